"""Settings shared by `train sft` and `train pt` (each one a flag and a YAML key).

Defaults follow the original CuteGPT runs (MISSION.md section 4): LoRA r 8,
alpha 16, dropout 0.05 on q_proj/v_proj; AdamW betas (0.98, 0.999), eps 1e-9;
warm-up then a constant learning rate. Values left unset (None) come from the
DeepSpeed file when one is given, else from the method's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cutegpt.config import arg
from cutegpt.model.loading import ModelArgs

# Per method: peak learning rate, micro-batch, gradient accumulation (the original's two DeepSpeed files).
METHOD_DEFAULTS = {
    "lora": {"lr": 3e-4, "micro_batch": 2, "grad_accum": 8},
    "full": {"lr": 5e-5, "micro_batch": 1, "grad_accum": 16},
}


@dataclass
class TrainArgs(ModelArgs):
    """Model, method, optimiser, schedule, saving: everything but the data."""

    out: str = arg("runs/train", "output folder: checkpoint-N/, final/, summary.json, loss.png, tensorboard logs")
    method: Literal["lora", "full"] = arg("lora", "lora (an adapter) or full (all weights)")
    lora_r: int = arg(8, "LoRA rank")
    lora_alpha: int = arg(16, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = arg(0.05, "dropout on the LoRA input")
    lora_targets: list[str] = arg(["q_proj", "v_proj"], "module names to adapt, or all-linear")
    modules_to_save: list[str] | None = arg(None, "modules trained in full beside the adapter, e.g. embed_tokens lm_head")
    resume_lora: str | None = arg(None, "adapter folder to continue training (the original's load_lora)")
    epochs: float = arg(4.0, "passes over the data")
    max_steps: int = arg(-1, "stop after this many optimizer steps (overrides --epochs when > 0)")
    micro_batch: int | None = arg(None, "rows per process per forward pass (default: 2 for LoRA, 1 for full)")
    grad_accum: int | None = arg(None, "micro-batches per optimizer step (default: 8 for LoRA, 16 for full)")
    lr: float | None = arg(None, "peak learning rate (default: 3e-4 for LoRA, 5e-5 for full)")
    lr_scheduler: str = arg("constant_with_warmup", "transformers scheduler name: constant_with_warmup, cosine, linear, ...")
    warmup_steps: int | None = arg(None, "warm-up steps (default: 3%% of the steps, at most 300)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_betas: list[float] = arg([0.98, 0.999], "AdamW betas")
    adam_eps: float = arg(1e-9, "AdamW epsilon")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 = off)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = arg("auto", "compute precision; auto = bf16 where the hardware has it, else fp32/fp16")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, ~25%% slower)")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = arg("auto", "attention kernel; auto = flash_attention_2 when installed on a GPU, else sdpa")
    deepspeed: str | None = arg(None, "DeepSpeed JSON config (see configs/); works on one process without a launcher")
    save_steps: int = arg(2000, "save a checkpoint every N optimizer steps (and at each epoch end)")
    save_total_limit: int | None = arg(None, "keep only the newest N checkpoints")
    logging_steps: int = arg(1, "log loss and learning rate every N steps")
    resume: bool = arg(False, "continue from the last complete checkpoint in --out")
    seed: int = arg(42, "random seed (data order, LoRA init, dropout)")
    num_threads: int = arg(0, "torch CPU threads (0 = torch's default)")
    max_length: int = arg(2048, "longest row in tokens (pre-training block size; on-the-fly conversion limit)")
