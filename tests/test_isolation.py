"""The test suite never writes into the user's own caches (issue 19): every cache points into one folder per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import CACHE_ROOT, CACHES

ROOT = Path(__file__).resolve().parents[1]


def test_every_cache_is_inside_the_sessions_folder():
    from cutegpt.model.embedded import cache_dir
    from cutegpt.training.sft import cache_root

    home = Path.home().resolve()
    for var in (*CACHES, "CUTEGPT_CHAT_HISTORY"):
        path = Path(os.environ[var]).resolve()
        assert path.is_relative_to(CACHE_ROOT.resolve()) and not path.is_relative_to(home), var
    assert cache_dir().resolve().is_relative_to(CACHE_ROOT.resolve())
    assert cache_root().resolve().is_relative_to(CACHE_ROOT.resolve())  # on-the-fly dataset conversions too


def test_child_processes_use_the_same_caches():
    """Commands run as subprocesses (serve, torchrun, the sweep) write where this process would."""
    code = ("import os; from cutegpt.model.embedded import cache_dir; import torch.utils.cpp_extension as c; "
            "print(cache_dir()); print(c._get_build_directory('x', False))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    cache, extensions = out.split()
    assert Path(cache) == CACHE_ROOT / "cutegpt" and Path(extensions).is_relative_to(CACHE_ROOT / "torch_extensions")


def test_libraries_read_the_caches_after_they_were_pointed():
    """Libraries that read their cache folder at import time were imported after conftest set it."""
    import huggingface_hub.constants as hub

    assert Path(hub.HF_HOME).is_relative_to(CACHE_ROOT) and Path(hub.HF_HUB_CACHE).is_relative_to(CACHE_ROOT)
