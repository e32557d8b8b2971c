"""Settings shared by `train sft` and `train pt` (each one a flag and a YAML key).

Defaults follow the original CuteGPT runs (MISSION.md section 4): LoRA r 8,
alpha 16, dropout 0.05 on q_proj/v_proj; AdamW betas (0.98, 0.999), eps 1e-9;
warm-up then a constant learning rate. Values left unset (None) come from the
DeepSpeed file when one is given, else from the method's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from cutegpt.config import arg
from cutegpt.errors import CuteGPTError
from cutegpt.model.args import ModelArgs
from cutegpt.threads import THREADS_HELP

Scheduler = Literal["constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial",
                    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"]

# Per method: peak learning rate, micro-batch, gradient accumulation (the original's two DeepSpeed files).
METHOD_DEFAULTS = {
    "lora": {"lr": 3e-4, "micro_batch": 2, "grad_accum": 8},
    "full": {"lr": 5e-5, "micro_batch": 1, "grad_accum": 16},
}


def training_weight_dtype(method: str, precision: str, dtype: str = "auto") -> str:
    """The dtype the model's weights are loaded in for training: `dtype` (the flag) unless auto; `precision` resolved.

    A LoRA base is frozen, so it needs no fp32 master copy: in the 16-bit compute type it takes half the memory
    and autocast has nothing to cast (what peft and LLaMA-Factory do). Full training keeps fp32 master weights.
    """
    if dtype != "auto":
        return dtype
    if method == "lora" and precision in ("bf16", "fp16"):
        return "bfloat16" if precision == "bf16" else "float16"
    return "float32"


@dataclass
class TrainArgs(ModelArgs):
    """Model, method, optimiser, schedule, saving: everything but the data."""

    dropped_flags: ClassVar[tuple[str, ...]] = ("load_in_8bit", "int8_backend", "merge_lora")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "auto", "weights as loaded for training; auto = the frozen base of LoRA in the compute precision's 16-bit type "
        "(the adapter stays float32), float32 master weights for full training and for --precision fp32")
    out: str = arg("runs/train", "output folder: checkpoint-N/, final/, summary.json, loss.png, tensorboard logs",
                   aliases=("--output", "--output-dir", "--output_dir"))
    method: Literal["lora", "full"] = arg("lora", "lora (an adapter) or full (all weights)")
    lora_r: int = arg(8, "LoRA rank", ge=1, aliases=("--lora_rank",))
    lora_alpha: int = arg(16, "LoRA alpha (scale = alpha / r)", ge=1)
    lora_dropout: float = arg(0.05, "dropout on the LoRA input", ge=0, lt=1)
    lora_targets: list[str] = arg(["q_proj", "v_proj"], "module names to adapt, or all-linear", aliases=("--lora_target",))
    modules_to_save: list[str] | None = arg(None, "modules trained in full beside the adapter, e.g. embed_tokens lm_head", absent="none")
    resume_lora: str | None = arg(None, "adapter folder to continue training (the original's load_lora)", absent="a new adapter")
    epochs: float = arg(4.0, "passes over the data", gt=0, aliases=("--num_train_epochs",))
    max_steps: int = arg(-1, "stop after this many optimizer steps (overrides --epochs when > 0; -1 = use --epochs)", ge=-1)
    micro_batch: int | None = arg(None, "rows per process per forward pass", ge=1, aliases=("--per_device_train_batch_size",),
                                  absent="the DeepSpeed file's, else 2 for LoRA, 1 for full")
    grad_accum: int | None = arg(None, "micro-batches per optimizer step", ge=1, aliases=("--gradient_accumulation_steps",),
                                 absent="the DeepSpeed file's, else 8 for LoRA, 16 for full")
    lr: float | None = arg(None, "peak learning rate", gt=0, aliases=("--learning_rate", "--learning-rate"),
                          absent="the DeepSpeed file's, else 3e-4 for LoRA, 5e-5 for full")
    lr_scheduler: Scheduler = arg("constant_with_warmup", "learning-rate schedule (transformers' names)", aliases=("--lr_scheduler_type",))
    warmup_steps: int | None = arg(None, "warm-up steps", ge=0, absent="3% of the steps, at most 300")
    weight_decay: float = arg(0.0, "AdamW weight decay", ge=0)
    adam_betas: list[float] = arg([0.98, 0.999], "AdamW betas: two numbers in [0, 1)", ge=0, lt=1)
    adam_eps: float = arg(1e-9, "AdamW epsilon", gt=0)
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 = off)", ge=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = arg("auto", "compute precision; auto = bf16 where the hardware has it, else fp32/fp16")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, ~25%% slower)")
    checkpoint_every: int = arg(1, "with --gradient-checkpointing: recompute only every Nth decoder layer (2 = every other "
                                   "layer); the others keep their activations: faster, more memory (--plan shows how much)", ge=1)
    checkpoint_keep: Literal["inputs", "matmuls"] = arg(
        "inputs", "with --gradient-checkpointing: what a checkpointed layer keeps; inputs (recompute the whole layer) or "
        "matmuls (also its matrix products and attention: only norms, activations, rotary and dropout are recomputed; "
        "near the speed of no checkpointing; --plan counts the memory)")
    attn_implementation: Literal["auto", "segments", "sdpa", "eager", "flash_attention_2"] = arg(
        "auto", "attention kernel; auto = flash_attention_2 when installed on a GPU, sdpa on other GPUs, segments on CPU "
                "(SDPA sample by sample over packed rows)")
    deepspeed: str | None = arg(None, "DeepSpeed JSON config (see configs/); works on one process without a launcher", absent="no DeepSpeed")
    save_steps: int = arg(2000, "save a checkpoint every N optimizer steps (and at each epoch end)", ge=1)
    save_total_limit: int = arg(2, "keep only the newest N checkpoints (--resume needs only the last)", ge=1)
    logging_steps: int = arg(1, "log loss and learning rate every N steps", ge=1)
    resume: bool = arg(False, "continue from the last complete checkpoint in --out")
    force: bool = arg(False, "with --resume: continue even though the data or settings differ from the checkpoint's run")
    overwrite: bool = arg(False, "train into an --out that holds an earlier run's final/ (replaced only when the new one is complete)")
    quantization: Literal["none", "4bit", "8bit"] = arg("none", "load the frozen base in 4 bits (QLoRA) or 8 bits (bitsandbytes); LoRA only")
    bnb_4bit_type: Literal["nf4", "fp4"] = arg("nf4", "4-bit data type with --quantization 4bit")
    double_quant: bool = arg(True, "quantize the 4-bit scales too (saves ~0.4 bit per weight)")
    val_data: str | None = arg(None, "held-out data (same kinds as --data) for a validation loss", absent="--val-ratio, else no validation")
    val_ratio: float = arg(0.0, "hold out this share of whole conversations (documents for pt), chosen with --seed", ge=0, lt=1)
    eval_steps: int | None = arg(None, "validation loss every N optimizer steps (and at the end)", ge=1,
                                 absent="--save-steps")
    keep_best: bool = arg(False, "keep the checkpoint with the lowest validation loss as OUT/best/")
    report_to: Literal["tensorboard", "wandb", "mlflow", "none"] = arg("tensorboard", "where the Trainer logs metrics")
    plan: bool = arg(False, "print the expected peak memory per device from config.json and stop (nothing loads)")
    device_memory_gb: float | None = arg(None, "memory per device for --plan", gt=0, absent="the GPU's, else this machine's RAM")
    plan_processes: int | None = arg(None, "processes in the whole job for --plan (e.g. 16 for 2 nodes x 8 GPUs); "
                                           "the launcher decides how many train", ge=1,
                                     absent="the launcher's WORLD_SIZE (or srun's task count), else 1")
    seed: int = arg(42, "random seed (data order, LoRA init, dropout)", ge=0)
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads", "--num_threads"))
    max_length: int = arg(2048, "longest row in tokens (pre-training block size; on-the-fly conversion limit)", ge=2,
                          aliases=("--cutoff_len",))

    def check(self) -> None:
        from cutegpt.model.architectures import split_lora_targets

        self.lora_targets = split_lora_targets(self.lora_targets)
        if len(self.adam_betas) != 2:
            raise CuteGPTError(f"--adam-betas takes two numbers (beta1 beta2), not {len(self.adam_betas)}.")
        if self.bnb_4bit_type != "nf4" and self.quantization != "4bit":  # it would be silently ignored
            raise CuteGPTError(f"--bnb-4bit-type {self.bnb_4bit_type} applies only with --quantization 4bit; add it or drop the flag.")
        if self.quantization != "none" and self.method == "full":
            raise CuteGPTError(f"--quantization {self.quantization} trains a LoRA adapter on a frozen quantized base; drop it or use --method lora.")
        if self.val_data and self.val_ratio:
            raise CuteGPTError("--val-data and --val-ratio both choose validation data; give one of them.")
        if self.keep_best and not (self.val_data or self.val_ratio):
            raise CuteGPTError("--keep-best needs validation data: add --val-data FILE or --val-ratio 0.05.")
        if self.plan_processes is not None and not self.plan:
            raise CuteGPTError("--plan-processes only sets the layout --plan assumes; drop it, the launcher (torchrun, "
                               "deepspeed, srun) decides how many processes train.")
        if self.checkpoint_every != 1 and not self.gradient_checkpointing:
            raise CuteGPTError(f"--checkpoint-every {self.checkpoint_every} chooses which layers --gradient-checkpointing "
                               "recomputes; add --gradient-checkpointing or drop it.")
        if self.checkpoint_keep != "inputs" and not self.gradient_checkpointing:
            raise CuteGPTError(f"--checkpoint-keep {self.checkpoint_keep} chooses what --gradient-checkpointing keeps; "
                               "add --gradient-checkpointing or drop it.")
        if self.max_steps == 0:
            raise CuteGPTError("--max-steps must be a positive number of steps, or -1 to train for --epochs.")

    def check_inputs(self) -> None:
        """Every input path exists and has the right kind: run first, before the plan line and before anything
        loads (not in `check`, which also validates settings whose paths do not exist yet, as the recipe's)."""
        from cutegpt.io import check_input

        for flag, value in (("--lora", self.lora), ("--resume-lora", self.resume_lora)):
            if value:
                check_input(value, flag=flag, kind="folder")
        if self.val_data:
            check_input(self.val_data, flag="--val-data")
        if self.deepspeed:
            check_input(self.deepspeed, flag="--deepspeed", kind="file")
