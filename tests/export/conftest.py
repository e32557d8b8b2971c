"""Tiny random LLaMAs in the four shapes GGUF export must handle (built once per session).

    sp-gqa-untied    SentencePiece tokenizer.model (byte fallback), 4 heads / 2 KV heads, separate output head
    sp-mha-tied      SentencePiece, 4 / 4 heads, head tied to the embedding
    bpe-gqa-tied     byte-level BPE tokenizer.json (GPT-2 style, like SmolLM2), 4 / 2, tied
    bpe-mha-untied   byte-level BPE, 4 / 4, untied, rope theta 50000 and linear rope scaling
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import build_sp_tokenizer, build_tiny_llama, build_tokenizer

VARIANTS = {
    "sp-gqa-untied": dict(family="sp", heads=4, kv_heads=2, tie=False),
    "sp-mha-tied": dict(family="sp", heads=4, kv_heads=4, tie=True),
    "bpe-gqa-tied": dict(family="bpe", heads=4, kv_heads=2, tie=True),
    "bpe-mha-untied": dict(family="bpe", heads=4, kv_heads=4, tie=False,
                           rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}),
}


def build_variant(out: Path, name: str) -> Path:
    spec = dict(VARIANTS[name])
    family = spec.pop("family")
    tok = build_sp_tokenizer(out) if family == "sp" else build_tokenizer(out, chat_template=False)
    build_tiny_llama(out, vocab_size=len(tok), seed=len(name), **spec)
    return out


@pytest.fixture(scope="session")
def variant_dirs(tmp_path_factory) -> dict[str, Path]:
    return {name: build_variant(tmp_path_factory.mktemp(name), name) for name in VARIANTS}


@pytest.fixture(scope="session")
def bpe_dir(variant_dirs) -> Path:
    return variant_dirs["bpe-gqa-tied"]


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models of every supported architecture (tests/export/archs.py), built once per session."""
    from tests.export.archs import ARCH_VARIANTS, build_arch_variant

    return {name: build_arch_variant(tmp_path_factory.mktemp(name), name) for name in ARCH_VARIANTS}
