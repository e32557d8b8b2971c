"""Portable LoRA adapters: the base recorded by name, found again anywhere, and checked by content.

    train  ─> adapter_config.json   base_model_name_or_path = hub id | path as given | EMBEDDED_BASE
              cutegpt_training.json base_fingerprint = {structure: hash of config + names + shapes, sample: values}
    load   ─> --model given: that base (checked);  --lora alone: the recorded base, found as
              EMBEDDED_BASE -> the embedded model, a local path, a hub id in the local hub cache

A cache path (~/.cache/cutegpt/models/...) is never recorded: it does not exist on another machine, and peft and
the hub read `base_model_name_or_path` as a hub id or a path. The fingerprint catches the base that has the right
shape but other weights, which peft loads without a word and which answers nonsense.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from cutegpt.errors import CuteGPTError

# Not a hub id (the colon), so neither peft nor the hub look it up; cutegpt maps it to the embedded model.
EMBEDDED_BASE = "cutegpt:embedded-smollm2-135m-instruct"
RECORD = "cutegpt_training.json"
SAMPLE_TENSORS = 16
SAMPLE_VALUES = 16
# What decides the shape of the weights; other config keys (dtype, versions, generation ids) vary between copies.
STRUCTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
_HUB_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")


def _is_embedded_cache_path(path: Path) -> bool:
    """The embedded model's converted folder (today's or one recorded by an older cutegpt on another machine)."""
    return path.parent.name == "models" and path.name.startswith("smollm2-135m-instruct-")


def record_base(given: str | None) -> str:
    """What `base_model_name_or_path` records for a run on `--model given` (None: the embedded model)."""
    if given is None or given == EMBEDDED_BASE:
        return EMBEDDED_BASE
    path = Path(given).expanduser()
    if _is_embedded_cache_path(path):
        return EMBEDDED_BASE
    hub = _HUB_SNAPSHOT.search(path.resolve().as_posix()) if path.exists() else None
    if hub:  # a snapshot folder of the hub cache: the hub id finds it on any machine that fetched it
        return f"{hub.group(1)}/{hub.group(2)}"
    return given


def recorded_base(adapter: Path) -> str | None:
    from cutegpt.io import read_json_object

    base = read_json_object(adapter / "adapter_config.json").get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


def find_base(adapter: Path, missing: str = "embedded") -> Path:
    """The base model folder an adapter records; one sentence naming --model when it is not on this machine.

    `missing="embedded"`: an adapter that records no base goes on the embedded model (what `--lora` alone did before
    bases were recorded); `"error"`: it is refused (an adapter given as --model)."""
    from cutegpt.model.hub import _from_hub_cache, looks_like_hub_id

    base = recorded_base(adapter)
    if (base is None and missing == "embedded") or base == EMBEDDED_BASE:
        from cutegpt.model.embedded import embedded_model_dir

        return embedded_model_dir()
    if base is not None:
        path = Path(base).expanduser()
        if path.exists():
            return path
        if _is_embedded_cache_path(path):  # recorded by an older cutegpt, whose cache folder is elsewhere here
            from cutegpt.model.embedded import embedded_model_dir

            return embedded_model_dir()
        cached = _from_hub_cache(base) if looks_like_hub_id(base) else None
        if cached is not None:
            return cached
    raise CuteGPTError(
        f"{adapter} is a LoRA adapter whose base model ({base or 'not recorded'}) is not a local folder nor in the "
        f"local hub cache: pass the base model as --model and the adapter as --lora {adapter}."
    )


def base_folder(adapter: Path) -> Path | None:
    """The recorded base for commands that run the embedded model from its own file (export/serve GGUF): None for
    the embedded model (or no record), else its folder as `find_base` finds it."""
    base = recorded_base(adapter)
    if base is None or record_base(base) == EMBEDDED_BASE:
        return None
    return find_base(adapter, missing="error")


def _sample_names(names: list[str]) -> list[str]:
    if len(names) <= SAMPLE_TENSORS:
        return names
    step = (len(names) - 1) / (SAMPLE_TENSORS - 1)
    return [names[round(i * step)] for i in range(SAMPLE_TENSORS)]


def fingerprint(model: Any) -> dict[str, Any]:
    """A cheap identity of a loaded base model: exact structure, plus a few hundred weight values.

    Computed from the model in memory (not from files), so the same base loaded from a folder, the hub cache or a
    GGUF file, in float32 or bfloat16, gives the same fingerprint; values are compared with a tolerance for that."""
    import torch

    params = dict(model.named_parameters())  # tied weights once
    names = sorted(params)
    config = model.config
    structure = {"config": {k: getattr(config, k, None) for k in STRUCTURE_KEYS},
                 "tensors": [[n, list(params[n].shape)] for n in names]}
    digest = hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()[:16]
    sample: list[float] = []
    for name in _sample_names(names):
        flat = params[name].detach().reshape(-1)
        if flat.device.type == "meta" or flat.numel() == 0:
            continue
        k = min(SAMPLE_VALUES, flat.numel())
        # integer spacing: a float32 linspace rounds past the last index of a 28M-entry embedding
        idx = (torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)).to(flat.device)
        sample += [float(f"{v:.5g}") for v in flat[idx].float().cpu().tolist()]
    return {"structure": digest, "sample": sample}


def same_base(recorded: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """None when `actual` is the recorded base; else what differs (for the message)."""
    import torch

    if recorded.get("structure") != actual["structure"]:
        return "its architecture or tensor shapes differ"
    a = torch.tensor(recorded.get("sample") or [], dtype=torch.float32)
    b = torch.tensor(actual["sample"], dtype=torch.float32)
    # bf16 keeps ~3 significant digits: a bf16 copy of the same base passes, other weights do not
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-2, atol=1e-3):
        return "it has the same shape but other weights"
    return None


def check_base(adapter: Path, model: Any, model_path: Path, force: bool, flag: str = "--lora") -> None:
    """Refuse (unless --force) a base model that is not the one the adapter was trained on.

    With the model loaded: by the fingerprint cutegpt records beside its adapters. Before loading (`model` None:
    `train dpo`, whose reference log-probabilities would silently mean nothing): when the recorded base is a local
    folder, it must hold the same weight files as `model_path` (any adapter, peft's too; --force does not apply)."""
    from cutegpt.io import read_json_object

    record = adapter / RECORD
    if model is None:
        problem = _other_weight_files(adapter, model_path)
        if problem is not None:
            raise CuteGPTError(f"{flag} {adapter} was trained on {problem}, not on {model_path}: pass --model {problem} "
                               "(on another base its reference log-probabilities would be wrong).")
        return
    recorded = read_json_object(record).get("base_fingerprint") if record.is_file() else None
    if not isinstance(recorded, dict):
        return  # made by peft or another tool (or a mid-run checkpoint): nothing to check against
    problem = same_base(recorded, fingerprint(model))
    if problem is None:
        return
    if force:
        import logging

        logging.getLogger("cutegpt").warning("--force: loading %s on %s although %s", adapter, model_path, problem)
        return
    raise CuteGPTError(
        f"the LoRA adapter {adapter} was trained on another base model than {model_path} ({problem}); "
        f"give the base it records ({recorded_base(adapter) or 'not recorded'}) as --model, or pass --force to load it anyway."
    )


def _other_weight_files(adapter: Path, model_path: Path) -> str | None:
    """The adapter's recorded base folder when its weight files differ from `model_path`'s; None when they are the
    same or the recorded base is not a local folder (a hub id: its shapes are checked when it loads)."""
    from cutegpt.io import read_json_object

    if not (adapter / "adapter_config.json").is_file():
        return None
    recorded = recorded_base(adapter)
    if (adapter / RECORD).is_file():  # the base as the run was given it (adapter_config.json keeps a portable name)
        recorded = read_json_object(adapter / RECORD).get("base_model") or recorded
    if not recorded or not Path(recorded).expanduser().is_dir():
        return None
    return recorded if _weights_fingerprint(Path(recorded).expanduser()) != _weights_fingerprint(model_path) else None


def _weights_fingerprint(folder: Path) -> str:
    from cutegpt.io import data_fingerprint

    if folder.suffix == ".gguf" or not folder.is_dir():
        return data_fingerprint([str(folder)])
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + [folder / "config.json"]
    return data_fingerprint([str(f) for f in files if f.is_file()])
