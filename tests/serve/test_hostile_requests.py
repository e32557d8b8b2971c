"""Request bodies that Python or llama.cpp cannot take, wrong field types, and streams cut by shutdown (fast, fake llama.cpp).

Each is a 400 naming the field (never a 500), nothing reaches llama.cpp, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.serve.conftest import request
from tests.serve.test_front import stream_in_background

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


def _chat(extra: str) -> bytes:
    """A chat body with `extra` (raw JSON text) spliced in, for what json.dumps cannot write."""
    return ('{"messages": [{"role": "user", "content": "hi"}], ' + extra + "}").encode()


HOSTILE = [
    # (body, path, param, words in the message)
    (b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}', CHAT, "messages[0].content", "lone UTF-16 surrogate"),
    (b'{"messages": [{"role": "user", "content": "hi", "\\udfff": 1}]}', CHAT, "messages[0]", "lone UTF-16 surrogate"),
    (_chat('"user": "\\udc00"'), CHAT, "user", "lone UTF-16 surrogate"),
    (b'{"prompt": "a\\ud83d"}', "/v1/completions", "prompt", "lone UTF-16 surrogate"),
    # deep enough to stop Python's parser (found again by scanning the text), and deep but parsable
    (b'{"messages": [{"role": "user", "content": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}", CHAT, "messages[0].content",
     "nests more than 100 levels"),
    (_chat('"metadata": {"a": ' + "[" * 300 + "]" * 300 + "}"), CHAT, "metadata.a", "nests more than 100 levels"),
    (_chat('"max_tokens": ' + "9" * 5000), CHAT, "max_tokens", "5,000-digit number"),
    (_chat('"seed": -' + "1" * 5000), CHAT, "seed", "5,000-digit number"),
    (_chat('"logit_bias": {"5": ' + "9" * 5000 + "}"), CHAT, "logit_bias.5", "5,000-digit number"),
    # Python reads these; JSON has no such numbers (json.dumps would send NaN on to llama.cpp)
    (_chat('"temperature": NaN'), CHAT, "temperature", "not a finite JSON number"),
    (_chat('"metadata": {"x": [1, -Infinity]}'), CHAT, "metadata.x[1]", "not a finite JSON number"),
    (_chat('"top_p": 1e400'), CHAT, "top_p", "not a finite JSON number"),
]


@pytest.mark.parametrize("raw,path,param,words", HOSTILE, ids=[f"{h[2]}-{h[3][:12]}" for h in HOSTILE])
def test_bodies_python_cannot_take_are_400s_naming_the_field(front_factory, raw, path, param, words):
    port, fake, front = front_factory()
    got, body = request(port, "POST", path, raw=raw)
    assert got == 400, body
    error = body["error"]
    assert error["param"] == param and error["code"] == "invalid_value"
    assert error["message"].startswith(f"'{param}'") and words in error["message"] and error["message"].endswith(".")
    assert not fake.bodies and front.counts["backend_errors"] == 0
    assert request(port, "POST", CHAT, {"messages": HELLO})[0] == 200


def test_a_surrogate_pair_is_text_and_passes(front_factory):
    port, fake, _ = front_factory()
    got, body = request(port, "POST", CHAT, raw=b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00 ok"}]}')
    assert got == 200 and fake.bodies[-1]["messages"][0]["content"] == "\U0001F600 ok"


WRONG_TYPES = [
    ({"logit_bias": "x"}, "logit_bias", "invalid_type"),
    ({"logit_bias": [[5, 1]]}, "logit_bias", "invalid_type"),
    ({"logit_bias": {"abc": 5}}, "logit_bias.abc", "invalid_value"),
    ({"logit_bias": {"-1": 5}}, "logit_bias.-1", "invalid_value"),
    ({"logit_bias": {"100": 5}}, "logit_bias.100", "invalid_value"),  # the fake model's vocabulary has 100 tokens
    ({"logit_bias": {"5": "x"}}, "logit_bias.5", "invalid_type"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5", "invalid_value"),
    ({"user": 5}, "user", "invalid_type"),
    ({"user": {"id": 1}}, "user", "invalid_type"),
    ({"user": "u" * 257}, "user", "invalid_type"),
    ({"tool_choice": 5}, "tool_choice", "invalid_value"),
    ({"tool_choice": ["auto"]}, "tool_choice", "invalid_value"),
    ({"response_format": "json"}, "response_format", "invalid_value"),
    ({"response_format": {"type": 5}}, "response_format", "invalid_value"),
    ({"tools": "x"}, "tools", "invalid_type"),
]


@pytest.mark.parametrize("tools", [True, False], ids=["own-template", "cutegpt-template"])
@pytest.mark.parametrize("extra,param,code", WRONG_TYPES, ids=[json.dumps(e)[:30] for e, _, _ in WRONG_TYPES])
def test_wrong_types_are_400s_naming_the_field(front_factory, extra, param, code, tools):
    port, fake, _ = front_factory(vocab_size=100, tools=tools)
    got, body = request(port, "POST", CHAT, {"messages": HELLO, **extra})
    assert got == 400, body
    assert body["error"]["param"] == param and body["error"]["code"] == code
    assert body["error"]["message"].startswith(f"'{param}'") and body["error"]["message"].endswith(".")
    assert not fake.bodies


def test_right_types_reach_llama_cpp(front_factory):
    port, fake, _ = front_factory(vocab_size=100)
    sent = {"messages": HELLO, "logit_bias": {"5": -100, "99": 2.5}, "user": "alice"}
    got, body = request(port, "POST", CHAT, sent)
    assert got == 200 and body["echo"]["logit_bias"] == sent["logit_bias"] and body["echo"]["user"] == "alice"
    got, body = request(port, "POST", "/v1/completions", {"prompt": [0, 99], "logit_bias": {"0": 1}})
    assert got == 200 and body["echo"]["prompt"] == [0, 99]


@pytest.mark.parametrize("path,sent,param", [
    ("/detokenize", {"tokens": [1, 100]}, "tokens[1]"),  # llama.cpp itself answers 500 (vector::_M_range_check)
    ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
    ("/detokenize", {"tokens": [1.5]}, "tokens[0]"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/detokenize", {}, "tokens"),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"content": "hi", "add_special": "yes"}, "add_special"),
    ("/v1/completions", {"prompt": [1, 100]}, "prompt"),
])
def test_token_ids_outside_the_vocabulary_are_400s(front_factory, path, sent, param):
    port, fake, _ = front_factory(vocab_size=100)
    got, body = request(port, "POST", path, sent)
    assert got == 400 and body["error"]["param"] == param, body
    assert not fake.bodies
    assert request(port, "POST", "/detokenize", {"tokens": [0, 99]}) == (200, {"object": "chat.completion", "echo": {"tokens": [0, 99]}})


def _close(front, grace: float) -> None:
    asyncio.run_coroutine_threadsafe(front.close(grace=grace), front.server.get_loop()).result(timeout=60)


def test_a_stream_cut_by_shutdown_ends_with_an_error_event_and_done(front_factory):
    port, fake, front = front_factory(max_tokens_limit=4096)
    # 2,000 events at 20 ms each: 40 s, far beyond the grace period
    reader, got = stream_in_background(port, front, 2000)
    assert front.active_streams == 1
    _close(front, grace=0.5)
    reader.join(30)
    assert not reader.is_alive()
    parts = got[0]
    assert parts[0].startswith(b"HTTP/1.1 200")
    assert parts[-1].startswith(b"[DONE]") and parts[-1].endswith(b"\r\n0\r\n\r\n")  # the chunked body ended properly
    error = json.loads(parts[-2].split(b"\n\n")[0])["error"]
    assert error["code"] == "server_shutdown" and "shutting down" in error["message"]
    tokens = [json.loads(p.split(b"\n\n")[0])["choices"][0]["delta"]["content"] for p in parts[1:-2]]
    assert 1 <= len(tokens) < 2000 and tokens == [f"t{i} " for i in range(len(tokens))]  # every event before the cut, in order
    assert fake.closed_early == 1 or time.sleep(1) or fake.closed_early == 1  # llama.cpp saw the close: it frees the slot
    assert front.active_streams == 0 and not front.relays


def test_a_stream_that_ends_within_the_grace_period_gets_no_error_event(front_factory):
    port, _, front = front_factory()
    reader, got = stream_in_background(port, front, 20)
    _close(front, grace=30)
    reader.join(30)
    parts = got[0]
    assert len(parts) == 1 + 20 + 1 and parts[-1].startswith(b"[DONE]") and b"server_shutdown" not in b"".join(parts)
