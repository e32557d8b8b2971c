"""DeepSpeed: read a config file, reconcile it with our settings, and run without a launcher.

The Trainer refuses a DeepSpeed file whose fixed values (batch size, learning
rate, betas, ...) differ from its own arguments. We move each fixed value into
our settings when the user did not set that setting, and write "auto" back,
so the original's files (configs/ds_lora_zero1.json) work as they are:

    file value  + flag unset   -> the file's value is used
    file value  + flag given   -> the flag wins (said in the log)

On a CPU the file's `optimizer` block is dropped (it would compile DeepSpeed's
fused Adam; torch's AdamW gives the same losses) and so is optimizer
and parameter offload (nothing to offload to).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from cutegpt.errors import CuteGPTError

log = logging.getLogger("cutegpt.training")


def read_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CuteGPTError(f"DeepSpeed config {path} does not exist.")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CuteGPTError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise CuteGPTError(f"{path}: a DeepSpeed config must be a JSON object.")
    return cfg


def _fixed(value: Any) -> bool:
    return value is not None and value != "auto"


def reconcile(ds: dict[str, Any], settings: dict[str, Any], on_cpu: bool, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (DeepSpeed dict for the Trainer, settings with the file's values filled in).

    `settings` keys: micro_batch, grad_accum, lr, warmup_steps, adam_betas,
    adam_eps, weight_decay, max_grad_norm, precision; None = not set by the user.
    """
    ds = copy.deepcopy(ds)
    s = dict(settings)

    def take(key: str, value: Any) -> None:
        if not _fixed(value):
            return
        if s.get(key) is None:
            s[key] = value
        elif s[key] != value:
            log.info("%s: %s=%s in the file, %s from the command line wins", source, key, value, s[key])

    take("micro_batch", ds.get("train_micro_batch_size_per_gpu"))
    take("grad_accum", ds.get("gradient_accumulation_steps"))
    take("max_grad_norm", ds.get("gradient_clipping"))
    opt = ds.get("optimizer", {}).get("params", {})
    sched = ds.get("scheduler", {})
    sched_params = sched.get("params", {})
    # with WarmupLR the schedule's ceiling, not the optimizer's lr, is the learning rate that is used
    take("lr", sched_params.get("warmup_max_lr") if _fixed(sched_params.get("warmup_max_lr")) else opt.get("lr"))
    take("warmup_steps", sched_params.get("warmup_num_steps"))
    betas = opt.get("betas")
    if _fixed(betas):
        take("adam_betas", list(betas))
    take("adam_eps", opt.get("eps"))
    take("weight_decay", opt.get("weight_decay"))
    for kind in ("bf16", "fp16"):
        if ds.get(kind, {}).get("enabled") is True and s.get("precision") in (None, "auto"):
            s["precision"] = kind

    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        if key in ds:
            ds[key] = "auto"
    for key in ("lr", "betas", "eps", "weight_decay"):
        if key in opt:
            opt[key] = "auto"
    for key in ("warmup_max_lr", "warmup_num_steps", "total_num_steps"):
        if key in sched_params:
            sched_params[key] = "auto"
    for kind in ("bf16", "fp16"):
        if kind in ds:
            ds[kind]["enabled"] = "auto"

    if on_cpu:
        if ds.pop("optimizer", None) is not None:
            log.info("%s: CPU run, using torch AdamW instead of the file's DeepSpeed optimizer", source)
        zero = ds.get("zero_optimization", {})
        for key in ("offload_optimizer", "offload_param"):
            if zero.pop(key, None) is not None:
                log.info("%s: CPU run, %s dropped (the model is already in CPU memory)", source, key)
        if ds.get("fp16", {}).get("enabled") not in (None, False):
            ds.pop("fp16")
    return ds, s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process_group_env() -> Iterator[None]:
    """A launcher's variables for one process, for the run only: DeepSpeed needs them (else it looks for mpi4py).

    Restored afterwards so that later child processes of the same Python (a notebook, a test run) do not
    believe they are rank 0 of a distributed job.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # a real launcher set them
        yield
        return
    import torch.distributed as dist

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    # transformers sets ACCELERATE_USE_DEEPSPEED=true for a DeepSpeed run: left behind, every later Trainer of this
    # Python (and its child processes) would start DeepSpeed too and fail for want of LOCAL_RANK
    accelerate = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    had_group = dist.is_available() and dist.is_initialized()
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    try:
        yield
    finally:
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # the one-process group DeepSpeed made for this run
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for k in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in accelerate]:
            del os.environ[k]
        os.environ.update(accelerate)
