"""Where the time of multiple choice on a GGUF file goes, and the request change, before and after in one run.

Scores the same C-Eval val questions (five-shot, one subject) three ways, interleaved, in one process:

    before  llama.cpp, two requests per question (the biased softmax over the letters + the forced anchor)
    after   llama.cpp, one request when the letters are among the unbiased top 20 (runtime.llamacpp.TOP_N)
    torch   our torch path (batched, shared-prefix KV cache), the reference for the ratio

Printed: CPU model and load, wall and process CPU-seconds of each (llama.cpp computes in threads of this
process, so CPU-seconds count its work and are what the load disturbs least), requests per question,
llama.cpp's own prompt-processing time and tokens, the ratios, and the letter/probability agreement of
before and after. Then the cause of what is left: prompt processing alone, 500 tokens from an empty cache
and 100 after a 500-token prefix, llama.cpp on the GGUF file vs torch fp32, CPU-seconds.

    python benchmarks/bench_eval_llamacpp.py --gguf smollm2-f16.gguf --hf <the HF folder it was exported from> \\
        --data ../shared/data/ceval --subject computer_network --limit 10 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import cpu_model  # benchmarks/ is on sys.path when a script runs


class Counting:
    """The llama.cpp server, counting completion requests and summing llama.cpp's own prompt timings."""

    def __init__(self, server: Any):
        self.server, self.requests, self.prompt_ms, self.prompt_n = server, 0, 0.0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)

    def handle_completions(self, body: dict[str, Any]) -> Any:
        r = self.server.handle_completions(body)
        self.requests += 1
        t = r.get("timings", {}) if isinstance(r, dict) else {}
        self.prompt_ms += float(t.get("prompt_ms", 0.0))
        self.prompt_n += int(t.get("prompt_n", 0))
        return r


def timed(fn: Any) -> tuple[Any, float, float]:
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def run_llamacpp(lm: Any, bench: Any, cfg: Any, top_n: int) -> dict[str, Any]:
    import cutegpt.runtime.llamacpp as rt
    from cutegpt.evaluation.cli import evaluate

    base = str(lm.server.listening_address)
    rt._post_json((base if base.startswith("http") else "http://" + base) + "/slots/0?action=erase", {})  # no warm prefix
    raw, rt.TOP_N = lm.server, top_n
    lm.server = Counting(raw)
    try:
        run, wall, cpu = timed(lambda: evaluate(lm, bench, cfg, None, show_progress=False))
        stats = {"requests": lm.server.requests, "prompt_s": lm.server.prompt_ms / 1000, "prompt_n": lm.server.prompt_n}
    finally:
        lm.server, rt.TOP_N = raw, 20
    return {"records": [r for recs in run["records"].values() for r in recs], "wall": wall, "cpu": cpu, **stats}


def prefill(gguf: Path, hf: str) -> dict[str, tuple[float, float]]:
    """Tokens per CPU-second for 500 tokens from an empty cache, and CPU-seconds for 100 more after them."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from cutegpt.runtime.llamacpp import keep_alive, server_params, xllamacpp_module

    ids = list(range(1000, 1600))
    xl = xllamacpp_module()
    p = server_params(xl, gguf, 2048, 1, 1)
    p.warmup = False
    s = xl.Server(p)
    keep_alive(s)
    s.handle_completions({"prompt": ids[:8], "n_predict": 0, "cache_prompt": False})
    _, _, c1 = timed(lambda: s.handle_completions({"prompt": ids[:500], "n_predict": 0, "cache_prompt": False}))
    _, _, c2 = timed(lambda: s.handle_completions({"prompt": ids[:600], "n_predict": 0, "cache_prompt": True}))
    out = {"llama.cpp": (500 / c1, c2)}
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        model(torch.tensor([ids[:8]]))
        o, _, c1 = timed(lambda: model(torch.tensor([ids[:500]]), use_cache=True, logits_to_keep=1))
        cache = copy.deepcopy(o.past_key_values)
        _, _, c2 = timed(lambda: model(torch.tensor([ids[500:600]]), past_key_values=cache, logits_to_keep=1))
    out["torch fp32"] = (500 / c1, c2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--hf", required=True, help="the HF folder the GGUF file was exported from (the torch side)")
    ap.add_argument("--data", required=True, help="C-Eval's data folder")
    ap.add_argument("--subject", default="computer_network")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from cutegpt.evaluation.cli import EvalConfig, evaluate, load_llamacpp_for
    from cutegpt.evaluation.data import load_benchmark
    from cutegpt.model.loading import load_model

    bench = load_benchmark("ceval", Path(args.data), "val", [args.subject])
    gcfg = EvalConfig(benchmark="ceval", model=args.gguf, shots=5, limit=args.limit, threads=1)
    tcfg = EvalConfig(benchmark="ceval", model=args.hf, shots=5, limit=args.limit, threads=1, dtype="float32")
    print(f"CPU: {cpu_model()}; load {os.getloadavg()[0]:.1f}; 1 thread; C-Eval val {args.subject}, five-shot, "
          f"first {args.limit} questions; {args.rounds} interleaved rounds")
    lm = load_llamacpp_for(gcfg, bench, 1, Path(tempfile.mkdtemp(prefix="bench-eval-llamacpp-")))
    tm = load_model(tcfg)
    res: dict[str, list[dict[str, Any]]] = {"before": [], "after": [], "torch": []}
    for _ in range(args.rounds):
        res["before"].append(run_llamacpp(lm, bench, gcfg, 0))
        res["after"].append(run_llamacpp(lm, bench, gcfg, 20))
        run, wall, cpu = timed(lambda: evaluate(tm, bench, tcfg, None, show_progress=False))
        res["torch"].append({"records": [r for recs in run["records"].values() for r in recs], "wall": wall, "cpu": cpu})
    n = len(res["torch"][0]["records"])
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "cpu")} for k, v in res.items()}
    for k in ("before", "after"):
        r = res[k][0]
        print(f"  {k:6s} wall {med[k]['wall']:6.1f} s, CPU {med[k]['cpu']:6.1f} s ({n / med[k]['cpu']:.3f} q per CPU-s); "
              f"{r['requests'] / n:.2f} requests/question; llama.cpp prompt processing {r['prompt_s']:.1f} s for {r['prompt_n']} tokens")
    print(f"  torch  wall {med['torch']['wall']:6.1f} s, CPU {med['torch']['cpu']:6.1f} s ({n / med['torch']['cpu']:.3f} q per CPU-s)")
    print(f"  after / before: CPU {med['before']['cpu'] / med['after']['cpu']:.2f}x faster, wall {med['before']['wall'] / med['after']['wall']:.2f}x; "
          f"llama.cpp / torch (CPU-s): before {med['torch']['cpu'] / med['before']['cpu']:.2f}x, after {med['torch']['cpu'] / med['after']['cpu']:.2f}x")
    b, a, t = res["before"][0]["records"], res["after"][0]["records"], res["torch"][0]["records"]
    dp = max(abs(x["probs"][L] - y["probs"][L]) for x, y in zip(b, a) for L in x["probs"])
    print(f"  letters after = before {sum(x['pred'] == y['pred'] for x, y in zip(b, a))}/{n}, = torch "
          f"{sum(x['pred'] == y['pred'] for x, y in zip(a, t))}/{n}; max |p_after - p_before| {dp:.1e}")
    print("prompt processing alone (CPU-s, 1 thread): 500 tokens from empty -> tok per CPU-s; 100 tokens after them -> CPU-s")
    for name, (rate, after500) in prefill(Path(args.gguf), args.hf).items():
        print(f"  {name:10s} {rate:6.1f} tok/CPU-s; {after500:.3f} CPU-s")
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
