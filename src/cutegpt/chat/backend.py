"""Which inference backend runs a command (`--backend torch|llamacpp|auto`), loading the model on it,
naming it, and the generation settings that apply to it.

auto: a `.gguf` model runs on llama.cpp, a folder on torch; with no --model the
embedded SmolLM2 (itself a GGUF file) runs on EMBEDDED_BACKEND, chosen by
measurement (benchmarks/bench_chat.py, docs/benchmarks.md). Flags that only
torch honours (--lora, --load-in-8bit, --dtype, --device cuda) make auto pick torch.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cutegpt.generation import GenerationArgs, describe_sources, generation_config_defaults, resolve_generation
from cutegpt.config import arg
from cutegpt.errors import CuteGPTError
from cutegpt.model.embedded import NAME as EMBEDDED_NAME

# Measured on the embedded model, one thread, side by side (docs/benchmarks.md): llama.cpp on the
# embedded Q4_1 file decodes ~4x faster than torch fp32, starts faster, and agrees with fp32 on most top-1 tokens.
EMBEDDED_BACKEND = "llamacpp"
# The file llama.cpp runs for the embedded model: None = the Q4_1 file the package ships; a quant type =
# our export of it at that type, made once into the cache (the shipped Q4_1 file disagrees with fp32 more).
EMBEDDED_GGUF_QUANT: str | None = "f16"
BACKEND_HELP = ("inference engine: llama.cpp (fast on CPU, GGUF files) or torch (any HF folder, LoRA, 8-bit); "
                "auto = llama.cpp for a .gguf file and the embedded model, torch for a folder")
Backend = Literal["auto", "torch", "llamacpp"]


@dataclass
class BackendArgs:
    backend: Backend = arg("auto", BACKEND_HELP)


def _is_gguf(path: str | None) -> bool:
    return path is not None and Path(path).suffix.lower() == ".gguf"


def torch_only_flags(cfg: Any) -> list[str]:
    flags = []
    if getattr(cfg, "lora", None) and not _is_gguf(cfg.lora):  # a LoRA GGUF is llama.cpp's (export --format gguf-lora)
        flags.append("--lora")
    if getattr(cfg, "load_in_8bit", False):
        flags.append("--load-in-8bit")
    if getattr(cfg, "dtype", "auto") != "auto":
        flags.append("--dtype")
    if getattr(cfg, "device", "auto") == "cuda":
        flags.append("--device cuda")
    return flags


def choose_backend(cfg: Any) -> str:
    """The backend a command runs on (checked before anything loads)."""
    model = getattr(cfg, "model", None)
    is_gguf = model is not None and Path(model).suffix == ".gguf"
    if _is_gguf(getattr(cfg, "lora", None)):
        if not is_gguf:
            raise CuteGPTError(f"--lora {cfg.lora} is a LoRA GGUF: give the base model's GGUF file as --model "
                               f"(`cutegpt export --format gguf` makes one).")
        if cfg.backend == "torch":
            raise CuteGPTError(f"--lora {cfg.lora} is a LoRA GGUF, which only llama.cpp runs; use --backend llamacpp "
                               f"(or the adapter's folder with --backend torch).")
    if cfg.backend == "llamacpp":
        blocked = [f for f in torch_only_flags(cfg) if f != "--lora"]
        if blocked:
            raise CuteGPTError(f"{blocked[0]} works only with --backend torch; llama.cpp runs the GGUF file's own weights.")
        if cfg.lora and is_gguf and not _is_gguf(cfg.lora):
            raise CuteGPTError("--lora with a .gguf model needs --backend torch or a LoRA GGUF (`cutegpt export --format "
                               "gguf-lora`), or export the merged model with `cutegpt export --format gguf --lora ...`.")
        return "llamacpp"
    if cfg.backend == "torch":
        return "torch"
    if torch_only_flags(cfg):
        return "torch"
    if model is None:
        return EMBEDDED_BACKEND
    return "llamacpp" if is_gguf else "torch"


def display_name(cfg: Any, lm: Any) -> str:
    """The model's name for the banner: its own name, never a cache folder's hash."""
    model = getattr(cfg, "model", None)
    if model is None:
        name = f"{EMBEDDED_NAME} (embedded)"
    elif Path(model).suffix == ".gguf":
        from cutegpt.runtime.llamacpp import gguf_model_name

        name = gguf_model_name(Path(model).expanduser())
    else:
        name = Path(model).expanduser().resolve().name
    if getattr(cfg, "lora", None):
        name += f" + LoRA {Path(cfg.lora).name}"
    return name


def _exported_gguf(folder: Path | None, lora: str | None, template: str | None) -> Path:
    """An HF folder (None: the embedded model) + adapter exported to GGUF once for --backend llamacpp, in the cache
    serve shares (`cutegpt.export.cache`): the same files give the same GGUF file, whichever command made it."""
    try:
        from cutegpt.export.gguf import export_gguf  # noqa: F401
    except ImportError:
        raise CuteGPTError(f"{folder or lora} needs a GGUF file for llama.cpp: export it first with "
                           f"`cutegpt export --format gguf --out model.gguf`, or use --backend torch.") from None
    from cutegpt.export.cache import cached_gguf

    # verification is export's and serve's job; chat starts as soon as the file is written
    return cached_gguf(str(folder) if folder else None, lora, quant="f16", template=template, verify=False, progress=False)


def embedded_llamacpp_file() -> Path:
    """The GGUF file llama.cpp runs for the embedded model (see EMBEDDED_GGUF_QUANT), made once into the cache
    straight from the shipped file (export/retype.py: seconds, no HF folder)."""
    from cutegpt.model.embedded import cache_dir, embedded_gguf

    shipped = embedded_gguf()
    if EMBEDDED_GGUF_QUANT is None:
        return shipped
    st = shipped.stat()
    key = hashlib.sha256(f"{shipped.name}:{st.st_size}".encode()).hexdigest()[:12]
    out = cache_dir() / "gguf" / f"smollm2-135m-instruct-{key}.{EMBEDDED_GGUF_QUANT}.gguf"
    if not out.is_file():
        from cutegpt.export.retype import retype_gguf

        # stderr: a piped chat's stdout carries JSON Lines only
        print(f"Preparing the embedded model for llama.cpp once ({EMBEDDED_GGUF_QUANT}, {out.parent})...", file=sys.stderr, flush=True)
        retype_gguf(shipped, out, quant=EMBEDDED_GGUF_QUANT)
    return out


def load_chat_model(cfg: Any, backend: str, threads: int) -> Any:
    """Load the model on `backend`: a torch `LoadedModel` or a `LlamaCppModel`."""
    if backend == "torch":
        from cutegpt.model.loading import load_model

        return load_model(cfg)
    from cutegpt.runtime.llamacpp import load_llamacpp

    name = display_name(cfg, None)
    if cfg.model is None and not cfg.lora:
        return load_llamacpp(embedded_llamacpp_file(), template=cfg.template, threads=threads, name=name)
    if cfg.model is None:  # --lora alone: on the base the adapter records (None: the embedded model), as torch does
        from cutegpt.model.adapter_base import base_folder

        lora = Path(cfg.lora).expanduser()
        if not (lora / "adapter_config.json").is_file():
            raise CuteGPTError(f"--lora {cfg.lora} is not a LoRA adapter folder: it has no adapter_config.json.")
        base = base_folder(lora)
        return _load_exported(cfg, base, threads, name)
    path = Path(cfg.model).expanduser()
    if path.suffix != ".gguf":
        if not path.is_dir():
            raise CuteGPTError(f"model path {path} does not exist." if not path.exists()
                               else f"{path} is a file; --model takes a model folder or a .gguf file.")
        if not (path / "config.json").is_file():
            raise CuteGPTError(f"{path} is not a model folder: it has no config.json.")
        return _load_exported(cfg, path, threads, name)
    lora = Path(cfg.lora).expanduser() if _is_gguf(cfg.lora) else None
    return load_llamacpp(path, template=cfg.template, threads=threads, name=name, lora=lora)


def _load_exported(cfg: Any, base: Path | None, threads: int, name: str) -> Any:
    """A folder (None: the embedded model) + cfg.lora on llama.cpp, through the shared export cache."""
    from cutegpt.runtime.llamacpp import load_llamacpp
    from cutegpt.templates import resolve_template_name

    folder = base
    if folder is None:
        from cutegpt.model.embedded import embedded_model_dir

        folder = embedded_model_dir()
    template = cfg.template or resolve_template_name(None, [cfg.lora, folder], _folder_tokenizer(folder, cfg.lora))
    gguf = _exported_gguf(base, cfg.lora, cfg.template)
    return load_llamacpp(gguf, template=template, threads=threads, name=name)


def _folder_tokenizer(path: Path, lora: str | None) -> Any:
    from cutegpt.model.loading import load_tokenizer

    src = Path(lora) if lora and (Path(lora) / "tokenizer_config.json").is_file() else path
    return load_tokenizer(src)


def model_generation_defaults(cfg: Any, lm: Any) -> tuple[dict[str, Any], str]:
    """What the model itself recommends, and where that came from."""
    from_llamacpp = getattr(lm, "generation_defaults", None)
    if from_llamacpp is not None and getattr(lm, "server", None) is not None:
        return from_llamacpp, "GGUF metadata"
    path = Path(lm.model_path)
    if path.suffix == ".gguf":
        from cutegpt.runtime.llamacpp import gguf_generation_defaults

        return gguf_generation_defaults(path), "GGUF metadata"
    return generation_config_defaults(path), "generation_config.json"


def resolved_generation(cfg: Any, lm: Any, verbose: bool = False) -> GenerationArgs:
    """The user's flags, then the model's generation_config.json / GGUF metadata, then the template's defaults."""
    defaults, source = model_generation_defaults(cfg, lm)
    gen, sources = resolve_generation(GenerationArgs.of(cfg), defaults, source, lm.template.name)
    if verbose:
        print(describe_sources(gen, sources), file=sys.stderr, flush=True)
    return gen


def make_engine(lm: Any, reuse_cache: bool) -> Any:
    if getattr(lm, "server", None) is not None:
        from cutegpt.chat.llamacpp import LlamaCppEngine

        return LlamaCppEngine(lm, reuse_cache=reuse_cache)
    from cutegpt.chat.engine import Engine

    return Engine(lm, reuse_cache=reuse_cache)


def setup_threads(requested: int, backend: str) -> int:
    if backend == "torch":
        from cutegpt.threads import apply_threads

        return apply_threads(requested)
    from cutegpt.threads import resolve_threads

    return resolve_threads(requested)
