"""Tool-call syntaxes of Llama 3.1 and Mistral v0.3 (and Hermes): their real chat templates through transformers are
the reference for rendering; hand-written answers for parsing; llama.cpp's grammar for forced calls on tiny models."""

from __future__ import annotations

import json

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.templates import ChatTemplate, ToolCall, ToolRound, Turn
from cutegpt.tool_syntax import HERMES, LLAMA3, MAX_PARALLEL_CALLS, MISTRAL, nine_char_id
from tests.test_templates_tools import _messages
from tests.tiny import LLAMA31, MISTRAL_V03, QWEN25, build_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "今天的天气",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
# ids as the clients of each family send them back: Mistral's templates take 9 letters or digits only
CALL = ToolCall("get_weather", json.dumps({"city": "北京"}, ensure_ascii=False), "a1b2c3d4e")
CALL_EN = ToolCall("get_weather", json.dumps({"city": "Paris"}), "f6g7h8i9j")
CALL2 = ToolCall("get_time", "{}", "k1l2m3n4o")


ONE_CALL = [
    [Turn("北京天气怎么样？", rounds=(ToolRound((CALL,), ('{"temp": 20}',)),), output="北京今天 20 度。")],
    [Turn("hi", output="hello"), Turn("Weather in Paris?", rounds=(ToolRound((CALL_EN,), ("sunny",)),), output="Sunny.")],
    [Turn("北京天气怎么样？", rounds=(ToolRound((CALL,), ("rain",)), ToolRound((CALL2,), ("9:00",))), output="下雨，九点。")],
]
OPEN = [  # prompts: the model answers next
    [Turn("北京天气怎么样？")],
    [Turn("北京天气怎么样？", rounds=(ToolRound((CALL,), ("rain",)),))],
    [Turn("hi", output="hello"), Turn("Weather and time?", rounds=(ToolRound((CALL_EN,), ("sunny",)),))],
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tokenizer of the tiny vocabulary carrying one family's real chat template."""
    def make(template: str):
        tok = build_tokenizer(tmp_path_factory.mktemp("family"), chat_template=False)
        tok.chat_template = template
        return tok
    return make


@pytest.mark.parametrize("template,syntax", [(QWEN25, HERMES), (LLAMA31, LLAMA3), (MISTRAL_V03, MISTRAL)],
                         ids=["qwen25", "llama31", "mistral03"])
def test_the_syntax_is_detected_from_the_template(family, template, syntax):
    t = ChatTemplate(family(template))
    assert t.tool_style == "native" and t.tool_syntax is syntax


@pytest.mark.parametrize("system", [None, "You are a weather bot."])
@pytest.mark.parametrize("k", range(len(OPEN)))
@pytest.mark.parametrize("template", [LLAMA31, MISTRAL_V03], ids=["llama31", "mistral03"])
def test_prompts_equal_the_familys_own_template(family, template, k, system):
    tok = family(template)
    turns = OPEN[k]
    want = tok.apply_chat_template(_messages(system, turns), tools=[WEATHER, TIME], tokenize=False, add_generation_prompt=True)
    assert ChatTemplate(tok).prompt(turns, system, [WEATHER, TIME]) == want


@pytest.mark.parametrize("k", range(len(ONE_CALL)))
def test_llama31_training_text_equals_its_template_and_trains_the_calls(family, k):
    tok = family(LLAMA31)
    turns = ONE_CALL[k]
    t = ChatTemplate(tok)
    assert t.text(turns, None, [WEATHER, TIME]) == tok.apply_chat_template(_messages(None, turns), tools=[WEATHER, TIME],
                                                                          tokenize=False)
    trained = [s.text for s in t.segments(turns, None, [WEATHER, TIME]) if s.train]
    calls = [c for turn in turns for r in turn.rounds for c in r.calls]
    assert [x for x in trained if x.startswith("{")] == [f'{{"name": "{c.name}", "parameters": {c.arguments}}}<|eot_id|>'
                                                         for c in calls]
    assert trained[-1] == turns[-1].output + "<|eot_id|>"


def test_mistral_training_text_equals_its_template(family):
    tok = family(MISTRAL_V03)
    turns = ONE_CALL[0]
    t = ChatTemplate(tok)
    assert t.text(turns, None, [WEATHER]) == tok.apply_chat_template(_messages(None, turns), tools=[WEATHER], tokenize=False)
    trained = [s.text for s in t.segments(turns, None, [WEATHER]) if s.train]
    assert trained == ['[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "北京"}, "id": "a1b2c3d4e"}]</s>',
                       " 北京今天 20 度。</s>"]


def test_openai_call_ids_become_mistrals_nine_characters_consistently(family):
    """`call_…` ids (what serve hands out) would make Mistral's template raise; call and result get the same id."""
    tok = family(MISTRAL_V03)
    long_id = ToolCall(CALL.name, CALL.arguments, "call_0123456789abcdef01234567")
    prompt = ChatTemplate(tok).prompt([Turn("北京天气怎么样？", rounds=(ToolRound((long_id,), ("rain",)),))], None, [WEATHER])
    short = nine_char_id(long_id.id)
    assert len(short) == 9 and short.isalnum() and nine_char_id("a1b2c3d4e") == "a1b2c3d4e"
    assert f'"id": "{short}"' in prompt and f'"call_id": "{short}"' in prompt


def test_llama31_refuses_two_calls_in_one_message_in_one_sentence(family):
    turns = [Turn("Weather and time?", rounds=(ToolRound((CALL_EN, CALL2), ("sunny", "12:00")),))]
    with pytest.raises(CuteGPTError, match="refuses this conversation: This model only supports single tool-calls"):
        ChatTemplate(family(LLAMA31)).prompt(turns, None, [WEATHER, TIME])


def test_a_call_syntax_outside_the_table_is_refused_in_one_sentence(family):
    """A template that describes tools but writes calls its own way (here `<function=...>`) is not guessed at."""
    other = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.role }}: "
             "{% if m.tool_calls %}{% for c in m.tool_calls %}<function={{ c.function.name }}>{{ c.function.arguments | tojson }}"
             "</function>{% endfor %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}")
    tok = family(other)
    t = ChatTemplate(tok)
    assert t.tool_style == "other"
    with pytest.raises(CuteGPTError, match="writes tool calls in a syntax cutegpt cannot parse.*--template cutegpt"):
        t.prompt(OPEN[0], None, [WEATHER])
    # without tools it is an ordinary template
    assert t.prompt(OPEN[0]) == tok.apply_chat_template(_messages(None, OPEN[0]), tokenize=False) == "user: 北京天气怎么样？"


PARSED = {  # syntax -> [(answer, content, calls)]
    LLAMA3: [
        ('{"name": "get_weather", "parameters": {"city": "北京"}}', "", [{"name": "get_weather", "arguments": {"city": "北京"}}]),
        ('\n{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [{"name": "get_weather", "arguments": {"city": "Paris"}}]),
        ('<|python_tag|>{"name": "get_time", "parameters": {}}', "", [{"name": "get_time", "arguments": {}}]),
        ('Let me check.<|python_tag|>{"name": "get_time", "arguments": {}}', "Let me check.", [{"name": "get_time", "arguments": {}}]),
        ('{"name": "get_weather", "parameters": {"city": "上海"}}; {"name": "get_time", "parameters": {}}', "",
         [{"name": "get_weather", "arguments": {"city": "上海"}}, {"name": "get_time", "arguments": {}}]),
        ("北京今天下雨。", "北京今天下雨。", []),
        ('The answer is {"a": 1}', 'The answer is {"a": 1}', []),  # JSON inside prose is no call
        ('{"name": "get_weather", "parameters": {"city": ', '{"name": "get_weather", "parameters": {"city": ', []),  # cut
        ('{"name": "f", "parameters": [1]}', '{"name": "f", "parameters": [1]}', []),
        ('{"a": 1}', '{"a": 1}', []),
        ('{"name": "f", "parameters": {}} trailing words', '{"name": "f", "parameters": {}} trailing words', []),
    ],
    MISTRAL: [
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "北京"}}]', "",
         [{"name": "get_weather", "arguments": {"city": "北京"}}]),
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}, {"name": "get_time", "arguments": {}}]',
         "", [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]),
        ('好的。 [TOOL_CALLS] [{"name": "get_time", "arguments": {}}]', "好的。", [{"name": "get_time", "arguments": {}}]),
        ("Sunny in Paris.", "Sunny in Paris.", []),
        ('[TOOL_CALLS] [{"name": "get_time", "arguments": {}', '[TOOL_CALLS] [{"name": "get_time", "arguments": {}', []),
        ('[TOOL_CALLS] {"name": "get_time", "arguments": {}}', '[TOOL_CALLS] {"name": "get_time", "arguments": {}}', []),
        ('[TOOL_CALLS] []', '[TOOL_CALLS] []', []),
        ('[TOOL_CALLS] [{"name": 3, "arguments": {}}]', '[TOOL_CALLS] [{"name": 3, "arguments": {}}]', []),
    ],
    HERMES: [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>', "",
         [{"name": "get_weather", "arguments": {"city": "北京"}}]),
        ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
         "", [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]),
        ('<tool_call>\n{"name": "f", "arguments": {}} {"name": "g", "arguments": {}}\n</tool_call>',
         '<tool_call>\n{"name": "f", "arguments": {}} {"name": "g", "arguments": {}}\n</tool_call>', []),  # one per block
    ],
}


@pytest.mark.parametrize("syntax,text,content,calls", [(s, *case) for s, cases in PARSED.items() for case in cases],
                         ids=lambda v: v.name if hasattr(v, "name") else None)
def test_parse(syntax, text, content, calls):
    assert syntax.parse(text) == (content, calls)


@pytest.mark.parametrize("template,syntax", [(LLAMA31, LLAMA3), (MISTRAL_V03, MISTRAL)], ids=["llama31", "mistral03"])
def test_parse_inverts_the_templates_rendering(family, template, syntax):
    tok = family(template)
    t = ChatTemplate(tok)
    turns = [Turn("北京天气怎么样？", rounds=(ToolRound((CALL,)),))]
    call = [s.text for s in t.segments(turns, None, [WEATHER]) if s.train][0].removesuffix(t.stop)
    assert syntax.parse(call) == ("", [{"name": "get_weather", "arguments": {"city": "北京"}}])


@pytest.mark.parametrize("syntax", [LLAMA3, MISTRAL, HERMES], ids=lambda s: s.name)
def test_streamed_content_never_shows_the_start_of_a_call(syntax):
    """Brute force: at every split, what content_end releases is a prefix of the parsed content."""
    for text, content, calls in PARSED[syntax]:
        sent = 0
        for n in range(len(text) + 1):
            sent = syntax.content_end(text[:n], sent)
            assert text[:sent] == content[:sent] if calls else text.startswith(text[:sent])
        if calls:
            assert sent <= len(content)


def test_forced_schemas():
    tools = [WEATHER, TIME]
    one = LLAMA3.forced_schema(tools, ["get_weather"])
    assert one["properties"]["name"] == {"const": "get_weather"} and one["required"] == ["name", "parameters"]
    assert one["properties"]["parameters"]["additionalProperties"] is False
    many = MISTRAL.forced_schema(tools, ["get_weather", "get_time"], parallel=False)
    assert many["type"] == "array" and many["minItems"] == 1 and many["maxItems"] == 1
    assert [o["properties"]["name"]["const"] for o in many["items"]["anyOf"]] == ["get_weather", "get_time"]
    assert MISTRAL.forced_schema(tools, ["get_time"])["maxItems"] == MAX_PARALLEL_CALLS


# ----------------------------------------------------------------------------- llama.cpp's grammar (slow)

UNIT = {"type": "function", "function": {"name": "set_unit", "description": "温度单位", "parameters": {
    "type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "华氏"]}, "loud": {"type": "boolean"}},
    "required": ["unit", "loud"]}}}
MODE = {"type": "function", "function": {"name": "set_mode", "parameters": {
    "type": "object", "properties": {"mode": {"type": "string", "enum": ["on", "off"]}}, "required": ["mode"]}}}


@pytest.fixture(scope="module")
def tiny_cpp(tmp_path_factory):
    """A tiny random LLaMA of the fixture vocabulary, as an f32 GGUF in llama.cpp."""
    pytest.importorskip("xllamacpp")
    from cutegpt.export.gguf import export_gguf
    from cutegpt.runtime.llamacpp import LlamaCpp
    from tests.tiny import build_tiny_llama

    folder = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(folder, chat_template=False)
    build_tiny_llama(folder, vocab_size=len(tok), max_position_embeddings=4096)  # Llama 3.1's tool prompt is long
    path = export_gguf(str(folder), folder.parent / "tiny.gguf", quant="f32", verify=False, overwrite=True, progress=False)
    with LlamaCpp(path, n_ctx=4096) as cpp:
        yield cpp


@pytest.mark.slow
@pytest.mark.parametrize("template", [LLAMA31, MISTRAL_V03, QWEN25], ids=["llama31", "mistral03", "qwen25"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_mode"}}], ids=["required", "named"])
def test_a_forced_call_on_a_random_model_validates(tiny_cpp, family, template, choice):
    """The serve path (plan -> llama.cpp /v1/completions with the syntax's opening and schema -> parse) returns a call
    that validates against the function's schema, whatever a random model would write, and with the separators the
    templates render (a greedy random model stays in the grammar's flexible white space until max_tokens otherwise)."""
    import jsonschema

    from cutegpt.serve.tools import chat_response, plan

    t = ChatTemplate(family(template))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "请把单位设成摄氏度"}], "tools": [UNIT, MODE],
            "tool_choice": choice, "max_tokens": 200, "temperature": 0,
            "parallel_tool_calls": False}  # a random model would fill Mistral's array of calls until max_tokens
    p = plan(body, t, [])
    assert p.upstream["prompt"].endswith(t.tool_syntax.prefill)
    upstream = tiny_cpp._post("/v1/completions", p.upstream)
    text = upstream["choices"][0]["text"]
    assert text == json.dumps(json.loads(text), ensure_ascii=False)  # written as the template writes calls
    answer = chat_response(p, upstream)
    (c,) = answer["choices"]
    assert c["finish_reason"] == "tool_calls", c
    assert c["message"]["tool_calls"], c
    for call in c["message"]["tool_calls"]:
        fn = {"set_unit": UNIT, "set_mode": MODE}[call["function"]["name"]]["function"]
        if isinstance(choice, dict):
            assert fn["name"] == "set_mode"
        jsonschema.validate(json.loads(call["function"]["arguments"]), fn["parameters"])


@pytest.mark.slow
def test_a_forced_parallel_call_array_ends(tiny_cpp, family):
    """With parallel calls allowed, Mistral's forced array still ends: at most MAX_PARALLEL_CALLS calls (a greedy
    random model adds calls until max_tokens without the bound)."""
    from cutegpt.serve.tools import chat_response, plan

    t = ChatTemplate(family(MISTRAL_V03))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "请把单位设成摄氏度"}], "tools": [MODE],
            "tool_choice": "required", "max_tokens": 1500, "temperature": 0}
    p = plan(body, t, [])
    upstream = tiny_cpp._post("/v1/completions", p.upstream)
    assert upstream["choices"][0]["finish_reason"] == "stop", upstream["choices"][0]
    (c,) = chat_response(p, upstream)["choices"]
    assert c["finish_reason"] == "tool_calls" and 1 <= len(c["message"]["tool_calls"]) <= MAX_PARALLEL_CALLS, c
