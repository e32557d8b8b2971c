"""Two processes under torchrun with DeepSpeed ZeRO-1/2 (gloo on CPU) against one process, same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cutegpt.training.ds_config import free_port
from cutegpt.training.sft import SFTConfig, run_sft
from tests.training.conftest import read_summary

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _common(model_dir: Path, data: Path) -> dict:
    # dropout off: each process draws its own dropout masks, so only a dropout-free run can match exactly
    return dict(model=str(model_dir), data=[str(data)], lr=1e-2, warmup_steps=0, max_steps=STEPS, save_steps=3,
                precision="fp32", seed=0, lora_dropout=0.0, threads=1)


def _torchrun(flags: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "cutegpt", "train", "sft", "--out", str(out)]
    for k, v in flags.items():
        argv.append("--" + k.replace("_", "-"))
        argv += [str(x) for x in v] if isinstance(v, list) else [str(v)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run([*argv, *extra], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def one_process_curve(tiny_model_dir, sft_dataset, tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("one") / "run"
    run_sft(SFTConfig(**_common(tiny_model_dir, sft_dataset), out=str(out), micro_batch=4, grad_accum=1))
    return read_summary(out)["loss_curve"]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ds_zero1_cpu.json", "ds_zero2_cpu.json"])
def test_two_processes_match_one(tiny_model_dir, sft_dataset, tmp_path, one_process_curve, config):
    out = tmp_path / "two"
    flags = dict(_common(tiny_model_dir, sft_dataset), micro_batch=2, grad_accum=1, deepspeed=str(ROOT / "configs" / config))
    _torchrun(flags, out)
    summary = read_summary(out)
    assert summary["processes"] == 2
    assert summary["loss_path"] == "chunked"  # inside the model's forward, so the DeepSpeed engine runs it too
    got = summary["loss_curve"]
    assert [s for s, _ in got] == [s for s, _ in one_process_curve]
    for (_, a), (_, b) in zip(got, one_process_curve):
        assert a == pytest.approx(b, abs=1e-4)
    assert (out / "final" / "adapter_model.safetensors").is_file()

    if config == "ds_zero1_cpu.json":
        # LoRA + DeepSpeed resume: restart from checkpoint-3 and get the same steps 4..6
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
        _torchrun(flags, resumed, "--resume")
        again = dict((s, loss) for s, loss in read_summary(resumed)["loss_curve"])
        for step, loss in got:
            assert again[step] == pytest.approx(loss, abs=1e-6), step


def _argv(flags: dict, out: Path) -> list[str]:
    argv = ["-m", "cutegpt", "train", "sft", "--out", str(out)]
    for k, v in flags.items():
        argv.append("--" + k.replace("_", "-"))
        argv += [str(x) for x in v] if isinstance(v, list) else [str(v)]
    return argv


def _together(commands: list[tuple[list[str], dict]], logs: Path) -> None:
    """Start every process at once (each waits for the others at the rendezvous), then wait for all of them.

    Output goes to files: a full pipe of one process would block it inside a collective and hang the others.
    """
    files = [open(logs / f"node-{i}.log", "w+") for i in range(len(commands))]
    procs = [subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True) for (cmd, env), f in zip(commands, files)]
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, f in zip(procs, files):
        f.seek(0)
        text = f.read()
        f.close()
        assert p.returncode == 0, text[-3000:]


def _launcher_free_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return env


def _check_curve(out: Path, one_process_curve: list) -> None:
    summary = read_summary(out)
    assert summary["processes"] == 2
    got = summary["loss_curve"]
    assert [s for s, _ in got] == [s for s, _ in one_process_curve]
    for (_, a), (_, b) in zip(got, one_process_curve):
        assert a == pytest.approx(b, abs=1e-4)
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_match_one_process(tiny_model_dir, sft_dataset, tmp_path, one_process_curve, launcher):
    """Two launches with node ranks 0 and 1 on the loopback address, as on two machines sharing --out.

    torchrun: `--nnodes 2 --node_rank R`; deepspeed: `--hostfile` (two hosts, one slot each) with `--no_ssh
    --node_rank R`, the same per-node launcher its ssh mode starts on every host, and the usual `--module`
    form that puts `--local_rank=0` in front of our command.
    """
    out = tmp_path / launcher
    flags = dict(_common(tiny_model_dir, sft_dataset), micro_batch=2, grad_accum=1, deepspeed=str(ROOT / "configs" / "ds_zero2_cpu.json"))
    port = str(free_port())
    command = _argv(flags, out)[1:]  # cutegpt train sft ...
    if launcher == "torchrun":
        node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", port]
        command = ["-m", *command]
    else:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
        node = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                "--master_addr", "127.0.0.1", "--master_port", port]
        command = ["--module", *command]
    commands = [([*node, "--node_rank", str(r), *command], _launcher_free_env()) for r in (0, 1)]
    _together(commands, tmp_path)
    _check_curve(out, one_process_curve)


@pytest.mark.slow
def test_two_srun_tasks_without_torchrun_match_one_process(tiny_model_dir, sft_dataset, tmp_path, one_process_curve):
    """What `srun --nodes 2 --ntasks-per-node 1 cutegpt train ...` gives each task: SLURM's variables only."""
    out = tmp_path / "srun"
    flags = dict(_common(tiny_model_dir, sft_dataset), micro_batch=2, grad_accum=1, deepspeed=str(ROOT / "configs" / "ds_zero2_cpu.json"))
    port = str(free_port())
    commands = []
    for rank in (0, 1):
        env = _launcher_free_env()
        env.update(SLURM_JOB_ID="77", SLURM_PROCID=str(rank), SLURM_LOCALID="0", SLURM_NODEID=str(rank),
                   SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_STEP_NODELIST="localhost",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # a free port here; on a cluster the job id picks one
        commands.append(([sys.executable, *_argv(flags, out)], env))
    _together(commands, tmp_path)
    _check_curve(out, one_process_curve)


@pytest.mark.slow
def test_one_process_without_launcher_uses_the_original_deepspeed_file(tiny_model_dir, sft_dataset, tmp_path):
    """`--deepspeed configs/ds_lora_zero1.json` with no launcher: its WarmupLR (1e-4 -> 3e-4, log) drives the rate."""
    import json

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "cutegpt", "train", "sft", "--model", str(tiny_model_dir), "--data", str(sft_dataset),
                           "--out", str(out), "--max-steps", "3", "--grad-accum", "1", "--precision", "fp32", "--num-threads", "1",
                           "--deepspeed", str(ROOT / "configs" / "ds_lora_zero1.json")],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    lrs = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    assert lrs[0] == pytest.approx(1e-4) and lrs[0] < lrs[1] < lrs[2] < 3e-4
    assert read_summary(out)["processes"] == 1


def test_launcher_variables_last_only_for_the_run(monkeypatch):
    """One-process DeepSpeed sets RANK/WORLD_SIZE for itself; afterwards a child of this Python must not see them."""
    from cutegpt.training.ds_config import process_group_env

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")  # a user's own setting survives
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with process_group_env():
        assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"].isdigit()
        assert os.environ["MASTER_ADDR"] == "10.0.0.7"
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what transformers' TrainingArguments does for a DeepSpeed run
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ
    assert os.environ["MASTER_ADDR"] == "10.0.0.7"
    # a later Trainer in this Python (or a child) must not start DeepSpeed: it failed for want of LOCAL_RANK
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ and os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with process_group_env():  # under a real launcher nothing changes
        assert os.environ["RANK"] == "3"
    assert os.environ["RANK"] == "3"
