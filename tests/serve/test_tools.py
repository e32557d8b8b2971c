"""Tool calling on /v1/chat/completions: the official openai client against the front, with a scripted llama.cpp
(fast), and against `cutegpt serve` on the embedded model, where the grammar forces a call that validates (slow)."""

from __future__ import annotations

import asyncio
import json

import pytest

from cutegpt.templates import ChatTemplate, ToolCall, ToolRound, Turn, get_template
from cutegpt.tool_syntax import nine_char_id
from tests.serve.conftest import FakeLlama, request
from tests.tiny import LLAMA31, MISTRAL_V03, build_tokenizer

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
CALL_TEXT = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class ScriptedLlama(FakeLlama):
    """llama.cpp's /v1/completions answering a fixed text (streamed 4 characters an event); other paths as FakeLlama."""

    def __init__(self, text: str, finish: str = "stop"):
        super().__init__()
        self.text, self.finish = text, finish

    async def handle(self, reader, writer):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        path = head[0].split(" ")[1]
        req = json.loads(body)
        self.bodies.append({"path": path, **req})
        if path != "/v1/completions":
            data = json.dumps({"object": "chat.completion", "echo": req}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        elif req.get("stream"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            pieces = [self.text[i:i + 4] for i in range(0, len(self.text), 4)]
            events = [{"choices": [{"text": t, "index": 0, "finish_reason": None}], "object": "text_completion"} for t in pieces]
            events.append({"choices": [{"text": "", "index": 0, "finish_reason": self.finish}], "object": "text_completion",
                           "usage": {"prompt_tokens": 9, "completion_tokens": len(pieces), "total_tokens": 9 + len(pieces)}})
            for ev in events:
                data = b"data: " + json.dumps(ev).encode() + b"\n\n"
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
                await asyncio.sleep(0.005)
            data = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
        else:
            data = json.dumps({"choices": [{"text": self.text, "index": 0, "finish_reason": self.finish}],
                               "object": "text_completion", "usage": {"prompt_tokens": 9, "completion_tokens": 5,
                                                                       "total_tokens": 14}}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        await writer.drain()
        writer.close()


def _client(port: int) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


def _front(front_factory, text: str, finish: str = "stop", template=None, **policy):
    fake = ScriptedLlama(text, finish)
    port, _, front = front_factory(fake=fake, template=template or get_template("cutegpt"), tools=True, **policy)
    return port, fake


def test_auto_call_is_parsed_from_the_models_text(front_factory):
    port, fake = _front(front_factory, CALL_TEXT)
    r = _client(port).chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and r.usage.total_tokens == 14
    sent = fake.bodies[-1]
    assert sent["path"] == "/v1/completions" and "json_schema" not in sent
    # the prompt is the training format's, with the tools described in the system part
    assert sent["prompt"] == get_template("cutegpt").prompt([Turn(ASK[0]["content"])], None, [WEATHER, TIME])
    assert "<end>" in sent["stop"] and sent["max_tokens"] == 256 and sent["top_p"] == 0.8


def test_plain_answers_stay_plain(front_factory):
    port, _ = _front(front_factory, "Sunny, <tool maybe.")
    r = _client(port).chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
    assert r.choices[0].message.content == "Sunny, <tool maybe." and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"


def _stream(port: int, **kw):
    """The openai docs' way of reading a streamed tool call: content deltas, tool_calls deltas merged by index."""
    content, calls, finish, chunks = "", {}, None, 0
    for chunk in _client(port).chat.completions.create(model="tiny", messages=ASK, stream=True, **kw):
        chunks += 1
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish, chunks


def test_streamed_call_arrives_as_tool_call_deltas(front_factory):
    port, _ = _front(front_factory, CALL_TEXT)
    content, calls, finish, chunks = _stream(port, tools=[WEATHER])
    assert content == "Let me look." and finish == "tool_calls" and chunks > 4  # the content came in pieces
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_")


@pytest.mark.parametrize("text", ["Sunny, <tool maybe.\n\nBye <tool_cal", "plain\n", "<tool_call>\n{broken"])
def test_streamed_plain_text_is_exact(front_factory, text):
    port, _ = _front(front_factory, text)
    content, calls, finish, _ = _stream(port, tools=[WEATHER])
    assert content == text and calls == [] and finish == "stop"


def test_two_calls_streamed_with_usage(front_factory):
    two = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    port, _ = _front(front_factory, two)
    content, calls, finish, _ = _stream(port, tools=[WEATHER, TIME], stream_options={"include_usage": True})
    assert content == "" and finish == "tool_calls" and [c["name"] for c in calls] == ["get_weather", "get_time"]
    events = []
    for chunk in _client(port).chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], stream=True,
                                                        stream_options={"include_usage": True}):
        events.append(chunk)
    assert events[-1].usage is not None and events[-1].usage.prompt_tokens == 9
    r = _client(port).chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]


@pytest.mark.parametrize("choice,names", [("required", ["get_weather", "get_time"]),
                                          ({"type": "function", "function": {"name": "get_time"}}, ["get_time"])])
def test_forced_calls_open_the_answer_and_send_a_schema(front_factory, choice, names):
    port, fake = _front(front_factory, '{"name": "get_time", "arguments": {"zone": "UTC"}}')
    r = _client(port).chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice)
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {"zone": "UTC"})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    sent = fake.bodies[-1]
    assert sent["prompt"].endswith("答：\n<tool_call>\n")
    schema = sent["json_schema"]
    options = schema["anyOf"] if "anyOf" in schema else [schema]
    assert [o["properties"]["name"]["const"] for o in options] == names
    import jsonschema

    jsonschema.validate({"name": "get_time", "arguments": {"zone": "UTC"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "arguments": {"zone": "PST"}}, schema)
    with pytest.raises(jsonschema.ValidationError):  # no invented parameters
        jsonschema.validate({"name": "get_time", "arguments": {"zone": "UTC", "city": "Paris"}}, schema)


def test_history_with_tool_turns_is_rendered_by_the_template(front_factory):
    port, fake = _front(front_factory, "It is sunny in Paris.")
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{\"zone\": \"CET\"}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "12:00"},  # out of order: rendered in the calls' order
        {"role": "tool", "tool_call_id": "a", "content": "sunny"}]
    r = _client(port).chat.completions.create(model="tiny", messages=history, tools=[WEATHER, TIME])
    assert r.choices[0].message.content == "It is sunny in Paris." and r.choices[0].finish_reason == "stop"
    rounds = (ToolRound((ToolCall("get_weather", '{"city": "Paris"}', "a"), ToolCall("get_time", '{"zone": "CET"}', "b")),
                        ("sunny", "12:00")),)
    want = get_template("cutegpt").prompt([Turn(ASK[0]["content"], rounds=rounds)], None, [WEATHER, TIME])
    assert fake.bodies[-1]["prompt"] == want and want.endswith("<tool_response>\n12:00\n</tool_response>\n答：\n")


def test_tool_choice_none_forwards_without_tools(front_factory):
    port, fake = _front(front_factory, "unused")
    status, body = request(port, "POST", "/v1/chat/completions", {"messages": ASK, "tools": [WEATHER], "tool_choice": "none"})
    assert status == 200 and fake.bodies[-1]["path"] == "/v1/chat/completions" and "tools" not in body["echo"]


def test_chatml_model_gets_qwen_style_tools(front_factory, tiny_tokenizer):
    port, fake = _front(front_factory, CALL_TEXT, template=lambda: ChatTemplate(tiny_tokenizer))
    r = _client(port).chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."}, *ASK],
                                              tools=[WEATHER])
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert fake.bodies[-1]["prompt"].startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")


FAMILIES = {  # each family's real chat template and a call as its models write it
    "llama31": (LLAMA31, '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    "mistral03": (MISTRAL_V03, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_openai_tool_example_on_llama31_and_mistral_templates(front_factory, tmp_path, family):
    """The openai docs' tool flow (call, streamed call, result sent back with role tool) on a model whose own template
    renders tools: the prompts are what transformers renders for those messages, the calls come back parsed."""
    template, call_text = FAMILIES[family]
    tok = build_tokenizer(tmp_path, chat_template=False)
    tok.chat_template = template
    port, fake = _front(front_factory, call_text, template=lambda: ChatTemplate(tok))
    client = _client(port)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert fake.bodies[-1]["prompt"] == tok.apply_chat_template(ASK, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    content, calls, finish, _ = _stream(port, tools=[WEATHER])
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    client.chat.completions.create(model="tiny", tools=[WEATHER], messages=[
        *ASK, r.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])  # as the docs append it
    sid = nine_char_id(call.id) if family == "mistral03" else call.id  # Mistral's template takes 9-character ids only
    want = tok.apply_chat_template([*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": sid, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": sid, "content": "sunny"}], tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert fake.bodies[-1]["prompt"] == want


def test_a_history_the_familys_template_refuses_is_a_400_naming_messages(front_factory, tmp_path):
    tok = build_tokenizer(tmp_path, chat_template=False)
    tok.chat_template = LLAMA31
    port, fake = _front(front_factory, "unused", template=lambda: ChatTemplate(tok))
    two = [{"id": k, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}} for k in ("a", "b")]
    status, answer = request(port, "POST", "/v1/chat/completions", {"tools": [WEATHER], "messages": [
        *ASK, {"role": "assistant", "tool_calls": two}, {"role": "tool", "tool_call_id": "a", "content": "x"},
        {"role": "tool", "tool_call_id": "b", "content": "y"}]})
    assert status == 400 and answer["error"]["param"] == "messages" and not fake.bodies
    assert "only supports single tool-calls" in answer["error"]["message"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("text", ["Sunny in Paris.", "天气 {晴}\n", " [TOOL_CALL maybe"])
def test_plain_answers_of_the_families_stream_exactly(front_factory, tmp_path, family, text):
    tok = build_tokenizer(tmp_path, chat_template=False)
    tok.chat_template = FAMILIES[family][0]
    port, _ = _front(front_factory, text, template=lambda: ChatTemplate(tok))
    content, calls, finish, _ = _stream(port, tools=[WEATHER])
    assert (content, calls, finish) == (text, [], "stop")


@pytest.mark.parametrize("text,want", [(" 北京今天下雨。", "北京今天下雨。"), ("  two spaces", " two spaces"),
                                       ("no space", "no space")])
def test_the_tool_path_drops_a_sentencepiece_first_space_like_the_plain_path(front_factory, text, want):
    """llama.cpp starts a SentencePiece answer with the space of its first piece; transformers (and chat, generate and
    serve's plain path) drop it: tool answers do too, whole and streamed, through the same FirstSpace."""
    port, _ = _front(front_factory, text, drop_first_space=True)
    r = _client(port).chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
    assert r.choices[0].message.content == want
    assert _stream(port, tools=[WEATHER])[0] == want
    port, _ = _front(front_factory, text)  # a byte-level vocabulary keeps it
    assert _client(port).chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER]).choices[0].message.content == text


def test_a_forced_call_continues_its_opening_with_its_spaces(front_factory):
    """A forced answer continues the prefilled `<tool_call>\n`: nothing is dropped (seen when max_tokens cuts it)."""
    port, _ = _front(front_factory, ' {"name": "get_ti', finish="length", drop_first_space=True)
    r = _client(port).chat.completions.create(model="tiny", messages=ASK, tools=[TIME], tool_choice="required")
    assert r.choices[0].message.content == '<tool_call>\n {"name": "get_ti' and r.choices[0].finish_reason == "length"


BAD = [
    ({"messages": ASK + [{"role": "assistant", "content": "hm"}], "tools": [WEATHER]}, "messages"),
    ({"messages": ASK, "tools": [WEATHER], "n": 2}, "n"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "[1]"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "x"}], "tools": [WEATHER]}, "messages[1].tool_calls[0].function.arguments"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}], "tools": [WEATHER]}, "messages"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_requests_the_template_cannot_render_are_400s(front_factory, body, param):
    port, fake = _front(front_factory, "unused")
    status, answer = request(port, "POST", "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == param and not fake.bodies, answer


def test_raw_format_refuses_tools(front_factory):
    port, fake = _front(front_factory, "unused", template=get_template("raw"))
    status, answer = request(port, "POST", "/v1/chat/completions", {"messages": ASK, "tools": [WEATHER]})
    assert status == 400 and answer["error"]["param"] == "tools" and "raw" in answer["error"]["message"]


# ----------------------------------------------------------------------------- the real server (slow)


@pytest.mark.slow
def test_required_call_on_the_embedded_model_validates():
    """SmolLM2's ChatML has no tool section: Qwen-style tools, and llama.cpp's grammar makes the call valid JSON."""
    import jsonschema

    from tests.serve.conftest import running_server

    with running_server("--quiet", "--parallel", "1") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=64)
        assert r.choices[0].message.tool_calls, r
        (call,) = r.choices[0].message.tool_calls
        fn = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]
        jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
        assert r.choices[0].finish_reason == "tool_calls"
        named = {"type": "function", "function": {"name": "get_time"}}
        stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, tools=[WEATHER, TIME],
                                                tool_choice=named, max_tokens=64, stream=True)
        deltas = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
        (streamed,) = [tc for d in deltas for tc in d]
        assert streamed.function.name == "get_time"
        jsonschema.validate(json.loads(streamed.function.arguments), TIME["function"]["parameters"])


@pytest.mark.slow
def test_cutegpt_format_llama_cpp_renders_our_tool_format_and_forced_calls_validate():
    """llama.cpp's own Jinja engine renders the cutegpt tool format as templates.py does (what GGUF users get), and a
    forced call through the cutegpt format comes back parsed and valid."""
    import jsonschema

    from tests.serve.conftest import running_server

    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"}]
    with running_server("--template", "cutegpt", "--quiet", "--parallel", "1") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        # (llama.cpp writes a missing tool description as "": WEATHER has one)
        status, body = request(port, "POST", "/apply-template", {"messages": history, "tools": [WEATHER]})
        rounds = (ToolRound((ToolCall("get_weather", '{"city": "Paris"}'),), ("sunny",)),)
        assert status == 200 and body["prompt"] == get_template("cutegpt").prompt(
            [Turn(ASK[0]["content"], rounds=rounds)], None, [WEATHER])
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, tools=[WEATHER],
                                           tool_choice="required", max_tokens=64, temperature=0)
        assert r.choices[0].message.tool_calls, r
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


@pytest.mark.slow
def test_a_tiny_model_trained_on_a_tool_turn_calls_the_tool_through_serve(tiny_model_dir, tmp_path):
    """End to end: OpenAI-style tool data -> data convert -> full SFT of the tiny random model (a few seconds) ->
    serve (GGUF export, llama.cpp) -> the openai client sees the call the model learnt, with tool_choice auto."""
    from cutegpt.data.convert import ConvertConfig, convert
    from cutegpt.training.sft import SFTConfig, run_sft
    from tests.serve.conftest import running_server

    now = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
    ask = [{"role": "system", "content": ""}, {"role": "user", "content": "What time is it?"}]
    record = {"tools": [now], "messages": ask + [
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "12:00"},
        {"role": "assistant", "content": "It is 12:00."}]}
    src = tmp_path / "tools.jsonl"
    src.write_text((json.dumps(record) + "\n") * 8)
    data = convert(ConvertConfig(input=str(src), out=str(tmp_path / "ds"), model=str(tiny_model_dir), max_length=512,
                                 add_stop_token=True, packing="pad"))
    run = tmp_path / "run"
    assert run_sft(SFTConfig(model=str(tiny_model_dir), data=[str(data)], out=str(run), method="full", micro_batch=4,
                             grad_accum=1, lr=3e-3, warmup_steps=0, max_steps=60, save_steps=1000, precision="fp32",
                             seed=0, logging_steps=10)) == 0
    with running_server("--model", str(run / "final"), "--quant", "f32", "--quiet", "--parallel", "1",
                        env={"CUTEGPT_CACHE": str(tmp_path / "cache")}) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="run", messages=ask, tools=[now], temperature=0, max_tokens=96)
        assert r.choices[0].finish_reason == "tool_calls", repr(r.choices[0].message.content)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "now" and json.loads(call.function.arguments) == {}
        # the same call streamed, read as the openai docs read it (deltas merged by index)
        streamed = {}
        for chunk in client.chat.completions.create(model="run", messages=ask, tools=[now], temperature=0,
                                                    max_tokens=96, stream=True):
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                slot = streamed.setdefault(tc.index, {"name": "", "arguments": ""})
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
        assert list(streamed.values()) == [{"name": "now", "arguments": "{}"}]
        # the result goes back (the message object appended as the docs do), and the model answers as it learnt
        r2 = client.chat.completions.create(model="run", tools=[now], temperature=0, max_tokens=24, messages=[
            *ask, r.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "12:00"}])
        assert r2.choices[0].message.content == "It is 12:00." and r2.choices[0].finish_reason == "stop"


def test_the_web_pages_built_in_tools_are_not_rendered(front_factory):
    """llama.cpp's page offers its own tools with every message; its chats are answered as plain chats."""
    port, fake = _front(front_factory, "unused")
    status, body = request(port, "POST", "/v1/chat/completions", {"messages": ASK, "tools": [WEATHER]},
                           headers={"Referer": f"http://127.0.0.1:{port}/"})
    assert status == 200 and fake.bodies[-1]["path"] == "/v1/chat/completions" and "tools" not in body["echo"]
