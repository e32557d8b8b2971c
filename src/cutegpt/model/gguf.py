"""GGUF files: load them through transformers and turn them into ordinary HF folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cutegpt.errors import CuteGPTError
from cutegpt.io import atomic_dir
from cutegpt.templates import write_model_card


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a GGUF file as a float model and its tokenizer (transformers dequantizes the weights)."""
    from transformers import AutoModelForCausalLM

    from cutegpt.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)  # with the GGUF's own pre-tokenizer (SmolLM2's digit split)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as e:  # gguf raises ValueError/KeyError/OSError with long texts on bad files
        raise CuteGPTError(f"{path}: cannot read this GGUF file ({_first_line(e)}).") from e
    return _plain_model(model), tokenizer


def _plain_model(model: Any) -> Any:
    """The GGUF-loaded model without the GGUF quantizer marker.

    transformers refuses `save_pretrained` on a model loaded from GGUF
    ("quantized with gguf and is not serializable"), yet its weights are plain
    float tensors once dequantized: dropping the marker makes it an ordinary,
    saveable model without copying any weight.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    return model


def convert_gguf(gguf: Path, out: Path, template: str = "auto") -> Path:
    """Write `gguf` as a safetensors HF folder at `out` (atomically)."""
    from cutegpt.model.tokenizer import save_tokenizer_files

    model, tokenizer = load_gguf(gguf)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer_files(tokenizer, tmp)
        write_model_card(tmp, template, source=str(gguf))
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
