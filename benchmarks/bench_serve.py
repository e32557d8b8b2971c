"""`cutegpt serve` under load on the embedded model, loopback only, side by side in one run.

    python benchmarks/bench_serve.py [--threads 1] [--tokens 64] [--load-seconds 60] [--quick] [--quant q8_0]
                                     [--llamacpp auto|native|wheel] [--old-ref cc2af52]

The model is what `cutegpt serve` serves with no --model: the embedded model's f16 GGUF (as chat runs it);
--quant Q serves our export of it at Q instead, --quant shipped the Q4_1 file the package ships.
Prints (and writes to --out as JSON):
  1. aggregate generated tokens/s and p50/p95 time to first token (TTFT) at 1, 4, 8, 16 concurrent
     streaming clients, for `cutegpt serve --parallel 8` vs `--parallel 1` (one request at a time, as
     LLaMA-Factory's and FastChat's HF engines serve), raw xllamacpp (llama.cpp's HTTP server with
     no cutegpt front) at n_parallel 8 and 1, and the hand-written front of git revision --old-ref (the one
     `benchmarks/bench_front.py` compares on a fake backend) in front of its own llama.cpp started as serve
     starts it, --parallel 8. All five servers run at once and each client count runs on each of them in
     turn, so machine load drifts over all five alike;
  2. TTFT of the 8th turn of a long chat with llama.cpp's prompt cache on vs off;
  3. a load test: 16 streaming clients for --load-seconds against --parallel 8; every request must
     finish completely; the server's RSS sampled every few seconds must stay flat.
Every request: greedy, `ignore_eos`, exactly --tokens new tokens, short prompts. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from machine import cpu_model  # benchmarks/ is on sys.path when a script runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?", "What is 12 times 7?",
             "Write a haiku about rain.", "Explain photosynthesis briefly.", "Who wrote Hamlet?", "What is a prime number?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_one(port: int, messages: list[dict], tokens: int, extra: dict | None = None) -> tuple[float, int, float, bool]:
    """(TTFT s, completion tokens, total s, complete?) of one streamed chat request."""
    body = {"messages": messages, "stream": True, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    ttft = None
    n = 0
    done = False
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            done = True
            break
        event = json.loads(data)
        if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
            if ttft is None:
                ttft = time.perf_counter() - t0
        if event.get("usage"):
            n = event["usage"]["completion_tokens"]
    conn.close()
    return (ttft if ttft is not None else float("nan")), n, time.perf_counter() - t0, done and n == tokens


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_clients(port: int, c: int, tokens: int) -> dict:
    """c concurrent streaming clients sending max(c, 8) requests in all; aggregate tok/s and TTFT percentiles."""
    total = max(c, 8)
    jobs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" (#{i})"}] for i in range(total)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        results = list(pool.map(lambda m: stream_one(port, m, tokens), jobs))
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    return {"clients": c, "requests": total, "tok_s": sum(r[1] for r in results) / wall,
            "ttft_p50": pct(ttfts, 0.5), "ttft_p95": pct(ttfts, 0.95), "complete": all(r[3] for r in results)}


class Serve:
    """`python -m cutegpt serve` in a subprocess."""

    def __init__(self, *args: str):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "cutegpt", "serve", "--port", str(self.port), "--quiet", *args],
                                     cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server failed: {self.proc.stderr.read().decode()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.5)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class RawServer:
    """llama.cpp's own HTTP server through xllamacpp, no cutegpt front (same settings, the same llama.cpp build)."""

    def __init__(self, model: Path, parallel: int, threads: int, ctx: int):
        from cutegpt.runtime.llamacpp import xllamacpp_module

        xllamacpp = xllamacpp_module()
        p = xllamacpp.CommonParams()
        p.model.path = str(model)
        p.n_parallel = parallel
        p.n_ctx = ctx * parallel
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.hostnames = ["127.0.0.1"]
        p.port = 0
        p.verbosity = -1
        self.server = xllamacpp.Server(p)
        self.port = int(str(self.server.listening_address).rsplit(":", 1)[1])

    def stop(self) -> None:
        del self.server


class OldFront(Serve):
    """The hand-written front of git revision `ref` in a subprocess (this script, --role old-front), in front of its
    own llama.cpp started by `cutegpt serve`'s code (`serve.engine.start_backend`) with the same settings."""

    def __init__(self, ref: str, model: Path | None, parallel: int, threads: int, ctx: int):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", "old-front", "--old-ref", ref, "--port", str(self.port),
                                      "--parallel", str(parallel), "--threads", str(threads), "--ctx", str(ctx),
                                      # the child's main() sets $CUTEGPT_LLAMACPP from its own flag: pass ours on
                                      "--llamacpp", os.environ.get("CUTEGPT_LLAMACPP", "auto"),
                                      *(["--model", str(model)] if model else [])],
                                     cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.wait_healthy()


async def run_old_front(ref: str, port: int, model: str | None, parallel: int, threads: int, ctx: int) -> None:
    import asyncio

    from bench_front import load_front

    from cutegpt.runtime.llamacpp import drops_first_space
    from cutegpt.serve.config import ServeConfig
    from cutegpt.serve.engine import start_backend
    from cutegpt.serve.source import resolve_model

    cfg = ServeConfig(model=model, parallel=parallel, threads=threads, ctx=ctx, quiet=True)
    cfg.check()
    served = resolve_model(cfg.model, cfg.lora, cfg.template, cfg.quant, progress=False)
    backend = start_backend(cfg, served)
    front = load_front("old", ref)
    policy = front.Policy(model_id=served.name, stop=served.stop, max_tokens_limit=cfg.token_limit, ctx=cfg.ctx,
                          defaults=cfg.request_defaults(served.template, served.model_defaults))
    assert not drops_first_space(served.gguf), "the old front does not drop SentencePiece's first space"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(512)
    sock.setblocking(False)
    await front.Front(policy, backend.url, backend.key).start(sock)
    await asyncio.Event().wait()


def long_chat(port: int, tokens: int, cache: bool) -> float:
    """TTFT of turn 8 after 7 turns of history (answers generated here, greedy)."""
    messages: list[dict] = []
    ttft = 0.0
    for turn in range(8):
        messages.append({"role": "user", "content": QUESTIONS[turn] + " Please answer in detail."})
        body = {"messages": messages, "max_tokens": 128 if turn < 7 else tokens, "temperature": 0, "ignore_eos": True,
                "cache_prompt": cache}
        if turn < 7:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read())["choices"][0]["message"]["content"]
            conn.close()
            messages.append({"role": "assistant", "content": answer})
        else:
            ttft = stream_one(port, messages, tokens, {"cache_prompt": cache})[0]
    return ttft


def load_test(srv: "Serve", seconds: float, tokens: int) -> dict:
    stop_at = time.monotonic() + seconds
    counts = {"ok": 0, "incomplete": 0, "errors": 0}
    lock = threading.Lock()
    rss: list[float] = [srv.rss_mb()]

    def client(i: int) -> None:
        k = 0
        while time.monotonic() < stop_at:
            try:
                ok = stream_one(srv.port, [{"role": "user", "content": QUESTIONS[(i + k) % len(QUESTIONS)]}], tokens)[3]
                with lock:
                    counts["ok" if ok else "incomplete"] += 1
            except Exception:
                with lock:
                    counts["errors"] += 1
            k += 1

    workers = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        time.sleep(5)
        rss.append(srv.rss_mb())
    return {**counts, "seconds": seconds, "rss_mb": rss}


def gguf_file(quant: str | None) -> Path:
    """What `cutegpt serve` serves with no --model (quant None), the embedded model's shipped Q4_1 GGUF ("shipped"),
    or our export of it at `quant` (made once, kept in the temp folder)."""
    from cutegpt.model.embedded import embedded_gguf

    if quant is None:
        from cutegpt.chat.backend import embedded_llamacpp_file

        return embedded_llamacpp_file()
    if quant == "shipped":
        return Path(embedded_gguf())
    out = Path(tempfile.gettempdir()) / f"cutegpt-bench-serve-embedded.{quant}.gguf"
    if not out.is_file():
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "cutegpt", "export", "--format", "gguf", "--quant", quant, "--out", str(out)],
                       cwd=REPO, env=env, check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads for every server (the machine is shared)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--load-seconds", type=float, default=60)
    ap.add_argument("--quick", action="store_true", help="1 and 8 clients only, 20 s load test")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds over every server; medians are printed")
    ap.add_argument("--quant", choices=["shipped", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"],
                    help="serve the embedded model exported by `cutegpt export --format gguf --quant Q`, or the Q4_1 "
                         "GGUF the package ships (default: what `cutegpt serve` serves, the f16 file chat runs)")
    ap.add_argument("--llamacpp", choices=["auto", "native", "wheel"], default="auto",
                    help="which llama.cpp every server loads ($CUTEGPT_LLAMACPP; native: `cutegpt llamacpp build`'s)")
    ap.add_argument("--old-ref", default="cc2af52", help="git revision holding the hand-written front (the fifth server)")
    ap.add_argument("--out", default="bench_serve.json")
    ap.add_argument("--role", choices=["bench", "old-front"], default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--parallel", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--ctx", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["CUTEGPT_LLAMACPP"] = args.llamacpp  # the servers in subprocesses inherit it
    if args.role == "old-front":
        import asyncio

        asyncio.run(run_old_front(args.old_ref, args.port, args.model, args.parallel, args.threads, args.ctx))
        return
    model = gguf_file(args.quant)
    clients = [1, 8] if args.quick else [1, 4, 8, 16]
    load_s = 20 if args.quick else args.load_seconds
    from cutegpt.runtime.llamacpp import xllamacpp_module
    from cutegpt.runtime.native import loaded_build

    xllamacpp = xllamacpp_module()
    print(f"CPU: {cpu_model()}; load average at start: {os.getloadavg()}, threads {args.threads}; "
          f"xllamacpp {getattr(xllamacpp, '__version__', '?')} ({loaded_build()} build)", flush=True)
    results: dict = {"threads": args.threads, "tokens": args.tokens, "model": model.name, "loadavg_start": os.getloadavg(),
                     "llamacpp": loaded_build()}
    # all five servers up at once; each client count runs on each in turn, so load drift hits them alike
    print(f"model: {model}", flush=True)
    model_args = [] if args.quant is None else ["--model", str(model)]  # no --model: exactly what serve serves by default
    p8 = Serve(*model_args, "--parallel", "8", "--threads", str(args.threads), "--ctx", "2048")
    p1 = Serve(*model_args, "--parallel", "1", "--threads", str(args.threads), "--ctx", "2048")
    old8 = OldFront(args.old_ref, None if args.quant is None else model, 8, args.threads, 2048)
    raw8, raw1 = RawServer(model, 8, args.threads, 2048), RawServer(model, 1, args.threads, 2048)
    servers = {"cutegpt_p8": p8.port, "cutegpt_p1": p1.port, "raw_p8": raw8.port, "raw_p1": raw1.port,
               "old_front_p8": old8.port}
    # Warm-up: as many concurrent requests as the server has slots, so every slot and llama.cpp's batched graph
    # sizes have run once before anything is timed (a server's first request took 3-4 s here, its next ones 0.1-1 s).
    for name, port in servers.items():
        run_clients(port, 8 if name.endswith("p8") else 1, 4)
    rows: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for c in clients:
            for name, port in servers.items():
                row = run_clients(port, c, args.tokens)
                rows.setdefault((name, c), []).append(row)
                print(f"    {name:<12} {c:>2} clients: {row['tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50']:.2f} s, "
                      f"p95 {row['ttft_p95']:.2f} s, complete {row['complete']}", flush=True)
    for name in servers:  # the median round of each server and client count, by tok/s
        results[name] = [sorted(rows[(name, c)], key=lambda r: r["tok_s"])[len(rows[(name, c)]) // 2] for c in clients]
    raw8.stop()
    raw1.stop()
    old8.stop()
    print("8th turn of a long chat, prompt cache on / off", flush=True)
    results["turn8_ttft_cache_on"] = long_chat(p1.port, args.tokens, True)
    results["turn8_ttft_cache_off"] = long_chat(p1.port, args.tokens, False)
    p1.stop()
    print(f"    cache on {results['turn8_ttft_cache_on']:.2f} s, off {results['turn8_ttft_cache_off']:.2f} s", flush=True)
    print(f"load test: 16 streaming clients, {load_s:.0f} s, --parallel 8", flush=True)
    results["load"] = load_test(p8, load_s, args.tokens)
    p8.stop()
    results["loadavg_end"] = os.getloadavg()
    print(json.dumps(results["load"]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))

    print(f"\nmedian of {args.rounds} interleaved round(s)")
    print("| clients | serve p8 tok/s | serve p1 tok/s | ratio | raw p8 tok/s | raw p1 tok/s | raw ratio | "
          "TTFT p50/p95 serve p8 | TTFT p50/p95 serve p1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, c in enumerate(clients):
        a, b = results["cutegpt_p8"][i], results["cutegpt_p1"][i]
        ra, rb = results["raw_p8"][i], results["raw_p1"][i]
        print(f"| {c} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {a['tok_s'] / b['tok_s']:.2f}x | {ra['tok_s']:.1f} | {rb['tok_s']:.1f} | "
              f"{ra['tok_s'] / rb['tok_s']:.2f}x | {a['ttft_p50']:.2f} / {a['ttft_p95']:.2f} s | {b['ttft_p50']:.2f} / {b['ttft_p95']:.2f} s |")
    print(f"\n| clients | new front p8 tok/s | old front ({args.old_ref}) p8 tok/s | new / old | raw p8 tok/s | new / raw | "
          "TTFT p95 new / old / raw |")
    print("|---|---|---|---|---|---|---|")
    for i, c in enumerate(clients):
        a, o, r = results["cutegpt_p8"][i], results["old_front_p8"][i], results["raw_p8"][i]
        print(f"| {c} | {a['tok_s']:.1f} | {o['tok_s']:.1f} | {a['tok_s'] / o['tok_s']:.2f}x | {r['tok_s']:.1f} | "
              f"{a['tok_s'] / r['tok_s']:.2f}x | {a['ttft_p95']:.2f} / {o['ttft_p95']:.2f} / {r['ttft_p95']:.2f} s |")
    load = results["load"]
    print(f"load average at the end: {results['loadavg_end']}")
    print(f"\nturn-8 TTFT: prompt cache on {results['turn8_ttft_cache_on']:.2f} s, off {results['turn8_ttft_cache_off']:.2f} s")
    print(f"load: {load['ok']} complete, {load['incomplete']} incomplete, {load['errors']} errors in {load['seconds']:.0f} s; "
          f"RSS MB first {load['rss_mb'][0]:.0f}, last {load['rss_mb'][-1]:.0f}, max {max(load['rss_mb']):.0f}")


if __name__ == "__main__":
    main()
