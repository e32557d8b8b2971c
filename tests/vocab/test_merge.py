"""Tokenizer-level merges, checked with sentencepiece and `tokenizers` themselves as the reference."""

import io
import json

import pytest

from cutegpt.vocab.merge import (
    SP_SPACE, byte_decoder, merge_byte_bpe, merge_sentencepiece, token_bytes,
)
from cutegpt.vocab.text import CODE_PROBES, ENGLISH_PROBES, ROUND_TRIP_PROBES
from tests.vocab.conftest import recipe_corpus

ENGLISH = ENGLISH_PROBES + CODE_PROBES + [t for t in recipe_corpus() if t.isascii()]
CHINESE = [t for t in recipe_corpus() if not t.isascii()]


def _sp(docs, model_type, vocab_size):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=buf, model_type=model_type, vocab_size=vocab_size,
                                   byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
                                   hard_vocab_limit=False, minloglevel=2)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    return proto


def test_byte_decoder_is_gpt2s_alphabet():
    from tokenizers import pre_tokenizers

    assert sorted(byte_decoder().values()) == list(range(256))
    assert set(byte_decoder()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert token_bytes("ä¸Ń") == "中".encode() and token_bytes("Ġhello") == b" hello" and token_bytes("中") is None


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_merge_keeps_english_and_round_trips(model_type):
    import sentencepiece as spm

    base = _sp(ENGLISH * 3, model_type, 400)
    zh = _sp(CHINESE * 2, model_type, 1200)
    merged = merge_sentencepiece(base, zh)
    assert merged.added and merged.first_id == len(base.pieces)
    assert all(SP_SPACE not in p[1:] and not p.replace(SP_SPACE, "").isascii() for p in merged.added)
    scores = [p.score for p in merged.content.pieces[len(base.pieces):]]
    if model_type == "bpe":  # below every base piece, in the new model's order
        assert max(scores) < min(p.score for p in base.pieces if p.type == 1) and scores == sorted(scores, reverse=True)
    old = spm.SentencePieceProcessor(model_proto=base.SerializeToString())
    new = spm.SentencePieceProcessor(model_proto=merged.content.SerializeToString())
    for text in ENGLISH:
        assert old.encode(text) == new.encode(text)
    for text in ROUND_TRIP_PROBES + CHINESE:
        assert new.decode(new.encode(text)) == text
    text = "".join(CHINESE)
    assert len(new.encode(text)) < 0.6 * len(old.encode(text))


def test_byte_bpe_merge_limit_and_string_merges(bpe_base, bpe_pieces):
    from tokenizers import Tokenizer

    base = json.loads((bpe_base / "tokenizer.json").read_text(encoding="utf-8"))
    new = json.loads((bpe_pieces / "tokenizer.json").read_text(encoding="utf-8"))
    base["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in base["model"]["merges"]]  # the older format
    merged = merge_byte_bpe(base, new, limit=25)
    assert len(merged.added) == 25 and all(isinstance(m, str) for m in merged.content["model"]["merges"])
    assert [merged.content["model"]["vocab"][t] for t in merged.added] == list(range(merged.first_id, merged.first_id + 25))
    old_tok, new_tok = Tokenizer.from_str(json.dumps(base)), Tokenizer.from_str(json.dumps(merged.content))
    for text in ENGLISH:
        assert old_tok.encode(text).ids == new_tok.encode(text).ids
    for text in ROUND_TRIP_PROBES + CHINESE:
        assert new_tok.decode(new_tok.encode(text).ids) == text
