"""Fixtures for `cutegpt serve`: a fake llama.cpp behind the real front (fast), and real servers (slow)."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cutegpt.serve.front import Front, Policy

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeLlama:
    """Answers like llama.cpp's server: echoes the body it got; streams `n` SSE events slowly when asked."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.closed_early = 0
        self.auth: list[str] = []
        self.headers: list[list[tuple[str, str]]] = []  # every request's headers as sent, repeats kept

    async def handle(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            self.auth.append(headers.get("authorization", ""))
            self.headers.append([(k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in head[1:] if line)])
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            method, path, _ = head[0].split(" ")
            if path == "/health":
                data = b'{"status":"ok"}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            elif path == "/metrics":
                data = b"llamacpp:requests_processing 0\n"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            elif path == "/":  # as llama.cpp: the page exists only gzip-compressed
                if "gzip" in headers.get("accept-encoding", ""):
                    data = gzip.compress(b"<html>llama-ui</html>")
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Encoding: gzip\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                else:
                    data = b"Error: gzip is not supported by this browser"
                    writer.write(b"HTTP/1.1 415 Unsupported Media Type\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(data), data))
            else:
                req = json.loads(body)
                self.bodies.append(req)
                if "CRASH" in json.dumps(req):  # dies half-way through its answer
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"choi")
                elif req.get("stream"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                    n = int(req.get("max_tokens", 5))
                    try:
                        for i in range(n):
                            ev = b'data: {"choices":[{"index":0,"delta":{"content":"t%d "}}]}\n\n' % i
                            writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                            await writer.drain()
                            await asyncio.sleep(0.02)
                        if req.get("ignore_eos"):  # ran to max_tokens: the last event says so, as llama.cpp's
                            ev = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"object":"chat.completion.chunk"}\n\n'
                            writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                        ev = b"data: [DONE]\n\n"
                        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(ev), ev))
                        await writer.drain()
                    except ConnectionError:
                        self.closed_early += 1
                        return
                elif "SLOW" in json.dumps(req):  # a long non-streamed answer: is the connection closed before it is ready?
                    try:
                        if await asyncio.wait_for(reader.read(), 60) == b"":
                            self.closed_early += 1
                            return
                    except asyncio.TimeoutError:
                        pass
                    data = json.dumps({"object": "chat.completion", "echo": req}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
                else:
                    data = json.dumps({"object": "chat.completion", "echo": req}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            await writer.drain()
        finally:
            writer.close()


@pytest.fixture()
def front_factory():
    """Start a Front (with `Policy` overrides) before a FakeLlama, in a background event loop; yields (port, fake, front)."""
    loops = []

    def make(fake=None, **policy):
        loop = asyncio.new_event_loop()
        fake = fake or FakeLlama()
        started = threading.Event()
        box = {}

        async def main():
            backend = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
            bport = backend.sockets[0].getsockname()[1]
            defaults = dict(model_id="tiny", stop=["<end>"], max_tokens_limit=512, ctx=512,
                            defaults={"max_tokens": 256, "temperature": 1.0, "top_p": 0.8, "top_k": 50, "repeat_penalty": 1.1})
            defaults.update(policy)
            front = Front(Policy(**defaults), f"http://127.0.0.1:{bport}", "backend-secret")
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            sock.setblocking(False)
            await front.start(sock)
            box.update(port=sock.getsockname()[1], front=front, backend=backend)
            started.set()

        threading.Thread(target=lambda: (asyncio.set_event_loop(loop), loop.run_until_complete(main()), loop.run_forever()),
                         daemon=True).start()
        assert started.wait(10)
        loops.append((loop, box))
        return box["port"], fake, box["front"]

    yield make
    for loop, box in loops:
        async def stop(box=box):
            await box["front"].close(grace=1)
            box["backend"].close()
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


def request(port: int, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one HTTP request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode("utf-8", "replace")
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


# ----------------------------------------------------------------------------- real servers (slow)


def need_real_server():
    pytest.importorskip("xllamacpp", reason="xllamacpp is not installed (pip install xllamacpp)")
    from cutegpt.errors import CuteGPTError
    from cutegpt.model.embedded import embedded_gguf

    try:
        embedded_gguf()
    except CuteGPTError as e:
        pytest.skip(f"embedded model missing: {e}")


@contextmanager
def running_server(*args: str, env: dict | None = None, timeout: float = 180):
    """`python -m cutegpt serve --port P ...` in a subprocess; yields (url, process); stops it with SIGTERM."""
    need_real_server()
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "cutegpt", "serve", "--port", str(port), "--threads", "1", *args],
                            cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not become healthy in time")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
