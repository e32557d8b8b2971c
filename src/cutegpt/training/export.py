"""`cutegpt export`: merge a LoRA adapter into its base model and save a plain model folder.

    cutegpt export --model BASE --lora runs/sft/final --out merged [--dtype float16]

The merge is done in float32 and cast afterwards, so the result differs from
base + adapter only by the final rounding. The folder holds safetensors, the
tokenizer (the adapter's, if it has one) and the template name, so
`cutegpt chat --model merged` needs no other flag.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar
from pathlib import Path

from cutegpt.config import arg
from cutegpt.errors import CuteGPTError
from cutegpt.io import atomic_dir
from cutegpt.model.args import ModelArgs
from cutegpt.templates import write_model_card


@dataclass
class ExportConfig(ModelArgs):
    dropped_flags: ClassVar[tuple[str, ...]] = ("load_in_8bit", "int8_backend", "merge_lora", "device")

    out: str = arg("", "folder for the merged model", aliases=("--output", "--output-dir", "--output_dir"))
    overwrite: bool = arg(False, "replace --out if it exists")


def run_export(cfg: ExportConfig) -> int:
    if not cfg.out:
        raise CuteGPTError("--out is required: the folder for the merged model.")
    if not cfg.lora:
        raise CuteGPTError("--lora is required: the adapter folder to merge into --model.")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise CuteGPTError(f"{out} already exists; pass --overwrite or choose another --out.")
    if cfg.load_in_8bit:
        raise CuteGPTError("--load-in-8bit cannot be merged and saved; export in float16/bfloat16/float32.")
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
        save_tokenizer(lm.tokenizer, tmp)
        write_model_card(tmp, lm.template.name, merged_from={"model": str(lm.model_path.resolve()), "lora": str(lm.lora_path.resolve())})
    print(f"saved {out} ({str(dtype).replace('torch.', '')}, template {lm.template.name})")
    return 0
