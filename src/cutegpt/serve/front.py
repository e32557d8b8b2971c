"""The thin front in front of llama.cpp's server: checks, defaults and limits, then forwards (streaming).

llama.cpp's server does the real work (continuous batching, prompt cache,
OpenAI-shaped answers, the web page). It cannot do what this layer does:
refuse an unknown model name, empty or malformed `messages`, wrong types, an
oversized body or `max_tokens`; fill in CuteGPT's sampling defaults for fields
a request leaves out; add the stop marker `<end>` to every request of a
CuteGPT-format model (llama.cpp never returns a stop string, also when
streaming); keep the API key out of llama.cpp's own exemptions; render tool
requests with the training template and parse the calls (`serve/tools.py`).

HTTP is uvicorn's (parsing, keep-alive, chunking, graceful shutdown) and
Starlette's (requests, responses); forwarding is aiohttp's. Every request gets
its own backend connection (no keep-alive pool: an idle pooled connection would
hold one of llama.cpp's HTTP threads), so a client that goes away closes its
backend connection and llama.cpp frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

HEADER_LIMIT = 64 * 1024
MAX_DISCARD = 64 * 1024 * 1024  # a refused body up to this size is read and dropped, so the client reads the 413
READ_TIMEOUT = 60.0
ROLES = ("system", "developer", "user", "assistant", "tool")
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
COMPLETION_PATHS = ("/v1/completions", "/completions")
FORWARD_POST = ("/apply-template", "/tokenize", "/detokenize")  # harmless llama.cpp helpers, key-protected
FORWARD_GET_KEYED = ("/props", "/slots")
PUBLIC_GET = ("/health", "/v1/health")
STATIC_SUFFIXES = (".html", ".js", ".css", ".svg", ".png", ".ico", ".webp", ".woff", ".woff2", ".map", ".txt", ".webmanifest")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")  # all reach the dispatch, which answers 404/405
PASSTHROUGH = ("content-type", "content-encoding", "etag", "cache-control", "cross-origin-embedder-policy",
               "cross-origin-opener-policy")


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type, param, code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.close = False  # end the connection after this answer (the rest of the request cannot be read)

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                     "code": self.code}}, ensure_ascii=False).encode()


@dataclass
class Policy:
    """What the front enforces and fills in."""

    model_id: str
    stop: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_body_bytes: int = 1_048_576
    max_tokens_limit: int = 2048
    ctx: int = 2048
    defaults: dict[str, Any] = field(default_factory=dict)  # max_tokens, temperature, top_p, top_k, repeat_penalty
    ui: bool = True
    tools: bool = True  # False: a format with no tool syntax, so tool lists are dropped, not rendered
    # the served `cutegpt.templates.Template` (or a function making it on first use): tool requests are rendered
    # with it and parsed here (`serve/tools.py`); None forwards them to llama.cpp as they are
    template: Any = None
    vocab_size: int | None = None  # token ids must lie below it (llama.cpp answers 500 to /detokenize beyond)
    drop_first_space: bool = False  # a SentencePiece answer's first space (runtime.llamacpp.drops_first_space)


# ----------------------------------------------------------------------------- request checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_number(body: dict, name: str, low: float | None = None, high: float | None = None, *, integer: bool = False,
                  low_open: bool = False) -> None:
    if name not in body or body[name] is None:
        body.pop(name, None)
        return
    v = body[name]
    if not (_is_int(v) if integer else _is_number(v)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(v)[:40]}.", param=name,
                       code="invalid_type")
    if low is not None and (v <= low if low_open else v < low):
        raise ApiError(400, f"'{name}' must be {'greater than' if low_open else 'at least'} {low}, not {v}.", param=name,
                       code="invalid_value")
    if high is not None and v > high:
        raise ApiError(400, f"'{name}' must be at most {high}, not {v}.", param=name, code="invalid_value")


def _content_text(content: Any, i: int, role: str) -> None:
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return
    if content is None and role == "assistant":
        return
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"'{param}[{j}]' must be a text part {{\"type\": \"text\", \"text\": \"...\"}}; this model reads text only.",
                               param=param, code="invalid_type")
        return
    raise ApiError(400, f"'{param}' must be a string or a list of text parts.", param=param, code="invalid_type")


def _common(body: dict, policy: Policy) -> dict:
    """Checks and defaults shared by chat and text completions; returns the body to forward."""
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string.", param="model", code="invalid_type")
        if model and model != policy.model_id:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{policy.model_id}'.", param="model",
                           code="model_not_found")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream", code="invalid_type")
    if "stream_options" in body and body["stream_options"] is not None and not isinstance(body["stream_options"], dict):
        raise ApiError(400, "'stream_options' must be an object.", param="stream_options", code="invalid_type")
    names = [n for n in ("max_tokens", "max_completion_tokens", "n_predict") if body.get(n) is not None]
    for n in names:
        _check_number(body, n, 1, integer=True)
        if body[n] > policy.max_tokens_limit:
            raise ApiError(400, f"'{n}' is {body[n]}, beyond this server's limit of {policy.max_tokens_limit} tokens "
                                f"(the context of one request is {policy.ctx}).", param=n, code="context_length_exceeded")
    if names:
        body["max_tokens"] = min(body[n] for n in names)
        for n in names:
            if n != "max_tokens":
                body.pop(n)
    else:
        body["max_tokens"] = policy.defaults.get("max_tokens", 256)
    _check_number(body, "temperature", 0, 100)
    _check_number(body, "top_p", 0, 1)
    _check_number(body, "min_p", 0, 1)
    _check_number(body, "top_k", 0, integer=True)
    _check_number(body, "frequency_penalty", -2, 2)
    _check_number(body, "presence_penalty", -2, 2)
    _check_number(body, "seed", integer=True)
    _check_number(body, "n", 1, 16, integer=True)
    for name in ("repeat_penalty", "repetition_penalty"):
        _check_number(body, name, 0, 100, low_open=True)
    if "repetition_penalty" in body:  # vLLM / transformers spelling -> llama.cpp's
        body.setdefault("repeat_penalty", body.pop("repetition_penalty"))
    for key, value in policy.defaults.items():
        if key != "max_tokens" and value is not None:
            body.setdefault(key, value)
    _check_logit_bias(body, policy.vocab_size)
    user = body.get("user")
    if user is not None and not (isinstance(user, str) and len(user) <= 256):
        raise _bad("user", "must be a string of at most 256 characters (an id for the end user).", "invalid_type")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = list(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of at most 16 strings.", param="stop", code="invalid_type")
    stops += [s for s in policy.stop if s not in stops]
    if stops:
        body["stop"] = stops
    else:
        body.pop("stop", None)
    if not policy.tools:
        choice = body.pop("tool_choice", None)
        if choice not in (None, "auto", "none"):
            raise ApiError(400, "This model's chat format has no tool calls, so 'tool_choice' can only be 'auto' or 'none'.",
                           param="tool_choice", code="invalid_value")
        body.pop("tools", None)  # e.g. the web page's built-in tools: the training format has no place for them
        body.pop("parallel_tool_calls", None)
    body["model"] = policy.model_id
    return body


def _token_id_problem(v: Any, vocab_size: int | None) -> str | None:
    if not _is_int(v) or not 0 <= v < 2**31:
        return f"{json.dumps(v)[:40]} is not a token id (an integer from 0)"
    if vocab_size is not None and v >= vocab_size:
        return f"{v} is not a token id of this model (its vocabulary has {vocab_size} tokens)"
    return None


def _check_logit_bias(body: dict, vocab_size: int | None) -> None:
    """OpenAI's form: {"token id": bias in [-100, 100]} (llama.cpp silently ignores anything else)."""
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict) or len(bias) > 1024:
        raise _bad("logit_bias", "must be an object of at most 1024 {\"token id\": bias} entries.", "invalid_type")
    for key, value in bias.items():
        param = f"logit_bias.{key[:20]}"
        problem = _token_id_problem(int(key) if key.isascii() and key.isdigit() else key, vocab_size)
        if problem:
            raise _bad(param, f"is not a valid key: {problem}.")
        if not _is_number(value) or not -100 <= value <= 100:
            raise _bad(param, f"must be a number from -100 to 100, not {json.dumps(value)[:40]}.",
                       "invalid_value" if _is_number(value) else "invalid_type")


def check_detokenize(body: Any, policy: Policy) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_type")
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise _bad("tokens", "must be a list of token ids.", "invalid_type" if "tokens" in body else "missing_required_parameter")
    for i, t in enumerate(tokens):
        problem = _token_id_problem(t, policy.vocab_size)
        if problem:
            raise _bad(f"tokens[{i}]", f"is wrong: {problem}.")


def check_tokenize(body: Any, policy: Policy) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_type")
    if not isinstance(body.get("content"), str):
        raise _bad("content", "must be the text to tokenize (a string).",
                   "invalid_type" if "content" in body else "missing_required_parameter")
    for name in ("add_special", "parse_special", "with_pieces"):
        if name in body and not isinstance(body[name], bool):
            raise _bad(name, "must be true or false.", "invalid_type")


def check_chat(body: Any, policy: Policy) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_type")
    if "messages" not in body or body["messages"] is None:
        raise ApiError(400, "'messages' is required: a list of {\"role\", \"content\"} objects.", param="messages", code="missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise ApiError(400, "'messages' must be a list of {\"role\", \"content\"} objects.", param="messages", code="invalid_type")
    if not messages:
        raise ApiError(400, "'messages' must not be empty.", param="messages", code="invalid_value")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"'messages[{i}]' must be an object with 'role' and 'content'.", param=f"messages[{i}]", code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"'messages[{i}].role' must be one of {', '.join(ROLES)}, not {json.dumps(role)[:40]}.",
                           param=f"messages[{i}].role", code="invalid_value")
        if "content" not in m and role != "assistant":
            raise ApiError(400, f"'messages[{i}].content' is required.", param=f"messages[{i}].content", code="missing_required_parameter")
        _content_text(m.get("content"), i, role)
    _check_tool_turns(messages)
    _check_tools(body)
    _check_response_format(body)
    return _common(body, policy)


# ----------------------------------------------------------------------------- tools and structured output
# Tool requests are rendered by our template and parsed in serve/tools.py; llama.cpp builds the grammar of a
# response_format or a forced call from a JSON schema and answers a malformed one with a 500 or ignores it, so
# malformed ones are refused here by field.

TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"'{param}' {message}", param=param, code=code)


def _check_schema(schema: Any, param: str) -> None:
    """A JSON Schema, checked against its metaschema by the jsonschema package."""
    import jsonschema

    if not isinstance(schema, dict):
        raise _bad(param, "must be a JSON Schema object.", "invalid_type")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise _bad(param, f"is not a valid JSON Schema ({e.message[:120]}{' at ' + where if where else ''}).") from None


def _check_tools(body: dict) -> None:
    tools = body.get("tools")
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > 128:
            raise _bad("tools", "must be a list of at most 128 {\"type\": \"function\", \"function\": {...}} objects.", "invalid_type")
        for i, tool in enumerate(tools):
            param = f"tools[{i}]"
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
                raise _bad(param, "must be {\"type\": \"function\", \"function\": {\"name\", \"parameters\"}}.", "invalid_type")
            fn = tool["function"]
            if not isinstance(fn.get("name"), str) or not TOOL_NAME.match(fn["name"]):
                raise _bad(param + ".function.name", "must be 1-64 letters, digits, '_', '.' or '-'.")
            if fn["name"] in names:
                raise _bad(param + ".function.name", f"repeats the name '{fn['name']}'.")
            names.append(fn["name"])
            if fn.get("description") is not None and not isinstance(fn["description"], str):
                raise _bad(param + ".function.description", "must be a string.", "invalid_type")
            if fn.get("parameters") is not None:
                _check_schema(fn["parameters"], param + ".function.parameters")
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        raise _bad("parallel_tool_calls", "must be true or false.", "invalid_type")
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none"):
        return
    if choice == "required" or isinstance(choice, dict):
        if not names:
            raise _bad("tool_choice", "needs a non-empty 'tools' list to choose from.")
        if choice == "required":
            return
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise _bad("tool_choice", "must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}.")
        if name not in names:
            raise _bad("tool_choice", f"names the function '{name[:64]}', which is not in 'tools' ({', '.join(names)}).")
        return
    raise _bad("tool_choice", "must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}.")


def _check_tool_turns(messages: list) -> None:
    """Assistant tool calls are well formed, and every tool message answers a call made before it."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if m["role"] == "assistant" and calls is not None:
            if not isinstance(calls, list):
                raise _bad(f"messages[{i}].tool_calls", "must be a list of tool calls.", "invalid_type")
            for j, call in enumerate(calls):
                param = f"messages[{i}].tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if not (isinstance(call, dict) and isinstance(call.get("id"), str) and isinstance(fn, dict)
                        and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)):
                    raise _bad(param, "must be {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\": \"<JSON text>\"}}.",
                               "invalid_type")
                called.add(call["id"])
        if m["role"] == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _bad(f"messages[{i}].tool_call_id", "is required in a tool message: the id of the call it answers.",
                           "missing_required_parameter")
            if call_id not in called:
                raise _bad(f"messages[{i}].tool_call_id", f"is '{call_id[:64]}', but no earlier assistant message made a call with that id.")


def _check_response_format(body: dict) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    kinds = ("text", "json_object", "json_schema")
    if not isinstance(fmt, dict) or fmt.get("type") not in kinds:
        raise _bad("response_format", "must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                      "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}.")
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise _bad("response_format.json_schema", "must be an object with a 'schema'.", "missing_required_parameter")
        _check_schema(spec["schema"], "response_format.json_schema.schema")


def check_completion(body: Any, policy: Policy) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_type")
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required: a string or a list of strings.", param="prompt", code="missing_required_parameter")
    # the 16 bounds a batch of strings; one prompt given as token ids (how evaluation scores) is as long as it is
    ok = (isinstance(prompt, str) and prompt != "") or (
        isinstance(prompt, list) and 0 < len(prompt) and (
            (len(prompt) <= 16 and all(isinstance(p, str) and p for p in prompt))
            or all(_token_id_problem(t, policy.vocab_size) is None for t in prompt)))
    if not ok:
        raise ApiError(400, "'prompt' must be a non-empty string, a list of up to 16 non-empty strings, or a list of token ids.",
                       param="prompt", code="invalid_value")
    return _common(body, policy)



# ----------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    method: str  # the method the route takes
    handler: str  # name of the Front method that answers it
    keyed: bool = True  # needs the API key


ROUTES: dict[str, Route] = {
    **{p: Route("GET", "pass", keyed=False) for p in PUBLIC_GET},
    # asked for by llama.cpp's web page at start: answered here so its log has no failed request
    "/tools": Route("GET POST", "tools", keyed=False),  # no server-side tools (llama.cpp answers 403 unless enabled)
    "/build.json": Route("GET", "build", keyed=False),
    "/v1/streams/lookup": Route("POST", "streams", keyed=False),  # no resumable streams
    "/v1/models": Route("GET", "models"), "/models": Route("GET", "models"),
    "/metrics": Route("GET", "metrics"),
    **{p: Route("POST", "chat") for p in CHAT_PATHS},
    **{p: Route("POST", "completion") for p in COMPLETION_PATHS},
    **{p: Route("POST", "forward_json") for p in FORWARD_POST},
    **{p: Route("GET", "pass") for p in FORWARD_GET_KEYED},
}


BODY_CHECKS = {"/detokenize": check_detokenize, "/tokenize": check_tokenize}  # of the forwarded llama.cpp helpers


def _error(e: ApiError) -> Any:
    from starlette.responses import Response

    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if e.close:
        headers["Connection"] = "close"
    return Response(e.body(), status_code=e.status, media_type="application/json", headers=headers)


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, at most `limit` bytes (413 beyond), read within READ_TIMEOUT (408 after)."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limit:  # uvicorn has already refused a malformed Content-Length
        e = ApiError(413, f"The request body is {declared} bytes; this server accepts at most {limit} (--max-body-bytes).",
                     code="request_too_large")
        e.close = int(declared) > MAX_DISCARD  # up to that size uvicorn reads and drops the rest itself
        raise e
    async def collect() -> bytes:
        out = bytearray()
        async for piece in request.stream():
            out += piece
            if len(out) > limit:
                e = ApiError(413, f"The request body exceeds this server's limit of {limit} bytes (--max-body-bytes).",
                             code="request_too_large")
                e.close = True
                raise e
        return bytes(out)

    try:
        return await asyncio.wait_for(collect(), READ_TIMEOUT)
    except asyncio.TimeoutError:
        e = ApiError(408, f"The request body did not arrive within {READ_TIMEOUT:.0f} seconds.", code="request_timeout")
        e.close = True
        raise e from None
    except ClientDisconnect:  # nobody is left to read the answer
        e = ApiError(400, "The client went away before its request body was complete.", code="client_disconnected")
        e.close = True
        raise e from None


def _field(path: str) -> str:
    return "'" + (path if len(path) <= 60 else path[:60] + "...") + "'" if path else "The request body"


def _json(raw: bytes) -> Any:
    """The parsed body; what Python or llama.cpp could not take (deep nesting, huge numbers, lone surrogates) is a 400
    naming the field."""
    from cutegpt.io import JSON_HOOKS, MAX_JSON_DEPTH, MAX_JSON_DIGITS, too_deep_at, json_problem

    if not raw:
        raise ApiError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text, **JSON_HOOKS)
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not UTF-8 text.", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"The request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).",
                       code="invalid_json") from None
    except RecursionError:
        data, problem = None, (too_deep_at(text, MAX_JSON_DEPTH), f"nesting more than {MAX_JSON_DEPTH} levels deep")
    else:
        problem = json_problem(data)
    if problem is not None:
        path, what = problem
        if what.startswith("nesting"):
            message = f"{_field(path)} nests more than {MAX_JSON_DEPTH} levels deep."
        elif what.endswith("-digit number"):
            message = f"{_field(path)} holds {what}; numbers must be at most {MAX_JSON_DIGITS} digits."
        else:
            message = f"{_field(path)} holds {what}."
        raise ApiError(400, message, param=path or None, code="invalid_value")
    return data


CUT_OFF = b'"finish_reason":"length"'
CUT_OFF_NOTE = "\n\n*[cut off: the answer reached its token limit (max_tokens)]*"


def _mark_cut_off(piece: bytes) -> list[bytes]:
    """The piece with one more SSE event, the cut-off note, before the event that ends the answer at its limit.

    For llama.cpp's web page, which shows a cut-off answer as if it were complete (it never reads finish_reason).
    """
    at = piece.find(CUT_OFF)
    start = piece.rfind(b"data: ", 0, at)
    kind = b"text_completion" if b'"text_completion"' in piece else b"chat.completion.chunk"
    choice = {"index": 0, "finish_reason": None}
    choice.update({"text": CUT_OFF_NOTE} if kind == b"text_completion" else {"delta": {"content": CUT_OFF_NOTE}})
    note = b"data: " + json.dumps({"choices": [choice], "object": kind.decode()}).encode() + b"\n\n"
    if start < 0:  # the event began in an earlier piece: the note follows it
        return [piece, note]
    return [p for p in (piece[:start], note, piece[start:]) if p]


DONE = b"data: [DONE]"
SHUTDOWN_EVENT = (b'data: {"error": {"message": "The server is shutting down; this answer was cut short.", '
                  b'"type": "server_error", "param": null, "code": "server_shutdown"}}\n\n' + DONE + b"\n\n")
def _strip_choice(choice: Any) -> bool:
    """Drop the first space of a choice's text (chat: message or delta content; completion: text); True once it had text."""
    if not isinstance(choice, dict):
        return False
    holder = choice.get("message") or choice.get("delta")
    key = "content" if isinstance(holder, dict) else "text"
    holder = holder if isinstance(holder, dict) else choice
    text = holder.get(key)
    if not isinstance(text, str) or not text:
        return False
    holder[key] = text.removeprefix(" ")
    return True


def drop_first_space(data: bytes) -> bytes:
    """A whole (not streamed) answer with each choice's first space dropped, as transformers decodes it."""
    try:
        body = json.loads(data)
    except ValueError:
        return data
    for choice in (body.get("choices") or []) if isinstance(body, dict) else []:
        _strip_choice(choice)
    return json.dumps(body, ensure_ascii=False).encode()


class FirstSpace:
    """Drops the first space of each choice's streamed text: reads whole SSE events until every choice has begun
    its text, rewriting the event that begins it, then passes the stream through untouched."""

    def __init__(self, n_choices: int):
        self.waiting = set(range(max(1, n_choices)))
        self.buffer = b""

    def feed(self, piece: bytes) -> bytes:
        if not self.waiting:
            return piece
        self.buffer += piece
        out: list[bytes] = []
        while self.waiting and b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            out.append(self._event(event) + b"\n\n")
        if not self.waiting:
            out.append(self.buffer)
            self.buffer = b""
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self.buffer, self.waiting = self.buffer, b"", set()
        return rest

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
            return event
        try:
            body = json.loads(event[6:])
        except ValueError:
            return event
        changed = False
        for choice in (body.get("choices") or []) if isinstance(body, dict) else []:
            index = choice.get("index", 0) if isinstance(choice, dict) else None
            if index in self.waiting and _strip_choice(choice):
                self.waiting.discard(index)
                changed = True
        return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() if changed else event


def _relay_class():
    from starlette.requests import ClientDisconnect
    from starlette.responses import StreamingResponse

    class Relay(StreamingResponse):
        """Relays a streamed llama.cpp answer; closes the backend connection however the stream ends."""

        def __init__(self, front: Front, upstream: Any, headers: dict[str, str], mark_cut_off: bool = False,
                     first_space: FirstSpace | None = None):
            self.front, self.upstream, self.complete = front, upstream, False
            self.mark_cut_off, self.first_space = mark_cut_off, first_space
            super().__init__(self._pieces(), status_code=upstream.status, headers=headers)

        async def _upstream(self):
            """llama.cpp's bytes as they come, each answer's first space dropped when asked (FirstSpace)."""
            async for piece in self.upstream.content.iter_any():
                yield self.first_space.feed(piece) if self.first_space is not None else piece
            if self.first_space is not None and (rest := self.first_space.flush()):
                yield rest

        async def _pieces(self):
            ended = False  # the [DONE] event has passed
            try:
                async for piece in self._upstream():
                    if self.mark_cut_off and CUT_OFF in piece:
                        for part in _mark_cut_off(piece):
                            yield part
                    elif piece:
                        yield piece
                    ended = ended or DONE in piece
            except Exception:
                if not self.front.cutting:
                    raise
            if self.front.cutting and not ended:
                # shutdown's grace is over: end the stream as a stream ends, so clients see why it stopped
                if self.upstream.headers.get("content-type", "").startswith("text/event-stream"):
                    yield SHUTDOWN_EVENT
                return
            self.complete = True

        async def __call__(self, scope, receive, send) -> None:
            self.front.active_streams += 1
            self.front.relays.add(self)
            try:
                # Starlette stops the stream when the client's disconnect arrives
                await super().__call__(scope, receive, send)
            except ClientDisconnect:
                pass
            except Exception:
                self.front.counts["backend_errors"] += 1
                raise  # headers are out: uvicorn cuts the connection, so the client sees an incomplete answer
            finally:
                self.front.active_streams -= 1
                self.front.relays.discard(self)
                self.upstream.close()  # a client that went away: llama.cpp sees the close and frees the slot
            if not self.complete:
                self.front.counts["disconnects"] += 1

    return Relay


def _tool_relay_class(relay: Any) -> Any:
    class ToolRelay(relay):
        """Streams a tool request's answer: llama.cpp's text events read line by line and turned into chat chunks."""

        def __init__(self, front: Front, upstream: Any, headers: dict[str, str], reader: Any,
                     first_space: FirstSpace | None = None):
            self.reader = reader
            super().__init__(front, upstream, headers, first_space=first_space)

        async def _pieces(self):
            rest = b""
            async for piece in self._upstream():
                *lines, rest = (rest + piece).split(b"\n")
                for line in lines:
                    line = line.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    try:
                        event = json.loads(line[6:])
                    except ValueError:
                        continue
                    for out in self.reader.feed(event):
                        yield out
            for piece in self.reader.close():
                yield piece
            self.complete = True

    return ToolRelay


class Front:
    """The public listener; forwards checked requests to llama.cpp at `backend` (http://127.0.0.1:PORT)."""

    def __init__(self, policy: Policy, backend: str, backend_key: str):
        self.policy = policy
        self.backend = backend.rstrip("/")
        self.backend_key = backend_key
        self.server: asyncio.AbstractServer | None = None  # the listening socket's server
        self.uvicorn: Any = None
        self.client: Any = None  # aiohttp.ClientSession
        self.active_streams = 0
        self.relays: set = set()  # streams being relayed now
        self.cutting = False  # shutdown's grace is over: streams end now, with an error event and [DONE]
        self.counts: dict[str, int] = {"requests": 0, "rejected": 0, "disconnects": 0, "backend_errors": 0}
        self.started = time.time()
        self._relay = _relay_class()
        self._tool_relay = _tool_relay_class(self._relay)

    @property
    def tasks(self) -> set:
        """Requests being answered now."""
        return self.uvicorn.server_state.tasks if self.uvicorn is not None else set()

    # -- lifecycle

    async def start(self, sock) -> None:
        import aiohttp
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route as StarletteRoute

        app = Starlette(routes=[StarletteRoute("/{path:path}", self._dispatch, methods=METHODS, include_in_schema=False)])
        config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="error", access_log=False,
                                http="h11", h11_max_incomplete_event_size=HEADER_LIMIT, server_header=False)
        config.load()
        self.client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=10), auto_decompress=False,  # the page's gzip passes through
            connector=aiohttp.TCPConnector(limit=0, force_close=True), skip_auto_headers=("Accept-Encoding", "User-Agent"))
        self.uvicorn = uvicorn.Server(config)
        # uvicorn's serve() would also take over SIGINT/SIGTERM; `cutegpt serve` handles them (run.py), so start
        # and stop the server's parts directly
        self.uvicorn.lifespan = config.lifespan_class(config)
        await self.uvicorn.startup(sockets=[sock])
        self.server = self.uvicorn.servers[0]

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting; let in-flight requests finish for up to `grace` seconds, then end them.

        Streams still running then get a closing error event and `data: [DONE]` (uvicorn's own cut would end
        them mid-answer); other requests get a few more seconds before uvicorn cancels them.
        """
        if self.uvicorn is None:
            return
        loop = asyncio.get_running_loop()
        self.uvicorn.config.timeout_graceful_shutdown = grace + 5
        shutdown = asyncio.ensure_future(self.uvicorn.shutdown())  # idle keep-alive connections close at once
        deadline = loop.time() + grace
        while self.relays and not shutdown.done() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.relays:
            self.cutting = True
            for relay in list(self.relays):
                relay.upstream.close()  # wakes the relay, which ends its stream
        await shutdown
        cut = [t for t in self.uvicorn.server_state.tasks if not t.done()]
        if cut:
            await asyncio.wait(cut, timeout=2)
        await self.client.close()

    # -- dispatch

    async def _dispatch(self, request: Any) -> Any:
        from starlette.responses import Response

        self.counts["requests"] += 1
        path, method = request.url.path.rstrip("/") or "/", request.method
        try:
            if method == "OPTIONS":
                return Response(status_code=204, headers={"Allow": "GET, POST, OPTIONS"})
            route = ROUTES.get(path)
            if route is not None and not route.keyed and method in route.method.split():
                return await getattr(self, "_" + route.handler)(request, path)
            if self._is_static(request):
                return await self._forward(request, b"")
            if not self._authorized(request):
                raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key")
            if route is None:
                raise ApiError(404, f"No route {method} {request.url.path} on this server; see /v1/chat/completions, "
                                    "/v1/completions, /v1/models.", code="not_found")
            if method not in route.method.split():
                raise ApiError(405, f"Use {' or '.join(route.method.split())} for this route, not {method}.",
                               code="method_not_allowed")
            return await getattr(self, "_" + route.handler)(request, path)
        except ApiError as e:
            self.counts["rejected"] += 1
            return _error(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # e.g. llama.cpp dropped the connection mid-answer: answer 500, keep serving
            self.counts["backend_errors"] += 1
            return _error(ApiError(500, f"The model server failed while answering ({type(e).__name__})."))

    def _authorized(self, request: Any) -> bool:
        key = self.policy.api_key
        if key is None:
            return True
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), key.encode())

    @staticmethod
    def _from_page(request: Any) -> bool:
        """A request made by the web page this server serves (same host, page at / or /index.html)."""
        from urllib.parse import urlsplit

        referer = urlsplit(request.headers.get("referer", ""))
        return referer.netloc == request.headers.get("host") and referer.path in ("", "/", "/index.html")

    def _is_static(self, request: Any) -> bool:
        p = request.url.path
        return self.policy.ui and request.method == "GET" and not p.startswith("/v1/") and (
            p in ("/", "/index.html") or p.startswith("/_app/") or p.lower().endswith(STATIC_SUFFIXES))

    # -- handlers (one per route kind)

    async def _chat(self, request: Any, path: str) -> Any:
        body = check_chat(_json(await _read_body(request, self.policy.max_body_bytes)), self.policy)
        if self.policy.template is not None:
            from cutegpt.serve.tools import is_tool_request

            if self._from_page(request):  # the page's own built-in tools, offered with every message: not the user's
                for key in ("tools", "tool_choice", "parallel_tool_calls"):
                    body.pop(key, None)
            if is_tool_request(body):
                return await self._tool_chat(request, body)
            for key in ("tools", "tool_choice", "parallel_tool_calls"):  # tool_choice "none": the model sees no tools
                body.pop(key, None)
        return await self._forward(request, json.dumps(body, ensure_ascii=False).encode(), path="/v1" + path.removeprefix("/v1"),
                                   mark_cut_off=bool(body.get("stream")) and self._from_page(request),
                                   choices=self._first_space_choices(body))

    async def _served_template(self) -> Any:
        from cutegpt.templates import Template

        t = self.policy.template
        if not isinstance(t, Template):  # made once, off the event loop (reading a GGUF's tokenizer takes seconds)
            t = self.policy.template = await asyncio.to_thread(t)
        return t

    async def _tool_chat(self, request: Any, body: dict) -> Any:
        """A request with tools or tool turns: rendered by our template, completed by llama.cpp, parsed here."""
        from starlette.responses import Response

        from cutegpt.errors import CuteGPTError
        from cutegpt.serve.tools import StreamReader, ToolRequestError, chat_response, plan

        if body.get("n", 1) != 1:
            raise _bad("n", "must be 1 when tools are used.")
        try:
            p = plan(body, await self._served_template(), self.policy.stop)
        except ToolRequestError as e:
            raise ApiError(400, str(e), param=e.param, code="invalid_value") from None
        except CuteGPTError as e:
            raise ApiError(400, f"This model cannot take tools: {e}", param="tools", code="invalid_value") from None
        upstream = await self._open(request, json.dumps(p.upstream, ensure_ascii=False).encode(), "/v1/completions")
        if upstream is None:  # the client left while llama.cpp was working
            return Response(b"", status_code=499)
        first_space = self._first_space_choices(body, continued=bool(p.prefill))
        if upstream.status < 400 and upstream.content_length is None and p.upstream["stream"]:
            return self._tool_relay(self, upstream, {"content-type": "text/event-stream", "Cache-Control": "no-cache"},
                                    reader=StreamReader(p), first_space=FirstSpace(first_space) if first_space else None)
        try:
            data = await upstream.read()
        finally:
            upstream.close()
        if upstream.status >= 400:
            if not data.lstrip().startswith(b"{"):
                raise ApiError(upstream.status, data.decode("utf-8", "replace").strip()[:300] or str(upstream.reason))
            return Response(data, status_code=upstream.status, media_type="application/json")
        if first_space:
            data = drop_first_space(data)
        return Response(json.dumps(chat_response(p, json.loads(data)), ensure_ascii=False), media_type="application/json")

    async def _completion(self, request: Any, path: str) -> Any:
        body = check_completion(_json(await _read_body(request, self.policy.max_body_bytes)), self.policy)
        return await self._forward(request, json.dumps(body, ensure_ascii=False).encode(), path="/v1" + path.removeprefix("/v1"),
                                   choices=self._first_space_choices(body))

    def _first_space_choices(self, body: dict, continued: bool = False) -> int:
        """How many answers get their first space dropped (0: none; a continued text keeps its spaces: `echo`, or the
        call opening a forced tool call prefilled). Every answer path asks here (plain, completion, tools)."""
        if not self.policy.drop_first_space or body.get("echo") or continued:
            return 0
        n = body.get("n")
        return n if _is_int(n) and n > 0 else 1

    async def _pass(self, request: Any, path: str) -> Any:
        return await self._forward(request, b"")

    async def _tools(self, request: Any, path: str) -> Any:
        from starlette.responses import Response

        if request.method == "GET":  # the list: empty
            return Response(b"[]", media_type="application/json")
        # a call: the page reads a tool's failure from the result, as llama.cpp's tools report it
        return Response(json.dumps({"error": "This server runs no server-side tools."}), media_type="application/json")

    async def _streams(self, request: Any, path: str) -> Any:
        from starlette.responses import Response

        await _read_body(request, self.policy.max_body_bytes)
        return Response(b"[]", media_type="application/json")

    async def _build(self, request: Any, path: str) -> Any:
        from starlette.responses import Response

        from cutegpt import __version__

        return Response(json.dumps({"version": f"cutegpt {__version__}"}), media_type="application/json")

    async def _forward_json(self, request: Any, path: str) -> Any:
        raw = await _read_body(request, self.policy.max_body_bytes)
        body = _json(raw)
        check = BODY_CHECKS.get(path)
        if check is not None:
            check(body, self.policy)
        return await self._forward(request, raw)

    async def _models(self, request: Any, path: str) -> Any:
        from starlette.responses import Response

        data = {"object": "list", "data": [{"id": self.policy.model_id, "object": "model", "created": int(self.started),
                                            "owned_by": "cutegpt", "context_length": self.policy.ctx}]}
        return Response(json.dumps(data), media_type="application/json")

    async def _metrics(self, request: Any, path: str) -> Any:
        from starlette.responses import Response

        try:
            async with self.client.get(self.backend + "/metrics", headers=self._backend_headers(request, forward=())) as upstream:
                text = (await upstream.text()) if upstream.status == 200 else ""
        except Exception:
            text = ""
        ours = [
            "# HELP cutegpt_requests_total HTTP requests received by the cutegpt front",
            "# TYPE cutegpt_requests_total counter",
            f"cutegpt_requests_total {self.counts['requests']}",
            "# HELP cutegpt_rejected_total requests refused by the front (bad input, key, limits)",
            "# TYPE cutegpt_rejected_total counter",
            f"cutegpt_rejected_total {self.counts['rejected']}",
            "# HELP cutegpt_client_disconnects_total clients that went away before their answer was complete",
            "# TYPE cutegpt_client_disconnects_total counter",
            f"cutegpt_client_disconnects_total {self.counts['disconnects']}",
            "# HELP cutegpt_active_streams answers being streamed now",
            "# TYPE cutegpt_active_streams gauge",
            f"cutegpt_active_streams {self.active_streams}",
        ]
        return Response(text + "\n".join(ours) + "\n", media_type="text/plain; version=0.0.4")

    # -- backend

    def _backend_headers(self, request: Any, forward=("accept", "accept-encoding", "if-none-match")) -> dict[str, str]:
        headers = {"authorization": f"Bearer {self.backend_key}", "accept-encoding": "identity"}
        headers.update({h: request.headers[h] for h in forward if h in request.headers})
        return headers

    @staticmethod
    async def _unless_client_leaves(request: Any, call: Any) -> Any:
        """`call`'s result, or None (the call cancelled, closing its connection to llama.cpp) if the client disconnects first.

        A non-streamed answer (and a stream's headers) arrives only when llama.cpp is done: without this, a
        client that gave up would keep its slot busy until the whole answer was computed for nobody."""
        async def gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass  # the rest of a body nobody read (GET, pass-through): only the disconnect matters

        work, watch = asyncio.ensure_future(call), asyncio.ensure_future(gone())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the front shutting down: nothing is left waiting on llama.cpp
            work.cancel()
            raise
        finally:
            watch.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        return None

    async def _open(self, request: Any, body: bytes, path: str | None = None, headers: dict[str, str] | None = None) -> Any:
        """The backend's answer (headers read, body not yet) to the client's request with `body` at `path`.

        None if the client left first: the backend request is then cancelled, and its closed connection frees the slot."""
        import aiohttp
        from yarl import URL

        headers = self._backend_headers(request) if headers is None else headers
        if body or request.method == "POST":
            headers["content-type"] = "application/json"
        query = request.url.query
        url = URL(self.backend + (path or request.url.path) + ("?" + query if query else ""), encoded=True)
        try:
            upstream = await self._unless_client_leaves(request, self.client.request(request.method, url, data=body or None,
                                                                                      headers=headers))
        except aiohttp.ClientConnectorError:
            self.counts["backend_errors"] += 1
            raise ApiError(503, "The model server is not available.", code="backend_unavailable") from None
        except aiohttp.ClientError:
            self.counts["backend_errors"] += 1
            raise ApiError(502, "The model server closed the connection without an answer.", code="backend_error") from None
        if upstream is None:
            self.counts["disconnects"] += 1
        return upstream

    async def _forward(self, request: Any, body: bytes, path: str | None = None, mark_cut_off: bool = False,
                       choices: int = 0) -> Any:
        """Send the request to llama.cpp and relay the answer; streams are relayed piece by piece.

        `choices`: answers whose first space is dropped (Policy.drop_first_space)."""
        from starlette.responses import Response

        headers = self._backend_headers(request)
        # llama.cpp has the page only gzip-compressed and refuses a client that does not take gzip (415, e.g.
        # curl): ask for gzip and unpack it here for such a client
        unpack = self._is_static(request) and "gzip" not in headers.get("accept-encoding", "")
        if unpack:
            headers["accept-encoding"] = "gzip"
        upstream = await self._open(request, body, path, headers)
        if upstream is None:  # the client left while llama.cpp was working
            return Response(b"", status_code=499)
        passthrough = {k: upstream.headers[k] for k in PASSTHROUGH if k in upstream.headers}
        if upstream.content_length is None:  # streamed (chunked) or read-to-EOF answer
            return self._relay(self, upstream, {**passthrough, "Cache-Control": "no-cache"}, mark_cut_off,
                               FirstSpace(choices) if choices and upstream.status == 200 else None)
        try:
            data = await upstream.read()
        finally:
            upstream.close()
        if unpack and passthrough.get("content-encoding") == "gzip":
            import gzip

            data = gzip.decompress(data)
            passthrough = {k: v for k, v in passthrough.items() if k.lower() != "content-encoding"}
        if upstream.status >= 400 and not data.lstrip().startswith(b"{"):
            raise ApiError(upstream.status, data.decode("utf-8", "replace").strip()[:300] or str(upstream.reason))
        if choices and upstream.status == 200:
            data = drop_first_space(data)
        return Response(data, status_code=upstream.status, headers=passthrough)
