"""The training engine shared by `train sft` and `train pt`: transformers Trainer + peft + deepspeed.

    cfg ──> prepare.py: tokenizer (+ <end> for full tuning) ──> load_for_training ──> LoRA / full
             checkpoints.py: check_run (where to start; refuse mixing runs)           │
    OUT/ <── checkpoint-N/ (atomic) <── trainer.py: CuteTrainer (NaN guard, tokens/s) <┘
         <── outputs.py: final/ + summary.json + loss.png; runs/ (TensorBoard)

This file only wires the parts together (`train`); imports go one way:
args <- checkpoints <- prepare <- outputs <- trainer <- engine (plan reads args only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cutegpt.errors import CuteGPTError
from cutegpt.threads import resolve_threads
from cutegpt.training.args import METHOD_DEFAULTS, TrainArgs
from cutegpt.training.checkpointing import checkpoint_kwargs, keep_matmuls_callback
from cutegpt.training.checkpoints import STAGING, check_run, clear_previous_run, run_progress, run_record
from cutegpt.training.outputs import save_final, say_disk_use, write_summary
from cutegpt.training.prepare import Prepared, base_model_path, quiet_deprecations, resolve_precision
from cutegpt.training.trainer import check_report_to, lm_validation_loss, make_callbacks, make_evaluator, make_trainer_class

log = logging.getLogger("cutegpt.training")



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



def train(cfg: TrainArgs, prepare: Callable[[Callable[[int], None]], Prepared], stage: "Stage | None" = None) -> dict[str, Any]:
    """Build the Trainer, train, save OUT/final, write summary.json and loss.png; returns the summary.

    `prepare(check_rows)` loads data and model; it calls `check_rows(len(dataset))` before the model loads, so a
    dataset too small for one optimizer step is refused without minutes of loading. `stage` is what the objective
    changes (arguments, trainer, validation, summary); None = SFT/PT's next-token loss.
    """
    stage = stage or Stage()
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
    from transformers import set_seed

    transformers.logging.set_verbosity_warning()
    threads = resolve_threads(cfg.threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # accelerate sets 2 threads unless OMP_NUM_THREADS says otherwise
    torch.set_num_threads(threads)
    report_to = check_report_to(cfg.report_to)
    record = run_record(cfg)
    record["settings"].update(stage.record(cfg))
    start_at = check_run(cfg, record)
    finished = (Path(cfg.out) / "final").is_dir() and (Path(cfg.out) / "summary.json").is_file()
    if start_at.complete and not finished:  # killed after its last checkpoint: resuming trains 0 steps, then writes them
        log.info("%s is at step %d but final/ or summary.json is missing: writing them from it", start_at.resume_from.name, start_at.step)
    if start_at.complete and finished:
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

        args = stage.arguments(cfg, dict(
            output_dir=str(cfg.out), per_device_train_batch_size=settings["micro_batch"],
            gradient_accumulation_steps=settings["grad_accum"], learning_rate=settings["lr"],
            lr_scheduler_type=cfg.lr_scheduler, warmup_steps=warmup, weight_decay=settings["weight_decay"],
            adam_beta1=settings["adam_betas"][0], adam_beta2=settings["adam_betas"][1], adam_epsilon=settings["adam_eps"],
            max_grad_norm=settings["max_grad_norm"], num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
            bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not on_gpu,
            logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
            report_to=report_to, seed=cfg.seed, data_seed=cfg.seed, remove_unused_columns=False,
            **({"gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": checkpoint_kwargs(cfg.checkpoint_every)}
               if cfg.gradient_checkpointing else {}),
            deepspeed=ds_dict, disable_tqdm=True, dataloader_num_workers=0, ddp_find_unused_parameters=False,
            log_level="warning",
        ))
        from transformers.trainer_callback import PrinterCallback

        with quiet_deprecations():
            trainer = stage.trainer(cfg, prep, args, record)
        trainer.remove_callback(PrinterCallback)
        torch.set_num_threads(threads)
        callbacks = make_callbacks(lambda: trainer.tokens_seen, world)
        if cfg.gradient_checkpointing and cfg.checkpoint_keep == "matmuls":
            callbacks.append(keep_matmuls_callback())
        if prep.val_dataset is not None:
            callbacks.append(stage.evaluator(trainer, cfg, prep, settings["micro_batch"], precision))
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
        trainer.tokens_before, trainer.seconds_before = run_progress(resume_from)
        start = trainer.started = time.perf_counter()
        try:
            with quiet_deprecations():
                if start_at.complete:  # nothing to train (the Trainer would take one step more): the last checkpoint's weights
                    from transformers.trainer_callback import TrainerState

                    trainer._load_from_checkpoint(str(resume_from))
                    trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
                else:
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
        stage.before_final(trainer)
        final = save_final(trainer, cfg, prep, precision)
        return stage.finish(trainer, cfg, write_summary(trainer, cfg, final, seconds, world, settings["lr"]))


class Stage:
    """What an objective changes in the engine; this default is SFT/PT's next-token loss (training/dpo.py: DPO)."""

    def record(self, cfg: TrainArgs) -> dict[str, Any]:
        """Settings beyond RUN_SETTINGS that a --resume must find unchanged."""
        return {}

    def arguments(self, cfg: TrainArgs, kwargs: dict[str, Any]) -> Any:
        from transformers import TrainingArguments

        return TrainingArguments(**kwargs)

    def trainer(self, cfg: TrainArgs, prep: Prepared, args: Any, record: dict[str, Any]) -> Any:
        from cutegpt.training.data import PackedCollator

        return make_trainer_class()(
            model=prep.model, args=args, train_dataset=prep.dataset, processing_class=prep.tokenizer,
            data_collator=PackedCollator(pad_id=_pad_id(prep.tokenizer)), template_name=prep.template_name,
            keep_checkpoints=cfg.save_total_limit, run_record=record,
            fused_loss=os.environ.get("CUTEGPT_FULL_LOGITS") != "1")  # the env switch exists for the before/after benchmark

    def evaluator(self, trainer: Any, cfg: TrainArgs, prep: Prepared, micro_batch: int, precision: str) -> Any:
        return make_evaluator(trainer, cfg, prep, precision, lm_validation_loss(trainer, prep, micro_batch, precision))

    def before_final(self, trainer: Any) -> None:
        pass

    def finish(self, trainer: Any, cfg: TrainArgs, summary: dict[str, Any]) -> dict[str, Any]:
        return summary



def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0



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
