"""Outputs: checked before any work, written atomically, readable by others.

Every command that writes follows one rule (issue: nothing a user types destroys data):

1. `check_output` before anything loads: the output must not be, contain or lie
   inside an input; an existing output is refused unless `--overwrite`; the
   place must be writable.
2. `atomic_dir` / `atomic_file` write under a hidden temporary name beside the
   final one and rename when complete, so an existing output is replaced only
   by a complete new one, and an error or Ctrl-C leaves the old one untouched.
3. Files get the umask's normal mode (transformers writes weights 0600, which
   makes a shared model folder unreadable to colleagues).
4. Leftovers of killed runs (`.NAME.tmp-*`, `.NAME.old-PID`) are removed the next
   time something is written beside them, once their process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from cutegpt.errors import CuteGPTError


class OutputExistsError(CuteGPTError, FileExistsError):
    """The output appeared while we were writing (another run on the same --out)."""


def check_output(path: str | Path, *, flag: str = "--out", inputs: Iterable[str | Path | None] = (),
                 overwrite: bool = False, kind: Literal["folder", "file"] = "folder") -> Path:
    """Refuse an output that would destroy data or cannot be written; returns it as a Path."""
    out = Path(path)
    if str(path).strip() == "":
        raise CuteGPTError(f"{flag} must name a {kind}.")
    resolved = out.resolve()
    for given in inputs:
        if given is None or str(given) == "":
            continue
        src = Path(given).resolve()
        if resolved == src:
            raise CuteGPTError(f"{flag} {out} is the input {given}; choose another {flag}.")
        if src.is_relative_to(resolved):
            raise CuteGPTError(f"{flag} {out} contains the input {given}; choose another {flag}.")
        if resolved.is_relative_to(src) and src.is_dir():
            raise CuteGPTError(f"{flag} {out} lies inside the input folder {given}; choose another {flag}.")
    if out.exists():
        if kind == "folder" and not out.is_dir():
            raise CuteGPTError(f"{flag} {out} is a file; it must be a folder.")
        if kind == "file" and out.is_dir():
            raise CuteGPTError(f"{flag} {out} is a folder; it must be a file.")
        if not overwrite:
            raise CuteGPTError(f"{flag} {out} already exists; pass --overwrite to replace it or choose another {flag}.")
    parent = _existing_parent(resolved.parent)
    if not parent.is_dir():
        raise CuteGPTError(f"{flag} {out}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CuteGPTError(f"{flag} {out}: cannot write in {parent} (permission denied or read-only).")
    return out


def check_input(path: str | Path, *, flag: str, kind: Literal["folder", "file", "any"] = "any") -> Path:
    """An input that must exist (and be a file or a folder): one sentence naming the flag otherwise."""
    p = Path(path)
    if not p.exists():
        raise CuteGPTError(f"{flag} {p} does not exist.")
    if kind == "folder" and not p.is_dir():
        raise CuteGPTError(f"{flag} {p} is a file; it must be a folder.")
    if kind == "file" and p.is_dir():
        raise CuteGPTError(f"{flag} {p} is a folder; it must be a file.")
    return p


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def os_errors(path: str | Path, doing: str = "writing") -> Iterator[None]:
    """Turn the operating system's write errors into one sentence that names `path`."""
    try:
        yield
    except OutputExistsError:
        raise
    except OSError as e:
        raise CuteGPTError(describe_os_error(e, path, doing)) from e
    except Exception as e:  # safetensors and torch.save report a full disk as their own error types
        if "No space left" in str(e) or "Read-only file system" in str(e):
            raise CuteGPTError(describe_os_error(OSError(errno.ENOSPC if "space" in str(e) else errno.EROFS, str(e)), path, doing)) from e
        if "enforce fail" in str(e) and any(w in str(e) for w in ("write failed", "unexpected pos", "PytorchStreamWriter")):
            # torch.save on a full disk: "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
            full = _nearly_full(Path(path))
            reason = OSError(errno.ENOSPC, "") if full else OSError(errno.EIO, "the write failed (an I/O error)")
            raise CuteGPTError(describe_os_error(reason, path, doing)) from e
        raise


def _nearly_full(path: Path) -> bool:
    """torch.save says only "file write failed"; a disk with under 64 MiB free is why."""
    try:
        return shutil.disk_usage(_existing_parent(path.resolve())).free < 64 << 20
    except OSError:
        return False


def describe_os_error(e: OSError, path: str | Path, doing: str = "writing") -> str:
    reasons = {
        errno.ENOSPC: "the disk is full; free some space (nothing was left half-written)",
        errno.EDQUOT: "the disk quota is exhausted; free some space",
        errno.EROFS: "the file system is read-only; choose another place",
        errno.EACCES: "permission denied; choose a place you can write to",
        errno.EPERM: "permission denied; choose a place you can write to",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "it is a folder, not a file",
        errno.ENAMETOOLONG: "the name is too long",
    }
    reason = reasons.get(e.errno, e.strerror or str(e))
    return f"{path}: failed {doing}: {reason}."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fix_modes(root: Path) -> None:
    """Give every file and folder under `root` the umask's normal mode (0644 / 0755 typically)."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp-(?:(?P<tmp_pid>\d+)-)?.+|old-(?P<pid>\d+))$")
_OLD_MERGE = re.compile(r"^\.cutegpt-merge-")  # GGUF export's LoRA merge before it carried its PID (owner unknown)


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove `.X.tmp-*` and `.X.old-PID` left in `folder` by killed runs (their process is gone)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _LEFTOVER.match(entry.name)
        if not m and not _OLD_MERGE.match(entry.name):
            continue
        pid = (int(m["pid"] or m["tmp_pid"] or 0) or None) if m else None
        if pid is None and time.time() - entry.lstat().st_mtime < 86400:
            continue  # owner unknown (an older version wrote it): leave it a day in case it is still at work
        if pid is not None and _alive(pid):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def put_in_place(new: Path, final: Path) -> None:
    """Rename the complete folder `new` to `final` (readable modes), replacing an old `final` only now."""
    fix_modes(new)
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")  # cleaned at a later start if we die here
        os.replace(final, trash)
        os.replace(new, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, final)


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; rename it to `final` on success.

    On any exception (Ctrl-C included) the temporary folder is removed, so a
    half-written result never sits under the final name. An existing `final` is
    replaced only when `overwrite` is set, and only once the new one is complete.
    """
    final = Path(final)
    with os_errors(final, "creating the output folder"):
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        with os_errors(final):
            yield tmp
            if final.exists() and not overwrite:
                raise OutputExistsError(f"{final} appeared while this run was writing it (another run on the same output?); "
                                        f"the new result was discarded.")
            put_in_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """Open a temporary file beside `final`; rename it to `final` when closed cleanly."""
    final = Path(final)
    with os_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
        os.close(fd)
        os.chmod(name, 0o666 & ~_umask())
    try:
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")
        with os_errors(final):
            with open(name, mode, **kwargs) as f:
                yield f
            os.replace(name, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


MAX_JSON_DEPTH = 100  # conversations and records nest 3-4 levels; Python's parser itself gives up near 1,000
MAX_JSON_DIGITS = 100  # Python refuses past 4,300 digits anyway; no field of ours needs more than a few


class _HugeInt:
    """Stands in for an integer of too many digits, so the check that follows can say where it was."""

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(text: str) -> int | _HugeInt:
    digits = len(text.lstrip("-"))
    return _HugeInt(digits) if digits > MAX_JSON_DIGITS else int(text)


class _NotFinite:
    """Stands in for NaN, Infinity or a float beyond float64 (1e400): Python's parser takes them, JSON has none."""

    def __init__(self, text: str):
        self.text = text


def _parse_float(text: str) -> float | _NotFinite:
    value = float(text)
    return value if math.isfinite(value) else _NotFinite(text)


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)


def _nesting_field(path: str) -> str:
    """The field a too-deep chain hangs from: `path` without its trailing indices, at most 8 names long."""
    names = re.sub(r"(\[\d+\])+$", "", path).split(".")
    return ".".join(names[:8]) + (".…" if len(names) > 8 else "")


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"\s*:?|[\[\]{},]')


def too_deep_at(text: str, max_depth: int) -> str:
    """The path ('messages[0].content') where `text` first nests deeper than `max_depth` (for the message only)."""
    path: list[str | int | None] = []  # one entry per open container: its current key or index
    for m in _JSON_TOKEN.finditer(text):
        tok = m.group()
        if tok in "[{":
            if len(path) >= max_depth:
                break
            path.append(0 if tok == "[" else None)
        elif tok in "]}":
            if path:
                path.pop()
        elif tok == ",":
            if path and isinstance(path[-1], int):
                path[-1] += 1
        elif tok.endswith(":") and path:
            path[-1] = json.loads(tok[:-1].rstrip(), strict=False)
    out = ""
    for key in path:
        out = _join(out, "?" if key is None else key)
    return _nesting_field(out)


def json_problem(data: Any, max_depth: int = MAX_JSON_DEPTH) -> tuple[str, str] | None:
    """(path, what is wrong) for the first value of parsed JSON that is not usable data, else None.

    Checks nesting beyond `max_depth`, huge integers (parsed with `JSON_HOOKS`) and lone UTF-16 surrogates
    (valid JSON escapes, but not text: every later encode would fail). Iterative: the check must not recurse.
    """
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, _HugeInt):
            return path, f"a {value.digits:,}-digit number"
        if isinstance(value, _NotFinite):
            return path, f"{value.text[:20]}, which is not a finite JSON number"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path, "a lone UTF-16 surrogate escape (such as \\ud800), which is not text"
        elif isinstance(value, (list, dict)):
            if depth > max_depth:
                return _nesting_field(path), f"nesting more than {max_depth} levels deep"
            items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
            stack.extend((k, path, depth) for k, _ in reversed(items) if isinstance(k, str))
            stack.extend((v, _join(path, k), depth + 1) for k, v in reversed(items))
    return None


JSON_HOOKS: dict[str, Any] = {"parse_int": _parse_int, "parse_float": _parse_float, "parse_constant": _NotFinite}  # json.loads(text, **JSON_HOOKS) before json_problem


def load_json_text(text: str | bytes, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads for text a user gives: anything it cannot take is one sentence naming `where`.

    Besides malformed JSON: what `json_problem` finds (deep nesting, huge integers, lone surrogates).
    """
    try:
        data = json.loads(text, **JSON_HOOKS)
    except json.JSONDecodeError as e:
        raise CuteGPTError(f"{where}: not valid JSON ({e.msg}).") from None
    except UnicodeDecodeError:
        raise CuteGPTError(f"{where}: not UTF-8 text.") from None
    except RecursionError:
        raise CuteGPTError(f"{where}: nested more than {max_depth} levels deep.") from None
    problem = json_problem(data, max_depth)
    if problem is not None:
        what = problem[1]
        if what.startswith("nesting"):
            raise CuteGPTError(f"{where}: nested more than {max_depth} levels deep.")
        if what.endswith("-digit number"):
            raise CuteGPTError(f"{where}: holds {what}; numbers must be at most {MAX_JSON_DIGITS} digits.")
        raise CuteGPTError(f"{where}: holds {what}.")
    return data


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, adapter_config.json): one sentence otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
        raise CuteGPTError(f"{path}: not valid JSON.") from None
    if not isinstance(data, dict):
        raise CuteGPTError(f"{path}: must hold a JSON object of settings, not a {type(data).__name__}.")
    return data


# checkpoint folders a run writes: serve them under the run's name ("runs/sft/final" -> "sft")
_RUN_PARTS = re.compile(r"^(final|best|last|latest|checkpoint-\d+)$")


def run_name(folder: Path) -> str:
    """The model id clients see for a folder: its own name, or its run's for a checkpoint folder of a run."""
    folder = folder.expanduser().resolve()
    if _RUN_PARTS.match(folder.name) and folder.parent.name:
        return folder.parent.name if folder.name in ("final", "best", "last", "latest") else f"{folder.parent.name}-{folder.name}"
    return folder.name


def data_fingerprint(paths: list[str | None]) -> str:
    """A cheap digest of the data given: every file's relative name, size, and first and last MiB."""
    h = hashlib.sha256()
    for given in paths:
        if not given:
            continue
        root = Path(given)
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            if any(part.startswith(".") for part in f.relative_to(root).parts) if root.is_dir() else False:
                continue
            try:
                size = f.stat().st_size
                h.update(f"{f.relative_to(root) if root.is_dir() else f.name}:{size}".encode())
                with open(f, "rb") as fh:
                    h.update(fh.read(1 << 20))
                    if size > 2 << 20:
                        fh.seek(-(1 << 20), 2)
                        h.update(fh.read())
            except OSError:
                h.update(f"{f}:unreadable".encode())
    return h.hexdigest()[:16]
