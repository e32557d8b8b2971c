"""`vocab extend` on tiny models of both tokenizer families, checked against plain transformers,
sentencepiece and `tokenizers` as references."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cutegpt.errors import CuteGPTError
from cutegpt.vocab.text import CODE_PROBES, ENGLISH_PROBES, ROUND_TRIP_PROBES
from tests.vocab.conftest import extend, recipe_corpus

ENGLISH = ENGLISH_PROBES + CODE_PROBES + [t for t in recipe_corpus() if t.isascii()]
CHINESE = [t for t in recipe_corpus() if not t.isascii()]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _report(folder):
    return json.loads((folder / "vocab_report.json").read_text(encoding="utf-8"))


def test_english_and_code_tokenize_identically(family_case):
    from cutegpt.model.tokenizer import load_tokenizer

    _, base, _, ext = family_case
    # both through the project loader: plain transformers 5 reads the raw LLaMA-layout base with its drifted
    # rule (leading spaces) but the extended folder, saved as tokenizer.json, with SentencePiece's
    old, new = load_tokenizer(base), load_tokenizer(ext)
    for text in ENGLISH:
        assert _ids(old, text) == _ids(new, text), text


def test_round_trip_is_exact(family_case):
    name, _, _, ext = family_case
    new = AutoTokenizer.from_pretrained(ext)
    for text in ROUND_TRIP_PROBES + ENGLISH + CHINESE:
        if name == "sp":
            text = text.lstrip(" ")  # LLaMA's decoder drops the one leading space it adds itself
        assert new.decode(_ids(new, text), clean_up_tokenization_spaces=False) == text


def test_new_pieces_are_used_on_chinese(family_case):
    _, base, _, ext = family_case
    report = _report(ext)
    old, new = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(ext)
    assert report["pieces_added"] > 100 and len(new) == len(old) + report["pieces_added"]
    first = report["first_new_id"]
    text = "".join(CHINESE)
    ids = _ids(new, text)
    assert any(i >= first for i in ids)
    assert len(ids) < 0.75 * len(_ids(old, text))
    after = report["held_out"]["after"]
    assert after["tokens_per_chinese_char"] < report["held_out"]["before"]["tokens_per_chinese_char"]
    assert after["tokens_per_english_word"] == report["held_out"]["before"]["tokens_per_english_word"]


def _reference_sources(name, base, new_tok, new_ids):
    """Base ids of each new token, computed independently of extend.py."""
    out = {}
    if name == "sp":
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString((base / "tokenizer.model").read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False  # spell the piece itself, without the "▁" LLaMA prepends
        sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        for i in new_ids:
            out[i] = sp.encode(new_tok.convert_ids_to_tokens(i).replace("▁", " "))
    else:
        old = AutoTokenizer.from_pretrained(base)
        for i in new_ids:
            text = new_tok.decode([i])
            if "\ufffd" not in text:  # whole characters only: fragments have no text to re-encode
                out[i] = _ids(old, text)
    return out


def test_new_rows_are_the_mean_of_their_decomposition(family_case):
    name, base, _, ext = family_case
    report = _report(ext)
    m0 = AutoModelForCausalLM.from_pretrained(base)
    m1 = AutoModelForCausalLM.from_pretrained(ext)
    tok = AutoTokenizer.from_pretrained(ext)
    n_base = report["vocab_size_before"]
    new_ids = range(report["first_new_id"], report["first_new_id"] + report["pieces_added"])
    sources = _reference_sources(name, base, tok, new_ids)
    assert len(sources) > 50
    e0, e1 = m0.get_input_embeddings().weight, m1.get_input_embeddings().weight
    h0, h1 = m0.get_output_embeddings().weight, m1.get_output_embeddings().weight
    for i, src in sources.items():
        torch.testing.assert_close(e1[i], e0[src].mean(0))
        torch.testing.assert_close(h1[i], h0[src].mean(0))
    rows = e1.shape[0]
    assert rows % 64 == 0 and rows >= len(tok) and h1.shape[0] == rows == m1.config.vocab_size
    torch.testing.assert_close(e1[len(tok):], e0[:n_base].mean(0).expand(rows - len(tok), -1))
    torch.testing.assert_close(e1[:n_base], e0[:n_base])
    assert (h1.data_ptr() == e1.data_ptr()) == (name == "bpe")  # the byte-level fixture is tied, the SentencePiece one not


def test_english_logits_equal_the_base_models(family_case):
    _, base, _, ext = family_case
    tok = AutoTokenizer.from_pretrained(base)
    m0, m1 = AutoModelForCausalLM.from_pretrained(base), AutoModelForCausalLM.from_pretrained(ext)
    n = len(tok)
    for text in ENGLISH[:4]:
        x = torch.tensor([_ids(tok, text)])
        with torch.no_grad():
            torch.testing.assert_close(m1(x).logits[..., :n], m0(x).logits[..., :n], rtol=0, atol=1e-5)


def test_saved_folder_reloads_the_same(family_case):
    """Plain transformers vs our loader vs the raw tokenizer files: same tokens, same logits."""
    from cutegpt.model.loading import ModelArgs, load_model

    name, _, _, ext = family_case
    hf_tok = AutoTokenizer.from_pretrained(ext)
    if name == "sp":
        import sentencepiece as spm

        raw = spm.SentencePieceProcessor(model_file=str(ext / "tokenizer.model")).encode
    else:
        from tokenizers import Tokenizer

        raw_tok = Tokenizer.from_file(str(ext / "tokenizer.json"))
        raw = lambda t: raw_tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    for text in ROUND_TRIP_PROBES + CHINESE[:10]:
        assert raw(text) == _ids(hf_tok, text), text
    ours = load_model(ModelArgs(model=str(ext)))
    plain = AutoModelForCausalLM.from_pretrained(ext)
    x = torch.tensor([_ids(hf_tok, ROUND_TRIP_PROBES[2])])
    assert _ids(ours.tokenizer, ROUND_TRIP_PROBES[2]) == x[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x).logits, plain(x).logits)


def test_plain_mean_init(bpe_base, bpe_pieces, tmp_path):
    ext = extend(bpe_base, bpe_pieces, tmp_path / "m", init="mean", pad_to=1, max_pieces=40)
    r = _report(ext)
    assert r["pieces_added"] == 40 and r["embedding_rows_after"] == r["vocab_size_after"]
    e0 = AutoModelForCausalLM.from_pretrained(bpe_base).get_input_embeddings().weight
    e1 = AutoModelForCausalLM.from_pretrained(ext).get_input_embeddings().weight
    torch.testing.assert_close(e1[r["first_new_id"]:], e0.mean(0).expand(40, -1))


def test_bad_inputs(tmp_path, sp_base, sp_pieces, bpe_base, bpe_pieces, bpe_extended):
    with pytest.raises(CuteGPTError, match="holds a sentencepiece tokenizer but .* uses a byte-bpe tokenizer"):
        extend(bpe_base, sp_pieces, tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(CuteGPTError, match="already exists"):
        extend(bpe_base, bpe_pieces, tmp_path / "b")
    with pytest.raises(CuteGPTError, match="adds nothing"):
        extend(bpe_extended, bpe_pieces, tmp_path / "c")
    with pytest.raises(CuteGPTError, match="does not exist"):
        extend(bpe_base, tmp_path / "nope", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_merge_that_changes_english_is_caught(bpe_base, corpus_txt, tmp_path, monkeypatch):
    """The peers' failure: append every merge of a tokenizer trained on mixed text. The check refuses it."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    tok = Tokenizer.from_file(str(bpe_base / "tokenizer.json"))
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(recipe_corpus() * 3 + ENGLISH * 3, trainer)
    (tmp_path / "pieces").mkdir()
    tok.save(str(tmp_path / "pieces" / "tokenizer.json"))
    monkeypatch.setattr("cutegpt.vocab.merge.is_cjk_fragment", lambda raw: True)
    with pytest.raises(CuteGPTError, match="check 'english' failed"):
        extend(bpe_base, tmp_path / "pieces", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pieces"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_continued_pretraining_trains_and_exports_the_new_rows(sp_extended, tmp_path, method):
    """`train pt` on an extended model: the new embedding and head rows change, are saved, and survive
    `export` (LoRA + --modules-to-save) with sizes plain transformers accepts (the peers' failure)."""
    from cutegpt.training.pt import PTConfig, run_pt

    corpus = tmp_path / "zh.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in CHINESE), encoding="utf-8")
    extra = {"modules_to_save": ["embed_tokens", "lm_head"]} if method == "lora" else {}
    run_pt(PTConfig(model=str(sp_extended), data=[str(corpus)], out=str(tmp_path / "pt"), method=method, max_steps=2,
                    micro_batch=2, grad_accum=1, lr=1e-2, max_length=64, save_steps=10**9, precision="fp32",
                    threads=1, warmup_steps=0, **extra))
    final = tmp_path / "pt" / "final"
    if method == "lora":
        from cutegpt.export.cli import ExportConfig, run_export

        run_export(ExportConfig(model=str(sp_extended), lora=str(final), out=str(tmp_path / "merged")))
        final = tmp_path / "merged"
    report = _report(sp_extended)
    first, n = report["first_new_id"], report["pieces_added"]
    m0, m1 = AutoModelForCausalLM.from_pretrained(sp_extended), AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert len(tok) == report["vocab_size_after"] and m1.config.vocab_size == report["embedding_rows_after"]
    for get in ("get_input_embeddings", "get_output_embeddings"):
        w0, w1 = getattr(m0, get)().weight[first:first + n], getattr(m1, get)().weight[first:first + n].float()
        assert w1.shape == w0.shape and not torch.allclose(w0, w1), f"{get}: new rows were not trained or not saved"
