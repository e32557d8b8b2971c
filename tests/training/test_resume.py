"""SIGKILL a run after a checkpoint, `--resume`, and the rest of the loss curve is the uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cutegpt.training import checkpoints
from cutegpt.training.sft import SFTConfig, run_sft
from tests.training.conftest import read_summary

STEPS = 30


def _flags(model_dir: Path, data: Path, out: Path) -> dict:
    # dropout stays on (0.05): the resumed run must restore the RNG too
    return dict(model=str(model_dir), data=[str(data)], out=str(out), micro_batch=2, grad_accum=1, lr=1e-2,
                warmup_steps=5, lr_scheduler="linear", max_steps=STEPS, save_steps=4, save_total_limit=2,
                precision="fp32", seed=3, threads=1)


def _argv(flags: dict) -> list[str]:
    argv = []
    for k, v in flags.items():
        argv.append("--" + k.replace("_", "-"))
        argv += [str(x) for x in v] if isinstance(v, list) else [str(v)]
    return argv


def test_sigkill_then_resume_reproduces_the_curve(tiny_model_dir, sft_dataset, tmp_path):
    ref = tmp_path / "ref"
    run_sft(SFTConfig(**_flags(tiny_model_dir, sft_dataset, ref)))
    want = dict((s, loss) for s, loss in read_summary(ref)["loss_curve"])

    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "cutegpt", "train", "sft", *_argv(_flags(tiny_model_dir, sft_dataset, out))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while not checkpoints.complete_checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "summary.json").exists(), "the run finished before it was killed"
    last = checkpoints.complete_checkpoints(out)[-1]
    k = int(last.name.split("-")[1])
    assert k < STEPS - 2  # some steps are left to compare

    run_sft(SFTConfig(**_flags(tiny_model_dir, sft_dataset, out), resume=True))
    got = dict((s, loss) for s, loss in read_summary(out)["loss_curve"])
    assert sorted(got) == sorted(want)
    for step in range(k + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
