"""Sampling settings shared by chat, generate, serve and the GGUF export's `general.sampling.*` (no torch import).

Every sampling field defaults to None, meaning "not given": `resolve_generation`
then fills it from, in order, the model's own recommendation (the folder's
`generation_config.json`, or a GGUF file's `general.sampling.*` metadata) and
the template's defaults (CuteGPT's original settings for the `cutegpt`
template; greedy decoding otherwise, as transformers does for a model that
recommends nothing). `--verbose` prints which source gave each value.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cutegpt.config import arg
from cutegpt.templates import CUTEGPT_DEFAULTS, template_defaults

_FROM_MODEL = "the model's generation_config.json or GGUF metadata, else the template's"

SAMPLING_FIELDS = tuple(CUTEGPT_DEFAULTS)


@dataclass
class GenerationArgs:
    """Sampling settings; None = not given (resolved per model by `resolve_generation`)."""

    max_new_tokens: int | None = arg(None, "most tokens to generate for one answer", ge=1,
                                     absent="the model's generation_config.json, else 256")
    greedy: bool | None = arg(None, "always take the most likely token (deterministic); --no-greedy samples",
                              absent=_FROM_MODEL + " (greedy for auto/raw, sampling for cutegpt)")
    temperature: float | None = arg(None, "sampling temperature", gt=0, absent=_FROM_MODEL + " (1.0)")
    top_p: float | None = arg(None, "nucleus sampling: keep the smallest set of tokens with this much probability",
                              gt=0, le=1, absent=_FROM_MODEL + " (0.8 for cutegpt, 1.0 otherwise)")
    top_k: int | None = arg(None, "keep only the k most likely tokens (0 = off)", ge=0, absent=_FROM_MODEL + " (50)")
    repetition_penalty: float | None = arg(None, "penalise tokens already in the prompt or answer (1.0 = off)", gt=0,
                                           absent=_FROM_MODEL + " (1.1 for cutegpt, 1.0 otherwise)")
    seed: int | None = arg(None, "random seed for sampling (reproducible answers)", absent="a new random answer each time")
    ignore_eos: bool = arg(False, "keep generating past EOS and the stop marker (for benchmarks)")

    @classmethod
    def of(cls, cfg: Any) -> "GenerationArgs":
        """The generation settings of a command config that inherits them."""
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})

    def is_resolved(self) -> bool:
        return all(getattr(self, f) is not None for f in SAMPLING_FIELDS)


def generation_config_defaults(folder: str | Path | None) -> dict[str, Any]:
    """The sampling settings a model folder's generation_config.json states (only the keys it has)."""
    if folder is None:
        return {}
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}  # transformers reads it too and reports a broken file when the model loads
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    if isinstance(data.get("do_sample"), bool):
        out["greedy"] = not data["do_sample"]
    for key in ("temperature", "top_p", "repetition_penalty"):
        if isinstance(data.get(key), (int, float)) and not isinstance(data.get(key), bool) and data[key] > 0:
            out[key] = float(data[key])
    if isinstance(data.get("top_k"), int) and not isinstance(data.get("top_k"), bool) and data["top_k"] >= 0:
        out["top_k"] = data["top_k"]
    if isinstance(data.get("max_new_tokens"), int) and data["max_new_tokens"] > 0:
        out["max_new_tokens"] = data["max_new_tokens"]
    return out


def resolve_generation(user: GenerationArgs, model_defaults: dict[str, Any], model_source: str,
                       template_name: str) -> tuple[GenerationArgs, dict[str, str]]:
    """Each sampling setting from the user's flag, else the model's recommendation, else the template's default.

    Returns the resolved settings and, per field, where its value came from.
    """
    fallback = template_defaults(template_name)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in SAMPLING_FIELDS:
        given = getattr(user, name)
        if given is not None:
            values[name], sources[name] = given, "your flag"
        elif model_defaults.get(name) is not None:
            values[name], sources[name] = model_defaults[name], model_source
        else:
            values[name], sources[name] = fallback[name], f"template {template_name}"
    return dataclasses.replace(user, **values), sources


def describe_sources(gen: GenerationArgs, sources: dict[str, str]) -> str:
    """One line for --verbose: each setting, its value and where it came from."""
    parts = [f"{name.replace('_', '-')} {getattr(gen, name)} ({sources[name]})" for name in SAMPLING_FIELDS]
    return "generation settings: " + ", ".join(parts)
