"""One model loader for every command: HF folders, GGUF files, LoRA adapters, 8-bit weights.

    --model  (none)          -> the embedded SmolLM2-135M-Instruct (converted once to the cache)
             DIR             -> any AutoModelForCausalLM folder (config.json + weights)
             FILE.gguf       -> dequantized by transformers
    --lora   DIR             -> a PEFT adapter on top; its tokenizer wins when it has one; alone, on the base
                                it records (model/adapter_base.py), refused on another base unless --force
    --load-in-8bit           -> bitsandbytes on CUDA (the original 13B-on-a-3090 path);
                                on CPU optimum-quanto int8 weights by default (faster and more
                                accurate than bitsandbytes there; see docs/benchmarks.md)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cutegpt.model.adapter_base import EMBEDDED_BASE, check_base, find_base
from cutegpt.model.args import ModelArgs  # noqa: F401  (re-exported: commands import it from here)
from cutegpt.model.hub import resolve_model_path
from cutegpt.errors import CuteGPTError
from cutegpt.io import read_json_object
from cutegpt.templates import Template, get_template, resolve_template_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    template: Template
    model_path: Path
    lora_path: Path | None
    dtype: torch.dtype
    device: torch.device
    int8: str | None  # backend used for 8-bit weights, or None

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    def describe(self) -> str:
        parts = [str(self.model_path)]
        if self.lora_path:
            parts.append(f"+ LoRA {self.lora_path}")
        parts.append(f"({self.int8 + ' int8' if self.int8 else str(self.dtype).replace('torch.', '')}, {self.device}, template {self.template.name})")
        return " ".join(parts)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CuteGPTError("--device cuda was asked for, but torch sees no CUDA GPU (is the CPU build of torch installed?).")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # on CPU bf16 decodes slower than fp32 (docs/benchmarks.md); choose it explicitly for memory


def _check_model_folder(path: Path) -> None:
    if not path.exists():
        raise CuteGPTError(f"model path {path} does not exist.")
    if path.is_file():
        raise CuteGPTError(f"{path} is a file; --model takes a model folder or a .gguf file.")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise CuteGPTError(f"{path} is a LoRA adapter, not a model: pass it as --lora and its base model as --model.")
        raise CuteGPTError(f"{path} is not a model folder: it has no config.json.")
    read_json_object(path / "config.json")
    weights = [p for pattern in WEIGHT_FILES for p in path.glob(pattern)]
    if not weights:
        raise CuteGPTError(f"{path} has a config.json but no weights (*.safetensors or *.bin).")
    _check_safetensors(weights)


def _check_safetensors(files: list[Path]) -> None:
    """Open each safetensors header so a corrupt or truncated file is named before loading."""
    from safetensors import safe_open

    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:
            raise CuteGPTError(f"{f}: the weights file is corrupt or truncated ({str(e).splitlines()[0][:200]}).") from None


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer, giving its reference's ids (cutegpt.model.tokenizer)."""
    from cutegpt.model.tokenizer import load_tokenizer as load

    return load(Path(path), trust_remote_code)


def _int8_backend(args: ModelArgs, device: torch.device) -> str | None:
    if not args.load_in_8bit:
        return None
    if args.int8_backend != "auto":
        return args.int8_backend
    return "bitsandbytes" if device.type == "cuda" else "quanto"


def load_model(args: ModelArgs) -> LoadedModel:
    """Load model + tokenizer + template as `args` says; every command goes through here."""
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # loading notes (unused keys, TP plans) are not the user's business
    hf_logging.disable_progress_bar()  # the "Loading weights" bar: a second of noise before every command
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    int8 = _int8_backend(args, device)

    lora_path = resolve_model_path(args.lora, "--lora") if args.lora else None
    if lora_path is not None:
        _check_adapter_folder(lora_path)
    if args.model is None and lora_path is not None:
        model_path = find_base(lora_path)  # --lora alone: the base the adapter records, wherever it was copied
    elif args.model is None or args.model == EMBEDDED_BASE:
        from cutegpt.model.embedded import embedded_model_dir

        model_path = embedded_model_dir()
    else:
        model_path = resolve_model_path(args.model, "--model")
    if lora_path is None and (model_path / "adapter_config.json").is_file() and not (model_path / "config.json").is_file():
        # a LoRA checkpoint given as --model: put it on the base model it names, as `cutegpt chat --model OUT/checkpoint-N` expects
        _check_adapter_folder(model_path)
        model_path, lora_path = find_base(model_path, missing="error"), model_path

    if model_path.suffix == ".gguf":
        if not model_path.is_file():
            raise CuteGPTError(f"GGUF file {model_path} does not exist.")
        if int8 == "bitsandbytes":  # refuse before spending seconds on dequantizing
            raise CuteGPTError("--load-in-8bit with bitsandbytes needs a model folder, not a GGUF file; convert it first or use --int8-backend quanto.")
        from cutegpt.model.gguf import load_gguf

        model, tokenizer = load_gguf(model_path, dtype=torch.float32 if int8 else dtype)
    else:
        _check_model_folder(model_path)
        tokenizer = None
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
        if int8 == "bitsandbytes":
            from transformers import BitsAndBytesConfig

            # bitsandbytes logs a cast warning on every matmul of fp32 input (each token, each layer)
            logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["dtype"] = torch.float16 if device.type == "cuda" else torch.float32
            kwargs["device_map"] = "auto" if device.type == "cuda" else {"": "cpu"}
        elif int8 == "quanto":
            kwargs["dtype"] = torch.bfloat16 if args.dtype == "auto" else dtype
        elif device.type == "cuda":
            kwargs["device_map"] = "auto"  # spreads a 13B model over the GPUs (and CPU) like the original
        try:
            model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
        except CuteGPTError:
            raise
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise CuteGPTError(f"{model_path} needs its own Python code to load; pass --trust-remote-code if you trust it.") from None
            raise CuteGPTError(f"{model_path}: cannot load the model ({str(e).splitlines()[0][:300]}).") from None
        except Exception as e:  # transformers reports a bad config.json with many error types (TypeError, its own validation errors)
            raise CuteGPTError(load_error(model_path, "the model", e)) from None

    tok_path = lora_path if lora_path is not None and _has_tokenizer(lora_path) else model_path
    if tokenizer is None or tok_path != model_path:
        tokenizer = load_tokenizer(tok_path, args.trust_remote_code)

    if lora_path is not None:
        if int8 != "bitsandbytes":  # its int8 weights no longer hold the values the fingerprint sampled
            check_base(lora_path, model, model_path, args.force)
        model = _attach_lora(model, lora_path, model_path, tokenizer, merge=args.merge_lora)

    if int8 == "quanto":
        model = quantize_int8_quanto(model)
    if getattr(model, "hf_device_map", None) is None:
        model.to(device)
    model.eval()
    release_memory()  # loading (dtype casts, GGUF dequantizing, quantizing) leaves freed pages in malloc's arenas

    template = get_template(resolve_template_name(args.template, [lora_path, model_path], tokenizer), tokenizer)
    actual_dtype = next(model.parameters()).dtype
    return LoadedModel(model, tokenizer, template, model_path, lora_path, actual_dtype, device, int8)


def _check_adapter_folder(path: Path) -> None:
    if not path.exists():
        raise CuteGPTError(f"LoRA adapter path {path} does not exist.")
    config = path / "adapter_config.json"
    if not config.is_file():
        if (path / "config.json").is_file():
            raise CuteGPTError(f"{path} is a full model, not a LoRA adapter: pass it as --model.")
        raise CuteGPTError(f"{path} is not a LoRA adapter folder: it has no adapter_config.json.")
    read_json_object(config)
    _check_safetensors(list(path.glob("*.safetensors")))


def load_error(path: Path, what: str, e: BaseException) -> str:
    """One sentence for a file that would not load; a pickle refused by torch's safe loader says so,
    and never repeats torch's advice to load it unsafely."""
    text = str(e)
    if "Weights only load failed" in text or "UnpicklingError" in type(e).__name__ or "weights_only" in text:
        return (f"{path}: {what} holds a pickle with objects other than tensors, which could run code; refused. "
                "Use a safetensors copy from a source you trust.")
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    detail = " ".join(text.split())[:300] if len(first) < 60 else first[:300]
    return f"{path}: cannot load {what} ({detail})."


def _attach_lora(model: Any, lora_path: Path, model_path: Path, tokenizer: Any, merge: bool) -> Any:
    from peft import PeftModel

    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise CuteGPTError(
            f"the tokenizer in {lora_path} has {len(tokenizer)} tokens but the base model {model_path} only {n_embed} embeddings: "
            "the adapter was trained on another (extended) base model."
        )
    import warnings

    try:
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecated: not the user's to see
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(lora_path), is_trainable=False)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise CuteGPTError(f"the LoRA adapter {lora_path} does not fit the base model {model_path}: {detail[:300]}") from None
    except Exception as e:
        raise CuteGPTError(load_error(lora_path, "the LoRA adapter", e)) from None
    if merge:
        model = model.merge_and_unload()
    return model


def quantize_int8_quanto(model: Any) -> Any:
    """int8 weights for every linear layer but the output head (tied to the embedding in small models)."""
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8, exclude=["lm_head"])
    freeze(model)
    release_memory()  # the full-precision copies are freed by freeze(), but malloc keeps their pages: 1,053 -> 566 MB RSS
    return model


def release_memory() -> None:
    """Return freed heap memory to the OS (glibc keeps freed blocks of large tensors in its arenas)."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def process_rss() -> int:
    """Resident set size of this process in bytes (what `top` shows), to report beside `weight_bytes`."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()  # fallback: the peak is the best this platform tells


def peak_rss() -> int:
    """Peak resident set size of this process in bytes since it started (VmHWM).

    Not `ru_maxrss`: on Linux that keeps the parent's high-water mark across fork+exec, so a child of a large
    process (a pytest run, a notebook) reports the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def weight_bytes(model: Any) -> int:
    """Bytes really held by parameters and buffers (int8 counted as 1 byte; tied weights once).

    `get_memory_footprint()` counts quantized tensors at their nominal dtype.
    """
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            names, _ = inner()
            for n in names:
                add(getattr(t, n))
            return
        if t.device.type == "meta":
            return
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t.data if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor else t)
    return total


def save_tokenizer(tokenizer: Any, folder: str | Path, template: str | None = None) -> None:
    """`save_pretrained`, plus the SentencePiece `tokenizer.model` it came with and the template as Jinja.

    transformers 5 writes only `tokenizer.json`; LLaMA tools (llama.cpp's
    converter, sentencepiece, the original CuteGPT scripts) still read
    `tokenizer.model`, so a trained or exported model must keep it.
    With `template="cutegpt"` the saved tokenizer's `chat_template` renders the
    CuteGPT format (`templates.chat_template_jinja`), so plain transformers,
    llama.cpp or vLLM prompt the model as it was trained; `auto`/`raw`/None keep
    the tokenizer's own template. The tokenizer object itself is left unchanged.
    """
    from cutegpt.model.tokenizer import save_tokenizer_files
    from cutegpt.templates import chat_template_jinja

    jinja = chat_template_jinja(template) if template else None
    previous = getattr(tokenizer, "chat_template", None)
    if jinja is not None:
        tokenizer.chat_template = jinja
    try:
        save_tokenizer_files(tokenizer, Path(folder))
    finally:
        if jinja is not None:
            tokenizer.chat_template = previous
