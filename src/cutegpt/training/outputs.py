"""What a run leaves: OUT/final (and best/) with tokenizer, model card and training record, summary.json,
loss.png, and the disk-use warning before a large run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cutegpt.io import atomic_dir, os_errors, put_in_place, write_json
from cutegpt.model.loading import save_tokenizer
from cutegpt.templates import write_model_card
from cutegpt.training.args import TrainArgs
from cutegpt.training.checkpoints import STAGING, barrier
from cutegpt.model.adapter_base import record_base
from cutegpt.training.prepare import Prepared



def say_disk_use(cfg: TrainArgs, model: Any) -> None:
    """Print how much the run will write when it is over 1 GB (checkpoints kept + final/ + best/)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    ckpt = trainable * 12  # weights (fp32) + AdamW m, v
    final = total * 2 if cfg.method == "full" else trainable * 4
    n_ckpt = cfg.save_total_limit + 1  # one more while the oldest is being rotated out
    need = ckpt * n_ckpt + final * (2 if cfg.keep_best else 1)
    if need > 1024 ** 3:
        print(f"this run will write about {need / 1024 ** 3:.1f} GB to {cfg.out}: up to {n_ckpt} checkpoints of "
              f"{ckpt / 1024 ** 3:.1f} GB (--save-total-limit {cfg.save_total_limit}) and final/ of {final / 1024 ** 3:.1f} GB"
              f"{' (and best/)' if cfg.keep_best else ''}.", flush=True)



def training_record(cfg: TrainArgs, model: Any = None) -> dict[str, Any]:
    """What final/ and best/ say about how they were trained (export and chat read the base from adapter_config,
    and check it against base_fingerprint: model/adapter_base.py)."""
    base_print = getattr(model, "cutegpt_base_fingerprint", None)
    return {"method": cfg.method, "base_model": record_base(cfg.model), "quantization": cfg.quantization,
            **({"base_fingerprint": base_print} if base_print else {}),
            **({"bnb_4bit_type": cfg.bnb_4bit_type, "double_quant": cfg.double_quant} if cfg.quantization == "4bit" else {}),
            "note": ("the adapter was trained on a quantized base; load or merge it onto the 16-bit base_model "
                     "(never onto dequantized weights)") if cfg.quantization != "none" else None}



def save_model_folder(trainer: Any, cfg: TrainArgs, prep: Prepared, precision: str, out: Path,
                      extra: dict[str, Any] | None = None) -> None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    with atomic_dir(out, overwrite=True) as tmp:
        if cfg.method == "full":
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            state = {k: v.to(dtype) for k, v in model.state_dict().items()}
            model.save_pretrained(tmp, state_dict=state)
        else:
            import warnings

            with warnings.catch_warnings():  # peft looks the recorded base name up as a folder or hub id; ours may be neither
                warnings.filterwarnings("ignore", message="Could not find a config file in")
                model.save_pretrained(tmp)
        save_tokenizer(prep.tokenizer, tmp, prep.template_name)
        write_model_card(tmp, prep.template_name)
        write_json(tmp / "cutegpt_training.json", training_record(cfg, model))
        for name, obj in (extra or {}).items():
            write_json(tmp / name, obj)



def save_final(trainer: Any, cfg: TrainArgs, prep: Prepared, precision: str) -> Path:
    """OUT/final: the adapter, or the model in 16 bits, with tokenizer and model card (atomic)."""
    out = Path(cfg.out) / "final"
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if zero3:  # every process takes part in gathering the sharded weights
        staging = Path(cfg.out) / STAGING / "final"
        with os_errors(out, "saving the final model"):
            trainer.save_model(str(staging))
            if trainer.is_world_process_zero():
                save_tokenizer(prep.tokenizer, staging, prep.template_name)
                write_model_card(staging, prep.template_name)
                write_json(staging / "cutegpt_training.json", training_record(cfg, trainer.accelerator.unwrap_model(trainer.model)))
                put_in_place(staging, out)
        barrier()
        return out
    if trainer.is_world_process_zero():
        save_model_folder(trainer, cfg, prep, precision, out)
    barrier()
    return out



def write_summary(trainer: Any, cfg: TrainArgs, final: Path, seconds: float, world: int, lr: float | None = None) -> dict[str, Any]:
    tokens = trainer.run_tokens()  # the whole run, resumed parts included
    seconds += trainer.seconds_before
    history = trainer.state.log_history
    curve = [[h["step"], h["loss"]] for h in history if "loss" in h]
    val_curve = [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h]
    summary = {
        "method": cfg.method,
        "quantization": cfg.quantization,
        "steps": trainer.state.global_step,
        "processes": world,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "final_loss": curve[-1][1] if curve else None,
        # how the loss was computed: on loss-bearing positions in chunks (training/loss.py), or transformers' full logits
        "loss_path": "chunked" if trainer.loss_use["batches"] else "full logits",
        "loss_curve": curve,
        "final": str(final),
    }
    if val_curve:
        best = min(val_curve, key=lambda c: c[1])
        summary.update(final_val_loss=val_curve[-1][1], best_val_loss=best[1], best_step=best[0], val_loss_curve=val_curve)
        if cfg.keep_best:
            summary["best"] = str(Path(cfg.out) / "best")
    if trainer.is_world_process_zero():
        write_json(Path(cfg.out) / "summary.json", summary)
        title = f"{Path(cfg.out).resolve().name} · {cfg.method}{' ' + cfg.quantization if cfg.quantization != 'none' else ''} · lr {lr:g}" if lr else None
        plot_loss(curve, Path(cfg.out) / "loss.png", val_curve, title)
        val = f", validation loss {summary['final_val_loss']:.4f} (best {summary['best_val_loss']:.4f} at step {summary['best_step']})" if val_curve else ""
        print(f"done: {summary['steps']} steps, {summary['tokens']} tokens in {summary['seconds']} s "
              f"({summary['tokens_per_second']} tokens/s), final loss {summary['final_loss']}{val}; saved {final}")
    return summary



def plot_loss(curve: list[list[float]], path: Path, val_curve: list[list[float]] | None = None, title: str | None = None) -> None:
    if not curve and not val_curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from cutegpt.io import atomic_file

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if curve:
        ax.plot([c[0] for c in curve], [c[1] for c in curve], label="training")
    if val_curve:
        ax.plot([c[0] for c in val_curve], [c[1] for c in val_curve], "o-", label="validation")
        ax.legend()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
