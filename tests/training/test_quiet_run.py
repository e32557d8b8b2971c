"""What a plain LoRA run prints: no bitsandbytes kernel notice, and a plan line for the dataset's real rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTICE = "Failed to load CPU gemm_4bit_forward"

# On a CPU with AVX512-BF16, importing bitsandbytes (peft imports it whenever it is installed) logs NOTICE unless the
# optional `kernels` package is present. This machine may lack AVX512-BF16: pretend it has it, and hide `kernels`.
SITECUSTOMIZE = '''
import importlib.abc, importlib.util, sys

sys.modules["kernels"] = None  # import kernels -> ImportError, as where it is not installed


class _AVX512BF16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AVX512BF16())
'''


def _env(tmp_path: Path) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                           "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(hook), str(ROOT / "src")]), OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_lora_run_prints_no_bitsandbytes_notice_and_plans_the_datasets_rows(tiny_model_dir, sft_dataset, tmp_path):
    pytest.importorskip("bitsandbytes")
    env = _env(tmp_path)
    # the reference: with the same hook, importing bitsandbytes prints the notice
    ref = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, env=env, timeout=120)
    assert ref.returncode == 0 and NOTICE in ref.stderr, ref.stderr[-2000:]

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "cutegpt", "train", "sft", "--model", str(tiny_model_dir), "--data", str(sft_dataset),
                           "--out", str(out), "--max-steps", "1", "--grad-accum", "1", "--micro-batch", "2", "--precision", "fp32",
                           "--threads", "1", "--report-to", "none"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert NOTICE not in done.stdout + done.stderr
    plan = [line for line in (done.stdout + done.stderr).splitlines() if "memory plan:" in line]
    assert len(plan) == 1 and "micro-batch 2 x 96 tokens" in plan[0], plan  # the dataset's rows, not --max-length 2048
    assert (out / "final").is_dir()
