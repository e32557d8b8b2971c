"""The first answer of `cutegpt chat` on the embedded model from an empty cache: this tree vs an earlier revision.

    python benchmarks/bench_first_chat.py                      # baseline: 6846ac9 (f16 GGUF via a float32 HF folder)
    python benchmarks/bench_first_chat.py --baseline HEAD~3 --runs 3

Each run is a fresh process on a fresh temporary CUTEGPT_CACHE, the question piped on stdin, one thread;
runs of the two trees alternate so both see the same machine load. Printed per tree: median wall time to the
first JSON line on stdout (the first answer), the process's CPU seconds (user + system: less sensitive to other
jobs on a shared machine than wall time), peak RSS, the cache's size afterwards, then the same once more on the
filled cache. The baseline's `src/` is taken from git (`git archive`), so nothing is checked out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from machine import cpu_model  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?\n"


def baseline_src(rev: str, into: Path) -> Path:
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def one_run(src: Path, cache: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "CUTEGPT_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cutegpt", "chat", "--greedy", "--threads", "1", "--max-new-tokens", "16"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    proc.stdin.write(QUESTION)
    proc.stdin.close()
    first = proc.stdout.readline()
    while first and not first.startswith("{"):  # older trees printed their status line on stdout
        first = proc.stdout.readline()
    answer_s = time.perf_counter() - start
    proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or '"answer"' not in first:
        raise SystemExit(f"{src}: chat failed (exit {proc.returncode}): {first!r}")
    return {"answer_s": answer_s, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "cache_mb": folder_bytes(cache) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="6846ac9", help="git revision to compare with")
    ap.add_argument("--runs", type=int, default=2, help="cold runs per tree (alternating)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-first-chat-"))
    try:
        trees = {f"baseline {args.baseline}": baseline_src(args.baseline, work / "baseline"), "this tree": REPO / "src"}
        cold: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        warm: dict[str, dict[str, float]] = {}
        for i in range(args.runs):
            for name, src in trees.items():
                cache = work / f"cache-{i}-{name.split()[0]}"
                cold[name].append(one_run(src, cache))
                if i == args.runs - 1:
                    warm[name] = one_run(src, cache)
                shutil.rmtree(cache, ignore_errors=True)
        print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.1f} at the end; "
              f"one thread; {args.runs} cold runs per tree, medians")
        print(f"{'tree':<22} {'first answer s':>15} {'CPU s':>7} {'peak RSS MB':>12} {'cache MB':>9} | warm: {'answer s':>9} {'CPU s':>6}")
        for name, rows in cold.items():
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(f"{name:<22} {med['answer_s']:>15.1f} {med['cpu_s']:>7.1f} {med['rss_mb']:>12.0f} {med['cache_mb']:>9.0f} | "
                  f"      {warm[name]['answer_s']:>9.1f} {warm[name]['cpu_s']:>6.1f}")
        names = list(cold)
        ratio = statistics.median(r["answer_s"] for r in cold[names[0]]) / statistics.median(r["answer_s"] for r in cold[names[1]])
        cpu_ratio = statistics.median(r["cpu_s"] for r in cold[names[0]]) / statistics.median(r["cpu_s"] for r in cold[names[1]])
        print(f"first answer from an empty cache: {ratio:.1f}x faster (wall), {cpu_ratio:.1f}x less CPU")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
