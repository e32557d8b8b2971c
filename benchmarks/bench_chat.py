"""Chat backends side by side on the embedded SmolLM2-135M-Instruct: torch vs llama.cpp (through cutegpt and raw).

    OMP_NUM_THREADS=1 python benchmarks/bench_chat.py [--threads 1] [--repeats 3] [--tokens 128] [--json out.json]

One process, one thread for every variant, the same prompts and token counts, runs interleaved
(medians of --repeats) so machine load hits every variant alike:
  - decode tok/s: --tokens greedy tokens (EOS ignored) after the chat prompt of PROMPT;
  - prefill tok/s and time to first token of a ~1,000-token prompt (no cache), and TTFT of the short prompt;
  - top-1 agreement with torch fp32, teacher-forced over an English and a Chinese text, and whether the
    greedy answer text equals fp32's;
  - ready time (load until the first prompt can be answered) and the files' sizes.
Variants: the torch engine fp32 / bf16 / int8 (quanto); llama.cpp through cutegpt (`LlamaCppEngine`) on the
embedded Q4_1 file and, when `cutegpt.export.gguf.export_gguf` is available, on our own f16 / q8_0 / q4_1
exports of it; raw xllamacpp (`Server.handle_completions`, streaming, no Python work per token) on the same
files, to measure what cutegpt adds (target < 5%).

    OMP_NUM_THREADS=1 python benchmarks/bench_chat.py --prefill-sweep [--repeats 3]

Only time to first token of the ~1,000-token prompt: torch fp32 / bf16 against raw llama.cpp on our f16 and q8_0
exports under each llama.cpp batch setting (`--ubatch`, default 128..1024, with `n_batch` 2048 so the prompt is one
logical batch; flash attention off / on), plus cutegpt's default llama.cpp settings (n_batch 2048, n_ubatch 512,
flash attention auto). The table is printed after every round, so a run cut short still reports. Prints the CPU
model, the llama.cpp build's CPU features and the load average at start and end.

    OMP_NUM_THREADS=1 python benchmarks/bench_chat.py --prefill-sweep --builds wheel native [--repeats 3]

The same sweep on the xllamacpp wheel and on `cutegpt llamacpp build`'s native build side by side: a process can load
only one of them, so each round runs one child process per build, in turn, and the table pools their rows (torch's
rows come from both children).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cutegpt.generation import GenerationArgs
from cutegpt.chat.engine import Engine
from cutegpt.chat.llamacpp import LlamaCppEngine
from cutegpt.runtime.llamacpp import keep_alive, load_llamacpp, request_for, server_params, xllamacpp_module
from cutegpt.model.embedded import embedded_gguf
from cutegpt.model.loading import ModelArgs, load_model
from cutegpt.templates import Turn, encode_segments
from machine import cpu_model  # benchmarks/ is on sys.path when a script runs

PROMPT = "Explain in detail why the sky is blue and why sunsets are red."
ENGLISH = ("The history of science is the study of the development of science and scientific knowledge, "
           "including both the natural and social sciences. Science is a body of empirical, theoretical, and "
           "practical knowledge about the natural world, produced by scientists who emphasize the observation, "
           "explanation, and prediction of real-world phenomena.")
CHINESE = ("科学史是研究科学和科学知识发展的学科，包括自然科学和社会科学。科学是关于自然界的经验、理论和实践知识的总体，"
           "由强调观察、解释和预测现实世界现象的科学家所产生。中国古代在天文、数学和医学方面都有重要的成就。")
LONG = ("Rayleigh scattering makes short wavelengths scatter more than long ones, so blue light fills the sky "
        "while the sun itself looks yellow; at sunset light crosses more air and the blue is scattered away. ") * 24


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def greedy(n: int, ignore_eos: bool = True) -> GenerationArgs:
    return GenerationArgs(greedy=True, max_new_tokens=n, ignore_eos=ignore_eos, temperature=1.0, top_p=1.0, top_k=0,
                          repetition_penalty=1.0)


# --- runners: each returns (decode tok/s, TTFT s, text) for one generation ------------------------

def run_torch(lm, ids: list[int], n: int) -> tuple[float, float, str]:
    r = Engine(lm, reuse_cache=False).generate(ids, greedy(n))
    return r.decode_tokens_per_second, r.time_to_first_token, r.text


def run_cutegpt_llamacpp(lm, ids: list[int], n: int) -> tuple[float, float, str]:
    r = LlamaCppEngine(lm, reuse_cache=False).generate(ids, greedy(n))
    return r.decode_tokens_per_second, r.time_to_first_token, r.text


def run_raw_llamacpp(lm, ids: list[int], n: int) -> tuple[float, float, str]:
    """The same request straight into xllamacpp: a callback that only notes times and keeps the text."""
    req = request_for(ids, greedy(n), None, lm.context_length, cache_prompt=False)
    pieces: list[str] = []
    times: list[float] = []

    def cb(chunk) -> bool:
        c = (chunk.get("choices") or [{}])[0]
        if c.get("text"):
            times.append(time.perf_counter())
            pieces.append(c["text"])
        return False

    t0 = time.perf_counter()
    lm.server.handle_completions(req, cb)
    t_end = time.perf_counter()
    k = len(times)
    return ((n - 1) / (t_end - times[0]) if k > 1 else 0.0), (times[0] - t0 if times else 0.0), "".join(pieces)


# --- agreement -------------------------------------------------------------------------------------

def torch_top1(lm, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        return lm.model(torch.tensor([ids])).logits.argmax(-1)[0].tolist()


def llamacpp_top1(lm, ids: list[int]) -> list[int]:
    """The greedy next token after every prefix (the prompt cache makes each request one token of prefill)."""
    out = []
    for i in range(1, len(ids) + 1):
        req = {"prompt": ids[:i], "max_tokens": 1, "temperature": 0.0, "top_k": 1, "stream": False, "cache_prompt": True,
               "logprobs": 1, "samplers": ["top_k"], "ignore_eos": True}
        r = lm.server.handle_completions(req)
        content = (r["choices"][0].get("logprobs") or {}).get("content") or []
        # llama.cpp withholds a token that ends inside a UTF-8 character (and reports only the last id of a
        # character later), so such positions cannot be compared: -1, left out of the agreement
        out.append(int(content[0]["id"]) if content else -1)
    return out


class _FakeServer:
    """Streams a fixed answer instantly: measures the Python work cutegpt does per token, without llama.cpp."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def handle_completions(self, req, cb):
        for p in self.pieces:
            if cb({"choices": [{"text": p, "finish_reason": None}]}):
                return
        cb({"choices": [{"text": "", "finish_reason": "length"}], "usage": {"completion_tokens": len(self.pieces)},
            "timings": {"cache_n": 0}})


def callback_cost(lm, n: int) -> float:
    """Seconds of cutegpt's own work per streamed token (stop check, hold-back, streaming to a callback)."""
    from types import SimpleNamespace

    pieces = [lm.tokenizer.decode([t]) for t in lm.tokenizer("The sky is blue because of Rayleigh scattering. " * 20)["input_ids"][:n]]
    fake = SimpleNamespace(**{**lm.__dict__, "server": _FakeServer(pieces)})
    sink: list[str] = []
    t = time.perf_counter()
    LlamaCppEngine(fake, reuse_cache=False).generate([1, 2, 3], greedy(n), sink.append)
    return (time.perf_counter() - t) / n


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where both predict the same token (positions `a` could not report, -1, are left out)."""
    pairs = [(x, y) for x, y in zip(a, b) if x != -1]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def coverage(a: list[int]) -> float:
    return sum(x != -1 for x in a) / max(1, len(a))


def llamacpp_with(path: Path, threads: int, n_ctx: int, n_batch: int, n_ubatch: int, flash: int) -> Any:
    """A llama.cpp server on `path` with these batch settings (what `run_raw_llamacpp` needs of a model)."""
    from types import SimpleNamespace

    xl = xllamacpp_module()
    p = server_params(xl, path, n_ctx, threads)
    p.n_batch, p.n_ubatch, p.flash_attn_type, p.warmup = n_batch, n_ubatch, flash, False
    server = xl.Server(p)
    keep_alive(server)  # xllamacpp's destructor can deadlock; the process end frees it
    return SimpleNamespace(server=server, context_length=n_ctx)


def flash_auto(path: Path, threads: int) -> str:
    """What llama.cpp's flash attention "auto" (cutegpt's setting) resolves to on this machine, from its own log."""
    from cutegpt.runtime.llamacpp import captured_stderr

    xl = xllamacpp_module()
    p = server_params(xl, path, 512, threads)
    p.verbosity, p.warmup = 4, False
    log: list[str] = []
    with captured_stderr(log):
        keep_alive(xl.Server(p))
    import re

    found = [m.group(0) for line in log for m in re.finditer(r"Flash Attention (enabled|disabled)", line)]
    return found[-1] if found else "not reported"


def prefill_sweep(args: argparse.Namespace) -> None:
    from cutegpt.export.gguf import export_gguf

    load_start = os.getloadavg()
    # first: llama.cpp's log level is process-wide, and the servers started after this one set it back to quiet
    args.flash_auto = flash_auto(Path(embedded_gguf()), args.threads)
    fp32 = load_model(ModelArgs(dtype="float32"))
    bf16 = load_model(ModelArgs(dtype="bfloat16"))
    long_ids = encode_segments(fp32.tokenizer, fp32.template.segments([Turn(LONG)]))[0]
    n_ctx = 2048
    tmp = Path(tempfile.mkdtemp(prefix="bench-prefill-"))
    variants: dict[str, tuple[Any, Any]] = {"torch fp32": (run_torch, fp32), "torch bf16": (run_torch, bf16)}
    for q in args.quants:
        path = Path(export_gguf(None, tmp / f"smol-{q}.gguf", quant=q, verify=False, progress=False))
        variants[f"llama.cpp {q}, cutegpt defaults"] = (run_cutegpt_llamacpp, load_llamacpp(path, threads=args.threads, tokenizer=fp32.tokenizer))
        for n_ubatch in args.ubatch:
            n_batch = 2048
            for flash in (0, 1):
                name = f"llama.cpp {q}, n_batch {n_batch}, n_ubatch {n_ubatch}, flash {'on' if flash else 'off'}"
                variants[name] = (run_raw_llamacpp, llamacpp_with(path, args.threads, n_ctx, n_batch, n_ubatch, flash))
    for fn, lm in variants.values():  # warm-up: first-use allocations and page-ins
        fn(lm, long_ids[:64], 1)
    ttft: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name, (fn, lm) in variants.items():
            ttft[name].append(fn(lm, long_ids, 1)[1])
        sweep_table(args, ttft, len(long_ids), load_start, r + 1)  # after every round: a cut-short run still reports
    if args.json:
        from cutegpt.runtime.native import loaded_build

        Path(args.json).write_text(json.dumps({"ttft": {k: median(v) for k, v in ttft.items()}, "tokens": len(long_ids),
                                               "cpu": cpu_model(), "load_start": load_start, "load_end": os.getloadavg(),
                                               "build": loaded_build(), "system_info": xllamacpp_module().get_system_info().strip(),
                                               "flash_auto": args.flash_auto},
                                              indent=2))


def sweep_table(args: argparse.Namespace, ttft: dict[str, list[float]], tokens: int, load_start: tuple, rounds: int) -> None:
    load_end = os.getloadavg()
    ref = median(ttft["torch bf16"])
    xl = xllamacpp_module()
    print(f"\n## Time to first token, {tokens}-token prompt, embedded SmolLM2-135M-Instruct, {args.threads} thread(s), "
          f"medians of {rounds} interleaved runs")
    print(f"CPU: {cpu_model()}; load average (1/5/15 min) at start {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, "
          f"at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} on {os.cpu_count()} cores: noisy, compare ratios only.")
    if not args.builds:
        from cutegpt.runtime.native import loaded_build

        print(f"torch {torch.__version__}; xllamacpp {getattr(xl, '__version__', '?')}; llama.cpp {loaded_build()} build: "
              f"{xl.get_system_info().strip()}")
    print(f"flash attention 'auto' (cutegpt's default) resolves to: {getattr(args, 'flash_auto', '?')}")
    print("| variant | TTFT s | prefill tok/s | TTFT / torch bf16 |\n|---|---|---|---|")
    for name, times in ttft.items():
        t = median(times)
        print(f"| {name} | {t:.2f} | {tokens / t:.0f} | {t / ref:.2f}x |", flush=True)


def sweep_builds(args: argparse.Namespace) -> None:
    """--builds: one child process per llama.cpp build and round, in turn; their medians pooled into one table."""
    import subprocess
    import sys

    load_start = os.getloadavg()
    ttft: dict[str, list[float]] = {}
    tokens = 0
    info: dict[str, str] = {}
    for r in range(args.repeats):
        for build in args.builds:
            out = Path(tempfile.mkdtemp(prefix="bench-prefill-child-")) / "round.json"
            argv = [sys.executable, __file__, "--prefill-sweep", "--repeats", "1", "--threads", str(args.threads),
                    "--llamacpp", build, "--json", str(out), "--quants", *args.quants, "--ubatch", *map(str, args.ubatch)]
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            got = json.loads(out.read_text())
            if got["build"] != build:
                raise SystemExit(f"asked for the {build} llama.cpp build, the child loaded the {got['build']} one "
                                 "(run `cutegpt llamacpp build` first)")
            info[build] = got["system_info"]
            args.flash_auto = got["flash_auto"]
            tokens = got["tokens"]
            for name, t in got["ttft"].items():
                ttft.setdefault(name if name.startswith("torch") else f"{build}: {name}", []).append(t)
        ttft = dict(sorted(ttft.items(), key=lambda kv: (not kv[0].startswith("torch"), kv[0].split(": ")[-1], kv[0])))
        for build, text in info.items():
            print(f"llama.cpp {build} build: {text}")
        sweep_table(args, ttft, tokens, load_start, r + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--agreement-only", action="store_true", help="only the top-1 agreement and greedy answers (fast)")
    ap.add_argument("--prefill-sweep", action="store_true", help="only time to first token of the long prompt, over llama.cpp batch settings")
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0"], help="--prefill-sweep: GGUF exports to measure")
    ap.add_argument("--ubatch", type=int, nargs="+", default=[128, 256, 512, 1024], help="--prefill-sweep: n_ubatch values (n_batch 2048)")
    ap.add_argument("--llamacpp", choices=["auto", "native", "wheel"], default="auto",
                    help="which llama.cpp build this process loads ($CUTEGPT_LLAMACPP; native: `cutegpt llamacpp build`'s)")
    ap.add_argument("--builds", nargs="+", choices=["native", "wheel"], help="--prefill-sweep: these builds side by side")
    args = ap.parse_args()
    os.environ["CUTEGPT_LLAMACPP"] = args.llamacpp
    torch.set_num_threads(args.threads)
    if args.prefill_sweep and args.builds:
        sweep_builds(args)
        return
    if args.prefill_sweep:
        prefill_sweep(args)
        return
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")

    ready: dict[str, float] = {}
    t = time.perf_counter()
    fp32 = load_model(ModelArgs(dtype="float32"))
    ready["torch fp32"] = time.perf_counter() - t
    t = time.perf_counter()
    bf16 = load_model(ModelArgs(dtype="bfloat16"))
    ready["torch bf16"] = time.perf_counter() - t
    t = time.perf_counter()
    int8 = load_model(ModelArgs(load_in_8bit=True, int8_backend="quanto"))
    ready["torch int8"] = time.perf_counter() - t

    files = {"Q4_1 (embedded file)": embedded_gguf()}
    export_note = ""
    export_seconds: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    try:
        from cutegpt.export.gguf import export_gguf

        for q in ("f16", "q8_0", "q4_1"):
            t = time.perf_counter()
            files[f"{q} (our export)"] = export_gguf(None, tmp / f"smol-{q}.gguf", quant=q, verify=False, progress=False)
            export_seconds[q] = time.perf_counter() - t
    except ImportError:
        export_note = "export_gguf is not available on this branch: only the embedded Q4_1 file was measured."

    llama = {}
    for name, path in files.items():
        t = time.perf_counter()
        llama[name] = load_llamacpp(Path(path), threads=args.threads, tokenizer=fp32.tokenizer)
        ready[f"llama.cpp {name}"] = time.perf_counter() - t

    short = encode_segments(fp32.tokenizer, fp32.template.segments([Turn(PROMPT)]))[0]
    long_ids = encode_segments(fp32.tokenizer, fp32.template.segments([Turn(LONG)]))[0]

    variants = {"torch fp32": (run_torch, fp32), "torch bf16": (run_torch, bf16), "torch int8 (quanto)": (run_torch, int8)}
    for name, lm in llama.items():
        variants[f"cutegpt llama.cpp {name}"] = (run_cutegpt_llamacpp, lm)
        variants[f"raw xllamacpp {name}"] = (run_raw_llamacpp, lm)
    per_token = callback_cost(next(iter(llama.values())), args.tokens)
    print(f"cutegpt's Python work per streamed token (llama.cpp replaced by an instant stream): {per_token * 1e6:.0f} µs")
    if args.agreement_only:
        args.repeats = 0

    for fn, lm in variants.values():  # warm-up
        if args.repeats:
            fn(lm, short, 4)

    decode = {k: [] for k in variants}
    ttft_short = {k: [] for k in variants}
    ttft_long = {k: [] for k in variants}
    texts: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, (fn, lm) in variants.items():
            tps, first, text = fn(lm, short, args.tokens)
            decode[name].append(tps)
            ttft_short[name].append(first)
            texts[name] = text
            _, first_long, _ = fn(lm, long_ids, 1)
            ttft_long[name].append(first_long)

    ref_en = fp32.tokenizer(ENGLISH)["input_ids"]
    ref_zh = fp32.tokenizer(CHINESE)["input_ids"]
    top1 = {}
    for name, (fn, lm) in variants.items():
        if name.startswith("raw"):
            continue
        f = torch_top1 if name.startswith("torch") else llamacpp_top1
        en, zh = f(lm, ref_en), f(lm, ref_zh)
        top1[name] = (agreement(en, torch_top1(fp32, ref_en)), agreement(zh, torch_top1(fp32, ref_zh)), coverage(en), coverage(zh))
    # greedy answer with EOS honoured (what a user sees)
    answers = {}
    for name, (fn, lm) in variants.items():
        if name.startswith("raw"):
            continue
        eng = Engine(lm, reuse_cache=False) if name.startswith("torch") else LlamaCppEngine(lm, reuse_cache=False)
        q = encode_segments(fp32.tokenizer, fp32.template.segments([Turn("What is the capital of France?")]))[0]
        answers[name] = eng.generate(q, greedy(24, ignore_eos=False)).text

    if args.agreement_only:
        print(f"\n## Top-1 agreement with torch fp32 (teacher-forced, {len(ref_en)} English / {len(ref_zh)} Chinese tokens)")
        print("| variant | top-1 EN / ZH | positions compared EN / ZH |\n|---|---|---|")
        for name, a in top1.items():
            print(f"| {name} | {a[0] * 100:.1f} / {a[1] * 100:.1f} % | {a[2] * 100:.0f} / {a[3] * 100:.0f} % |")
        print("\nGreedy answer to 'What is the capital of France?' (EOS honoured):")
        for name, text in answers.items():
            print(f"- {name}: {text!r}")
        return
    fp32_decode = median(decode["torch fp32"])
    print(f"\n## Chat backends, embedded SmolLM2-135M-Instruct, {args.threads} thread(s), medians of {args.repeats}, "
          f"1-minute load average at start {load:.1f}")
    print(f"Decode: {args.tokens} greedy tokens after a {len(short)}-token prompt; prefill: a {len(long_ids)}-token prompt, "
          f"no cache. Top-1: teacher-forced agreement with torch fp32 over {len(ref_en)} English / {len(ref_zh)} Chinese tokens.")
    print("| variant | decode tok/s | vs torch fp32 | prefill tok/s | TTFT short s | TTFT long s | top-1 EN / ZH | greedy text = fp32 | ready s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in variants:
        d, tl = median(decode[name]), median(ttft_long[name])
        a = top1.get(name)
        same = texts[name] == texts["torch fp32"]
        rname = name.replace("cutegpt llama.cpp ", "llama.cpp ").replace("raw xllamacpp ", "llama.cpp ")
        rd = ready.get(name.replace("torch int8 (quanto)", "torch int8")) or ready.get(rname)
        print(f"| {name} | {d:.1f} | {d / fp32_decode:.2f}x | {len(long_ids) / tl:.0f} | {median(ttft_short[name]):.3f} | {tl:.3f} | "
              f"{f'{a[0] * 100:.1f} / {a[1] * 100:.1f} %' if a else '–'} | {'yes' if same else 'no'} | "
              f"{f'{rd:.1f}' if rd is not None and not name.startswith('raw') else '–'} |")
    print("\ncutegpt over raw xllamacpp (decode time per token, same file, same request):")
    overhead = {}
    for name in llama:
        c, r = median(decode[f"cutegpt llama.cpp {name}"]), median(decode[f"raw xllamacpp {name}"])
        overhead[name] = r / c - 1
        print(f"- {name}: cutegpt {c:.1f} tok/s, raw {r:.1f} tok/s: {overhead[name] * 100:+.1f}% time per token")
    print("\nGreedy answer to 'What is the capital of France?' (EOS honoured):")
    for name, text in answers.items():
        print(f"- {name}: {text!r}")
    sizes = {name: Path(p).stat().st_size for name, p in files.items()}
    print("\nGGUF sizes: " + ", ".join(f"{n} {s / 1e6:.0f} MB" for n, s in sizes.items()))
    if export_seconds:
        print("export_gguf time (embedded model, no verification): " + ", ".join(f"{q} {s:.1f} s" for q, s in export_seconds.items()))
    if export_note:
        print(export_note)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "decode": {k: median(v) for k, v in decode.items()}, "ttft_short": {k: median(v) for k, v in ttft_short.items()},
            "ttft_long": {k: median(v) for k, v in ttft_long.items()}, "prefill_tokens": len(long_ids),
            "top1": top1, "answers": answers, "ready": ready, "overhead": overhead, "sizes": sizes, "load": load,
            "export_seconds": export_seconds}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
