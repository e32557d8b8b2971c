"""What gradient checkpointing keeps: torch's selective activation checkpointing for `--checkpoint-keep matmuls`.

A checkpointed decoder layer normally keeps only its input and runs its whole forward again in the backward pass.
With `matmuls` it also keeps the outputs of its matrix products and of attention, and recomputes only what is cheap
to redo (norms, rotary embedding, the MLP's activation and product, dropout, residual adds):

    layer forward:  norm -> q k v (mm) -> rotary -> attention (sdpa) -> o (mm) -> + -> norm -> gate up (mm) -> silu * -> down (mm) -> +
    kept:                   ^^^^^^^^^                ^^^^^^^^^^^^^^^^   ^^^^^^                     ^^^^^^^^^^^^            ^^^^^^^^^
    recomputed:     the rest (element-wise; dropout with the same random state, so the gradients are the same)

Profiled on the embedded model (fp32, LoRA q/v, checkpointing on), matrix products and attention are ~80% of a step's
time and the element-wise parts ~15% (benchmarks/profile_sft.py, docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

KEEP = ("inputs", "matmuls")


@functools.lru_cache(maxsize=1)
def _kept_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _kept_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def matmuls_context() -> Any:
    """torch.utils.checkpoint's context_fn for `--checkpoint-keep matmuls`."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_matmuls)


def checkpoint_kwargs(every: int) -> dict[str, Any]:
    """The Trainer's gradient_checkpointing_kwargs (JSON: the Trainer writes its arguments as text)."""
    return {"use_reentrant": False, "every_n_layers": every}


def keep_matmuls_callback() -> Any:
    """A Trainer callback giving the layers the Trainer checkpoints (in `train()`, before `on_train_begin`) the
    `matmuls` policy; a function cannot travel in TrainingArguments, which the Trainer serialises as JSON."""
    from torch.utils.checkpoint import checkpoint
    from transformers import TrainerCallback

    class KeepMatmuls(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            for module in model.modules():
                if getattr(module, "gradient_checkpointing", False) is True and hasattr(module, "_gradient_checkpointing_func"):
                    module._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False,
                                                                            context_fn=matmuls_context)

    return KeepMatmuls()
