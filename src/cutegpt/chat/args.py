"""Sampling settings shared by chat, generate and serve (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cutegpt.config import arg


@dataclass
class GenerationArgs:
    """Sampling settings; defaults are the original CuteGPT's."""

    max_new_tokens: int = arg(256, "most tokens to generate for one answer", ge=1)
    greedy: bool = arg(False, "always take the most likely token (deterministic)")
    temperature: float = arg(1.0, "sampling temperature", gt=0)
    top_p: float = arg(0.8, "nucleus sampling: keep the smallest set of tokens with this much probability", gt=0, le=1)
    top_k: int = arg(50, "keep only the k most likely tokens (0 = off)", ge=0)
    repetition_penalty: float = arg(1.1, "penalise tokens already in the prompt or answer (1.0 = off)", gt=0)
    seed: int | None = arg(None, "random seed for sampling (reproducible answers)", absent="a new random answer each time")
    ignore_eos: bool = arg(False, "keep generating past EOS and the stop marker (for benchmarks)")

    @classmethod
    def of(cls, cfg: Any) -> "GenerationArgs":
        """The generation settings of a command config that inherits them."""
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})
