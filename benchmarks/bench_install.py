"""Size and install time of a fresh virtual environment for the core install and each extra.

    python benchmarks/bench_install.py                 # core, [train], [all]
    python benchmarks/bench_install.py --extras core train

Each venv is made with `python -m venv`, then `pip install torch==2.13.0` (the README's first step: the CPU wheel
where it resolves to one), then `pip install -e "REPO[extra]"`; printed: seconds of each step, the number of
packages and the venv's size on disk (torch included, then without it). Uses pip's configured indexes and cache,
as a user's machine would; the venvs are removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from machine import cpu_model  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]


def size(path: Path) -> int:
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def one(extra: str, work: Path) -> dict[str, float]:
    venv = work / extra
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    torch_s = run([py, "-m", "pip", "install", "-q", "torch==2.13.0"])
    site = next((venv / "lib").glob("python*/site-packages"))
    torch_bytes = size(site)
    spec = str(REPO) if extra == "core" else f"{REPO}[{extra}]"
    rest_s = run([py, "-m", "pip", "install", "-q", "-e", spec])
    n = len(subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True).stdout.splitlines())
    total = size(venv)
    ok = subprocess.run([py, "-c", "import cutegpt.chat.cli, cutegpt.serve.cli, cutegpt.export.cli, cutegpt.evaluation.cli"],
                        capture_output=True, text=True, cwd=work).returncode == 0
    shutil.rmtree(venv, ignore_errors=True)
    return {"torch_s": torch_s, "rest_s": rest_s, "packages": n, "total_gb": total / 1e9, "rest_gb": (total - torch_bytes) / 1e9,
            "imports_ok": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extras", nargs="+", default=["core", "train", "all"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-install-"))
    rows = {}
    try:
        for extra in args.extras:
            rows[extra] = one(extra, work)
            print(extra, rows[extra], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.1f}; Python {platform.python_version()}")
    print(f"{'install':<8} {'torch s':>8} {'pip install -e s':>17} {'packages':>9} {'venv GB':>8} {'without torch GB':>17}")
    for extra, r in rows.items():
        print(f"{extra:<8} {r['torch_s']:>8.0f} {r['rest_s']:>17.0f} {r['packages']:>9} {r['total_gb']:>8.2f} {r['rest_gb']:>17.2f}"
              + ("" if r["imports_ok"] else "  (core command modules failed to import!)"))


if __name__ == "__main__":
    main()
