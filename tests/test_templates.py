"""The cutegpt template renders exactly the original training text; `auto` splits chat templates right."""

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.templates import (
    CUTEGPT_SYSTEM,
    ChatTemplate,
    Segment,
    Turn,
    encode_segments,
    get_template,
)

SYS = "你是复旦大学知识工场实验室训练出来的语言模型CuteGPT。给定任务描述，请给出对应请求的回答。\n"


def test_system_line_is_the_original():
    assert CUTEGPT_SYSTEM == SYS


def test_cutegpt_prompt_no_history():
    t = get_template("cutegpt")
    assert t.prompt([Turn("中国的首都是哪里？")]) == SYS + "问：中国的首都是哪里？\n答：\n"


def test_cutegpt_prompt_one_turn_history():
    t = get_template("cutegpt")
    turns = [Turn("你好", output="你好！有什么可以帮你？"), Turn("再见")]
    assert t.prompt(turns) == SYS + "问：你好\n答：\n你好！有什么可以帮你？<end>问：再见\n答：\n"


def test_cutegpt_prompt_three_turns_history_with_input():
    t = get_template("cutegpt")
    turns = [
        Turn("Translate", "我爱你", "I love you"),
        Turn("1+1=?", output="2"),
        Turn("总结下面的文字", "今天天气很好。", "天气好。"),
        Turn("Why?", "Explain briefly"),
    ]
    expected = (
        SYS
        + "问：Translate\n我爱你\n答：\nI love you<end>"
        + "问：1+1=?\n答：\n2<end>"
        + "问：总结下面的文字\n今天天气很好。\n答：\n天气好。<end>"
        + "问：Why?\nExplain briefly\n答：\n"
    )
    assert t.prompt(turns) == expected


def test_cutegpt_segments_train_only_answers():
    segs = get_template("cutegpt").segments([Turn("q", output="a"), Turn("q2", "in", "a2")])
    assert segs == [
        Segment(SYS, False),
        Segment("问：q\n答：\n", False),
        Segment("a<end>", True),
        Segment("问：q2\nin\n答：\n", False),
        Segment("a2<end>", True),
    ]


def test_training_text_is_prefix_of_next_prompt():
    """What chat feeds at turn 2 starts with exactly the training rendering of turn 1."""
    t = get_template("cutegpt")
    first = t.text([Turn("a", output="b")])
    assert t.prompt([Turn("a", output="b"), Turn("c")]).startswith(first)


def test_custom_system_gets_newline():
    assert get_template("cutegpt").prompt([Turn("x")], system="SYS") == "SYS\n问：x\n答：\n"


def test_unknown_template():
    with pytest.raises(CuteGPTError, match="unknown template 'nope'"):
        get_template("nope")


def test_auto_segments_chatml(tiny_tokenizer):
    t = ChatTemplate(tiny_tokenizer)
    assert t.stop == "<|im_end|>"
    segs = t.segments([Turn("hi", output="hello"), Turn("bye")])
    assert segs == [
        Segment("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        Segment("hello<|im_end|>", True),
        Segment("\n", False),
        Segment("<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n", False),
    ]
    # the joined segments are the tokenizer's own rendering
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    assert "".join(s.text for s in segs) == tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_auto_needs_chat_template(tmp_path):
    from tests.tiny import build_tokenizer

    tok = build_tokenizer(tmp_path, chat_template=False)
    with pytest.raises(CuteGPTError, match="has none"):
        get_template("auto", tok)


def test_encode_segments_flags(tiny_tokenizer):
    segs = get_template("cutegpt").segments([Turn("q", output="a")])
    ids, train = encode_segments(tiny_tokenizer, segs)
    assert len(ids) == len(train)
    trained = [i for i, f in zip(ids, train) if f]
    assert tiny_tokenizer.decode(trained) == "a<end>"
    assert tiny_tokenizer.decode([i for i, f in zip(ids, train) if not f]) == SYS + "问：q\n答：\n"


def test_resolve_template_name_precedence(tmp_path, tiny_tokenizer):
    from cutegpt.templates import resolve_template_name, write_model_card

    adapter, base = tmp_path / "adapter", tmp_path / "base"
    adapter.mkdir()
    base.mkdir()
    assert resolve_template_name(None, [adapter, base, None], tiny_tokenizer) == "auto"  # chat template present
    write_model_card(base, "raw")
    assert resolve_template_name(None, [adapter, base], tiny_tokenizer) == "raw"
    write_model_card(adapter, "cutegpt")
    assert resolve_template_name(None, [adapter, base], tiny_tokenizer) == "cutegpt"
    assert resolve_template_name("auto", [adapter, base], tiny_tokenizer) == "auto"
