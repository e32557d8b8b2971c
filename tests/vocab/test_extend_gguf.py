"""Vocabularies grown by `vocab extend` export to GGUF and tokenize identically in llama.cpp."""

from __future__ import annotations

import pytest

pytest.importorskip("xllamacpp")


@pytest.mark.parametrize("family", ["sp", "bpe"])
def test_extended_vocabulary_tokenizes_identically(family, sp_extended, bpe_extended, tmp_path):
    from transformers import AutoTokenizer

    from cutegpt.export import gguf as gx
    from cutegpt.export.verify import LlamaCpp

    folder = sp_extended if family == "sp" else bpe_extended
    out = gx.export_gguf(str(folder), tmp_path / "ext.gguf", quant="f16", template="cutegpt", progress=False)
    assert gx.last_report["verification"]["tokenization"]["ok"]
    tok = AutoTokenizer.from_pretrained(folder)
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
