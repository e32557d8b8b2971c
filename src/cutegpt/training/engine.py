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

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from cutegpt.errors import CuteGPTError
from cutegpt.threads import resolve_threads
from cutegpt.io import atomic_dir, os_errors, put_in_place, write_json
from cutegpt.model.loading import save_tokenizer
from cutegpt.templates import CUTEGPT_STOP, add_stop_token, write_model_card
from cutegpt.training.args import METHOD_DEFAULTS, TrainArgs, training_weight_dtype

log = logging.getLogger("cutegpt.training")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
RUN_FILE = "cutegpt_run.json"  # the data and settings a checkpoint was trained with (checked by --resume)


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

    if cfg.lora and cfg.method == "lora" and not cfg.merge_lora:
        raise CuteGPTError(f"--lora {cfg.lora}: to continue training that adapter pass it as --resume-lora; "
                           "to train a new adapter on top of it add --merge-lora.")
    args = ModelArgs(model=cfg.model, lora=cfg.lora, template=template_name,
                     dtype=training_weight_dtype(cfg.method, resolve_precision(cfg.precision), cfg.dtype),
                     device="cpu",  # the Trainer places the model (no device_map: it breaks DDP/DeepSpeed)
                     trust_remote_code=cfg.trust_remote_code, merge_lora=cfg.merge_lora)
    if cfg.quantization != "none":
        model = load_quantized(cfg)
    else:
        model = load_model(args).model
    model.config.use_cache = False  # restarting position ids separate samples only without a cache (tests/training/test_data.py)
    attn = pick_attention(cfg.attn_implementation)
    if attn == "sdpa" and cfg.attn_implementation == "auto" and not getattr(model, "_supports_sdpa", True):
        attn = "eager"  # transformers has no sdpa path for some architectures (Gemma 2's soft-capped attention)
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


def load_quantized(cfg: TrainArgs) -> Any:
    """The frozen base in 4 bits (NF4/FP4) or 8 bits with bitsandbytes, prepared for k-bit training by peft."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from cutegpt.model.loading import _check_model_folder

    path = base_model_path(cfg)
    if path.suffix == ".gguf":
        raise CuteGPTError(f"--quantization {cfg.quantization} needs a model folder, not a GGUF file; convert it first.")
    if cfg.lora:
        raise CuteGPTError(f"--quantization {cfg.quantization} trains on the 16-bit base: merge --lora {cfg.lora} into a model folder first (cutegpt export).")
    _check_model_folder(path)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise CuteGPTError(f"--quantization {cfg.quantization} needs bitsandbytes: pip install 'bitsandbytes>=0.45'.") from None
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a cast note on every matmul on CPU
    compute = torch.bfloat16 if resolve_precision(cfg.precision) == "bf16" else torch.float32
    if cfg.quantization == "4bit":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_type,
                               bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute,
                               bnb_4bit_quant_storage=torch.uint8)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=q, dtype=torch.float32,
                                                     device_map={"": local if on_gpu else "cpu"},
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CuteGPTError(f"{path}: cannot load the model in {cfg.quantization} ({str(e).splitlines()[0][:300]}).") from None
    from peft import prepare_model_for_kbit_training

    with quiet_deprecations():
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@contextlib.contextmanager
def quiet_deprecations():
    """peft reads `model.is_gradient_checkpointing`, deprecated in transformers 5 (not ours to fix; not the user's to see)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


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

        folder = Path(cfg.resume_lora)
        _check_adapter_folder(folder)
        for f in folder.glob("*.bin"):
            check_torch_file(f, "--resume-lora")
        try:
            with quiet_deprecations():
                return trainable_in_fp32(PeftModel.from_pretrained(model, cfg.resume_lora, is_trainable=True))
        except pickle.UnpicklingError:
            raise CuteGPTError(f"--resume-lora {cfg.resume_lora}: the adapter weights are not a plain tensor file (refused unread).") from None
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise CuteGPTError(f"--resume-lora {cfg.resume_lora}: cannot load the adapter on this base model ({str(e).splitlines()[0][:300]}).") from None
    check_module_names(model, cfg)
    targets: Any = "all-linear" if cfg.lora_targets == ["all-linear"] else list(cfg.lora_targets)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=targets, modules_to_save=cfg.modules_to_save or None, task_type="CAUSAL_LM")
    try:
        with quiet_deprecations():
            return trainable_in_fp32(get_peft_model(model, lora))
    except ValueError as e:
        raise CuteGPTError(f"--lora-targets {' '.join(cfg.lora_targets)}: {str(e).splitlines()[0][:300]}") from None


def trainable_in_fp32(model: Any) -> Any:
    """Trained weights in float32 over a 16-bit frozen base: AdamW updates of 16-bit weights lose small steps, and
    fp16's gradient scaler refuses fp16 gradients. peft upcasts the adapter itself, not `--modules-to-save` copies."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def check_module_names(model: Any, cfg: TrainArgs) -> None:
    """A misspelled --lora-targets / --modules-to-save name is one sentence listing the model's names."""
    linear: set[str] = set()
    top: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not leaf or leaf.isdigit():
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            linear.add(leaf)
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            top.add(leaf)
    if cfg.lora_targets != ["all-linear"]:
        bad = [t for t in cfg.lora_targets if t not in linear]
        if bad:
            raise CuteGPTError(f"--lora-targets {' '.join(bad)}: no such linear layer in this model; valid names: "
                               f"{' '.join(sorted(linear))} (or all-linear).")
    bad = [m for m in (cfg.modules_to_save or []) if m not in top]
    if bad:
        raise CuteGPTError(f"--modules-to-save {' '.join(bad)}: no such module in this model; valid names: {' '.join(sorted(top))}.")


def check_torch_file(path: Path, what: str) -> None:
    """Open a .bin/.pt/.pth with weights_only=True (never anything else); one sentence naming it when it is refused.

    The allow-list is the Trainer's own (numpy's RNG state types), exactly what it will load the file with.
    """
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CuteGPTError(f"{what}: {path} holds more than plain tensors (or is corrupt) and was refused unread.") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, TypeError, IndexError) as e:
        raise CuteGPTError(f"{what}: {path} is corrupt or truncated ({str(e).splitlines()[0][:120]}).") from None


# ---------------------------------------------------------------- checkpoints

def complete_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders (renamed into place only when complete), oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a truncated, corrupt or hostile file), or None."""
    from cutegpt.model.loading import _check_safetensors

    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return f"{ckpt / 'trainer_state.json'} has no step count"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return f"{ckpt / 'trainer_state.json'} is not valid JSON"
    for f in sorted(ckpt.iterdir()):
        try:
            if f.suffix == ".safetensors":
                _check_safetensors([f])
            elif f.suffix in (".pt", ".pth", ".bin") and f.name != "training_args.bin":  # the Trainer never reads that one
                check_torch_file(f, "--resume")
            elif f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
        except CuteGPTError as e:
            return str(e).rstrip(".")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return f"{f} is not valid JSON"
    return None


def resumable_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose files all read back; the ones skipped are named in the log."""
    done = complete_checkpoints(out)
    for ckpt in reversed(done):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("--resume: skipping %s (%s); falling back to the previous complete checkpoint", ckpt.name, problem)
    if done:
        raise CuteGPTError(f"--resume: no checkpoint in {out} can be read back ({checkpoint_problem(done[-1])}); "
                           "start again with --overwrite or another --out.")
    return None


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

        def __init__(self, *a: Any, template_name: str, keep_checkpoints: int | None = None,
                     run_record: dict[str, Any] | None = None, fused_loss: bool = True, **kw: Any):
            super().__init__(*a, **kw)
            self.template_name = template_name
            self.run_record = run_record
            self.loss_use = {"batches": 0}
            if fused_loss:
                from cutegpt.training import loss

                lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                if loss.supported(lm):
                    self.loss_use = loss.install(lm)
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
                with os_errors(out / name, "saving a checkpoint"):
                    super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            if self.is_world_process_zero():
                with os_errors(out / name, "saving a checkpoint"):
                    save_tokenizer(self.processing_class, staging / name, self.template_name)  # adds tokenizer.model, which the Trainer drops
                    write_model_card(staging / name, self.template_name)
                    if self.run_record is not None:
                        write_json(staging / name / RUN_FILE, self.run_record)
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
        """One bar: loss, validation loss, learning rate and trained tokens per second (all processes)."""

        bar = None
        start = 0.0
        shown: dict[str, str] = {}

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)
            self.start = time.perf_counter()
            self.shown = {}

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is None or not logs:
                return
            if "loss" in logs:
                rate = tokens() * world / max(time.perf_counter() - self.start, 1e-9)
                self.shown.update(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}", tok_s=f"{rate:.0f}")
            if "eval_loss" in logs:
                self.shown["val_loss"] = f"{logs['eval_loss']:.4f}"
            self.bar.set_postfix(self.shown)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    class SaveAtEpochEnd(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kw):
            control.should_save = True

    return [Progress(), SaveAtEpochEnd()]


def make_evaluator(trainer: Any, cfg: TrainArgs, prep: "Prepared", collator: Any, micro_batch: int, precision: str) -> Any:
    """Validation loss every --eval-steps and at the last step; --keep-best saves OUT/best when it is the lowest."""
    from transformers import TrainerCallback

    from cutegpt.training.validation import validation_loss

    every = cfg.eval_steps or cfg.save_steps
    best_file = Path(cfg.out) / "best" / "best.json"

    class Evaluate(TrainerCallback):
        best: float | None = None

        def on_train_begin(self, args, state, control, **kw):
            if cfg.keep_best and best_file.is_file():
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    self.best = float(json.loads(best_file.read_text())["eval_loss"])

        def on_step_end(self, args, state, control, **kw):
            step = state.global_step
            if step % every and step != state.max_steps:
                return
            loss = validation_loss(trainer.model, prep.val_dataset, collator, micro_batch, precision)
            should_log = control.should_log  # trainer.log clears it, which would drop this step's training loss
            trainer.log({"eval_loss": loss})
            control.should_log = should_log
            if cfg.keep_best and (self.best is None or loss < self.best):
                self.best = loss
                if trainer.is_world_process_zero():
                    save_model_folder(trainer, cfg, prep, precision, Path(cfg.out) / "best",
                                      extra={"best.json": {"step": step, "eval_loss": loss}})
                _barrier()

    return Evaluate()


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
    """What a command hands the engine: the model, tokenizer, rows, validation rows and the template name."""

    model: Any
    tokenizer: Any
    dataset: Any
    template_name: str
    val_dataset: Any = None


REPORTERS = {"tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
             "wandb": (("wandb",), "pip install wandb"), "mlflow": (("mlflow",), "pip install mlflow")}


def check_report_to(name: str) -> list[str]:
    import importlib.util

    if name == "none":
        return []
    modules, pip = REPORTERS[name]
    if not any(importlib.util.find_spec(m) for m in modules):
        raise CuteGPTError(f"--report-to {name} needs the {modules[0]} package: {pip} (or pass --report-to none).")
    return [name]


# Settings that decide what a run computes; a resume with other values would silently continue another run.
RUN_SETTINGS = ("method", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "modules_to_save", "quantization",
                "bnb_4bit_type", "double_quant", "lr", "micro_batch", "grad_accum", "lr_scheduler", "warmup_steps",
                "weight_decay", "adam_betas", "adam_eps", "max_grad_norm", "precision", "seed", "max_length",
                "val_ratio", "model", "template", "packing", "text_field", "deepspeed", "resume_lora")
STRUCTURAL = ("method", "lora_r", "lora_targets", "modules_to_save", "quantization", "model")  # the weights would not fit


def data_fingerprint(paths: list[str | None]) -> str:
    """A cheap digest of the data given: every file's relative name, size, and first and last MiB."""
    h = hashlib.sha256()
    for given in paths:
        if not given:
            continue
        root = Path(given)
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            if any(part.startswith(".") for part in f.relative_to(root).parts) if root.is_dir() else False:
                continue
            try:
                size = f.stat().st_size
                h.update(f"{f.relative_to(root) if root.is_dir() else f.name}:{size}".encode())
                with open(f, "rb") as fh:
                    h.update(fh.read(1 << 20))
                    if size > 2 << 20:
                        fh.seek(-(1 << 20), 2)
                        h.update(fh.read())
            except OSError:
                h.update(f"{f}:unreadable".encode())
    return h.hexdigest()[:16]


def run_record(cfg: TrainArgs) -> dict[str, Any]:
    settings = {k: getattr(cfg, k) for k in RUN_SETTINGS if hasattr(cfg, k)}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
    return {"data": data_fingerprint(list(getattr(cfg, "data", []) or [])),
            "val_data": data_fingerprint([cfg.val_data]) if cfg.val_data else None,
            "settings": settings}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def compare_runs(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(structural changes, other changes), each as '--flag OLD -> NEW'."""
    structural, other = [], []
    if old.get("data") != new.get("data"):
        other.append("--data (the files' contents differ)")
    if old.get("val_data") != new.get("val_data"):
        other.append("--val-data (the files' contents differ)")
    a, b = old.get("settings", {}), new.get("settings", {})
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            (structural if k in STRUCTURAL else other).append(f"{_flag(k)} {a.get(k)} -> {b.get(k)}")
    return structural, other


@dataclass
class Start:
    resume_from: Path | None
    complete: bool = False
    step: int = 0


def check_run(cfg: TrainArgs, record: dict[str, Any]) -> Start:
    """Decide where the run starts, before anything loads; refuse what would destroy or mix runs."""
    from cutegpt.io import check_output as check_out_path

    out = Path(cfg.out)
    inputs = [*(getattr(cfg, "data", []) or []), cfg.val_data, cfg.model, cfg.resume_lora, cfg.lora]
    check_out_path(out, inputs=inputs, overwrite=True)
    done = complete_checkpoints(out)
    earlier = [p.name for p in (out / "final", out / "summary.json") if p.exists()]
    if cfg.resume:
        ckpt = resumable_checkpoint(out)
        if ckpt is None:
            if earlier and not cfg.overwrite:
                raise CuteGPTError(f"--resume: {out} holds a finished run ({', '.join(earlier)}) but no checkpoint; "
                                   "pass --overwrite to train it again or choose another --out.")
            log.warning("--resume: %s has no complete checkpoint; starting from the beginning", out)
            return Start(None)
        with contextlib.suppress(OSError, ValueError):
            old = json.loads((ckpt / RUN_FILE).read_text(encoding="utf-8"))
            structural, other = compare_runs(old, record)
            if structural:
                raise CuteGPTError(f"--resume: {ckpt.name} was trained with other weights' settings ({'; '.join(structural)}); "
                                   "they cannot change within a run: restore them or start a new --out.")
            if other and not cfg.force:
                raise CuteGPTError(f"--resume: {ckpt.name} was trained with other data or settings ({'; '.join(other)}); "
                                   "restore them, or pass --force to continue anyway.")
            if other:
                log.warning("--resume --force: continuing although %s", "; ".join(other))
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        step, planned = int(state.get("global_step", 0)), int(state.get("max_steps", 0) or 0)
        target = cfg.max_steps if cfg.max_steps > 0 else planned
        if target and step >= target:
            return Start(ckpt, complete=True, step=step)
        return Start(ckpt, step=step)
    leftovers = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    if (done or earlier or leftovers) and not cfg.overwrite:
        what = ", ".join(earlier) or (done[-1].name if done else ", ".join(sorted(leftovers)[:3]))
        raise CuteGPTError(f"--out {out} already holds a run ({what}); pass --resume to continue it, "
                           "--overwrite to replace it (the old final/ stays until the new one is complete), or choose another --out.")
    return Start(None)


def clear_previous_run(out: Path) -> None:
    """With --overwrite: the old checkpoints and best/ go (final/ and summary.json are replaced only when complete)."""
    for p in complete_checkpoints(out) + [out / "best", out / STAGING]:
        shutil.rmtree(p, ignore_errors=True)
    for p in out.glob("checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)


def print_plan(cfg: TrainArgs, settings: dict[str, Any], precision: str, ds_dict: dict | None, world: int,
               on_gpu: bool, full: bool) -> Any:
    from cutegpt.training.plan import device_memory, estimate, format_plan, plan_input_from_args, read_shape

    path = base_model_path(cfg)
    if path.suffix == ".gguf":
        return None
    shape = read_shape(path)
    inp = plan_input_from_args(cfg, precision=precision, micro_batch=settings["micro_batch"], ds=ds_dict,
                               processes=world, device="cuda" if on_gpu else "cpu")
    plan = estimate(shape, inp)
    budget = cfg.device_memory_gb * 1024 ** 3 if cfg.device_memory_gb else device_memory(inp.device)
    text = format_plan(plan, budget, one_line=not full)
    if full:
        print(text)
    else:
        log.info("%s", text)
    return plan


def train(cfg: TrainArgs, prepare: Callable[[Callable[[int], None]], Prepared]) -> dict[str, Any]:
    """Build the Trainer, train, save OUT/final, write summary.json and loss.png; returns the summary.

    `prepare(check_rows)` loads data and model; it calls `check_rows(len(dataset))` before the model loads, so a
    dataset too small for one optimizer step is refused without minutes of loading.
    """
    from cutegpt.training.ds_config import process_group_env, read_ds_config, reconcile

    setup_logging()
    on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    settings = {k: getattr(cfg, k) for k in ("micro_batch", "grad_accum", "lr", "warmup_steps", "adam_eps",
                                               "weight_decay", "max_grad_norm", "precision")}
    settings["adam_betas"] = list(cfg.adam_betas)
    ds_dict = None
    if cfg.deepspeed:
        ds_dict, settings = reconcile(read_ds_config(cfg.deepspeed), settings, on_cpu=not on_gpu, source=cfg.deepspeed)
    defaults = METHOD_DEFAULTS[cfg.method]
    for key in ("micro_batch", "grad_accum", "lr"):
        if settings[key] is None:
            settings[key] = defaults[key]
    precision = resolve_precision(settings["precision"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.plan:
        plan = print_plan(cfg, settings, precision, ds_dict, world, on_gpu, full=True)
        return {"plan": {k: v for k, v in (plan.parts.items() if plan else [])}, "peak": plan.peak if plan else None}

    import transformers
    from transformers import TrainingArguments, set_seed

    from cutegpt.training.data import PackedCollator

    transformers.logging.set_verbosity_warning()
    threads = resolve_threads(cfg.threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # accelerate sets 2 threads unless OMP_NUM_THREADS says otherwise
    torch.set_num_threads(threads)
    report_to = check_report_to(cfg.report_to)
    record = run_record(cfg)
    start_at = check_run(cfg, record)
    if start_at.complete:
        msg = (f"{cfg.out} is already complete: {start_at.resume_from.name} is at step {start_at.step} "
               f"(--max-steps {cfg.max_steps if cfg.max_steps > 0 else start_at.step}); nothing to train, final/ and summary.json left as they are.")
        print(msg)
        summary_path = Path(cfg.out) / "summary.json"
        with contextlib.suppress(OSError, ValueError):
            return json.loads(summary_path.read_text(encoding="utf-8"))
        return {"steps": start_at.step, "complete": True}
    resume_from = start_at.resume_from
    with process_group_env() if cfg.deepspeed else contextlib.nullcontext():
        with contextlib.suppress(CuteGPTError, OSError):
            print_plan(cfg, settings, precision, ds_dict, world, on_gpu, full=False)

        rows_per_step = settings["micro_batch"] * world * settings["grad_accum"]

        def check_rows(rows: int) -> None:
            if cfg.max_steps <= 0 and rows * cfg.epochs < rows_per_step:
                raise CuteGPTError(f"--epochs {cfg.epochs:g} covers {rows * cfg.epochs:.1f} of {rows} rows, less than one optimizer "
                                   f"step ({rows_per_step} rows = micro-batch x accumulation x processes); raise --epochs or use --max-steps.")

        set_seed(cfg.seed)  # before the adapter is created: its init must be the same in every process and run
        prep = prepare(check_rows)
        check_rows(len(prep.dataset))
        per_epoch = math.ceil(len(prep.dataset) / (settings["micro_batch"] * world)) // settings["grad_accum"]
        total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(per_epoch * cfg.epochs))
        warmup = settings["warmup_steps"] if settings["warmup_steps"] is not None else min(300, int(0.03 * total))
        say_disk_use(cfg, prep.model)

        args = TrainingArguments(
            output_dir=str(cfg.out), per_device_train_batch_size=settings["micro_batch"],
            gradient_accumulation_steps=settings["grad_accum"], learning_rate=settings["lr"],
            lr_scheduler_type=cfg.lr_scheduler, warmup_steps=warmup, weight_decay=settings["weight_decay"],
            adam_beta1=settings["adam_betas"][0], adam_beta2=settings["adam_betas"][1], adam_epsilon=settings["adam_eps"],
            max_grad_norm=settings["max_grad_norm"], num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
            bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not on_gpu,
            logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
            report_to=report_to, seed=cfg.seed, data_seed=cfg.seed, remove_unused_columns=False,
            **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
               if cfg.gradient_checkpointing else {}),
            deepspeed=ds_dict, disable_tqdm=True, dataloader_num_workers=0, ddp_find_unused_parameters=False,
            log_level="warning",
        )
        from transformers.trainer_callback import PrinterCallback

        collator = PackedCollator(pad_id=_pad_id(prep.tokenizer))
        with quiet_deprecations():
            trainer = make_trainer_class()(
                model=prep.model, args=args, train_dataset=prep.dataset, processing_class=prep.tokenizer,
                data_collator=collator, template_name=prep.template_name,
                keep_checkpoints=cfg.save_total_limit, run_record=record,
                fused_loss=os.environ.get("CUTEGPT_FULL_LOGITS") != "1")  # the env switch exists for the before/after benchmark
        trainer.remove_callback(PrinterCallback)
        torch.set_num_threads(threads)
        callbacks = make_callbacks(lambda: trainer.tokens_seen, world)
        if prep.val_dataset is not None:
            callbacks.append(make_evaluator(trainer, cfg, prep, collator, settings["micro_batch"], precision))
        for cb in callbacks:
            trainer.add_callback(cb)
        if trainer.is_world_process_zero():
            if cfg.overwrite and not resume_from:
                clear_previous_run(Path(cfg.out))
            shutil.rmtree(Path(cfg.out) / STAGING, ignore_errors=True)  # leftovers of a killed run
            val = f", {len(prep.val_dataset)} validation rows" if prep.val_dataset is not None else ""
            log.info("training %s%s: %d rows%s, %d steps, micro-batch %d x accumulation %d x %d process(es), lr %g, %s%s",
                     cfg.method, f" on a {cfg.quantization} base" if cfg.quantization != "none" else "", len(prep.dataset), val,
                     total, settings["micro_batch"], settings["grad_accum"], world,
                     settings["lr"], precision, f", resuming from {resume_from}" if resume_from else "")
        start = time.perf_counter()
        try:
            with quiet_deprecations():
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except torch.OutOfMemoryError:
            raise CuteGPTError(
                f"out of GPU memory (micro-batch {settings['micro_batch']}, max length {cfg.max_length}); lower --micro-batch "
                "(raise --grad-accum to keep the batch), lower --max-length, add --gradient-checkpointing, use --method lora, "
                "--quantization 4bit, or a DeepSpeed config with ZeRO-2/3 and CPU offload (configs/); --plan shows the budget."
            ) from None
        finally:
            if callbacks[0].bar is not None:  # a stopped run (NaN, Ctrl-C) leaves no dangling bar
                callbacks[0].bar.close()
        seconds = time.perf_counter() - start
        if trainer.is_world_process_zero():
            shutil.rmtree(Path(cfg.out) / STAGING, ignore_errors=True)
        final = save_final(trainer, cfg, prep, precision)
        return write_summary(trainer, cfg, final, seconds, world, settings["lr"])


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


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def training_record(cfg: TrainArgs) -> dict[str, Any]:
    """What final/ and best/ say about how they were trained (export and chat read the base from adapter_config)."""
    return {"method": cfg.method, "base_model": str(base_model_path(cfg)), "quantization": cfg.quantization,
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
            model.save_pretrained(tmp)
        save_tokenizer(prep.tokenizer, tmp, prep.template_name)
        write_model_card(tmp, prep.template_name)
        write_json(tmp / "cutegpt_training.json", training_record(cfg))
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
                write_json(staging / "cutegpt_training.json", training_record(cfg))
                put_in_place(staging, out)
        _barrier()
        return out
    if trainer.is_world_process_zero():
        save_model_folder(trainer, cfg, prep, precision, out)
    _barrier()
    return out


def write_summary(trainer: Any, cfg: TrainArgs, final: Path, seconds: float, world: int, lr: float | None = None) -> dict[str, Any]:
    tokens = torch.tensor([trainer.tokens_seen], dtype=torch.long)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tokens = tokens.to(trainer.args.device)  # nccl needs a GPU tensor
        torch.distributed.all_reduce(tokens)  # sum over processes
    history = trainer.state.log_history
    curve = [[h["step"], h["loss"]] for h in history if "loss" in h]
    val_curve = [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h]
    summary = {
        "method": cfg.method,
        "quantization": cfg.quantization,
        "steps": trainer.state.global_step,
        "processes": world,
        "tokens": int(tokens.item()),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(int(tokens.item()) / max(seconds, 1e-9), 1),
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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a handler made once must not keep a replaced stream)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging() -> None:
    """Our INFO lines on stderr, from the first process only."""
    if log.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("cutegpt: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    log.propagate = False
