"""The transformers Trainer as we run it: atomic checkpoints, a NaN/inf guard, a count of trained tokens, the
progress bar, a save at each epoch end, and the validation callback (--eval-steps, --keep-best).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cutegpt.errors import CuteGPTError
from cutegpt.io import os_errors, write_json
from cutegpt.model.loading import save_tokenizer
from cutegpt.templates import write_model_card
from cutegpt.training.args import TrainArgs
from cutegpt.training.checkpoints import RUN_FILE, STAGING, barrier, complete_checkpoints
from cutegpt.training.outputs import save_model_folder
from cutegpt.training.prepare import Prepared



class NonFiniteLoss(CuteGPTError):
    pass



def make_trainer_class(base: Any = None):
    """Our Trainer on top of `base` (transformers' Trainer, or one of trl's trainers for preference tuning)."""
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    class CuteTrainer(base or Trainer):
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
            # the part of the run before a resume (from the checkpoint's RUN_FILE), so summary.json counts the whole run
            self.tokens_before, self.seconds_before = 0, 0.0
            self.started = time.perf_counter()
            self._staging: str | None = None

        def run_tokens(self) -> int:
            """Tokens of the whole run so far, over every process (a collective: every process calls it)."""
            tokens = torch.tensor([self.tokens_seen], dtype=torch.long)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                tokens = tokens.to(self.args.device)  # nccl needs a GPU tensor
                torch.distributed.all_reduce(tokens)  # sum over processes
            return int(tokens.item()) + self.tokens_before

        def run_seconds(self) -> float:
            return self.seconds_before + time.perf_counter() - self.started

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
            barrier()
            self._staging = str(staging)
            progress = {"tokens": self.run_tokens(), "seconds": round(self.run_seconds(), 2)}
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
                        write_json(staging / name / RUN_FILE, {**self.run_record, "progress": progress})
            barrier()
            if self.is_world_process_zero():
                final = out / name
                if final.exists():  # saved again at the same step (epoch end == save step)
                    shutil.rmtree(final)
                os.replace(staging / name, final)
                rotate_checkpoints(str(out), save_total_limit=self.keep_checkpoints, use_mtime=False)
            barrier()

    return CuteTrainer



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
            if "rewards/accuracies" in logs:  # preference tuning (train dpo)
                self.shown["reward_acc"] = f"{logs['rewards/accuracies']:.2f}"
            self.bar.set_postfix(self.shown)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    class SaveAtEpochEnd(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kw):
            control.should_save = True

    return [Progress(), SaveAtEpochEnd()]



def make_evaluator(trainer: Any, cfg: TrainArgs, prep: "Prepared", precision: str, loss_fn: Callable[[], float]) -> Any:
    """`loss_fn()` (the validation loss, logged by it) every --eval-steps and at the last step; --keep-best saves
    OUT/best when it is the lowest. SFT passes `lm_validation_loss`, preference tuning its trainer's evaluate."""
    from transformers import TrainerCallback

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
            should_log = control.should_log  # trainer.log clears it, which would drop this step's training loss
            loss = loss_fn()
            control.should_log = should_log
            if cfg.keep_best and (self.best is None or loss < self.best):
                self.best = loss
                if trainer.is_world_process_zero():
                    save_model_folder(trainer, cfg, prep, precision, Path(cfg.out) / "best",
                                      extra={"best.json": {"step": step, "eval_loss": loss}})
                barrier()

    return Evaluate()


def lm_validation_loss(trainer: Any, prep: "Prepared", micro_batch: int, precision: str) -> Callable[[], float]:
    """The causal-LM loss on the validation rows, logged as eval_loss."""
    from cutegpt.training.validation import validation_loss

    def loss_fn() -> float:
        loss = validation_loss(trainer.model, prep.val_dataset, trainer.data_collator, micro_batch, precision,
                               show=trainer.is_world_process_zero())
        trainer.log({"eval_loss": loss})
        return loss

    return loss_fn



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
