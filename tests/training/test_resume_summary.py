"""A resume is never silent: killed after the last checkpoint, `--resume` writes the missing final/ and summary.json;
after any resume summary.json counts the whole run (tokens and seconds), as if it had never stopped."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from cutegpt.training import checkpoints
from cutegpt.training.sft import SFTConfig, run_sft
from tests.training.conftest import read_summary


def _cfg(model_dir, data, out, **kw) -> SFTConfig:
    base = dict(model=str(model_dir), data=[str(data)], out=str(out), micro_batch=2, grad_accum=1, lr=1e-2,
                warmup_steps=0, max_steps=4, save_steps=2, precision="fp32", seed=0, logging_steps=1, threads=1)
    base.update(kw)
    return SFTConfig(**base)


@pytest.fixture(scope="module")
def whole_run(tiny_model_dir, sft_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run_sft(_cfg(tiny_model_dir, sft_dataset, out))
    return out


def test_killed_after_the_last_checkpoint_resume_writes_final_and_summary(whole_run, tiny_model_dir, sft_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(whole_run / "checkpoint-4", out / "checkpoint-4")  # what a kill between checkpoint and final/ leaves
    run_sft(_cfg(tiny_model_dir, sft_dataset, out, resume=True))
    assert "left as they are" not in capsys.readouterr().out
    summary = read_summary(out)
    reference = read_summary(whole_run)
    assert summary["steps"] == 4 and summary["tokens"] == reference["tokens"]
    assert summary["loss_curve"] == reference["loss_curve"]
    got = load_file(out / "final" / "adapter_model.safetensors")
    want = load_file(whole_run / "checkpoint-4" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    # and now that it is finished, a second resume changes nothing
    before = (out / "summary.json").read_bytes()
    run_sft(_cfg(tiny_model_dir, sft_dataset, out, resume=True))
    assert "already complete" in capsys.readouterr().out and (out / "summary.json").read_bytes() == before


def test_summary_after_a_resume_counts_the_whole_run(whole_run, tiny_model_dir, sft_dataset, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole_run / "checkpoint-2", out / "checkpoint-2")
    progress = json.loads((out / "checkpoint-2" / checkpoints.RUN_FILE).read_text())["progress"]
    reference = read_summary(whole_run)
    assert 0 < progress["tokens"] < reference["tokens"] and progress["seconds"] > 0
    run_sft(_cfg(tiny_model_dir, sft_dataset, out, resume=True))
    summary = read_summary(out)
    assert summary["tokens"] == reference["tokens"]  # not only steps 3-4
    assert summary["seconds"] > progress["seconds"]
    assert summary["tokens_per_second"] == pytest.approx(summary["tokens"] / summary["seconds"], rel=0.01)
