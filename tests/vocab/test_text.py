import json

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.vocab.text import (
    cjk_runs, count_han, count_words, is_cjk_fragment, is_cjk_piece, read_corpus, split_held_out, token_stats,
)


def test_cjk_fragment_accepts_pieces_of_chinese_text_only():
    zhong, guo = "中".encode(), "国".encode()
    assert is_cjk_fragment(zhong) and is_cjk_fragment(zhong + guo) and is_cjk_fragment(b" " + zhong)
    assert is_cjk_fragment(zhong[:1]) and is_cjk_fragment(zhong[:2])          # lead byte (+1) of a character
    assert is_cjk_fragment(zhong[1:]) and is_cjk_fragment(zhong[2:] + guo[:1])  # tail of one, start of the next
    assert is_cjk_fragment("，。".encode())
    for text in ["a", " the", "中a", "é", "é中", "\u201c", "😀", ""]:
        assert not is_cjk_fragment(text.encode()), text
    # Brute force: no byte string made only of ASCII is ever accepted.
    assert not any(is_cjk_fragment(bytes([a, b])) for a in range(128) for b in range(128))


def test_cjk_piece_and_runs():
    assert is_cjk_piece("中国") and is_cjk_piece(" 中国") and is_cjk_piece("《红楼梦》")
    assert not is_cjk_piece("中国a") and not is_cjk_piece(" ") and not is_cjk_piece("GPT")
    assert cjk_runs("CuteGPT是模型，支持English和中文。") == ["是模型，支持", "和中文。"]
    assert count_han("中文ABC，。") == 2 and count_words("It's a dog-eat-dog world") == 6


def test_read_corpus_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("第一行\n\n second line \n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "中文"}, ensure_ascii=False) + "\n\n" + json.dumps({"text": ""}) + "\n", encoding="utf-8")
    assert read_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["第一行", " second line ", "中文"]


@pytest.mark.parametrize("content, message", [
    ('{"txt": "x"}\n', "line 1 has no 'text' field"),
    ("not json\n", "line 1 is not valid JSON"),
    ('{"text": 3}\n', "is not a string"),
])
def test_read_corpus_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CuteGPTError, match=message):
        read_corpus([path])


def test_read_corpus_missing_and_binary(tmp_path):
    with pytest.raises(CuteGPTError, match="does not exist"):
        read_corpus([tmp_path / "nope.txt"])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CuteGPTError, match="not UTF-8"):
        read_corpus([tmp_path / "bin.txt"])


def test_split_held_out_is_seeded_and_disjoint():
    docs = [f"doc {i}" for i in range(40)]
    train, held = split_held_out(docs, 0.1, seed=3)
    assert len(held) == 4 and sorted(train + held) == sorted(docs)
    assert split_held_out(docs, 0.1, seed=3) == (train, held)
    assert split_held_out(docs[:5], 0.5, seed=0) == (docs[:5], [])  # too few documents to hold any out


def test_token_stats_against_hand_count(tiny_tokenizer):
    zh = "中国的首都是北京。"
    stats = token_stats(tiny_tokenizer, [zh])
    assert stats.han_chars == 8
    assert stats.zh_tokens == len(tiny_tokenizer(zh, add_special_tokens=False)["input_ids"])
    assert stats.en_words > 0 and stats.as_dict()["tokens_per_chinese_char"] == round(stats.zh_tokens / 8, 4)
