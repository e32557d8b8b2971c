"""Chat speed with the default `--threads` (auto) against fixed counts, on an idle and a loaded machine.

    python benchmarks/bench_threads.py [--backend llamacpp|torch] [--tokens 64] [--repeats 3]

Runs `cutegpt chat` non-interactively (one question on stdin, greedy, a fixed number of tokens,
--ignore-eos) for --threads 0 (auto), 1 and every core, first on the idle machine, then while the
benchmark itself keeps every core busy with spinning processes (the shared-machine case that made
two threads 3-7x slower than one). Prints decode tokens/s and time to first token, medians of
--repeats runs, and the auto setting's ratio to the best fixed count of the same condition.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time


def spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def run_chat(threads: int, backend: str, tokens: int) -> tuple[float, float]:
    argv = [sys.executable, "-m", "cutegpt", "chat", "--backend", backend, "--threads", str(threads), "--greedy",
            "--max-new-tokens", str(tokens), "--ignore-eos", "--quiet"]
    done = subprocess.run(argv, input="Explain why the sky is blue.\n", capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-1000:])
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return record["tokens_per_second"], record["time_to_first_token"]


def measure(label: str, counts: list[int], a: argparse.Namespace) -> dict[int, tuple[float, float]]:
    per: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
    for _ in range(a.repeats):
        for n in counts:  # interleaved: a change of load hits every setting alike
            per[n].append(run_chat(n, a.backend, a.tokens))
    out = {n: (statistics.median(v[0] for v in xs), statistics.median(v[1] for v in xs)) for n, xs in per.items()}
    best = max(out[n][0] for n in counts if n > 0)
    for n in counts:
        name = "auto (0)" if n == 0 else str(n)
        print(f"| {label} | {name} | {out[n][0]:.1f} | {out[n][1]:.3f} | {out[n][0] / best:.2f} |", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="llamacpp", choices=["llamacpp", "torch"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    counts = sorted({0, 1, cores})
    run_chat(1, a.backend, 4)  # warm-up: the first start converts/caches the model
    print(f"backend {a.backend}, {a.tokens} greedy tokens, {cores} cores, medians of {a.repeats}")
    print("| machine | --threads | decode tok/s | time to first token (s) | vs best fixed |")
    print("|---|---|---|---|---|")
    measure("idle", counts, a)
    procs = [mp.Process(target=spin, args=(time.time() + 3600,), daemon=True) for _ in range(cores)]
    for p in procs:
        p.start()
    try:
        time.sleep(65)  # let the 1-minute load average see the load, as a real shared machine's would
        measure(f"loaded ({cores} spinning processes)", counts, a)
    finally:
        for p in procs:
            p.terminate()


if __name__ == "__main__":
    main()
