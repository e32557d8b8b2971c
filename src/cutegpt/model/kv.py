"""The KV-cache keyword of a model's forward, across transformers versions.

transformers 5.24 renamed `past_key_values` to `cache` (the old name warns and goes in 5.40),
both as the forward argument and as the output field. Every caller that feeds or reads a
cache goes through these two functions so one place follows the rename.
"""

from __future__ import annotations

import inspect
from typing import Any


def cache_kwarg(model: Any) -> str:
    """The keyword the model's forward takes the KV cache by: `cache` (transformers >= 5.24) or `past_key_values`."""
    if hasattr(model, "get_base_model"):  # a peft model passes **kwargs on; its own signature names neither
        model = model.get_base_model()
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: Any) -> Any:
    """An empty DynamicCache for `model`, to pass under `cache_kwarg(model)`; the forward fills it in place."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
