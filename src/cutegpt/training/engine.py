"""The training engine shared by `train sft` and `train pt`: transformers Trainer + peft + deepspeed.

    cfg ──> tokenizer (+ <end> for full tuning) ──> dataset check ──> load_model ──> LoRA / full
                                                                                      │
    OUT/ <── checkpoint-N/ (atomic) <── CuteTrainer (NaN guard, tokens/s) <───────────┘
         <── final/ + summary.json + loss.png + runs/ (TensorBoard)

What we add to the Trainer: checkpoints written to `OUT/.staging/` and renamed
once every process has finished writing (so `--resume` never meets half a
checkpoint), a stop with a clear message when the loss is not finite, the
model card that lets `cutegpt chat` load a checkpoint with no other flag, and
a progress bar with tokens per second.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from cutegpt.errors import CuteGPTError
from cutegpt.threads import resolve_threads
from cutegpt.io import atomic_dir, write_json
from cutegpt.model.loading import save_tokenizer
from cutegpt.templates import CUTEGPT_STOP, add_stop_token, write_model_card
from cutegpt.training.args import METHOD_DEFAULTS, TrainArgs

log = logging.getLogger("cutegpt.training")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"


# ---------------------------------------------------------------- model and tokenizer

def base_model_path(cfg: TrainArgs) -> Path:
    if cfg.model is None:
        from cutegpt.model.embedded import embedded_model_dir

        return embedded_model_dir()
    return Path(cfg.model).expanduser()


def training_tokenizer(cfg: TrainArgs, template_name: str | None) -> Any:
    """The tokenizer the run trains with (the adapter's when continuing one; `<end>` added for full tuning)."""
    from cutegpt.model.loading import _has_tokenizer, load_tokenizer

    path = base_model_path(cfg)
    if path.suffix == ".gguf":
        raise CuteGPTError(f"{path}: training needs a model folder, not a GGUF file; convert it first (load it once with `cutegpt chat --model` and save).")
    if cfg.resume_lora and _has_tokenizer(Path(cfg.resume_lora)):
        path = Path(cfg.resume_lora)
    if not path.exists():
        raise CuteGPTError(f"model path {path} does not exist.")
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    if cfg.method == "full" and template_name == "cutegpt":
        add_stop_token(tokenizer)
    return tokenizer


def resize_for_tokenizer(model: Any, tokenizer: Any, std: float = 1e-6) -> int:
    """Grow the embeddings to the tokenizer; new rows (input and output) drawn from N(0, std) like the original."""
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return 0
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:].normal_(0.0, std)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not model.get_input_embeddings().weight:
            out.weight[old:].normal_(0.0, std)
    return len(tokenizer) - old


def load_for_training(cfg: TrainArgs, tokenizer: Any, template_name: str) -> Any:
    """Base model through the project's loader, then the adapter (or full training) set up."""
    from cutegpt.model.loading import ModelArgs, load_model

    if cfg.load_in_8bit:
        raise CuteGPTError("--load-in-8bit is not supported for training; train in bf16/fp32 (LoRA keeps memory low).")
    if cfg.lora and cfg.method == "lora" and not cfg.merge_lora:
        raise CuteGPTError(f"--lora {cfg.lora}: to continue training that adapter pass it as --resume-lora; "
                           "to train a new adapter on top of it add --merge-lora.")
    args = ModelArgs(model=cfg.model, lora=cfg.lora, template=template_name,
                     dtype="float32" if cfg.dtype == "auto" else cfg.dtype,  # fp32 master weights; autocast does bf16
                     device="cpu",  # the Trainer places the model (no device_map: it breaks DDP/DeepSpeed)
                     trust_remote_code=cfg.trust_remote_code, merge_lora=cfg.merge_lora)
    model = load_model(args).model
    model.config.use_cache = False  # restarting position ids separate samples only without a cache (FACTS.md)
    attn = pick_attention(cfg.attn_implementation)
    if attn and getattr(model.config, "_attn_implementation", None) != attn:
        model.set_attn_implementation(attn)
    added = resize_for_tokenizer(model, tokenizer)
    if added:
        log.info("added %d token(s) to the embeddings (%s)", added, CUTEGPT_STOP)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return attach_lora(model, cfg)


def pick_attention(name: str) -> str | None:
    if name != "auto":
        if name == "flash_attention_2" and not _has_flash_attn():
            raise CuteGPTError("--attn-implementation flash_attention_2 needs the flash-attn package and a CUDA GPU.")
        return name
    return "flash_attention_2" if torch.cuda.is_available() and _has_flash_attn() else "sdpa"


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def attach_lora(model: Any, cfg: TrainArgs) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.resume_lora:
        from cutegpt.model.loading import _check_adapter_folder

        _check_adapter_folder(Path(cfg.resume_lora))
        try:
            return PeftModel.from_pretrained(model, cfg.resume_lora, is_trainable=True)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise CuteGPTError(f"--resume-lora {cfg.resume_lora}: cannot load the adapter on this base model ({str(e).splitlines()[0][:300]}).") from None
    targets: Any = "all-linear" if cfg.lora_targets == ["all-linear"] else list(cfg.lora_targets)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=targets, modules_to_save=cfg.modules_to_save or None, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise CuteGPTError(f"--lora-targets {' '.join(cfg.lora_targets)}: {str(e).splitlines()[0][:300]}") from None


# ---------------------------------------------------------------- checkpoints

def complete_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders (renamed into place only when complete), oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class NonFiniteLoss(CuteGPTError):
    pass


def make_trainer_class():
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    class CuteTrainer(Trainer):
        """Trainer with atomic checkpoints, a NaN/inf guard and a count of trained tokens."""

        def __init__(self, *a: Any, template_name: str, keep_checkpoints: int | None = None, **kw: Any):
            super().__init__(*a, **kw)
            self.template_name = template_name
            self.keep_checkpoints = keep_checkpoints  # our rotation (the Trainer's would only see the staging folder)
            self.tokens_seen = 0  # real (non-padding) tokens this process trained on since start/resume
            self._staging: str | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            n_tokens = inputs.pop("n_tokens", 0)
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                step = self.state.global_step + 1
                good = complete_checkpoints(Path(self.args.output_dir))
                keep = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was saved yet"
                raise NonFiniteLoss(
                    f"the loss became {loss.item()} at step {step}; the run stopped before updating the weights and {keep} "
                    "(lower --lr, use --precision bf16 instead of fp16, or check the data, then --resume)."
                )
            self.tokens_seen += int(n_tokens)
            return loss

        def _get_output_dir(self, trial):
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            """Write into OUT/.staging/checkpoint-N, then rename into OUT once every process is done."""
            out = Path(self.args.output_dir)
            name = f"checkpoint-{self.state.global_step}"
            staging = out / STAGING
            if self.is_world_process_zero():
                shutil.rmtree(staging / name, ignore_errors=True)
                staging.mkdir(parents=True, exist_ok=True)
            _barrier()
            self._staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            if self.is_world_process_zero():
                save_tokenizer(self.processing_class, staging / name, self.template_name)  # adds tokenizer.model, which the Trainer drops
                write_model_card(staging / name, self.template_name)
            _barrier()
            if self.is_world_process_zero():
                final = out / name
                if final.exists():  # saved again at the same step (epoch end == save step)
                    shutil.rmtree(final)
                os.replace(staging / name, final)
                rotate_checkpoints(str(out), save_total_limit=self.keep_checkpoints, use_mtime=False)
            _barrier()

    return CuteTrainer


# ---------------------------------------------------------------- callbacks

def make_callbacks(tokens: Callable[[], int], world: int) -> list[Any]:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One bar: loss, learning rate and trained tokens per second (all processes)."""

        bar = None
        start = 0.0

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is None or not logs or "loss" not in logs:
                return
            rate = tokens() * world / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}", tok_s=f"{rate:.0f}")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    class SaveAtEpochEnd(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kw):
            control.should_save = True

    return [Progress(), SaveAtEpochEnd()]


# ---------------------------------------------------------------- running

def resolve_precision(name: str) -> str:
    if name != "auto":
        if name == "fp16" and not torch.cuda.is_available():
            raise CuteGPTError("--precision fp16 needs a GPU; on a CPU use bf16 or fp32.")
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


@dataclass
class Prepared:
    """What a command hands the engine: the model, tokenizer, rows and the template name for the model card."""

    model: Any
    tokenizer: Any
    dataset: Any
    template_name: str


def check_output(cfg: TrainArgs) -> Path | None:
    """The checkpoint to resume from, or None; refuses to train over an earlier run by accident."""
    out = Path(cfg.out)
    done = complete_checkpoints(out)
    if cfg.resume:
        if not done:
            log.warning("--resume: %s has no complete checkpoint; starting from the beginning", out)
            return None
        return done[-1]
    if done:
        raise CuteGPTError(f"{out} already holds checkpoints ({done[-1].name}); pass --resume to continue that run or choose another --out.")
    return None


def train(cfg: TrainArgs, prepare: Callable[[], Prepared]) -> dict[str, Any]:
    """Build the Trainer, train, save OUT/final, write summary.json and loss.png; returns the summary."""
    import transformers
    from transformers import TrainingArguments, set_seed

    from cutegpt.training.data import PackedCollator
    from cutegpt.training.ds_config import ensure_process_group_env, read_ds_config, reconcile

    transformers.logging.set_verbosity_warning()
    setup_logging()
    threads = resolve_threads(cfg.threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # accelerate sets 2 threads unless OMP_NUM_THREADS says otherwise
    torch.set_num_threads(threads)
    resume_from = check_output(cfg)
    on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    settings = {k: getattr(cfg, k) for k in ("micro_batch", "grad_accum", "lr", "warmup_steps", "adam_eps",
                                               "weight_decay", "max_grad_norm", "precision")}
    settings["adam_betas"] = list(cfg.adam_betas)
    ds_dict = None
    if cfg.deepspeed:
        ds_dict, settings = reconcile(read_ds_config(cfg.deepspeed), settings, on_cpu=not on_gpu, source=cfg.deepspeed)
        ensure_process_group_env()
    defaults = METHOD_DEFAULTS[cfg.method]
    for key in ("micro_batch", "grad_accum", "lr"):
        if settings[key] is None:
            settings[key] = defaults[key]
    precision = resolve_precision(settings["precision"])
    world = int(os.environ.get("WORLD_SIZE", "1"))

    set_seed(cfg.seed)  # before the adapter is created: its init must be the same in every process and run
    prep = prepare()
    per_epoch = math.ceil(len(prep.dataset) / (settings["micro_batch"] * world)) // settings["grad_accum"]
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(per_epoch * cfg.epochs))
    warmup = settings["warmup_steps"] if settings["warmup_steps"] is not None else min(300, int(0.03 * total))

    args = TrainingArguments(
        output_dir=str(cfg.out), per_device_train_batch_size=settings["micro_batch"],
        gradient_accumulation_steps=settings["grad_accum"], learning_rate=settings["lr"],
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=warmup, weight_decay=settings["weight_decay"],
        adam_beta1=settings["adam_betas"][0], adam_beta2=settings["adam_betas"][1], adam_epsilon=settings["adam_eps"],
        max_grad_norm=settings["max_grad_norm"], num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not on_gpu,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        report_to=["tensorboard"], seed=cfg.seed, data_seed=cfg.seed, remove_unused_columns=False,
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if cfg.gradient_checkpointing else {}),
        deepspeed=ds_dict, disable_tqdm=True, dataloader_num_workers=0, ddp_find_unused_parameters=False,
        log_level="warning",
    )
    from transformers.trainer_callback import PrinterCallback

    trainer = make_trainer_class()(
        model=prep.model, args=args, train_dataset=prep.dataset, processing_class=prep.tokenizer,
        data_collator=PackedCollator(pad_id=_pad_id(prep.tokenizer)), template_name=prep.template_name,
        keep_checkpoints=cfg.save_total_limit)
    trainer.remove_callback(PrinterCallback)
    torch.set_num_threads(threads)
    callbacks = make_callbacks(lambda: trainer.tokens_seen, world)
    for cb in callbacks:
        trainer.add_callback(cb)
    if trainer.is_world_process_zero():
        shutil.rmtree(Path(cfg.out) / STAGING, ignore_errors=True)  # leftovers of a killed run
        log.info("training %s: %d rows, %d steps, micro-batch %d x accumulation %d x %d process(es), lr %g, %s%s",
                 cfg.method, len(prep.dataset), total, settings["micro_batch"], settings["grad_accum"], world,
                 settings["lr"], precision, f", resuming from {resume_from}" if resume_from else "")
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError:
        raise CuteGPTError(
            f"out of GPU memory (micro-batch {settings['micro_batch']}, max length {cfg.max_length}); lower --micro-batch "
            "(raise --grad-accum to keep the batch), lower --max-length, add --gradient-checkpointing, use --method lora, "
            "or a DeepSpeed config with ZeRO-2/3 and CPU offload (configs/)."
        ) from None
    finally:
        if callbacks[0].bar is not None:  # a stopped run (NaN, Ctrl-C) leaves no dangling bar
            callbacks[0].bar.close()
    seconds = time.perf_counter() - start
    if trainer.is_world_process_zero():
        shutil.rmtree(Path(cfg.out) / STAGING, ignore_errors=True)
    final = save_final(trainer, cfg, prep, precision)
    return write_summary(trainer, cfg, final, seconds, world)


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def save_final(trainer: Any, cfg: TrainArgs, prep: Prepared, precision: str) -> Path:
    """OUT/final: the adapter, or the model in 16 bits, with tokenizer and model card (atomic)."""
    out = Path(cfg.out) / "final"
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if zero3:  # every process takes part in gathering the sharded weights
        staging = Path(cfg.out) / STAGING / "final"
        trainer.save_model(str(staging))
        if trainer.is_world_process_zero():
            save_tokenizer(prep.tokenizer, staging, prep.template_name)
            write_model_card(staging, prep.template_name)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(staging, out)
        _barrier()
        return out
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        with atomic_dir(out, overwrite=True) as tmp:
            if cfg.method == "full":
                dtype = torch.float16 if precision == "fp16" else torch.bfloat16
                model = model.to(dtype)
            model.save_pretrained(tmp)
            save_tokenizer(prep.tokenizer, tmp, prep.template_name)
            write_model_card(tmp, prep.template_name)
    _barrier()
    return out


def write_summary(trainer: Any, cfg: TrainArgs, final: Path, seconds: float, world: int) -> dict[str, Any]:
    tokens = torch.tensor([trainer.tokens_seen], dtype=torch.long)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tokens = tokens.to(trainer.args.device)  # nccl needs a GPU tensor
        torch.distributed.all_reduce(tokens)  # sum over processes
    history = trainer.state.log_history
    curve = [[h["step"], h["loss"]] for h in history if "loss" in h]
    summary = {
        "method": cfg.method,
        "steps": trainer.state.global_step,
        "processes": world,
        "tokens": int(tokens.item()),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(int(tokens.item()) / max(seconds, 1e-9), 1),
        "final_loss": curve[-1][1] if curve else None,
        "loss_curve": curve,
        "final": str(final),
    }
    if trainer.is_world_process_zero():
        write_json(Path(cfg.out) / "summary.json", summary)
        plot_loss(curve, Path(cfg.out) / "loss.png")
        print(f"done: {summary['steps']} steps, {summary['tokens']} tokens in {summary['seconds']} s "
              f"({summary['tokens_per_second']} tokens/s), final loss {summary['final_loss']}; saved {final}")
    return summary


def plot_loss(curve: list[list[float]], path: Path) -> None:
    if not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cutegpt.io import atomic_file

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c[0] for c in curve], [c[1] for c in curve])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def setup_logging() -> None:
    """Our INFO lines on stderr, from the first process only."""
    if log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("cutegpt: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    log.propagate = False
