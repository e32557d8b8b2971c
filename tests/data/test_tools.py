"""Tool turns in training data: OpenAI messages (`tool_calls`, `tool`) and LLaMA-Factory sharegpt (`function_call`,
`observation`) read into the same conversation, rendered by the template, with loss on the calls and not the results."""

import json

import pytest

from cutegpt.data.convert import ConvertConfig, convert
from cutegpt.data.manifest import load_dataset
from cutegpt.data.readers import Source, parse_record
from cutegpt.errors import CuteGPTError
from cutegpt.templates import ToolCall, ToolRound, Turn, get_template
from tests.data.test_convert import _spans

FN = {"name": "get_weather", "description": "天气", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
OPENAI = {
    "tools": [{"type": "function", "function": FN}],
    "messages": [
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 20}"},
        {"role": "assistant", "content": "北京今天 20 度。"},
    ],
}
SHAREGPT = {  # LLaMA-Factory's layout: tools as JSON text, bare function objects
    "tools": json.dumps([FN], ensure_ascii=False),
    "conversations": [
        {"from": "human", "value": "北京天气怎么样？"},
        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}"},
        {"from": "observation", "value": "{\"temp\": 20}"},
        {"from": "gpt", "value": "北京今天 20 度。"},
    ],
}
CALL = ToolCall("get_weather", "{\"city\": \"北京\"}")
WANT_TURN = Turn("北京天气怎么样？", "", "北京今天 20 度。", (ToolRound((CALL,), ("{\"temp\": 20}",)),))


def test_openai_and_sharegpt_give_the_same_conversation():
    a, b = parse_record(OPENAI), parse_record(SHAREGPT)
    assert a.tools == b.tools == ({"type": "function", "function": FN},)
    assert b.turns == (WANT_TURN,)
    assert a.turns[0].rounds[0].calls[0].id == "call_1"
    assert a.turns[0].instruction == WANT_TURN.instruction and a.turns[0].output == WANT_TURN.output


def test_parallel_calls_and_a_conversation_ending_with_a_call():
    rec = {"tools": [FN], "messages": [
        {"role": "user", "content": "两个城市"},
        {"role": "assistant", "content": "好的", "tool_calls": [
            {"id": "a", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
            {"id": "b", "function": {"name": "get_weather", "arguments": "{\"city\": \"上海\"}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "晴"},
        {"role": "tool", "tool_call_id": "b", "content": "雨"},
        {"role": "assistant", "content": "北京晴，上海雨。"},
        {"role": "user", "content": "再查广州"},
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "get_weather", "arguments": "{\"city\": \"广州\"}"}}]},
    ]}
    conv = parse_record(rec)
    first, last = conv.turns
    assert first.rounds[0].results == ("晴", "雨") and first.rounds[0].content == "好的"
    assert [c.arguments for c in first.rounds[0].calls] == ['{"city": "北京"}', '{"city": "上海"}']
    assert last.output is None and not last.is_open and last.rounds[0].calls[0].name == "get_weather"
    sharegpt_list = {"tools": [FN], "conversations": [
        {"from": "human", "value": "两个城市"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}},
                                                       {"name": "get_weather", "arguments": {"city": "上海"}}])},
        {"from": "observation", "value": "晴，雨"}, {"from": "gpt", "value": "ok"}]}
    assert len(parse_record(sharegpt_list).turns[0].rounds[0].calls) == 2


@pytest.mark.parametrize("rec,message", [
    ({**OPENAI, "tools": None}, "has no 'tools' field"),
    ({**OPENAI, "tools": "[{"}, "field 'tools' is not valid JSON text"),
    ({**OPENAI, "tools": [{"description": "x"}]}, "tools [0]: field 'name' is missing"),
    ({"tools": [FN], "messages": [OPENAI["messages"][0], {"role": "tool", "content": "x"}]},
     "messages [1]: a tool result without an assistant tool call"),
    ({"tools": [FN], "messages": OPENAI["messages"][:2] + [{"role": "assistant", "content": "hi"}]},
     "messages [2]: an answer while the tool calls before it have no results"),
    ({"tools": [FN], "messages": OPENAI["messages"][:3] + [OPENAI["messages"][2]]},
     "messages [3]: more tool results than the 1 call"),
    ({"tools": [FN], "messages": [OPENAI["messages"][0], {"role": "assistant", "tool_calls": [
        {"id": "x", "function": {"name": "get_weather", "arguments": "[1]"}}]}]},
     "messages [1]: field 'tool_calls' [0]: the arguments are a list, not a JSON object"),
    ({"tools": [FN], "messages": [OPENAI["messages"][0], {"role": "assistant", "tool_calls": [{"id": "x", "function": {}}]}]},
     "messages [1]: field 'tool_calls' [0] has no function name"),
    ({"tools": [FN], "conversations": [SHAREGPT["conversations"][0], {"from": "function_call", "value": "{oops"}]},
     "conversations [1]: field 'value' is not valid JSON text"),
    ({"tools": [FN], "messages": OPENAI["messages"][:3]}, "the tool results have no answer after them"),
])
def test_bad_tool_records_name_line_and_field(tmp_path, rec, message):
    p = tmp_path / "tools.jsonl"
    p.write_text(json.dumps(OPENAI, ensure_ascii=False) + "\n" + json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(CuteGPTError) as e:
        Source(p)
    assert f"{p}: line 2: " in str(e.value) and message in str(e.value)


def _trained_texts(ds, tok):
    row = ds[0]
    return [tok.decode(r) for r in _spans(row["input_ids"], row["labels"])], tok.decode(row["input_ids"])


@pytest.mark.parametrize("template", ["cutegpt", "auto"])
def test_convert_trains_calls_not_results(tmp_path, tiny_model_dir, tiny_tokenizer, template):
    p = tmp_path / "tools.jsonl"
    p.write_text(json.dumps(OPENAI, ensure_ascii=False) + "\n", encoding="utf-8")
    out = convert(ConvertConfig(input=str(p), out=str(tmp_path / "ds"), model=str(tiny_model_dir), template=template,
                                max_length=2048, packing="pad"))
    ds, _ = load_dataset(out, tiny_tokenizer)
    trained, whole = _trained_texts(ds, tiny_tokenizer)
    t = get_template(template, tiny_tokenizer)
    conv = parse_record(OPENAI)
    segs = t.segments(conv.turns, conv.system, conv.tools)
    assert whole == "".join(s.text for s in segs) + (tiny_tokenizer.eos_token if t.eos_after_conversation else "")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    stop = t.stop
    expected = [call + stop, "北京今天 20 度。" + stop]
    if t.eos_after_conversation:
        expected[-1] += tiny_tokenizer.eos_token
    assert "".join(trained) == "".join(expected)
    assert "get_weather" in whole.split(call)[0]  # the tools are described before the question
    assert '{"temp": 20}' in whole and all('{"temp": 20}' not in x for x in trained)


def test_a_tool_list_is_never_cut(tmp_path, tiny_model_dir, tiny_tokenizer):
    """At --max-length 512 the tiny byte-level vocabulary needs more than 2/3 of it for the tool list: the tool
    conversation is dropped and counted (a cut list would teach calls to tools that are not there); alone, refused."""
    from cutegpt.data.manifest import read_manifest

    p = tmp_path / "tools.jsonl"
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    p.write_text(json.dumps(OPENAI, ensure_ascii=False) + "\n" + json.dumps(plain) + "\n", encoding="utf-8")
    conv = parse_record(OPENAI)
    system = get_template("cutegpt").segments(conv.turns, conv.system, conv.tools)[0].text
    assert len(tiny_tokenizer(system, add_special_tokens=False)["input_ids"]) > 2 * (512 // 3)
    out = convert(ConvertConfig(input=str(p), out=str(tmp_path / "ds"), model=str(tiny_model_dir), max_length=512))
    c = read_manifest(out)["counts"]
    assert c["dropped_long_tool_lists"] == 1 and c["samples"] == 1
    p.write_text(json.dumps(OPENAI, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(CuteGPTError, match="tool list takes more than 2/3 of --max-length 512"):
        convert(ConvertConfig(input=str(p), out=str(tmp_path / "ds2"), model=str(tiny_model_dir), max_length=512))
    assert not (tmp_path / "ds2").exists()
