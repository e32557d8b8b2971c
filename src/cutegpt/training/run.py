"""`train sft|pt` as a command: the memory plan, or the input checks and the run (no torch until it trains)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from cutegpt.errors import CuteGPTError


def run_training(cfg: Any, prepare: Callable[[Any, Callable[[int], None]], Any], data_help: str, stage: Any = None) -> int:
    """`train sft|pt`: with --plan, the memory plan from config.json alone (no torch, no weights); else check the
    inputs and train, `prepare(cfg, check_rows)` loading data and model (see training.engine.train)."""
    from cutegpt.training.launch import slurm_env

    slurm_env()  # an srun task becomes a torchrun-style process before anything reads RANK or WORLD_SIZE
    if cfg.method == "lora" and cfg.model is not None and not cfg.resume_lora:
        from cutegpt.model.architectures import check_lora_targets

        check_lora_targets(cfg.lora_targets, Path(cfg.model).expanduser() / "config.json")
    if cfg.plan:
        from cutegpt.training.plan import run_plan

        run_plan(cfg)
        return 0
    if not cfg.data:
        raise CuteGPTError(f"--data is required: {data_help}.")
    cfg.check_inputs()
    from cutegpt.training.engine import train

    train(cfg, lambda check_rows: prepare(cfg, check_rows), stage)
    import os

    import torch.distributed as dist

    # under torchrun or srun, close the process group before exit: left to the interpreter's teardown, gloo's threads
    # were once seen to abort a rank that had finished (SIGABRT, "terminate called without an active exception")
    if ("TORCHELASTIC_RUN_ID" in os.environ or "SLURM_STEP_NUM_TASKS" in os.environ) and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
