"""The decoder architectures CuteGPT knows by name: one table entry each, read from config.json alone.

Training needs, before any weight loads, the names of each architecture's linear layers (for
`--lora-targets`) and what its layers hold beyond LLaMA's (for the `--plan` parameter count).
Loading, chat and evaluation go through transformers' Auto classes and need no entry; GGUF
export has its own table (`cutegpt.export.gguf.ARCHITECTURES`) for llama.cpp's side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cutegpt.errors import CuteGPTError

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
ALL_SPELLINGS = ("all", "all-linear", "all_linear")  # LLaMA-Factory's `all`, peft's `all-linear`


@dataclass(frozen=True)
class Family:
    """What one HF architecture's decoder layer holds, as far as training and the memory plan care."""

    linear: tuple[str, ...] = LLAMA_LINEAR  # leaf names of the linear layers in a decoder layer
    qkv_bias: bool = False                  # q/k/v projections carry biases (Qwen2)
    qk_norm: bool = False                   # RMSNorm on each head's q and k (Qwen3)
    norms_per_layer: int = 2                # Gemma 2 adds a norm after attention and after the MLP


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": Family(),
    "Qwen2ForCausalLM": Family(qkv_bias=True),
    "Qwen3ForCausalLM": Family(qk_norm=True),
    "Gemma2ForCausalLM": Family(norms_per_layer=4),
}


MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM"}


def architecture_name(config: dict[str, Any]) -> str | None:
    """A config.json's architecture class: its first `architectures` entry, else the one its model_type implies."""
    return (config.get("architectures") or [None])[0] or MODEL_TYPES.get(config.get("model_type"))


def family_of(config: dict[str, Any]) -> Family | None:
    """The table entry for a config.json's architecture; None for one outside the table."""
    return FAMILIES.get(architecture_name(config))


def split_lora_targets(targets: list[str]) -> list[str]:
    """The names users type, as peft takes them: `q_proj,v_proj` is two names; `all` (LLaMA-Factory) is all-linear."""
    names = [n.strip() for t in targets for n in str(t).split(",") if n.strip()]
    if not names:
        raise CuteGPTError("--lora-targets needs at least one module name (or all).")
    if any(n in ALL_SPELLINGS for n in names):
        return [ALL_LINEAR]
    return list(dict.fromkeys(names))


def check_lora_targets(targets: list[str], config_path: Path) -> None:
    """Refuse a --lora-targets name that matches no linear layer of the model, from config.json before any weight loads.

    Architectures outside the table are left to the check after loading (which lists the loaded model's names).
    """
    if targets == [ALL_LINEAR] or not config_path.is_file():
        return
    try:
        import json

        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the loader names a broken config.json in its own words
    family = family_of(config) if isinstance(config, dict) else None
    if family is None:
        return
    bad = [t for t in targets if t not in family.linear]
    if bad:
        raise CuteGPTError(f"--lora-targets {' '.join(bad)}: no such linear layer in this model; valid names: "
                           f"{' '.join(family.linear)} (or all / all-linear for every one; a comma list such as q_proj,v_proj works "
                           f"too), read from {config_path} ({architecture_name(config)}).")
