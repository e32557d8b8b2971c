"""A hostile file anywhere a resume would unpickle it (DeepSpeed's global_stepN/*_states.pt, which DeepSpeed loads
with weights_only=False, the Trainer's rng/optimizer/scheduler states, any depth) is refused before anything loads,
naming the file, and never runs. The checkpoints are real: written by DeepSpeed ZeRO-1 and ZeRO-2 on this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cutegpt.errors import CuteGPTError
from cutegpt.training import checkpoints
from cutegpt.training.sft import SFTConfig, run_sft

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--max-steps", "2", "--save-steps", "2", "--micro-batch", "2", "--grad-accum", "1", "--precision", "fp32",
         "--threads", "1"]


class Marker:
    """Unpickling this creates `path`: the proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return env


def _train(model: Path, data: Path, out: Path, stage: int, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "cutegpt", "train", "sft", "--model", str(model), "--data", str(data), "--out", str(out),
            *FLAGS, "--deepspeed", str(ROOT / "configs" / f"ds_zero{stage}_cpu.json"), *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=600)


@pytest.fixture(scope="module", params=[1, 2], ids=["zero1", "zero2"])
def ds_run(request, tiny_model_dir, sft_dataset, tmp_path_factory) -> tuple[int, Path]:
    """A finished one-process DeepSpeed run (no launcher: the process-group variables are set by cutegpt)."""
    out = tmp_path_factory.mktemp(f"zero{request.param}") / "run"
    done = _train(tiny_model_dir, sft_dataset, out, request.param)
    assert done.returncode == 0, done.stderr[-3000:]
    return request.param, out


def _fresh(ds_run, tmp_path: Path) -> Path:
    """A copy of the run without final/ and summary.json, as if killed after its last checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(ds_run[1] / "checkpoint-2", out / "checkpoint-2")
    return out


# Resumes below go on to step 4, so that without the check DeepSpeed and the Trainer would really load the states.
# Every place a resume unpickles: DeepSpeed's model and optimizer states, the Trainer's states, and deeper.
PLACES = ["global_step2/mp_rank_00_model_states.pt", "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
          "rng_state.pth", "scheduler.pt", "optimizer.pt", "global_step2/deeper/still/states.pt",
          "global_step2/no_suffix_states"]


@pytest.mark.slow
def test_real_deepspeed_checkpoints_pass_the_check(ds_run):
    stage, out = ds_run
    ckpt = out / "checkpoint-2"
    states = sorted(p.name for p in (ckpt / "global_step2").iterdir())
    assert states == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert checkpoints.checkpoint_problem(ckpt) is None
    # the allow-list is needed and no wider than DeepSpeed's own classes: without them the optimizer state is refused
    with pytest.raises(CuteGPTError, match="holds more than plain tensors"):
        checkpoints.check_torch_file(ckpt / "global_step2" / states[1], "--resume", deepspeed=False)


@pytest.mark.slow
@pytest.mark.parametrize("place", PLACES)
def test_hostile_file_anywhere_in_a_deepspeed_checkpoint_is_refused_unrun(ds_run, tmp_path, tiny_model_dir, sft_dataset, place):
    stage, _ = ds_run
    out = _fresh(ds_run, tmp_path)
    marker = tmp_path / "pwned"
    target = out / "checkpoint-2" / place
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": Marker(marker)}, target)
    cfg = SFTConfig(model=str(tiny_model_dir), data=[str(sft_dataset)], out=str(out), max_steps=4, save_steps=2, micro_batch=2,
                    grad_accum=1, precision="fp32", threads=1, resume=True,
                    deepspeed=str(ROOT / "configs" / f"ds_zero{stage}_cpu.json"))
    with pytest.raises(CuteGPTError) as e:
        run_sft(cfg)
    msg = str(e.value)
    assert str(target) in msg and "holds more than plain tensors" in msg and "\n" not in msg
    assert not marker.exists()
    assert not (out / "final").exists() and (out / "checkpoint-2").is_dir()  # nothing written, nothing lost


@pytest.mark.slow
def test_latest_pointing_outside_the_checkpoint_is_refused(ds_run, tmp_path):
    out = _fresh(ds_run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "checkpoint-2" / "global_step2", elsewhere)
    torch.save({"module": Marker(tmp_path / "pwned")}, elsewhere / "mp_rank_00_model_states.pt")
    for tag in (str(elsewhere), "../../elsewhere", ".."):
        (out / "checkpoint-2" / "latest").write_text(tag)
        problem = checkpoints.checkpoint_problem(out / "checkpoint-2")
        assert problem and "latest must name a DeepSpeed folder inside checkpoint-2" in problem
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_hostile_deepspeed_state_from_the_command_line(ds_run, tmp_path, tiny_model_dir, sft_dataset):
    """The reported case end to end: `train sft --deepspeed … --resume`, exit code 1, one sentence, no marker."""
    stage, _ = ds_run
    out = _fresh(ds_run, tmp_path)
    marker = tmp_path / "pwned"
    target = out / "checkpoint-2" / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Marker(marker)}, target)
    done = _train(tiny_model_dir, sft_dataset, out, stage, "--resume", "--max-steps", "4")  # 4: DeepSpeed must load
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(target) in last and "Traceback" not in done.stderr
    assert not marker.exists() and not (out / "final").exists()
