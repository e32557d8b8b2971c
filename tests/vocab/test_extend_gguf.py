"""Vocabularies grown by `vocab extend` export to GGUF and tokenize identically in llama.cpp."""

from __future__ import annotations

import pytest

pytest.importorskip("xllamacpp")


@pytest.mark.parametrize("family", ["sp", "bpe"])
def test_extended_vocabulary_tokenizes_identically(family, sp_extended, bpe_extended, tmp_path):
    from cutegpt.export import gguf as gx
    from cutegpt.export.verify import LlamaCpp
    from cutegpt.model.tokenizer import load_tokenizer

    folder = sp_extended if family == "sp" else bpe_extended
    out = gx.export_gguf(str(folder), tmp_path / "ext.gguf", quant="f16", template="cutegpt", progress=False)
    assert gx.last_report["verification"]["tokenization"]["ok"]
    tok = load_tokenizer(folder)
    texts = ["机器学习是人工智能的一个分支。", "中国的首都是北京 and the capital of France is Paris.", "深度学习使用多层神经网络，效果很好！"]
    with LlamaCpp(out) as cpp:
        for text in texts:
            assert cpp.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
    new = [i for text in texts for i in tok(text, add_special_tokens=False)["input_ids"] if i >= len(tok) - 2000]
    assert new  # the texts really use extended tokens


def test_extended_tokenizer_carries_the_template(sp_extended):
    from transformers import AutoTokenizer

    from cutegpt.templates import chat_template_jinja, read_model_card

    if read_model_card(sp_extended).get("template") != "cutegpt":
        pytest.skip("the base model's template is not cutegpt")
    assert AutoTokenizer.from_pretrained(sp_extended).chat_template == chat_template_jinja("cutegpt")


@pytest.mark.parametrize("family", ["sp", "bpe"])
def test_extended_vocabulary_equals_its_reference_on_every_probe(family, sp_extended, bpe_extended):
    """SentencePiece: sentencepiece on the merged tokenizer.model; BPE: the merged tokenizer.json's own pipeline."""
    from cutegpt.model.probes import probe_texts
    from cutegpt.model.tokenizer import load_tokenizer
    from tests.reference import SentencePieceReference

    folder = sp_extended if family == "sp" else bpe_extended
    tok = load_tokenizer(folder)
    if family == "sp":
        ref = SentencePieceReference(folder).encode
    else:
        from tokenizers import Tokenizer

        published = Tokenizer.from_file(str(folder / "tokenizer.json"))
        ref = lambda text, add: published.encode(text, add_special_tokens=add).ids  # noqa: E731
    texts = probe_texts(tok) + ["机器学习是人工智能的一个分支。", " 深度学习", "<s>中国的首都是北京"]
    for text in texts:
        for add in (False, True):
            assert list(tok(text, add_special_tokens=add)["input_ids"]) == ref(text, add), (text, add)


def test_extension_keeps_the_base_pre_tokenizer(bpe_base, corpus_txt, tmp_path):
    """A base with SmolLM2's digit split: the extended tokenizer.json keeps it and exports as llama.cpp's `smollm`."""
    import json
    import shutil

    from tokenizers import Tokenizer

    from cutegpt.export import gguf as gx
    from cutegpt.model.tokenizer import PRE_TOKENIZERS, load_tokenizer
    from tests.vocab.conftest import extend, train_pieces

    base = tmp_path / "base"
    shutil.copytree(bpe_base, base)
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.pre_tokenizer = PRE_TOKENIZERS["smollm"]()
    tok.save(str(base / "tokenizer.json"))
    pieces = train_pieces(corpus_txt, base, tmp_path / "pieces", 1500)
    out = extend(base, pieces, tmp_path / "ext")
    want = json.loads((base / "tokenizer.json").read_text())["pre_tokenizer"]
    got = json.loads((out / "tokenizer.json").read_text())
    assert got["pre_tokenizer"] == want
    assert load_tokenizer(out)(" ١٢٣", add_special_tokens=False)["input_ids"] == Tokenizer.from_file(str(out / "tokenizer.json")).encode(" ١٢٣", add_special_tokens=False).ids
    assert gx.pre_tokenizer_name(got, load_tokenizer(out)) == "smollm"
