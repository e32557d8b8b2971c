"""Settings shared by every command that loads a model (no torch import: `--help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cutegpt.config import arg


@dataclass
class ModelArgs:
    """Settings shared by every command that loads a model."""

    model: str | None = arg(None, "model folder, .gguf file or hub id found in the local hub cache",
                              aliases=("--model_name_or_path",), absent="the embedded SmolLM2-135M-Instruct (English only)")
    lora: str | None = arg(None, "LoRA adapter folder to put on top of --model", aliases=("--adapter_name_or_path",))
    template: str | None = arg(None, "prompt template: cutegpt, auto (the tokenizer's chat template) or raw",
                                 absent="what the model folder records, else auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg("auto", "weight dtype; auto = float32 on CPU, bfloat16/float16 on GPU")
    load_in_8bit: bool = arg(False, "8-bit weights (bitsandbytes on GPU, optimum-quanto on CPU unless --int8-backend says otherwise)")
    int8_backend: Literal["auto", "bitsandbytes", "quanto"] = arg("auto", "library for --load-in-8bit")
    device: Literal["auto", "cpu", "cuda"] = arg("auto", "where to run")
    trust_remote_code: bool = arg(False, "allow model folders to run their own Python code")
    merge_lora: bool = arg(False, "merge the LoRA adapter into the weights after loading (faster inference)")
    force: bool = arg(False, "load --lora on a base model other than the one it was trained on (refused otherwise)")
