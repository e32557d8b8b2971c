"""Checkpoints and resume: which checkpoint-N folders are complete, whether every file a resume reads is safe and
intact, and whether a resumed run is the same run (its data and settings, recorded in each checkpoint).

Checkpoints are written to OUT/.staging/ and renamed into OUT only once every process has finished writing
(trainer.py), so a folder named checkpoint-N is complete by construction; `check_run` decides, before anything
loads, where a run starts and refuses what would destroy or mix runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cutegpt.errors import CuteGPTError
from cutegpt.io import data_fingerprint
from cutegpt.training.args import TrainArgs

log = logging.getLogger("cutegpt.training")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
RUN_FILE = "cutegpt_run.json"  # the data and settings a checkpoint was trained with (checked by --resume)



# Classes besides tensors and containers that real DeepSpeed ZeRO-1/2 optimizer states hold (checkpoints written by
# deepspeed 0.19 on CPU in fp32 and bf16; DynamicLossScaler is fp16's). DeepSpeed itself loads these files with
# weights_only=False, so this list, checked first, is all that stands between a crafted file and code execution.
DEEPSPEED_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                     ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                     ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                     ("deepspeed.utils.tensor_fragment", "fragment_address"))
PICKLED = (".pt", ".pth", ".bin", ".pkl", ".pickle")



def _deepspeed_globals() -> list[Any]:
    import importlib

    found = []
    for module, name in DEEPSPEED_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return found



def check_torch_file(path: Path, what: str, deepspeed: bool = False) -> None:
    """Open a .bin/.pt/.pth with weights_only=True (never anything else); one sentence naming it when it is refused.

    The allow-list is the Trainer's own (numpy's RNG state types), plus DeepSpeed's few classes for its own files.
    Tensors are memory-mapped, not read, so checking a large optimizer state costs little.
    """
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals(), torch.serialization.safe_globals(_deepspeed_globals() if deepspeed else []):
            # legacy (non-zip) files cannot be memory-mapped
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise CuteGPTError(f"{what}: {path} holds more than plain tensors (or is corrupt) and was refused unread.") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, TypeError, IndexError) as e:
        raise CuteGPTError(f"{what}: {path} is corrupt or truncated ({str(e).splitlines()[0][:120]}).") from None



def _looks_pickled(path: Path) -> bool:
    """A pickle (protocol 2+) or a zip archive (torch.save's format), whatever the file is called."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            head = f.read(4)
        return head[:1] == b"\x80" or head == b"PK\x03\x04"
    return False



def _files_under(root: Path) -> list[Path]:
    """Every file under `root` at any depth, through symbolic links too (each folder once)."""
    seen: set[str] = set()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        found.extend(Path(dirpath) / name for name in filenames)
    return sorted(found)



def complete_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders (renamed into place only when complete), oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]



def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a truncated, corrupt or hostile file), or None.

    Every file a resume could unpickle is checked, at any depth: the Trainer's (optimizer, scheduler, rng states)
    and DeepSpeed's (`global_stepN/*_states.pt`, loaded by DeepSpeed with weights_only=False), found by name or by
    content; `latest` must name a folder inside the checkpoint, since DeepSpeed loads from whatever it names.
    """
    from cutegpt.model.loading import _check_safetensors

    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return f"{ckpt / 'trainer_state.json'} has no step count"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return f"{ckpt / 'trainer_state.json'} is not valid JSON"
    latest = ckpt / "latest"
    if latest.exists():
        try:
            tag = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            tag = ""
        if not tag or tag in (".", "..") or "/" in tag or os.sep in tag or not (ckpt / tag).is_dir():
            return f"{latest} must name a DeepSpeed folder inside {ckpt.name}"
    for f in _files_under(ckpt):
        try:
            if f.suffix == ".safetensors":
                _check_safetensors([f])
            elif f == ckpt / "training_args.bin":  # the Trainer never reads that one
                continue
            elif f.suffix in PICKLED or _looks_pickled(f):
                check_torch_file(f, "--resume", deepspeed=f.parent != ckpt)
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



def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# Settings that decide what a run computes; a resume with other values would silently continue another run.
RUN_SETTINGS = ("method", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "modules_to_save", "quantization",
                "bnb_4bit_type", "double_quant", "lr", "micro_batch", "grad_accum", "lr_scheduler", "warmup_steps",
                "weight_decay", "adam_betas", "adam_eps", "max_grad_norm", "precision", "seed", "max_length",
                "val_ratio", "model", "template", "packing", "text_field", "deepspeed", "resume_lora")



STRUCTURAL = ("method", "lora_r", "lora_targets", "modules_to_save", "quantization", "model")  # the weights would not fit






def run_record(cfg: TrainArgs) -> dict[str, Any]:
    settings = {k: getattr(cfg, k) for k in RUN_SETTINGS if hasattr(cfg, k)}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
    return {"data": data_fingerprint(list(getattr(cfg, "data", []) or [])),
            "val_data": data_fingerprint([cfg.val_data]) if cfg.val_data else None,
            "settings": settings}



def run_progress(ckpt: Path | None) -> tuple[int, float]:
    """(tokens, seconds) the run had trained when `ckpt` was saved; (0, 0.0) for a new run or an older checkpoint."""
    if ckpt is None:
        return 0, 0.0
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        progress = json.loads((ckpt / RUN_FILE).read_text(encoding="utf-8")).get("progress") or {}
        return int(progress.get("tokens", 0)), float(progress.get("seconds", 0.0))
    return 0, 0.0



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
