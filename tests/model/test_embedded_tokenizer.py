"""The embedded SmolLM2's HF folder tokenizes as SmolLM2 was published (digits one by one: llama.cpp's `smollm`
rule), equal to llama.cpp on the shipped Q4_1 GGUF for every probe text."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_embedded_folder_has_smollm_pre_tokenizer(embedded_dir):
    from cutegpt.export import gguf as gx
    from cutegpt.model.tokenizer import PRE_TOKENIZERS, load_tokenizer

    tj = json.loads((embedded_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["pre_tokenizer"] == json.loads(PRE_TOKENIZERS["smollm"]().__getstate__())
    tok = load_tokenizer(embedded_dir)
    assert gx.pre_tokenizer_name(tj, tok) == "smollm"  # what llama.cpp's converter names SmolLM2's rule
    config = json.loads((embedded_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] != "TokenizersBackend" and not isinstance(config.get("extra_special_tokens"), list)


def test_embedded_folder_equals_llamacpp_on_every_probe(embedded_dir):
    pytest.importorskip("xllamacpp")
    from cutegpt.export.verify import LlamaCpp
    from cutegpt.model.embedded import embedded_gguf
    from cutegpt.model.probes import probe_texts
    from cutegpt.model.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_dir)
    texts = probe_texts(tok)
    assert " ١٢٣" in texts
    with LlamaCpp(embedded_gguf()) as cpp:
        for text in texts:
            for add in (False, True):
                assert list(tok(text, add_special_tokens=add)["input_ids"]) == cpp.tokenize(text, add_special=add), (text, add)
