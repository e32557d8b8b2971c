import json

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.vocab.merge import load_sp_proto
from cutegpt.vocab.train import VocabTrainConfig, run_vocab_train
from cutegpt.vocab.text import is_cjk_fragment
from cutegpt.vocab.merge import token_bytes


def test_sentencepiece_kind_follows_base(sp_base, sp_pieces):
    info = json.loads((sp_pieces / "vocab_train.json").read_text(encoding="utf-8"))
    assert info["kind"] == "sp-bpe" and info["vocab_size"] == 1500
    proto = load_sp_proto(sp_pieces / "tokenizer.model")
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.model_type == 2
    pieces = {p.piece for p in proto.pieces}
    assert "中国" in pieces or "▁中国" in pieces
    held = (sp_pieces / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    assert info["documents_held_out"] == len(held) >= 1


def test_byte_bpe_kind_learns_only_from_chinese(bpe_pieces):
    info = json.loads((bpe_pieces / "vocab_train.json").read_text(encoding="utf-8"))
    assert info["kind"] == "byte-bpe"
    data = json.loads((bpe_pieces / "tokenizer.json").read_text(encoding="utf-8"))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    assert merges, "no merges learned"
    # Trained on the CJK runs only: every learned merge is a piece of Chinese text.
    assert all(is_cjk_fragment(token_bytes(a + b)) for a, b in merges)


def _run(tmp_path, corpus_text, **kw):
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    kw.setdefault("out", str(tmp_path / "out"))
    return run_vocab_train(VocabTrainConfig(corpus=[str(corpus)], **kw))


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("The quick brown fox.\nJumps over the lazy dog.\n" * 20, "has no Chinese"),
    ("中文句子。\n" * 5, "too small"),
])
def test_bad_corpus(tmp_path, bpe_base, text, message):
    with pytest.raises(CuteGPTError, match=message):
        _run(tmp_path, text, model=str(bpe_base))
    assert not (tmp_path / "out").exists()


def test_vocab_size_too_small(tmp_path, sp_base, corpus_txt):
    with pytest.raises(CuteGPTError, match="smaller than the .* pieces this corpus needs"):
        _run(tmp_path, corpus_txt.read_text(encoding="utf-8"), model=str(sp_base), vocab_size=300)
    with pytest.raises(CuteGPTError, match="too small: a byte-level BPE"):
        _run(tmp_path, corpus_txt.read_text(encoding="utf-8"), kind="byte-bpe", model=str(sp_base), vocab_size=100)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_and_unsupported_base(tmp_path, corpus_txt, bpe_base):
    (tmp_path / "out").mkdir()
    with pytest.raises(CuteGPTError, match="already exists"):
        _run(tmp_path, corpus_txt.read_text(encoding="utf-8"), model=str(bpe_base))
    wordpiece = tmp_path / "wp"
    wordpiece.mkdir()
    (wordpiece / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}, "pre_tokenizer": None}))
    with pytest.raises(CuteGPTError, match="WordPiece tokenizer without byte-level pre-tokenization is not supported"):
        _run(tmp_path, corpus_txt.read_text(encoding="utf-8"), model=str(wordpiece), out=str(tmp_path / "o2"))


def test_threads_reach_sentencepiece(tmp_path, sp_base, corpus_txt, monkeypatch):
    """`vocab train --threads 1` trains SentencePiece on one thread (it used to take 2 whatever the machine did)."""
    import sentencepiece as spm

    seen = []
    real = spm.SentencePieceTrainer.train
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", lambda *a, **kw: seen.append(kw.get("num_threads")) or real(*a, **kw))
    run_vocab_train(VocabTrainConfig(corpus=[str(corpus_txt)], out=str(tmp_path / "out"), model=str(sp_base),
                                     vocab_size=1500, threads=1))
    assert seen == [1]
