"""Model names that are not local paths: Hugging Face hub ids.

Nothing is downloaded (the project runs offline); a hub id found in the local
hub cache loads from there, any other gets the one command that fetches it.
"""

from __future__ import annotations

import re
from pathlib import Path

from cutegpt.errors import CuteGPTError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.endswith((".gguf", ".json", ".safetensors"))


def resolve_model_path(name: str, flag: str = "--model") -> Path:
    """A local path as given, or the local hub-cache folder of a hub id; one sentence when neither exists."""
    path = Path(name).expanduser()
    if path.exists() or not looks_like_hub_id(name):
        return path
    cached = _from_hub_cache(name)
    if cached is not None:
        return cached
    raise CuteGPTError(
        f"{flag} {name} is not a local path; it looks like a Hugging Face hub id that is not in the local hub cache. "
        f"Fetch it with `hf download {name} --local-dir {name.split('/')[-1]}` (older huggingface_hub: "
        f"`huggingface-cli download ...`) and pass that folder, or set HF_HOME to the cache that holds it."
    )


def _from_hub_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, or no huggingface_hub: both mean "not here"
        return None
    return Path(folder)
