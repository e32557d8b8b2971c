"""Tool turns in the templates: Qwen2.5's own Jinja through transformers is the reference for `auto`; a ChatML
template without tools renders what Qwen2.5 renders; `cutegpt` has its documented format; masks train the calls only."""

import json

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.templates import (CUTEGPT_SYSTEM, ChatTemplate, Segment, ToolCall, ToolRound, Turn, get_template,
                               parse_tool_calls)
from tests.tiny import CHATML, QWEN25, build_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "今天的天气",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = ToolCall("get_weather", json.dumps({"city": "北京"}), "c1")
CALL2 = ToolCall("get_time", "{}", "c2")


def _messages(system, turns):
    """The same conversation as an OpenAI client sends it (arguments as objects, as the family templates want)."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for t in turns:
        msgs.append({"role": "user", "content": t.instruction})
        for r in t.rounds:
            msgs.append({"role": "assistant", "content": r.content, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                for c in r.calls]})
            msgs += [{"role": "tool", "tool_call_id": c.id, "content": x} for c, x in zip(r.calls, r.results)]
        if t.output is not None:
            msgs.append({"role": "assistant", "content": t.output})
    return msgs


CONVERSATIONS = [
    [Turn("北京天气怎么样？", rounds=(ToolRound((CALL,), ('{"temp": 20}',)),), output="北京今天 20 度。")],
    [Turn("hi", output="hello"),
     Turn("Weather and time?", rounds=(ToolRound((CALL, CALL2), ("sunny", "12:00"), "Let me check."),), output="Sunny, noon.")],
    [Turn("北京天气怎么样？", rounds=(ToolRound((CALL,), ("rain",)), ToolRound((CALL2,), ("9:00",))), output="下雨，九点。")],
    [Turn("北京天气怎么样？", rounds=(ToolRound((CALL,)),))],  # ends at the call: trained, not open
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("qwen"), chat_template=False)
    tok.chat_template = QWEN25
    return tok


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("chatml"))
    assert tok.chat_template == CHATML
    return tok


@pytest.mark.parametrize("system", [None, "You are a weather bot."])
@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_auto_equals_qwen25_own_template(qwen, k, system):
    turns = CONVERSATIONS[k]
    t = ChatTemplate(qwen)
    assert t.tool_style == "native"
    want = qwen.apply_chat_template(_messages(system, turns), tools=[WEATHER, TIME], tokenize=False)
    assert t.text(turns, system, [WEATHER, TIME]) == want


def test_auto_open_prompt_after_results_equals_qwen25(qwen):
    turns = [Turn("北京天气怎么样？", rounds=(ToolRound((CALL,), ("rain",)),))]
    want = qwen.apply_chat_template(_messages(None, turns), tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert ChatTemplate(qwen).prompt(turns, None, [WEATHER]) == want
    assert want.endswith("<tool_response>\nrain\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_chatml_without_tools_renders_what_qwen25_renders(qwen, chatml, k):
    """SmolLM2-style ChatML has no tool section: ours goes into the messages, giving Qwen2.5's bytes."""
    turns = CONVERSATIONS[k]
    t = ChatTemplate(chatml)
    assert t.tool_style == "none"
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert t.text(turns, system, [WEATHER]) == ChatTemplate(qwen).text(turns, None, [WEATHER])


def test_auto_masks_train_calls_not_results(qwen):
    segs = ChatTemplate(qwen).segments(CONVERSATIONS[0], None, [WEATHER])
    trained = [s.text for s in segs if s.train]
    assert trained == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>',
                       "北京今天 20 度。<|im_end|>"]
    untrained = "".join(s.text for s in segs if not s.train)
    assert "<tool_response>\n{\"temp\": 20}\n</tool_response>" in untrained and "get_weather" in untrained  # tools + result


def test_cutegpt_tool_format():
    t = get_template("cutegpt")
    segs = t.segments(CONVERSATIONS[0], None, [WEATHER])
    tools_line = json.dumps(WEATHER, ensure_ascii=False)
    assert segs == [
        Segment(CUTEGPT_SYSTEM + "你可以调用以下工具，<tools></tools> 中每行描述一个：\n<tools>\n" + tools_line
                + "\n</tools>\n调用工具时，每个调用回答一个 <tool_call></tool_call> 块：\n<tool_call>\n"
                "{\"name\": <工具名>, \"arguments\": <参数 JSON 对象>}\n</tool_call>\n", False),
        Segment("问：北京天气怎么样？\n答：\n", False),
        Segment('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><end>', True),
        Segment('工具：\n<tool_response>\n{"temp": 20}\n</tool_response>\n答：\n', False),
        Segment("北京今天 20 度。<end>", True),
    ]
    # the open prompt after the results is the training text up to the final answer
    open_turn = [Turn("北京天气怎么样？", rounds=CONVERSATIONS[0][0].rounds)]
    assert t.prompt(open_turn, None, [WEATHER]) == "".join(s.text for s in segs[:4])


def test_cutegpt_parallel_calls_with_content():
    segs = get_template("cutegpt").segments(CONVERSATIONS[1], "")
    assert segs[2:] == [
        Segment("问：Weather and time?\n答：\n", False),
        Segment('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><end>', True),
        Segment("工具：\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n12:00\n</tool_response>\n答：\n", False),
        Segment("Sunny, noon.<end>", True),
    ]


def test_no_tools_no_change():
    turns = [Turn("q", output="a")]
    assert get_template("cutegpt").segments(turns, None, None) == get_template("cutegpt").segments(turns)


def test_raw_refuses_tools():
    with pytest.raises(CuteGPTError, match="raw"):
        get_template("raw").segments(CONVERSATIONS[0], None, [WEATHER])


def test_a_turn_ending_with_calls_is_not_open():
    assert not CONVERSATIONS[3][0].is_open
    with pytest.raises(ValueError):
        get_template("cutegpt").prompt(CONVERSATIONS[3])


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "", [{"name": "f", "arguments": {"a": 1}}]),
    ('Sure.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {"x": "y"}}\n</tool_call>',
     "Sure.", [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"x": "y"}}]),
    ('<tool_call>\n{"name": "f", "arguments": {}}', "", [{"name": "f", "arguments": {}}]),  # stopped before the close
    ("plain answer", "plain answer", []),
    ('<tool_call>\n{"name": "f", "arguments": ', '<tool_call>\n{"name": "f", "arguments": ', []),  # broken: content
    ('<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>', '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>', []),
])
def test_parse_tool_calls(text, content, calls):
    assert parse_tool_calls(text) == (content, calls)


def test_parse_inverts_rendering():
    seg = get_template("cutegpt").segments(CONVERSATIONS[1], "")[3].text.removesuffix("<end>")
    content, calls = parse_tool_calls(seg)
    assert content == "Let me check." and calls == [{"name": "get_weather", "arguments": {"city": "北京"}},
                                                     {"name": "get_time", "arguments": {}}]


@pytest.fixture(scope="module")
def cutegpt_jinja_tok(tmp_path_factory):
    from cutegpt.templates import chat_template_jinja

    tok = build_tokenizer(tmp_path_factory.mktemp("cj"), chat_template=False)
    tok.chat_template = chat_template_jinja("cutegpt")
    return tok


@pytest.mark.parametrize("system", [None, "", "Be brief."])
@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_cutegpt_jinja_renders_the_tool_format(cutegpt_jinja_tok, k, system):
    """The Jinja saved with every cutegpt tokenizer (and GGUF) renders tools, calls and results as templates.py does."""
    turns = CONVERSATIONS[k]
    want = get_template("cutegpt").text(turns, system, [WEATHER, TIME])
    assert cutegpt_jinja_tok.apply_chat_template(_messages(system, turns), tools=[WEATHER, TIME], tokenize=False) == want
    # OpenAI clients send arguments as JSON text
    msgs = _messages(system, turns)
    for m in msgs:
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = json.dumps(c["function"]["arguments"], ensure_ascii=False)
    assert cutegpt_jinja_tok.apply_chat_template(msgs, tools=[WEATHER, TIME], tokenize=False) == want


def test_auto_over_the_cutegpt_jinja_equals_cutegpt_with_tools(cutegpt_jinja_tok):
    auto = ChatTemplate(cutegpt_jinja_tok)
    assert auto.tool_style == "native"
    for turns in CONVERSATIONS:
        a, c = auto.segments(turns, None, [WEATHER]), get_template("cutegpt").segments(turns, None, [WEATHER])
        assert "".join(s.text for s in a) == "".join(s.text for s in c)
        assert [s.train for s in a for _ in s.text] == [s.train for s in c for _ in s.text]
    open_turn = [Turn("北京天气怎么样？", rounds=(ToolRound((CALL,), ("rain",)),))]
    assert auto.prompt(open_turn, None, [WEATHER]) == get_template("cutegpt").prompt(open_turn, None, [WEATHER])
