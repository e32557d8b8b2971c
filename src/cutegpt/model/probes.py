"""Probe texts for tokenization: the places where tokenizers of one vocabulary are known to disagree.

Shared by export verification (llama.cpp vs the reference tokenizer), the dataset fingerprint and
the tests. `probe_texts(tokenizer)` adds, for every special and added token the tokenizer has
(`<s>`, `<end>`, ChatML markers, ...), text right after it, before it and around it: the dummy-prefix
rule of SentencePiece vocabularies differs exactly there.
"""

from __future__ import annotations

from typing import Any

# Fixed pitfalls, any vocabulary. Never reorder or edit: `FINGERPRINT` hashes the ids of a prefix of them.
PITFALLS: tuple[str, ...] = (
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "runs  of   spaces    here",
    "\ttab\tand\t\ttabs",
    " \t mixed \t ",
    "line one\nline two\n\nline four\n",
    "\nleading newline",
    "\r\nwindows line\r\n",
    "   ",
    " ",
    "\n",
    "digits 0123456789 3.14159 1,000,000",
    "Arabic-Indic ١٢٣٤ Devanagari ०१२३ full-width １２３ Roman Ⅻ",
    " ١٢٣",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "中文标点：“引号”、《书名》……——（括号）【方括号】",
    "全角ＡＢＣ　全角空格　结束",
    "Emoji 😀🚀 flags 🇨🇳 family 👨‍👩‍👧 skin 👍🏽",
    "Rare 4-byte 𠀀𪚥𝕏 and a lone 🦙",
    "def add(a, b):\n    return a + b  # 加法\n\n\tif x:\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "Combining: e\u0301 a\u0308 n\u0303 and precomposed é ä ñ; naïve café",
    "Mixed English 和中文 text, with numbers 42 和 数字七。",
    "'s 't 're 've 'm 'll 'd I've YOU'RE",
    "«quotes» „German“ 'single' \"double\" — em dash – en dash",
    "https://example.com/path?q=1&r=2#frag user@example.com",
)
# The cutegpt template's turn boundaries (templates.py renders `问：…\n答：\n…<end>`).
TURNS: tuple[str, ...] = (
    "问：你好\n答：\n你好！<end>问：中国的首都是哪里？\n答：\n",
    "问：What is 2+2?\n答：\n4<end>\n问：再见\n答：\n",
    "答：\n 以空格开头的回答<end>",
)
FINGERPRINT = PITFALLS[:18] + TURNS


def probe_texts(tokenizer: Any = None) -> list[str]:
    """The fixed pitfalls and turn boundaries, plus text around each special/added token of `tokenizer`."""
    texts = list(PITFALLS) + list(TURNS)
    for token in marker_tokens(tokenizer):
        texts += [f"{token}问", f"{token}Hello", f"{token} space after", f"{token}\n答：", f"x{token}y",
                  f"text {token} text", f"{token}{token}", f"问：你好{token}问：再见"]
    return texts


def marker_tokens(tokenizer: Any) -> list[str]:
    """Special and added tokens (their text) that a prompt can contain; sorted for a stable order."""
    if tokenizer is None:
        return []
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens = {str(getattr(t, "content", t)) for t in decoder.values()}
    tokens |= {str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])}
    return sorted(t for t in tokens if t and t != str(getattr(tokenizer, "unk_token", None)))
