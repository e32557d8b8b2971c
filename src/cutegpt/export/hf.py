"""`cutegpt export --format hf`: a LoRA adapter merged into its base model, saved as a plain model folder.

The merge is done in float32 and cast afterwards, so the result differs from
base + adapter only by the final rounding. The folder holds safetensors, the
tokenizer (the adapter's, if it has one) and the template name, so
`cutegpt chat --model merged` needs no other flag.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from cutegpt.io import atomic_dir
from cutegpt.templates import write_model_card


def export_merged(cfg: Any) -> Path:
    """Merge `cfg.lora` into `cfg.model` and write the folder `cfg.out` (atomically); `cfg` is an ExportConfig."""
    out = Path(cfg.out)
    import torch

    from cutegpt.model.loading import DTYPES, load_model, save_tokenizer

    target = cfg.dtype
    lm = load_model(replace(cfg, dtype="float32", device="cpu", merge_lora=True))
    model = lm.model
    if target == "auto":  # keep the base model's stored precision
        stored = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
        dtype = stored if isinstance(stored, torch.dtype) else DTYPES.get(str(stored).replace("torch.", ""), torch.float32)
    else:
        dtype = DTYPES[target]
    model = model.to(dtype)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(lm.tokenizer, tmp, lm.template.name)
        write_model_card(tmp, lm.template.name, merged_from={"model": str(lm.model_path.resolve()), "lora": str(lm.lora_path.resolve())})
    print(f"saved {out} ({str(dtype).replace('torch.', '')}, template {lm.template.name})")
    return out
