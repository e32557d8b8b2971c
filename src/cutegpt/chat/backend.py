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

from cutegpt.chat.args import GenerationArgs, describe_sources, generation_config_defaults, resolve_generation
from cutegpt.config import arg
from cutegpt.errors import CuteGPTError

# Measured on the embedded model, one thread, side by side (docs/benchmarks.md): llama.cpp on the
# embedded Q4_1 file decodes ~4x faster than torch fp32, starts faster, and agrees with fp32 on most top-1 tokens.
EMBEDDED_BACKEND = "llamacpp"
# The file llama.cpp runs for the embedded model: None = the Q4_1 file the package ships; a quant type =
# our export of it at that type, made once into the cache (the shipped Q4_1 file disagrees with fp32 more).
EMBEDDED_GGUF_QUANT: str | None = "f16"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
BACKEND_HELP = ("inference engine: llama.cpp (fast on CPU, GGUF files) or torch (any HF folder, LoRA, 8-bit); "
                "auto = llama.cpp for a .gguf file and the embedded model, torch for a folder")
Backend = Literal["auto", "torch", "llamacpp"]


@dataclass
class BackendArgs:
    backend: Backend = arg("auto", BACKEND_HELP)


def torch_only_flags(cfg: Any) -> list[str]:
    flags = []
    if getattr(cfg, "lora", None):
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
    if cfg.backend == "llamacpp":
        blocked = [f for f in torch_only_flags(cfg) if f != "--lora"]
        if blocked:
            raise CuteGPTError(f"{blocked[0]} works only with --backend torch; llama.cpp runs the GGUF file's own weights.")
        if cfg.lora and is_gguf:
            raise CuteGPTError("--lora with a .gguf model needs --backend torch, or export the merged model with "
                               "`cutegpt export --format gguf --lora ...` and chat with that file.")
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


def _exported_gguf(folder: Path, lora: str | None) -> Path:
    """An HF folder (+ adapter) exported to GGUF once, in the cache, for --backend llamacpp."""
    try:
        from cutegpt.export.gguf import export_gguf
    except ImportError:
        raise CuteGPTError(f"{folder} is a model folder and llama.cpp needs a GGUF file: export it first with "
                           f"`cutegpt export --format gguf --model {folder} --out model.gguf`, or use --backend torch.") from None
    from cutegpt.model.embedded import cache_dir

    parts = []
    for base in [folder] + ([Path(lora)] if lora else []):
        for f in sorted(base.glob("*")):
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    out = cache_dir() / "gguf" / f"{folder.resolve().name}-{key}.f16.gguf"
    if not out.is_file():
        print(f"Exporting {folder} to GGUF (f16) once for llama.cpp: {out}", file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(str(folder), out, lora=lora, quant="f16", verify=False, overwrite=True, progress=False)
    return out


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
    if cfg.model is None:
        return load_llamacpp(embedded_llamacpp_file(), template=cfg.template, threads=threads, name=name)
    path = Path(cfg.model).expanduser()
    if path.suffix != ".gguf":
        if not path.is_dir():
            raise CuteGPTError(f"model path {path} does not exist." if not path.exists()
                               else f"{path} is a file; --model takes a model folder or a .gguf file.")
        if not (path / "config.json").is_file():
            raise CuteGPTError(f"{path} is not a model folder: it has no config.json.")
        from cutegpt.templates import resolve_template_name

        template = cfg.template or resolve_template_name(None, [cfg.lora, path], _folder_tokenizer(path, cfg.lora))
        path = _exported_gguf(path, cfg.lora)
        return load_llamacpp(path, template=template, threads=threads, name=name)
    return load_llamacpp(path, template=cfg.template, threads=threads, name=name)


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
