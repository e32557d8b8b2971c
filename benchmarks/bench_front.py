"""The cost of `cutegpt serve`'s front alone: CPU time per request and per streamed event, old vs new.

    python benchmarks/bench_front.py [--old-ref cc2af52] [--clients 8] [--requests 200] [--events 64]

A fake llama.cpp (answers at once, SSE events of llama.cpp's size, no model) runs in one process;
in front of it, each in its own process and with the same Policy: the front at --old-ref (the
hand-written asyncio HTTP/1.1 one, read from git) and the current one (uvicorn + Starlette + aiohttp).
The clients (this process) send the same load straight to the fake too. For each target it prints
wall time and the CPU seconds the front process used (from /proc), per request and per streamed
event: CPU time is what the front takes from llama.cpp on a shared machine, and it does not depend
on what else runs (wall time does).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import cpu_model  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
EVENT = ('data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" token"}}],"created":1765000000,'
         '"id":"chatcmpl-abcdefghijklmnopqrstuvwxyz012345","model":"tiny","system_fingerprint":"b1-0000000",'
         '"object":"chat.completion.chunk"}\n\n').encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def fake_llama(port: int) -> None:
    async def handle(reader, writer):
        try:
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            except asyncio.IncompleteReadError:
                return  # a connection that only checked the port
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))) or b"{}")
            if body.get("stream"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(int(body.get("max_tokens", 1))):
                    writer.write(b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
                    await writer.drain()
                done = b"data: [DONE]\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            else:
                data = b'{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=512)
    await server.serve_forever()


def load_front(kind: str, ref: str) -> types.ModuleType:
    if kind == "new":
        sys.path.insert(0, str(REPO / "src"))
        from cutegpt.serve import front

        return front
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:src/cutegpt/serve/front.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("old_front")
    sys.modules["old_front"] = module
    exec(compile(source, f"{ref}:front.py", "exec"), module.__dict__)
    return module


async def run_front(kind: str, ref: str, port: int, backend: int) -> None:
    front = load_front(kind, ref)
    policy = front.Policy(model_id="tiny", stop=["<end>"], max_tokens_limit=4096, ctx=4096,
                          defaults={"max_tokens": 256, "temperature": 1.0, "top_p": 0.8, "top_k": 50, "repeat_penalty": 1.1})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(512)
    sock.setblocking(False)
    server = front.Front(policy, f"http://127.0.0.1:{backend}", "key")
    await server.start(sock)
    await asyncio.Event().wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(port: int, stream: bool, events: int) -> int:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": events})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == 200, data[:200]
    return data.count(b"data: ") - 1 if stream else 1


def wait_up(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing listens on {port}")


def measure(port: int, pid: int, clients: int, requests: int, stream: bool, events: int) -> tuple[float, float, int]:
    """(wall s, CPU s of process pid, events) for `requests` requests from `clients` threads."""
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        got = sum(pool.map(lambda _: one(port, stream, events), range(requests)))
    return time.perf_counter() - t0, cpu_seconds(pid) - cpu0, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-ref", default="cc2af52", help="git revision holding the hand-written front")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--events", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is printed")
    ap.add_argument("--role", choices=["bench", "fake", "front"], default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="new", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--backend", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "fake":
        asyncio.run(fake_llama(args.port))
        return
    if args.role == "front":
        asyncio.run(run_front(args.kind, args.old_ref, args.port, args.backend))
        return

    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores; load average {os.getloadavg()}", flush=True)
    me = [sys.executable, __file__, "--old-ref", args.old_ref]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fake_port = free_port()
    procs = {"fake": subprocess.Popen([*me, "--role", "fake", "--port", str(fake_port)], env=env)}
    ports = {"none": fake_port}
    for kind in ("old", "new"):
        ports[kind] = free_port()
        procs[kind] = subprocess.Popen([*me, "--role", "front", "--kind", kind, "--port", str(ports[kind]),
                                        "--backend", str(fake_port)], env=env)
    try:
        for port in ports.values():
            wait_up(port)
        for target, port in ports.items():  # warm up (imports, first connections)
            measure(port, procs["fake" if target == "none" else target].pid, 2, 4, True, 4)
        results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
        for _ in range(args.rounds):
            for stream in (False, True):
                for target, port in ports.items():
                    pid = procs["fake" if target == "none" else target].pid
                    row = measure(port, pid, args.clients, args.requests, stream, args.events)
                    results.setdefault((target, "stream" if stream else "plain"), []).append(row)
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(10)

    def med(xs):
        return sorted(xs)[len(xs) // 2]

    print(f"\n{args.clients} clients, {args.requests} requests a round, {args.events} events a stream, median of {args.rounds} rounds")
    print("| target | kind | wall s | requests/s | front CPU ms per request | front CPU us per event |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for (target, mode), rows in results.items():
        wall = med([r[0] for r in rows])
        cpu_s = med([r[1] for r in rows])
        events = rows[0][2]
        per_event = cpu_s / events * 1e6 if mode == "stream" else float("nan")
        summary[(target, mode)] = cpu_s
        name = {"none": "fake llama.cpp directly (its own CPU)", "old": f"hand-written front ({args.old_ref})",
                "new": "uvicorn (h11) + Starlette + aiohttp front"}[target]
        print(f"| {name} | {mode} | {wall:.2f} | {args.requests / wall:.0f} | {cpu_s / args.requests * 1e3:.2f} | "
              + (f"{per_event:.1f} |" if mode == "stream" else "- |"))
    for mode in ("plain", "stream"):
        print(f"front CPU new / old, {mode}: {summary[('new', mode)] / summary[('old', mode)]:.2f}x")


if __name__ == "__main__":
    main()
