"""Chinese text helpers for vocabulary work: what counts as CJK, reading a corpus, token statistics.

Two character classes matter:

    han  -- ideographs (U+4E00-9FFF, extensions A-G, compatibility ideographs): the unit of
            "tokens per Chinese character";
    cjk  -- han + CJK punctuation (U+3000-303F) + full-width forms (U+FF00-FFEF) + CJK
            compatibility forms (U+FE30-FE4F): the characters a new piece may be made of.

General punctuation (curly quotes, dashes, U+2000-206F) is deliberately NOT cjk: English text
uses it too, and a new piece built on it could change how English is tokenized.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cutegpt.data.text import read_documents
from cutegpt.errors import CuteGPTError

_HAN_RANGES = (
    (0x3400, 0x4DBF),    # extension A
    (0x4E00, 0x9FFF),    # unified ideographs
    (0xF900, 0xFAFF),    # compatibility ideographs
    (0x20000, 0x3134F),  # extensions B-G
)
_CJK_EXTRA = ((0x3000, 0x303F), (0xFF00, 0xFFEF), (0xFE30, 0xFE4F))
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")

# Texts every extension is checked on (besides the user's held-out slice): English and code must
# tokenize identically; all of them must round-trip exactly.
ENGLISH_PROBES = [
    "The quick brown fox jumps over the lazy dog. Language models predict the next token.",
    "Instruction: What is the capital of France?\nResponse: The capital of France is Paris.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon; \u201cThat's one small step\u201d \u2014 he said.",
    "E-mail: someone@example.com, URL: https://example.org/a?b=1&c=2 #hashtag @user 3.14159 -42 1e-9",
    "   leading spaces, trailing tabs\t\t\nnew lines\n\n\nand CAPITALS, MixedCase, snake_case, camelCase.",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe",
]
CODE_PROBES = [
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(f\"{i}: {add(i, 2)}\")\n",
    "#include <stdio.h>\nint main(void) { printf(\"hello, world\\n\"); return 0; }\n",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
]
ROUND_TRIP_PROBES = [
    "中国的首都是北京。今天天气很好，我们去公园散步吧！",
    "机器学习是人工智能的一个分支；深度学习使用多层神经网络（DNN）。",
    "CuteGPT是复旦大学知识工场实验室训练的模型，支持English和中文混合输入。",
    "问：1+1等于几？\n答：\n等于2。<end>",
    "Emoji: \U0001F600\U0001F44D\U0001F1E8\U0001F1F3 家庭\U0001F468\u200D\U0001F469\u200D\U0001F467",
    "Rare: 龘靐齉 \U00020000\U0002A6D6 \u3007 ㄅㄆㄇ かな カナ 한국어 Ελληνικά русский",
    "Full-width：ＡＢＣ１２３，「引号」『书名』【括号】……——",
    "e\u0301 combining, zero\u200bwidth, tab\there",
]


def is_han(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _HAN_RANGES)


def is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return is_han(ch) or any(lo <= cp <= hi for lo, hi in _CJK_EXTRA)


def has_cjk(text: str) -> bool:
    return any(is_cjk(ch) for ch in text)


def count_han(text: str) -> int:
    return sum(1 for ch in text if is_han(ch))


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def cjk_runs(text: str) -> list[str]:
    """Maximal runs of CJK characters, in order (the only text a new byte-level merge may learn from)."""
    runs: list[str] = []
    cur: list[str] = []
    for ch in text:
        if is_cjk(ch):
            cur.append(ch)
        elif cur:
            runs.append("".join(cur))
            cur = []
    if cur:
        runs.append("".join(cur))
    return runs


def is_cjk_piece(text: str) -> bool:
    """A piece that may be appended: an optional leading space, then one or more CJK characters only."""
    body = text[1:] if text[:1] == " " else text
    return bool(body) and all(is_cjk(ch) for ch in body)


# UTF-8 lead bytes of the 3-byte CJK blocks (U+3000-9FFF: E3-E9; U+F900-FFEF: EF) and of the
# supplementary ideographs (F0 A0-B4 ..).
_CJK_LEADS = {0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEF, 0xF0}


def is_cjk_fragment(data: bytes) -> bool:
    """Whether a byte-level token (raw bytes) is a piece of CJK text, so English can never produce it.

        [optional 0x20][<=3 trailing bytes of a char][whole CJK chars][lead byte (+ cont.) of a CJK char]

    Every accepted token has at least one byte >= 0x80 outside the optional space, so no ASCII
    text can ever be merged into it.
    """
    if data[:1] == b" ":
        data = data[1:]
    if not data or any(b < 0x80 for b in data):
        return False
    i = 0
    while i < len(data) and 0x80 <= data[i] <= 0xBF and i < 3:  # tail of a character started earlier
        i += 1
    while i < len(data):
        lead = data[i]
        size = 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
        if size == 0:
            return False  # 2-byte chars (Latin, Greek, Cyrillic ...) or a stray continuation byte
        chunk = data[i:i + size]
        if len(chunk) < size:  # the token ends inside a character: judge by its lead byte
            return lead in _CJK_LEADS and all(0x80 <= b <= 0xBF for b in chunk[1:])
        try:
            ch = chunk.decode("utf-8")
        except UnicodeDecodeError:
            return False
        if not is_cjk(ch):
            return False
        i += size
    return True


# ---------------------------------------------------------------------------------------------
# Corpus files


def read_corpus(paths: Sequence[str | Path], text_field: str = "text") -> list[str]:
    """Documents of `.txt` files (one per non-empty line) and JSON Lines files (field `text_field`)."""
    if not paths:
        raise CuteGPTError("no corpus given: pass one or more .txt or .jsonl files.")
    return list(read_documents(paths, text_field, txt_per_line=True))


def split_held_out(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held_out): a seeded random `fraction` of the documents, at least one when there are 10 or more."""
    if not 0 <= fraction < 1:
        raise CuteGPTError(f"--held-out must be in [0, 1), not {fraction}.")
    n_held = 0 if fraction == 0 or len(docs) < 10 else max(1, round(len(docs) * fraction))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class TokenStats:
    zh_tokens: int
    han_chars: int
    en_tokens: int
    en_words: int

    @property
    def per_han(self) -> float:
        return self.zh_tokens / self.han_chars if self.han_chars else float("nan")

    @property
    def per_word(self) -> float:
        return self.en_tokens / self.en_words if self.en_words else float("nan")

    def as_dict(self) -> dict[str, Any]:
        def r(x: float) -> float | None:
            return None if x != x else round(x, 4)  # NaN is not JSON

        return {"tokens_per_chinese_char": r(self.per_han), "tokens_per_english_word": r(self.per_word),
                "chinese_tokens": self.zh_tokens, "chinese_chars": self.han_chars,
                "english_tokens": self.en_tokens, "english_words": self.en_words}


def token_stats(tokenizer: Any, texts: Sequence[str]) -> TokenStats:
    """Tokens per Chinese character (texts with any han) and per English word (texts with no CJK at all).

    The built-in English probes are always added to the English side, so a purely Chinese
    held-out slice still shows that English costs the same before and after.
    """
    texts = list(texts) + ENGLISH_PROBES
    zh = [t for t in texts if count_han(t)]
    en = [t for t in texts if not has_cjk(t)]
    enc = lambda xs: sum(len(ids) for ids in tokenizer(list(xs), add_special_tokens=False)["input_ids"]) if xs else 0  # noqa: E731
    return TokenStats(enc(zh), sum(map(count_han, zh)), enc(en), sum(map(count_words, en)))
