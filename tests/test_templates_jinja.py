"""chat_template_jinja: transformers' apply_chat_template renders exactly what templates.py renders."""

from __future__ import annotations

import itertools

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.templates import CUTEGPT_SYSTEM, ChatTemplate, CuteGPTTemplate, Turn, chat_template_jinja

QA = [
    ("你好", "", "你好！有什么可以帮你的吗？"),
    ("Translate to English", "今天天气很好。", "The weather is nice today."),
    ("写一个 Python 函数", "", "def f(x):\n    return x * 2\n"),
    ("What's \"quoted\" and 'single' \\ backslash?", "{{ not jinja }} {% raw %}", "It's text."),
]
SYSTEMS = [None, "", "You are a helpful assistant.", "你是一个乐于助人的助手。\n", "It's a 'tricky' \\n line"]


def _messages(turns, system):
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for t in turns:
        m = {"role": "user", "content": t.instruction}
        if t.input:
            m["input"] = t.input
        msgs.append(m)
        if t.output is not None:
            msgs.append({"role": "assistant", "content": t.output})
    return msgs


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    import copy

    t = copy.deepcopy(tiny_tokenizer)
    t.chat_template = chat_template_jinja("cutegpt")
    return t


@pytest.mark.parametrize("n_hist", [0, 1, 2, 3])
def test_prompt_equals_templates_py(tok, n_hist):
    for system, last in itertools.product(SYSTEMS, QA):
        history = [Turn(q, i, a) for q, i, a in QA[:n_hist]]
        turns = history + [Turn(last[0], last[1])]
        want = CuteGPTTemplate().prompt(turns, system)
        got = tok.apply_chat_template(_messages(turns, system), tokenize=False, add_generation_prompt=True)
        assert got == want


def test_full_conversation_equals_training_text(tok):
    turns = [Turn(q, i, a) for q, i, a in QA]
    want = CuteGPTTemplate().text(turns)
    assert tok.apply_chat_template(_messages(turns, None), tokenize=False) == want
    assert want.startswith(CUTEGPT_SYSTEM) and "<end>问：" in want  # no newline before the next question


def test_custom_default_system_line(tiny_tokenizer):
    import copy

    t = copy.deepcopy(tiny_tokenizer)
    t.chat_template = chat_template_jinja("cutegpt", system="Be brief.")
    turns = [Turn("hi")]
    assert t.apply_chat_template(_messages(turns, None), tokenize=False, add_generation_prompt=True) == \
        CuteGPTTemplate().prompt(turns, "Be brief.")


def test_auto_template_over_the_jinja_segments_like_cutegpt(tok):
    """`--template auto` on a saved cutegpt model gives the cutegpt segments and stop marker."""
    auto = ChatTemplate(tok)
    assert auto.stop == "<end>"
    turns = [Turn("你好", output="你好！"), Turn("1+1?")]
    def flags(segments):  # the text with its trained-on characters, whatever the segment boundaries
        return "".join(s.text for s in segments), [s.train for s in segments for _ in s.text]

    assert flags(auto.segments(turns)) == flags(CuteGPTTemplate().segments(turns))


def test_auto_and_raw_have_no_jinja():
    assert chat_template_jinja("auto") is None and chat_template_jinja("raw") is None
    with pytest.raises(CuteGPTError, match="unknown template"):
        chat_template_jinja("alpaca")
