"""What `cutegpt serve` serves: a GGUF file found or made from --model/--lora, and its chat template.

- no --model (and no --lora): the embedded model's GGUF, served as it is;
- a .gguf file: served as it is;
- an HF folder or an adapter folder (with --lora merged): exported to GGUF once into the cache that chat and
  generate share (`cutegpt.export.cache`); the next start, or a chat on the same files, reuses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cutegpt.errors import CuteGPTError
from cutegpt.export.cache import _exporter, cached_gguf
from cutegpt.io import run_name  # noqa: F401  (the model id clients see; export names GGUF files the same way)


@dataclass
class ServedModel:
    gguf: Path
    name: str  # the model id clients see in /v1/models
    template: str  # "cutegpt" or "auto" (the GGUF's own)
    jinja: str | None  # template text given to llama.cpp; None = the GGUF's own
    stop: list[str]  # stop strings added to every request
    hf_folder: Path | None  # for --engine vllm
    source: str  # what the user asked for, for the start-up banner
    model_defaults: dict = field(default_factory=dict)  # the sampling settings the model recommends (chat's source too)
    lora: Path | None = None  # a LoRA GGUF llama.cpp applies on top of `gguf` (export --format gguf-lora)


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def _is_hf_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def gguf_chat_template(path: Path) -> str | None:
    """The `tokenizer.chat_template` stored in a GGUF file, or None."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path), "r")
    except Exception as e:  # not a GGUF file, truncated, ...
        raise CuteGPTError(f"--model {path} is not a readable GGUF file ({type(e).__name__}: {e}).") from None
    field = reader.fields.get("tokenizer.chat_template")
    if field is None:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception:
        return None


def _template_name(explicit: str | None, folders: list[Path | None]) -> str | None:
    """The served format: the one asked for, else cutegpt or auto by what the folders' model card records."""
    from cutegpt.export.cache import export_template

    if explicit:
        return explicit
    recorded = export_template(None, folders)
    return None if recorded is None else "cutegpt" if recorded == "cutegpt" else "auto"


def _adapter_base(adapter: Path) -> Path | None:
    """The local base model folder an adapter records (None: the embedded model)."""
    try:
        base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        raise CuteGPTError(f"{adapter / 'adapter_config.json'} is not valid JSON.") from None
    if not base:
        return None
    from cutegpt.model.adapter_base import base_folder

    return base_folder(adapter)  # a local folder or the hub cache; else one sentence naming --model


def _looks_cutegpt(jinja: str | None) -> bool:
    return bool(jinja) and "<end>" in jinja and "问：" in jinja


def resolve_model(model: str | None, lora: str | None, template: str | None, quant: str,
                  *, export: bool = True, progress: bool = True) -> ServedModel:
    """Find (or make once) the GGUF to serve and decide its template; raises CuteGPTError for bad paths."""
    from cutegpt.serve.template import cutegpt_jinja

    from cutegpt.generation import generation_config_defaults

    hf_folder: Path | None = None
    lora_gguf: Path | None = None
    model_defaults: dict | None = None  # None: the GGUF file's own metadata
    if model is None and lora is None:
        from cutegpt.chat.backend import embedded_llamacpp_file

        gguf = embedded_llamacpp_file()  # the file chat and generate run, so all three give the same answer
        source = f"embedded model, {gguf.name}"
        name = "smollm2-135m-instruct"
    elif model is not None and model.lower().endswith(".gguf"):
        gguf = Path(model)
        if not gguf.is_file():
            raise CuteGPTError(f"--model {gguf} does not exist.")
        source = str(gguf)
        name = gguf.stem
        if lora:
            lora_gguf = _lora_gguf(Path(lora))
            source += f" + LoRA {lora_gguf}"
            name = lora_gguf.stem
    else:
        folder = Path(model) if model else None
        adapter = Path(lora) if lora else None
        for flag, path in (("--model", folder), ("--lora", adapter)):
            if path is not None and not path.is_dir():
                raise CuteGPTError(f"{flag} {path} is neither a .gguf file nor a folder.")
        if folder is not None and not (_is_hf_model(folder) or _is_adapter(folder)):
            raise CuteGPTError(f"--model {folder} has no config.json or adapter_config.json; give an HF model folder, an adapter folder or a .gguf file.")
        if adapter is not None and not _is_adapter(adapter):
            raise CuteGPTError(f"--lora {adapter} has no adapter_config.json.")
        if folder is not None and _is_adapter(folder):
            if adapter is not None:
                raise CuteGPTError(f"--model {folder} is a LoRA adapter; give its base model as --model and the adapter as --lora.")
            folder, adapter = _adapter_base(folder), folder
            model, lora = (str(folder) if folder else None), str(adapter)
        elif folder is None and adapter is not None:  # --lora alone: on the base it records, as chat does
            folder = _adapter_base(adapter)
            model = str(folder) if folder else None
        hf_folder = folder
        asked = template  # the export gets what was asked (the cache resolves it as chat does: one file for both)
        template = _template_name(template, [adapter, folder]) or template
        gguf = cached_export(model, lora, quant=quant, template=asked, progress=progress) if export else Path("<not exported>")
        source = " + LoRA ".join(str(p) for p in (folder, adapter) if p is not None) or "embedded model"
        name = run_name(adapter or folder) if (adapter or folder) else "cutegpt"
        model_defaults = {**generation_config_defaults(folder), **generation_config_defaults(adapter)}
    own = gguf_chat_template(gguf) if gguf.is_file() else None
    if template is None:
        template = "cutegpt" if (own is None or _looks_cutegpt(own)) else "auto"
    if template == "auto" and own is None:
        raise CuteGPTError(f"--template auto needs a chat template in the model, and {gguf} has none; use --template cutegpt.")
    jinja = cutegpt_jinja() if template == "cutegpt" else None
    stop = ["<end>"] if template == "cutegpt" else []
    if model_defaults is None:
        from cutegpt.runtime.llamacpp import gguf_generation_defaults

        model_defaults = gguf_generation_defaults(gguf)
    return ServedModel(gguf, name, template, jinja, stop, hf_folder, source, model_defaults, lora_gguf)


def _lora_gguf(lora: Path) -> Path:
    """--lora on a .gguf model: a LoRA GGUF (export --format gguf-lora); llama.cpp checks its architecture at load."""
    if lora.suffix.lower() != ".gguf":
        raise CuteGPTError(f"--lora needs an HF model folder as --model (a .gguf file already has its weights merged), or a "
                           f"LoRA GGUF: make one with `cutegpt export --format gguf-lora --lora {lora}`.")
    if not lora.is_file():
        raise CuteGPTError(f"--lora {lora} does not exist.")
    from cutegpt.export.gguf_lora import is_lora_gguf

    if not is_lora_gguf(lora):
        raise CuteGPTError(f"--lora {lora} is not a LoRA GGUF (its general.type is not 'adapter').")
    return lora


# ----------------------------------------------------------------------------- cache


def cached_export(model: str | None, lora: str | None, *, quant: str, template: str | None, progress: bool = True) -> Path:
    """The GGUF of model (+ lora), from the cache chat and generate share (exported once, verified)."""
    return cached_gguf(model, lora, quant=quant, template=template, verify=True, progress=progress, exporter=_exporter())
