"""`vocab extend` on a Qwen2-style (byte-level BPE, Qwen2 split rule) and a Gemma 2-style (SentencePiece, no dummy
prefix) base: English tokenizes exactly as before, and the grown vocabulary exports to GGUF that llama.cpp
tokenizes like transformers."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cutegpt.vocab.text import CODE_PROBES, ENGLISH_PROBES
from tests.export.archs import build_arch_variant
from tests.vocab.conftest import extend, recipe_corpus, train_pieces

ENGLISH = ENGLISH_PROBES + CODE_PROBES + [t for t in recipe_corpus() if t.isascii()]
CHINESE = [t for t in recipe_corpus() if not t.isascii()]


@pytest.fixture(scope="module", params=["qwen2-bpe-tied", "gemma2-sp-tied"])
def grown(request, corpus_txt, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = build_arch_variant(root / "base", request.param)
    pieces = train_pieces(corpus_txt, base, root / "zh", 1500)
    return request.param, base, extend(base, pieces, root / "ext")


def test_english_tokenizes_identically(grown):
    _, base, ext = grown
    old, new = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(ext)
    assert len(new) > len(old)
    for text in ENGLISH:
        assert old(text, add_special_tokens=False)["input_ids"] == new(text, add_special_tokens=False)["input_ids"], text
    def count(tok):
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in CHINESE)

    assert count(new) < 0.9 * count(old)


@pytest.mark.slow
def test_grown_vocabulary_exports_and_tokenizes_in_llamacpp(grown, tmp_path):
    pytest.importorskip("xllamacpp")
    from cutegpt.export import gguf as gx
    from cutegpt.export.verify import LlamaCpp

    name, _, ext = grown
    out = gx.export_gguf(str(ext), tmp_path / "ext.gguf", quant="f16", template="auto", progress=False)
    report = gx.last_report["verification"]
    assert report["tokenization"]["ok"] and report["top1"]["greedy_same"]
    tok = AutoTokenizer.from_pretrained(ext)
    texts = ["机器学习是人工智能的一个分支。", "中国的首都是北京 and the capital of France is Paris."]
    with LlamaCpp(out) as cpp:
        for text in texts:
            assert cpp.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
