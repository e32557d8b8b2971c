"""Process memory of the torch runtime per precision: weight bytes beside process RSS.

Each variant loads the embedded model in a fresh process (`--model` to choose another),
runs one forward pass and reports the real bytes of its weights, the process RSS after
loading and the peak RSS. `--baseline-src DIR` also runs the same variants with another
checkout's `src` (e.g. the main branch) first, side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--baseline-src ../main/src]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"}, "int8 quanto": {"load_in_8bit": True}}

CHILD = r"""
import json, re, sys
import torch
torch.set_num_threads(1)
from cutegpt.model.loading import ModelArgs, load_model, weight_bytes
try:
    from cutegpt.model.loading import process_rss
except ImportError:  # an older checkout
    def process_rss():
        import os
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
kw = json.loads(sys.argv[1])
lm = load_model(ModelArgs(device="cpu", **kw))
with torch.no_grad():
    lm.model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))
print(json.dumps({"weights": weight_bytes(lm.model), "rss": process_rss(),
                  # VmHWM, not ru_maxrss (which keeps the parent's peak across fork+exec)
                  "peak": int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024}))
"""


def run(src: Path, kw: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--baseline-src", default=None, help="src folder of another checkout to compare with")
    args = ap.parse_args()
    sides = ([("baseline", Path(args.baseline_src).resolve())] if args.baseline_src else []) + [("this branch", ROOT / "src")]
    print("| code | weights | weight MB | RSS after load MB | peak RSS MB |\n|---|---|---|---|---|")
    for side, src in sides:
        for name, kw in VARIANTS.items():
            r = run(src, dict(kw, model=args.model))
            print(f"| {side} | {name} | {r['weights'] / 1e6:.0f} | {r['rss'] / 2**20:.0f} | {r['peak'] / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
