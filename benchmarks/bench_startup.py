"""Start-up time of the command line, this checkout against an earlier commit, side by side.

    python benchmarks/bench_startup.py [--before 028845c] [--repeats 5]

Times `cutegpt --help`, `cutegpt chat --help`, a bad flag (`cutegpt train sft --lr -1`) and the
time until `cutegpt chat` shows its first `>>>` prompt (in a pseudo-terminal, embedded model
already converted), for each source tree. The earlier commit is checked out into a temporary git
worktree and run with PYTHONPATH pointing at its src/, so both use the same installed libraries.
Medians of --repeats runs, interleaved.
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(src: Path, argv: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(src))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cutegpt", *argv], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    return time.perf_counter() - t


def first_prompt(src: Path, extra: list[str]) -> float:
    """Seconds until the interactive chat prints its `>>>` prompt."""
    env = dict(os.environ, PYTHONPATH=str(src), TERM="dumb")
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "cutegpt", "chat", *extra], env)
    t = time.perf_counter()
    seen = b""
    try:
        while time.perf_counter() - t < 300:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
                if b">>>" in seen:
                    return time.perf_counter() - t
        return float("nan")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="028845c", help="git commit to compare with")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chat-args", default="", help="extra flags for the time-to-first-prompt runs")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), a.before],
                       check=True, capture_output=True)
        try:
            trees = {f"before ({a.before})": old / "src", "now": REPO / "src"}
            cases = {"cutegpt --help": ["--help"], "cutegpt chat --help": ["chat", "--help"],
                     "cutegpt train sft --lr -1": ["train", "sft", "--lr", "-1"]}
            rows: dict[str, dict[str, list[float]]] = {c: {t: [] for t in trees} for c in [*cases, "chat: first prompt"]}
            for _ in range(a.repeats):
                for tname, src in trees.items():
                    for cname, argv in cases.items():
                        rows[cname][tname].append(timed(src, argv))
                    rows["chat: first prompt"][tname].append(first_prompt(src, a.chat_args.split()))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)
    names = list(trees)
    print(f"| command | {' | '.join(names)} | ratio |")
    print("|---|" + "---|" * (len(names) + 1))
    for cname, per in rows.items():
        med = [statistics.median(per[n]) for n in names]
        print(f"| `{cname}` | " + " | ".join(f"{m:.2f} s" for m in med) + f" | {med[0] / med[-1]:.1f}x |")


if __name__ == "__main__":
    main()
