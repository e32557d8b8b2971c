"""The thin front in front of llama.cpp's server: checks, defaults and limits, then forwards (streaming).

llama.cpp's server does the real work (continuous batching, prompt cache,
OpenAI-shaped answers, the web page). It cannot do what this layer does:
refuse an unknown model name, empty or malformed `messages`, wrong types, an
oversized body or `max_tokens`; fill in CuteGPT's sampling defaults for fields
a request leaves out; add the stop marker `<end>` to every request of a
CuteGPT-format model (llama.cpp never returns a stop string, also when
streaming); keep the API key out of llama.cpp's own exemptions. It is plain
asyncio (no web framework), one backend connection per request, so a client
that goes away closes its backend connection and llama.cpp frees the slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

HEADER_LIMIT = 64 * 1024
MAX_DISCARD = 64 * 1024 * 1024  # a refused body larger than this is cut off, not read
READ_TIMEOUT = 60.0
ROLES = ("system", "developer", "user", "assistant", "tool")
STATUS_TEXT = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
               405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large",
               415: "Unsupported Media Type", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
               502: "Bad Gateway", 503: "Service Unavailable"}
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
COMPLETION_PATHS = ("/v1/completions", "/completions")
FORWARD_POST = ("/apply-template", "/tokenize", "/detokenize")  # harmless llama.cpp helpers, key-protected
FORWARD_GET_KEYED = ("/props", "/slots")
PUBLIC_GET = ("/health", "/v1/health")
STATIC_SUFFIXES = (".html", ".js", ".css", ".svg", ".png", ".ico", ".webp", ".woff", ".woff2", ".map", ".txt", ".webmanifest")


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
        self.discard = 0  # request body bytes still to be read and dropped

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
    tools: bool = True  # False for the cutegpt format: it has no tool syntax, so tool lists are dropped, not rendered


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
    return _common(body, policy)


def check_completion(body: Any, policy: Policy) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_type")
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required: a string or a list of strings.", param="prompt", code="missing_required_parameter")
    ok = (isinstance(prompt, str) and prompt != "") or (
        isinstance(prompt, list) and 0 < len(prompt) <= 16 and (
            all(isinstance(p, str) and p for p in prompt) or all(_is_int(t) and t >= 0 for t in prompt)))
    if not ok:
        raise ApiError(400, "'prompt' must be a non-empty string, a list of up to 16 non-empty strings, or a list of token ids.",
                       param="prompt", code="invalid_value")
    return _common(body, policy)


# ----------------------------------------------------------------------------- HTTP plumbing


@dataclass
class Request:
    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        return "close" not in conn if self.version == "HTTP/1.1" else "keep-alive" in conn


class ClientGone(Exception):
    pass


async def _read_request_start(reader: asyncio.StreamReader, policy: Policy) -> Request | None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise ApiError(400, "Incomplete HTTP request.") from None
        return None
    except asyncio.LimitOverrunError:
        raise ApiError(431, f"Request headers exceed {HEADER_LIMIT} bytes.") from None
    except asyncio.TimeoutError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ApiError(400, "Malformed HTTP request line.")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ApiError(400, "Malformed HTTP header.")
        headers[name.strip().lower()] = value.strip()
    url = urlsplit(target)
    return Request(method.upper(), url.path or "/", url.query, version, headers)


async def _read_request_body(reader: asyncio.StreamReader, req: Request, policy: Policy) -> Request:
    headers = req.headers
    if "chunked" in headers.get("transfer-encoding", "").lower():
        req.body = await _read_chunked(reader, policy.max_body_bytes)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
            if length < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, "Invalid Content-Length header.") from None
        if length > policy.max_body_bytes:
            e = ApiError(413, f"The request body is {length} bytes; this server accepts at most {policy.max_body_bytes} "
                              "(--max-body-bytes).", code="request_too_large")
            e.discard = length  # read and drop it after answering, so the client gets to read the answer
            raise e
        try:
            req.body = await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            raise ClientGone() from None
    return req


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    out = bytearray()
    while True:
        size_line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise ApiError(400, "Malformed chunked request body.") from None
        if size == 0:
            while (await asyncio.wait_for(reader.readline(), READ_TIMEOUT)).strip():
                pass
            return bytes(out)
        if len(out) + size > limit:
            raise ApiError(413, f"The request body exceeds this server's limit of {limit} bytes (--max-body-bytes).",
                           code="request_too_large")
        out += await asyncio.wait_for(reader.readexactly(size), READ_TIMEOUT)
        await reader.readexactly(2)


async def _discard(reader: asyncio.StreamReader, n: int) -> None:
    try:
        while n > 0:
            piece = await asyncio.wait_for(reader.read(min(n, 1 << 16)), 10)
            if not piece:
                return
            n -= len(piece)
    except (asyncio.TimeoutError, ConnectionError):
        pass


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Status')}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Front:
    """The public listener; forwards checked requests to llama.cpp at `backend` (http://127.0.0.1:PORT)."""

    def __init__(self, policy: Policy, backend: str, backend_key: str):
        self.policy = policy
        u = urlsplit(backend)
        self.backend_host = u.hostname or "127.0.0.1"
        self.backend_port = u.port or 80
        self.backend_key = backend_key
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()
        self.idle: set[asyncio.Task] = set()
        self.active_streams = 0
        self.counts: dict[str, int] = {"requests": 0, "rejected": 0, "disconnects": 0, "backend_errors": 0}
        self.started = time.time()
        self.closing = False

    # -- lifecycle

    async def start(self, sock) -> None:
        self.server = await asyncio.start_server(self._connection, sock=sock, limit=HEADER_LIMIT)

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting; let in-flight requests finish for up to `grace` seconds, then cut them."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for t in list(self.idle):  # keep-alive connections waiting for a next request: nothing to finish
            t.cancel()
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still, timeout=2)
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            while not self.closing:
                try:
                    if task is not None:
                        self.idle.add(task)
                    try:
                        req = await _read_request_start(reader, self.policy)
                    finally:
                        if task is not None:
                            self.idle.discard(task)
                    if req is not None:
                        req = await _read_request_body(reader, req, self.policy)
                except ApiError as e:
                    self.counts["rejected"] += 1
                    await self._send_error(writer, e, keep_alive=False)
                    await _discard(reader, min(e.discard, MAX_DISCARD))
                    return
                except ClientGone:
                    return
                if req is None:
                    return
                self.counts["requests"] += 1
                keep = await self._dispatch(req, writer) and req.keep_alive and not self.closing
                if not keep:
                    return
        except (ConnectionError, ClientGone):
            self.counts["disconnects"] += 1
        except asyncio.CancelledError:
            pass
        except Exception as e:  # e.g. llama.cpp dropped the connection mid-answer: answer 500, keep serving
            self.counts["backend_errors"] += 1
            await self._send_error(writer, ApiError(500, f"The model server failed while answering ({type(e).__name__})."),
                                   keep_alive=False)
        finally:
            if task is not None:
                self.tasks.discard(task)
            writer.close()

    # -- responses

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str = "application/json",
                    keep_alive: bool = True, extra: list[tuple[str, str]] | None = None) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   ("Connection", "keep-alive" if keep_alive else "close")] + (extra or [])
        writer.write(_head(status, headers) + body)
        await writer.drain()

    async def _send_error(self, writer: asyncio.StreamWriter, e: ApiError, keep_alive: bool = True) -> None:
        extra = [("WWW-Authenticate", "Bearer")] if e.status == 401 else None
        try:
            await self._send(writer, e.status, e.body(), keep_alive=keep_alive, extra=extra)
        except (ConnectionError, RuntimeError):
            pass

    def _authorized(self, req: Request) -> bool:
        key = self.policy.api_key
        if key is None:
            return True
        auth = req.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else req.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), key.encode())

    def _is_static(self, req: Request) -> bool:
        p = req.path
        return self.policy.ui and req.method == "GET" and not p.startswith("/v1/") and (
            p in ("/", "/index.html") or p.startswith("/_app/") or p.lower().endswith(STATIC_SUFFIXES))

    async def _dispatch(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True if the connection may carry another."""
        p, m = req.path.rstrip("/") or "/", req.method
        try:
            if m == "OPTIONS":
                await self._send(writer, 204, b"", extra=[("Allow", "GET, POST, OPTIONS")])
                return True
            if p in PUBLIC_GET and m == "GET":
                return await self._forward(req, writer, req.body)
            if self._is_static(req):
                return await self._forward(req, writer, b"")
            if not self._authorized(req):
                raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key")
            if p in ("/v1/models", "/models"):
                self._method(m, "GET")
                return await self._models(writer)
            if p == "/metrics":
                self._method(m, "GET")
                return await self._metrics(writer)
            if p in CHAT_PATHS or p in COMPLETION_PATHS:
                self._method(m, "POST")
                body = self._json(req)
                body = check_chat(body, self.policy) if p in CHAT_PATHS else check_completion(body, self.policy)
                return await self._forward(req, writer, json.dumps(body, ensure_ascii=False).encode(), path="/v1" + p.removeprefix("/v1"))
            if p in FORWARD_POST:
                self._method(m, "POST")
                self._json(req)
                return await self._forward(req, writer, req.body)
            if p in FORWARD_GET_KEYED:
                self._method(m, "GET")
                return await self._forward(req, writer, b"")
            raise ApiError(404, f"No route {m} {req.path} on this server; see /v1/chat/completions, /v1/completions, /v1/models.",
                           code="not_found")
        except ApiError as e:
            self.counts["rejected"] += 1
            await self._send_error(writer, e)
            return True

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise ApiError(405, f"Use {allowed} for this route, not {method}.", code="method_not_allowed")

    @staticmethod
    def _json(req: Request) -> Any:
        if not req.body:
            raise ApiError(400, "The request body is empty; send a JSON object.", code="invalid_json")
        try:
            return json.loads(req.body.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "The request body is not UTF-8 text.", code="invalid_json") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"The request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).",
                           code="invalid_json") from None

    async def _models(self, writer: asyncio.StreamWriter) -> bool:
        data = {"object": "list", "data": [{"id": self.policy.model_id, "object": "model", "created": int(self.started),
                                            "owned_by": "cutegpt", "context_length": self.policy.ctx}]}
        await self._send(writer, 200, json.dumps(data).encode())
        return True

    async def _metrics(self, writer: asyncio.StreamWriter) -> bool:
        status, _, body = await self._backend_simple("GET", "/metrics")
        text = body.decode("utf-8", "replace") if status == 200 else ""
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
        await self._send(writer, 200, (text + "\n".join(ours) + "\n").encode(), content_type="text/plain; version=0.0.4")
        return True

    # -- backend

    async def _backend_simple(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        reader, bw = await asyncio.open_connection(self.backend_host, self.backend_port, limit=HEADER_LIMIT)
        try:
            bw.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.backend_key}\r\n"
                     "Connection: close\r\n\r\n".encode())
            await bw.drain()
            status, headers = await self._backend_head(reader)
            body = await reader.read()
            return status, headers, body
        finally:
            bw.close()

    @staticmethod
    async def _backend_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers = {}
        for line in head[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        return status, headers

    async def _forward(self, req: Request, writer: asyncio.StreamWriter, body: bytes, path: str | None = None) -> bool:
        """Send the request to llama.cpp and relay the answer; streams are relayed chunk by chunk."""
        target = (path or req.path) + (("?" + req.query) if req.query else "")
        try:
            br, bw = await asyncio.open_connection(self.backend_host, self.backend_port, limit=HEADER_LIMIT)
        except OSError:
            self.counts["backend_errors"] += 1
            raise ApiError(503, "The model server is not available.", code="backend_unavailable") from None
        streaming = False
        try:
            headers = [f"{req.method} {target} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {self.backend_key}",
                       "Connection: close"]
            if body or req.method == "POST":
                headers += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
            for h in ("accept", "accept-encoding", "if-none-match"):
                if h in req.headers:
                    headers.append(f"{h}: {req.headers[h]}")
            bw.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body)
            await bw.drain()
            try:
                status, bh = await self._backend_head(br)
            except (asyncio.IncompleteReadError, ConnectionError):
                self.counts["backend_errors"] += 1
                raise ApiError(502, "The model server closed the connection without an answer.", code="backend_error") from None
            passthrough = [(k.title(), bh[k]) for k in ("content-type", "content-encoding", "etag", "cache-control",
                                                        "cross-origin-embedder-policy", "cross-origin-opener-policy") if k in bh]
            if "content-length" in bh:
                data = await br.readexactly(int(bh["content-length"]))
                if status >= 400 and not data.lstrip().startswith(b"{"):
                    raise ApiError(status, data.decode("utf-8", "replace").strip()[:300] or STATUS_TEXT.get(status, "error"))
                writer.write(_head(status, passthrough + [("Content-Length", str(len(data))),
                                                          ("Connection", "keep-alive" if req.keep_alive else "close")]) + data)
                await writer.drain()
                return True
            # streamed (chunked) or read-to-EOF answer: relay as chunked
            streaming = True
            self.active_streams += 1
            writer.write(_head(status, passthrough + [("Transfer-Encoding", "chunked"), ("Cache-Control", "no-cache"),
                                                      ("Connection", "keep-alive" if req.keep_alive else "close")]))
            chunked = "chunked" in bh.get("transfer-encoding", "").lower()
            async for piece in (_dechunk(br) if chunked else _until_eof(br)):
                if not piece:
                    continue
                try:
                    writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    await writer.drain()
                except ConnectionError:
                    raise ClientGone() from None
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        finally:
            if streaming:
                self.active_streams -= 1
            bw.close()  # a client that went away closes this too, and llama.cpp cancels its task


async def _dechunk(reader: asyncio.StreamReader):
    while True:
        line = await reader.readline()
        if not line:
            return
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            return
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def _until_eof(reader: asyncio.StreamReader):
    while True:
        piece = await reader.read(65536)
        if not piece:
            return
        yield piece
