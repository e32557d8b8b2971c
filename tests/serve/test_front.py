"""The front: defaults, checks, limits, API key and streaming, against a fake llama.cpp (fast)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.serve.conftest import request

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


def test_defaults_and_stop_marker_are_added(front_factory):
    port, fake, _ = front_factory()
    status, body = request(port, "POST", CHAT, {"messages": HELLO})
    assert status == 200
    sent = body["echo"]
    assert (sent["top_p"], sent["top_k"], sent["repeat_penalty"], sent["max_tokens"], sent["temperature"]) == (0.8, 50, 1.1, 256, 1.0)
    assert sent["stop"] == ["<end>"] and sent["model"] == "tiny"
    assert fake.auth[-1] == "Bearer backend-secret"


def test_request_values_win(front_factory):
    port, _, _ = front_factory()
    status, body = request(port, "POST", CHAT, {"messages": HELLO, "model": "tiny", "top_p": 0.5, "top_k": 3,
                                                "repetition_penalty": 1.3, "max_completion_tokens": 7, "stop": "\n\n",
                                                "temperature": 0})
    sent = body["echo"]
    assert status == 200
    assert (sent["top_p"], sent["top_k"], sent["repeat_penalty"], sent["max_tokens"], sent["temperature"]) == (0.5, 3, 1.3, 7, 0)
    assert sent["stop"] == ["\n\n", "<end>"] and "max_completion_tokens" not in sent


def test_completions_get_the_stop_marker(front_factory):
    port, _, _ = front_factory()
    status, body = request(port, "POST", "/v1/completions", {"prompt": "Once upon", "max_tokens": 4})
    assert status == 200 and body["echo"]["stop"] == ["<end>"] and body["echo"]["max_tokens"] == 4


BAD = [
    (b"{not json", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    (json.dumps([1, 2]).encode(), 400, "invalid_type"),
    (json.dumps({}).encode(), 400, "missing_required_parameter"),
    (json.dumps({"messages": []}).encode(), 400, "invalid_value"),
    (json.dumps({"messages": "hello"}).encode(), 400, "invalid_type"),
    (json.dumps({"messages": ["hello"]}).encode(), 400, "invalid_type"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "invalid_value"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), 400, "missing_required_parameter"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}).encode(), 400, "invalid_type"),
    (json.dumps({"messages": HELLO, "max_tokens": "10"}).encode(), 400, "invalid_type"),
    (json.dumps({"messages": HELLO, "max_tokens": 10.5}).encode(), 400, "invalid_type"),
    (json.dumps({"messages": HELLO, "max_tokens": True}).encode(), 400, "invalid_type"),
    (json.dumps({"messages": HELLO, "max_tokens": 0}).encode(), 400, "invalid_value"),
    (json.dumps({"messages": HELLO, "max_tokens": 513}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"messages": HELLO, "temperature": "hot"}).encode(), 400, "invalid_type"),
    (json.dumps({"messages": HELLO, "top_p": 1.5}).encode(), 400, "invalid_value"),
    (json.dumps({"messages": HELLO, "stream": "yes"}).encode(), 400, "invalid_type"),
    (json.dumps({"messages": HELLO, "stop": [1]}).encode(), 400, "invalid_type"),
    (json.dumps({"messages": HELLO, "model": "gpt-4"}).encode(), 404, "model_not_found"),
    (json.dumps({"messages": HELLO, "model": 7}).encode(), 400, "invalid_type"),
]


@pytest.mark.parametrize("raw,status,code", BAD)
def test_bad_chat_requests_get_openai_errors_and_the_server_keeps_serving(front_factory, raw, status, code):
    port, fake, _ = front_factory()
    got, body = request(port, "POST", CHAT, raw=raw)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code
    assert body["error"]["message"].endswith(".")
    assert not fake.bodies  # nothing reached llama.cpp
    assert request(port, "POST", CHAT, {"messages": HELLO})[0] == 200


def test_bad_completion_requests(front_factory):
    port, _, _ = front_factory()
    for body in ({}, {"prompt": ""}, {"prompt": 5}, {"prompt": [""]}, {"prompt": ["a", 1]}, {"prompt": ["a"] * 17},
                 {"prompt": [1, -2]}):
        got, answer = request(port, "POST", "/v1/completions", body)
        assert got == 400 and answer["error"]["param"] == "prompt", body
    # one prompt as token ids (how `eval --endpoint` scores) may be longer than the 16 strings of a batch
    got, answer = request(port, "POST", "/v1/completions", {"prompt": list(range(300)), "max_tokens": 1})
    assert got == 200 and answer["echo"]["prompt"] == list(range(300))


def test_one_megabyte_prompt_is_refused_with_413(front_factory):
    port, fake, _ = front_factory()
    got, body = request(port, "POST", CHAT, {"messages": [{"role": "user", "content": "x" * 1_048_576}]})
    assert got == 413 and body["error"]["code"] == "request_too_large"
    assert request(port, "POST", CHAT, {"messages": HELLO})[0] == 200


def test_routes_and_methods(front_factory):
    port, _, _ = front_factory()
    assert request(port, "GET", CHAT)[0] == 405
    got, body = request(port, "GET", "/v1/nothing")
    assert got == 404 and body["error"]["code"] == "not_found"
    assert request(port, "POST", "/lora-adapters", {"x": 1})[0] == 404  # llama.cpp's state-changing routes stay private
    got, body = request(port, "GET", "/v1/models")
    assert got == 200 and [m["id"] for m in body["data"]] == ["tiny"]
    got, text = request(port, "GET", "/metrics")
    assert got == 200 and "llamacpp:requests_processing" in text and "cutegpt_requests_total" in text
    assert request(port, "GET", "/health") == (200, {"status": "ok"})
    assert request(port, "GET", "/")[1] == "<html>llama-ui</html>"


def test_api_key_is_enforced_on_every_api_route(front_factory):
    port, fake, _ = front_factory(api_key="s3cret")
    for method, path, body in (("POST", CHAT, {"messages": HELLO}), ("POST", "/v1/completions", {"prompt": "a"}),
                               ("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/props", None),
                               ("POST", "/apply-template", {"messages": HELLO})):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            got, answer = request(port, method, path, body, headers)
            assert got == 401 and answer["error"]["code"] == "invalid_api_key", (path, headers)
    assert not fake.bodies
    assert request(port, "POST", CHAT, {"messages": HELLO}, {"Authorization": "Bearer s3cret"})[0] == 200
    assert request(port, "GET", "/v1/models", None, {"x-api-key": "s3cret"})[0] == 200
    assert request(port, "GET", "/health")[0] == 200  # health checks and the static page stay open
    assert request(port, "GET", "/")[0] == 200


def _stream(port: int, body: dict, read_events: int | None = None) -> list[bytes]:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
    buf = b""
    while True:
        piece = s.recv(65536)
        if not piece:
            break
        buf += piece
        if read_events is not None and buf.count(b"data: ") >= read_events:
            break
    s.close()
    return buf.split(b"data: ")


def stream_in_background(port: int, front, max_tokens: int) -> tuple[threading.Thread, list]:
    """A streamed chat read by a thread (its parts land in the list), returned once the front relays it."""
    got: list = []
    reader = threading.Thread(target=lambda: got.append(_stream(port, {"messages": HELLO, "stream": True, "max_tokens": max_tokens})))
    reader.start()
    deadline = time.monotonic() + 10
    while not front.active_streams and time.monotonic() < deadline:
        time.sleep(0.01)
    return reader, got

def test_streams_are_relayed_event_by_event(front_factory):
    port, _, _ = front_factory()
    parts = _stream(port, {"messages": HELLO, "stream": True, "max_tokens": 6})
    assert parts[0].startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in parts[0].lower()  # names are case-insensitive
    assert len(parts) == 1 + 6 + 1 and parts[-1].startswith(b"[DONE]")


def test_client_disconnect_mid_stream_frees_the_backend_and_the_server_keeps_serving(front_factory):
    port, fake, front = front_factory()
    _stream(port, {"messages": HELLO, "stream": True, "max_tokens": 200}, read_events=3)
    deadline = time.monotonic() + 10
    while fake.closed_early == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.closed_early == 1  # the backend saw its connection go away: llama.cpp frees the slot
    assert front.counts["disconnects"] == 1
    assert request(port, "POST", CHAT, {"messages": HELLO})[0] == 200


def test_client_leaving_before_a_non_streamed_answer_frees_the_backend(front_factory):
    """llama.cpp answers a non-streamed request only when done: a client that leaves must not keep the slot."""
    port, fake, front = front_factory()
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"messages": [{"role": "user", "content": "SLOW"}]}).encode()
    sock.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 10
    while not fake.bodies and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.bodies  # llama.cpp is working on it
    sock.close()
    deadline = time.monotonic() + 20
    while fake.closed_early == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.closed_early == 1  # the backend connection was closed: llama.cpp cancels the task and frees the slot
    assert front.counts["disconnects"] == 1
    assert request(port, "POST", CHAT, {"messages": HELLO})[0] == 200


def test_keep_alive_connection_carries_several_requests(front_factory):
    import http.client

    port, _, _ = front_factory()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(3):
        conn.request("POST", CHAT, body=json.dumps({"messages": HELLO}), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["echo"]["messages"] == HELLO
    conn.close()


def test_malformed_http_is_refused(front_factory):
    port, _, _ = front_factory()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"garbage\r\n\r\n")
    assert s.recv(1000).startswith(b"HTTP/1.1 400")
    s.close()
    assert request(port, "GET", "/health")[0] == 200


def test_tools_are_dropped_for_a_format_without_tool_syntax(front_factory):
    port, _, _ = front_factory(tools=False)
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
    status, body = request(port, "POST", CHAT, {"messages": HELLO, "tools": tools, "tool_choice": "auto"})
    assert status == 200 and "tools" not in body["echo"] and "tool_choice" not in body["echo"]
    status, body = request(port, "POST", CHAT, {"messages": HELLO, "tools": tools, "tool_choice": "required"})
    assert status == 400 and body["error"]["param"] == "tool_choice"


def test_shutdown_does_not_wait_for_idle_keep_alive_connections(front_factory):
    import asyncio
    import http.client

    port, _, front = front_factory()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().read() == b'{"status":"ok"}'  # the connection now idles, kept alive
    loop = front.server.get_loop()
    # with a 600 s grace period, only cancelling the idle connection lets close() return within the minute
    asyncio.run_coroutine_threadsafe(front.close(grace=600), loop).result(timeout=60)
    assert not front.tasks
    conn.close()


def test_shutdown_lets_streams_in_progress_finish(front_factory):
    import asyncio

    port, fake, front = front_factory()
    reader, got = stream_in_background(port, front, 40)
    assert front.active_streams == 1
    asyncio.run_coroutine_threadsafe(front.close(grace=60), front.server.get_loop()).result(timeout=90)
    reader.join(30)
    parts = got[0]
    assert len(parts) == 1 + 40 + 1 and parts[-1].startswith(b"[DONE]")  # the answer ended completely
    with pytest.raises(OSError):  # and nothing new is accepted
        socket.create_connection(("127.0.0.1", port), timeout=5).recv(1)


def test_backend_dying_mid_answer_is_a_500_and_the_server_keeps_serving(front_factory):
    port, _, front = front_factory()
    got, body = request(port, "POST", CHAT, {"messages": [{"role": "user", "content": "CRASH"}]})
    assert got == 500 and body["error"]["type"] == "server_error"
    assert request(port, "POST", CHAT, {"messages": HELLO})[0] == 200


def test_forwarded_headers_are_sent_once_with_the_clients_value(front_factory):
    # the browser's Accept-Encoding must reach llama.cpp alone: a second default value made it refuse the page (415)
    port, fake, _ = front_factory()
    status, _ = request(port, "GET", "/", headers={"Accept-Encoding": "gzip, br"})
    assert status == 200
    sent = fake.headers[-1]
    assert [v for k, v in sent if k == "accept-encoding"] == ["gzip, br"]
    assert [v for k, v in sent if k == "authorization"] == ["Bearer backend-secret"]
    request(port, "POST", CHAT, {"messages": HELLO})
    assert [v for k, v in fake.headers[-1] if k == "accept-encoding"] == ["identity"]  # JSON answers come uncompressed


def _raw(port: int, data: bytes, wait: float = 30) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=wait)
    s.sendall(data)
    buf = b""
    try:
        while True:
            piece = s.recv(65536)
            if not piece:
                break
            buf += piece
    except (ConnectionResetError, TimeoutError):
        pass
    s.close()
    return buf


def test_chunked_body_over_the_limit_is_a_413(front_factory):
    port, fake, _ = front_factory(max_body_bytes=2048)
    chunk = b"x" * 1000
    data = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    answer = _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + data)
    assert answer.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in answer and not fake.bodies
    body = json.dumps({"messages": HELLO}).encode()
    small = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    answer = _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + small)
    assert answer.startswith(b"HTTP/1.1 200") and fake.bodies[-1]["messages"] == HELLO


def test_a_body_that_never_arrives_is_a_408(front_factory, monkeypatch):
    from cutegpt.serve import front as front_module

    monkeypatch.setattr(front_module, "READ_TIMEOUT", 0.5)
    port, fake, _ = front_factory()
    answer = _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"messages\"")
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer and not fake.bodies
    assert request(port, "POST", CHAT, {"messages": HELLO})[0] == 200


def test_huge_headers_are_refused_and_the_server_keeps_serving(front_factory):
    port, fake, _ = front_factory()
    answer = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 4") and not fake.bodies
    assert request(port, "GET", "/health")[0] == 200


def test_the_page_comes_to_clients_with_and_without_gzip(front_factory):
    import gzip
    import http.client

    port, _, _ = front_factory(api_key="s3cret")
    assert request(port, "GET", "/") == (200, "<html>llama-ui</html>")  # curl, http.client: no gzip, unpacked here
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/", headers={"Accept-Encoding": "gzip, deflate, br"})  # a browser: passed through packed
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Encoding") == "gzip"
    assert gzip.decompress(resp.read()) == b"<html>llama-ui</html>"
    conn.close()


def test_what_the_page_asks_for_at_start_is_answered(front_factory):
    port, fake, _ = front_factory(api_key="s3cret")
    assert request(port, "GET", "/tools") == (200, [])  # no server tools, as a list the page can read
    status, call = request(port, "POST", "/tools", {"tool": "glob", "params": {}})
    assert status == 200 and call["error"].endswith("no server-side tools.")  # a tool's failure, as the page reads it
    assert request(port, "POST", "/v1/streams/lookup", {"conversation_ids": ["a"]}) == (200, [])  # nothing to resume
    status, build = request(port, "GET", "/build.json")
    assert status == 200 and build["version"].startswith("cutegpt ")
    assert not fake.bodies


def _sse(port: int, body: dict, referer: str | None) -> list[dict]:
    data = json.dumps(body).encode()
    extra = b"Referer: %s\r\n" % referer.encode() if referer else b""
    raw = _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n%s"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (port, extra, len(data), data))
    return [json.loads(e.split(b"\n\n")[0]) for e in raw.split(b"data: ")[1:] if not e.startswith(b"[DONE]")]


def test_a_cut_off_answer_is_marked_for_the_web_page_only(front_factory):
    from cutegpt.serve.front import CUT_OFF_NOTE

    port, _, _ = front_factory()
    body = {"messages": HELLO, "stream": True, "max_tokens": 3, "ignore_eos": True}
    page = _sse(port, body, f"http://127.0.0.1:{port}/")
    text = "".join(e["choices"][0].get("delta", {}).get("content") or "" for e in page)
    assert text == "t0 t1 t2 " + CUT_OFF_NOTE and page[-1]["choices"][0]["finish_reason"] == "length"
    api = _sse(port, body, None)  # an API client gets llama.cpp's answer as it is
    assert "".join(e["choices"][0].get("delta", {}).get("content") or "" for e in api) == "t0 t1 t2 "
    assert _sse(port, body, "http://elsewhere.example/") == api
    finished = _sse(port, {**body, "ignore_eos": False}, f"http://127.0.0.1:{port}/")  # not cut off: nothing added
    assert CUT_OFF_NOTE not in json.dumps(finished, ensure_ascii=False)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}
BAD_TOOLS = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": 5}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [*HELLO, {"role": "tool", "tool_call_id": "c9", "content": "sunny"}]}, "messages[1].tool_call_id"),
    ({"messages": [*HELLO, {"role": "tool", "content": "sunny"}]}, "messages[1].tool_call_id"),
    ({"messages": [*HELLO, {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": {}}}]}]},
     "messages[1].tool_calls[0]"),
]


@pytest.mark.parametrize("extra,param", BAD_TOOLS, ids=[p for _, p in BAD_TOOLS])
def test_bad_tools_and_formats_are_400s_naming_the_field(front_factory, extra, param):
    port, fake, _ = front_factory()
    status, body = request(port, "POST", CHAT, {"messages": HELLO, **extra})
    assert status == 400 and body["error"]["param"] == param and body["error"]["message"].endswith("."), body
    assert body["error"]["message"].startswith(f"'{param}'") and not fake.bodies


def test_good_tools_and_formats_reach_llama_cpp_unchanged(front_factory):
    port, fake, _ = front_factory(tools=True, stop=[])
    schema = {"name": "person", "schema": {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}}
    sent = {"messages": [*HELLO, CALL, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "response_format": {"type": "json_schema", "json_schema": schema}}
    status, body = request(port, "POST", CHAT, sent)
    assert status == 200
    for key in ("messages", "tools", "tool_choice", "response_format"):
        assert body["echo"][key] == sent[key]
    assert request(port, "POST", CHAT, {"messages": HELLO, "tools": [WEATHER], "tool_choice": "required",
                                        "response_format": {"type": "json_object"}})[0] == 200
