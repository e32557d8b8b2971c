"""Which option a free-text answer chose (`--method generate`), in Chinese and English, or None.

The rules, tried in this order; the first that finds something decides:

  1. a stated answer, OpenCompass-style: 答案是 B / 答案为：B / 正确答案：(B) / 应该选 B / 选项 B 正确 / 我认为是 B /
     the answer is (B) / Answer: B / the correct option is B / I choose B  -> its letter (the first such statement);
  2. the answer starts with a letter standing alone: "B", "(B)", "B.", "B、", "B：32", "**B**"  -> that letter;
  3. the text of exactly one option appears in the answer -> the option stated first (earliest position;
     an option whose text is contained in another's counts only where the longer one is not);
  4. a letter A-D standing alone anywhere, not after a negation (不是 A / 不选 A / not A / isn't A) -> the first one.

Nothing found -> None: counted as an extraction failure (and as wrong), never guessed.
"""

from __future__ import annotations

import re
from typing import Sequence

_L = r"([A-D])"
_OPEN = r"[\s:：\*\(\（\[【\"'“]*"
_CLOSE = r"(?![A-Za-z])"
STATED = [re.compile(p, re.IGNORECASE if ascii_only else 0) for p, ascii_only in [
    (r"(?:正确)?答案(?:应该|应当|应|就)?(?:是|为|选)" + _OPEN + _L + _CLOSE, False),
    (r"(?:正确)?答案" + r"[\s]*[:：]" + _OPEN + _L + _CLOSE, False),
    (r"(?:应该|应当|应|故|所以|因此)?选(?:择)?" + _OPEN + _L + _CLOSE, False),
    (r"选项" + _OPEN + _L + _CLOSE + r"[^。\n]{0,6}(?:正确|对|是正确)", False),
    (r"(?<![不非])是" + _OPEN + _L + _CLOSE, False),
    (r"\b(?:the\s+)?(?:correct\s+|right\s+|final\s+|best\s+)?(?:answer|option|choice)\s+(?:is|would\s+be|should\s+be)[:\s]*" + r"[\(\[\*\"']*" + r"\b([A-D])\b", True),
    (r"\banswer\s*[:：]\s*[\(\[\*\"']*([A-D])\b", True),
    (r"\bI\s+(?:would\s+)?(?:choose|pick|select)\s+(?:option\s+)?[\(\[\*\"']*([A-D])\b", True),
]]
LEADING = re.compile(r"^[\s\*\(\（\[【\"'“]*([A-D])(?:[\)\）\]】\*\"'”]*)(?:$|[\s.。,，、:：)\）])")
NEGATED = re.compile(r"(?:不是|不选|并非|排除|not|isn't|is\s+not)\s*(?:选项\s*|option\s*)?[\(\[\*\"']*[A-D]\b", re.IGNORECASE)
LONE = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])")


def extract_choice(answer: str, options: Sequence[str] = ()) -> str | None:
    """The letter `answer` chose among A-D (see the module's rules), or None."""
    text = answer.strip()
    if not text:
        return None
    for pattern in STATED:
        m = pattern.search(text)
        if m:
            return m.group(1).upper()
    m = LEADING.match(text)
    if m:
        return m.group(1)
    by_text = _first_option_text(text, options)
    if by_text is not None:
        return by_text
    m = LONE.search(NEGATED.sub(" ", text))
    return m.group(1) if m else None


def _first_option_text(text: str, options: Sequence[str]) -> str | None:
    """The option whose text appears first in `text` (matches inside a longer option's match do not count)."""
    spans: list[tuple[int, int, int]] = []  # (start, -length, option index)
    for i, opt in enumerate(options):
        opt = str(opt).strip()
        if len(opt) < 1:
            continue
        for m in re.finditer(re.escape(opt), text):
            spans.append((m.start(), -(m.end() - m.start()), i))
    if not spans:
        return None
    spans.sort()
    taken: list[tuple[int, int]] = []
    first: tuple[int, int] | None = None
    for start, neg_len, i in spans:
        end = start - neg_len
        if any(s <= start and end <= e and (s, e) != (start, end) for s, e in taken):
            continue  # inside a longer option's match
        taken.append((start, end))
        if first is None:
            first = (start, i)
    return "ABCD"[first[1]] if first is not None else None
