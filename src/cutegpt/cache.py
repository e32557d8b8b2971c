"""`cutegpt cache`: what CuteGPT keeps in its cache folder, with sizes, and clearing it.

Everything there can be made again (at the cost of the first run's time): the embedded model's conversions,
GGUF exports for chat and serve, tokenizers read from GGUF files, on-the-fly dataset conversions, finished eval
subjects. Entries are the folders and files one level inside each kind; `chat_history` is the chat's line
history, listed but cleared only when named. Kinds older versions wrote and nothing reads now (`serve-gguf/`,
serve's own exports before it shared `gguf/`) are marked unused; their contents cannot be moved into `gguf/`,
whose names are content keys the old files do not record, so they are removed, not migrated.
The embedded model's folders converted by an older tokenizer rule (`models/smollm2-135m-instruct-<key>`,
the rule is in the key) are marked unused too.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from cutegpt.config import arg
from cutegpt.errors import CuteGPTError

KINDS = {  # folder in the cache -> what it holds
    "models": "the embedded model converted to a Hugging Face folder (torch commands)",
    "gguf": "GGUF exports for chat, generate and serve on llama.cpp",
    "serve-gguf": "GGUF exports made by serve before it shared gguf/ (never read now)",
    "tokenizers": "tokenizers read from GGUF files",
    "datasets": "on-the-fly conversions of training data",
    "eval": "finished subjects of eval runs (--resume)",
    "templates": "chat templates written for vLLM",
    "llamacpp": "llama.cpp built for this CPU (`cutegpt llamacpp build`)",
}
KEPT_UNLESS_NAMED = ("chat_history",)
UNUSED = ("serve-gguf",)  # kinds older versions wrote and no command reads: listed as such, their folder removed when cleared


@dataclass
class CacheConfig:
    """List what the cache holds (with sizes) or clear it."""

    entries: list[str] = arg([], "only these: a kind (gguf, models, ...) or one entry (gguf/NAME) as listed", positional=True)
    clear: bool = arg(False, "remove the entries (all of them, or those named); asks first unless --yes")
    yes: bool = arg(False, "with --clear: do not ask (needed when stdin is not a terminal)", aliases=("-y",))


@dataclass
class Entry:
    path: Path
    kind: str
    bytes: int
    unused: bool = False  # written by an older cutegpt and read by no command now

    def name(self, root: Path) -> str:
        return str(self.path.relative_to(root))


def _size(path: Path) -> int:
    """Bytes under `path`; links are not followed (a link to a model elsewhere costs nothing here)."""
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.lstat().st_size
        except OSError:  # removed meanwhile
            pass
    return total


def _current_embedded_folder() -> str | None:
    """Name of the embedded model's folder this cutegpt converts to (None without the embedded model)."""
    from cutegpt.model.embedded import embedded_gguf, embedded_model_target

    try:
        return embedded_model_target(embedded_gguf()).name
    except (CuteGPTError, OSError):
        return None


def _unused(path: Path, kind: str, embedded: str | None) -> bool:
    """Left by an older cutegpt: a kind nothing reads, or an embedded-model folder converted by an older rule
    (its key holds the tokenizer rule, so the current one is converted afresh beside it)."""
    if kind in UNUSED:
        return True
    from cutegpt.model.embedded import MODEL_PREFIX

    return kind == "models" and embedded is not None and path.name.startswith(MODEL_PREFIX) and path.name != embedded


def list_entries(root: Path) -> list[Entry]:
    """Every entry of the cache, by kind then name (hidden temporaries of running commands are not entries)."""
    out: list[Entry] = []
    if not root.is_dir():
        return out
    embedded = _current_embedded_folder()
    for top in sorted(root.iterdir()):
        if top.name.startswith("."):
            continue
        if top.name in KINDS and top.is_dir() and not top.is_symlink():
            out += [Entry(p, top.name, _size(p), _unused(p, top.name, embedded))
                    for p in sorted(top.iterdir()) if not p.name.startswith(".")]
        else:
            out.append(Entry(top, top.name, _size(top)))
    return out


def select(entries: list[Entry], root: Path, names: list[str], clearing: bool) -> list[Entry]:
    """The entries `names` pick (all but chat_history when none are named); an unknown name is one sentence."""
    if not names:
        return [e for e in entries if not (clearing and e.kind in KEPT_UNLESS_NAMED)]
    picked: list[Entry] = []
    for name in names:
        clean = name.strip("/")
        found = [e for e in entries if e.kind == clean or e.name(root) == clean]
        if not found:
            kinds = sorted({e.kind for e in entries})
            raise CuteGPTError(f"'{name}' is not in the cache {root} (kinds there: {', '.join(kinds) or 'none'}; "
                               "run `cutegpt cache` for the entries).")
        picked += [e for e in found if e not in picked]
    return picked


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise CuteGPTError("--clear asks before removing anything and stdin is not a terminal; add --yes to clear without asking.")
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def run_cache(cfg: CacheConfig) -> int:
    from cutegpt.io import clean_leftovers
    from cutegpt.model.embedded import cache_dir

    root = cache_dir()
    entries = list_entries(root)
    picked = select(entries, root, cfg.entries, cfg.clear)
    total = sum(e.bytes for e in picked)
    if not cfg.clear:
        print(f"cache {root}" + ("" if root.is_dir() else " (empty: nothing is cached yet)"))
        for e in picked:
            print(f"  {human(e.bytes):>9}  {e.name(root)}" + ("  (unused: left by an older cutegpt)" if e.unused else ""))
        print(f"  {human(total):>9}  total in {len(picked)} entr{'y' if len(picked) == 1 else 'ies'}"
              + ("" if cfg.entries else "; `cutegpt cache --clear` removes them (chat_history only when named)"))
        unused = [e for e in picked if e.unused]
        if unused:
            names = " ".join(sorted({e.kind if e.kind in UNUSED else e.name(root) for e in unused}))
            print(f"  {human(sum(e.bytes for e in unused)):>9}  of it no command reads any more; "
                  f"`cutegpt cache --clear {names}` removes it")
        return 0
    if not picked:
        print(f"nothing to clear in {root}.")
        return 0
    if not cfg.yes and not _confirm(f"remove {len(picked)} entr{'y' if len(picked) == 1 else 'ies'} ({human(total)}) from {root}?"):
        print("nothing removed.")
        return 0
    for e in picked:
        try:
            _remove(e.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            from cutegpt.io import describe_os_error

            raise CuteGPTError(describe_os_error(err, e.path, "removing")) from None
    for kind in KINDS:  # what killed commands left behind (dead processes only)
        if (root / kind).is_dir():
            clean_leftovers(root / kind)
    for kind in UNUSED:  # nothing writes there any more: the emptied folder goes too
        try:
            (root / kind).rmdir()
        except OSError:  # absent, or not empty (entries not named)
            pass
    print(f"removed {len(picked)} entr{'y' if len(picked) == 1 else 'ies'} ({human(total)}) from {root}.")
    return 0
