"""Answer extraction for --method generate: a hand-written set of Chinese and English answers."""

from __future__ import annotations

import pytest

from cutegpt.evaluation.extract import extract_choice

OPTIONS = ("牛顿", "焦耳", "瓦特", "伏特")

# (answer, expected letter or None): written by hand, each for one rule or one trap
CASES = [
    ("B", "B"),
    ("(C)", "C"),
    ("D.", "D"),
    ("**A**", "A"),
    ("A、牛顿", "A"),
    ("答案是B", "B"),
    ("答案：C", "C"),
    ("正确答案为 (D)。", "D"),
    ("根据定义，答案应该是A，因为力的单位是牛顿。", "A"),
    ("这道题应该选C。", "C"),
    ("我认为是B，焦耳是能量的单位。", "B"),
    ("选项D正确。", "D"),
    ("答案不是A，是B。", "B"),
    ("The answer is B.", "B"),
    ("the correct option is (c)", "C"),
    ("Answer: D", "D"),
    ("I would choose A because force is measured in newtons.", "A"),
    ("After thinking step by step, the answer is C) 瓦特", "C"),
    ("力的单位是牛顿。", "A"),
    ("瓦特是功率的单位，所以不是功的单位。", "C"),
    ("Not A, the right one is D", "D"),
    ("A is wrong. B", "A"),  # a letter standing first decides (rule 2), whatever follows
    ("我不知道。", None),
    ("", None),
    ("Apples and Bananas", None),
    ("这个问题很难回答，请提供更多信息。", None),
]


@pytest.mark.parametrize("answer,expected", CASES)
def test_extract_choice(answer, expected):
    assert extract_choice(answer, OPTIONS) == expected


def test_an_option_inside_a_longer_one_does_not_count():
    assert extract_choice("3e8 米每秒", ("3", "3e8", "30", "300")) == "B"
    assert extract_choice("大约是 300", ("3", "3e8", "30", "300")) == "D"
