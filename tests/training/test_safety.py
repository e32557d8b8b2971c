"""Issue 11 for training: resume never mixes runs or trains past the end, nothing is replaced by accident,
broken or hostile files are one sentence naming the file (tiny LLaMA: fast)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest

from cutegpt.config import parse_config
from cutegpt.errors import CuteGPTError
from cutegpt.training import checkpoints, engine, prepare
from cutegpt.training.pt import PTConfig
from cutegpt.training.sft import SFTConfig, run_sft
from tests.training.conftest import QA, encode_samples, read_summary, write_dataset


def _cfg(model_dir, data, out, **kw) -> SFTConfig:
    base = dict(model=str(model_dir), data=[str(data)], out=str(out), micro_batch=2, grad_accum=1, lr=1e-2,
                warmup_steps=0, max_steps=4, save_steps=2, precision="fp32", seed=0, logging_steps=1, threads=1)
    base.update(kw)
    return SFTConfig(**base)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.fixture()
def done_run(tiny_model_dir, sft_dataset, tmp_path):
    out = tmp_path / "run"
    run_sft(_cfg(tiny_model_dir, sft_dataset, out))
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    return out


def test_resume_at_max_steps_says_complete_and_rewrites_nothing(done_run, tiny_model_dir, sft_dataset, capsys):
    before = _digest(done_run)
    summary = engine.train(_cfg(tiny_model_dir, sft_dataset, done_run, resume=True), lambda: pytest.fail("loaded the model"))
    assert "already complete" in capsys.readouterr().out
    assert _digest(done_run) == before
    assert summary["steps"] == 4


def test_resume_refuses_changed_settings_and_data_unless_force(done_run, tiny_model_dir, sft_dataset, tiny_tokenizer, tmp_path):
    with pytest.raises(CuteGPTError, match=r"--lr 0.01 -> 0.02.*--force"):
        run_sft(_cfg(tiny_model_dir, sft_dataset, done_run, resume=True, max_steps=6, lr=2e-2))
    other = write_dataset(tmp_path / "other", tiny_tokenizer, encode_samples(tiny_tokenizer, pairs=QA[:6]), 96)
    with pytest.raises(CuteGPTError, match=r"--data \(the files' contents differ\)"):
        run_sft(_cfg(tiny_model_dir, other, done_run, resume=True, max_steps=6))
    # the rank cannot change inside a run, even with --force
    with pytest.raises(CuteGPTError, match=r"--lora-r 8 -> 16.*cannot change"):
        run_sft(_cfg(tiny_model_dir, sft_dataset, done_run, resume=True, max_steps=6, lora_r=16, force=True))
    run_sft(_cfg(tiny_model_dir, sft_dataset, done_run, resume=True, max_steps=6, lr=2e-2, force=True))
    assert read_summary(done_run)["steps"] == 6


def test_resume_never_trains_past_max_steps(done_run, tiny_model_dir, sft_dataset):
    run_sft(_cfg(tiny_model_dir, sft_dataset, done_run, resume=True, max_steps=5))  # checkpoint-4 -> one step
    steps = [s for s, _ in read_summary(done_run)["loss_curve"]]
    assert max(steps) == 5


def test_truncated_newest_checkpoint_falls_back_and_says_so(done_run, tiny_model_dir, sft_dataset):
    newest = done_run / "checkpoint-4" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    checkpoints.log.addHandler(handler)
    try:
        assert checkpoints.resumable_checkpoint(done_run).name == "checkpoint-2"
    finally:
        checkpoints.log.removeHandler(handler)
    assert any("skipping checkpoint-4" in m and "adapter_model.safetensors" in m and "falling back" in m for m in said), said
    all_tokens = read_summary(done_run)["tokens"]
    shutil.rmtree(done_run / "final")
    (done_run / "summary.json").unlink()
    run_sft(_cfg(tiny_model_dir, sft_dataset, done_run, resume=True))
    summary = read_summary(done_run)
    assert summary["steps"] == 4 and summary["tokens"] == all_tokens  # steps 3-4 trained again, the whole run counted
    assert checkpoints.checkpoint_problem(done_run / "checkpoint-4") is None


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth"])
def test_hostile_checkpoint_file_is_named_and_never_unpickled(done_run, name, capsys):
    for ck in checkpoints.complete_checkpoints(done_run):
        (ck / name).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CuteGPTError) as e:
        checkpoints.resumable_checkpoint(done_run)
    msg = str(e.value)
    assert name in msg and "weights_only=False" not in msg and "\n" not in msg
    assert "pwned" not in capsys.readouterr().out


def test_hostile_resume_lora_adapter_is_one_sentence(done_run, tiny_model_dir, sft_dataset, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(done_run / "final", adapter)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CuteGPTError, match=r"adapter_model.bin holds more than plain tensors") as e:
        run_sft(_cfg(tiny_model_dir, sft_dataset, tmp_path / "run2", resume_lora=str(adapter)))
    assert "weights_only=False" not in str(e.value)
    assert "pwned" not in capsys.readouterr().out


def test_new_run_over_a_finished_one_needs_overwrite_and_keeps_old_final_until_done(done_run, tiny_model_dir, sft_dataset, monkeypatch):
    old = _digest(done_run / "final")
    with pytest.raises(CuteGPTError, match=r"already holds a run \(final, summary.json\).*--overwrite"):
        run_sft(_cfg(tiny_model_dir, sft_dataset, done_run))
    assert _digest(done_run / "final") == old

    def broken(*a, **k):
        raise CuteGPTError("interrupted")

    monkeypatch.setattr(engine, "save_final", broken)  # the new run dies before its final/ is complete
    with pytest.raises(CuteGPTError, match="interrupted"):
        run_sft(_cfg(tiny_model_dir, sft_dataset, done_run, overwrite=True, lr=5e-3))
    assert _digest(done_run / "final") == old
    monkeypatch.undo()
    run_sft(_cfg(tiny_model_dir, sft_dataset, done_run, overwrite=True, lr=5e-3))
    assert _digest(done_run / "final") != old


def test_disk_full_while_saving_is_one_sentence(tiny_model_dir, sft_dataset, tmp_path, monkeypatch):
    from transformers import Trainer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_save_checkpoint", full)
    with pytest.raises(CuteGPTError, match=r"checkpoint-2: failed saving a checkpoint: the disk is full"):
        run_sft(_cfg(tiny_model_dir, sft_dataset, tmp_path / "run"))


def test_epochs_below_one_step(tiny_model_dir, sft_dataset, tmp_path, monkeypatch):
    # refused from the dataset's size alone, before minutes of model loading
    monkeypatch.setattr(prepare, "load_for_training", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(CuteGPTError, match=r"^--epochs 0.1 covers 1.2 of 12 rows, less than one optimizer step"):
        run_sft(_cfg(tiny_model_dir, sft_dataset, tmp_path / "run", max_steps=-1, epochs=0.1))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value,pattern", [
    ("lora_targets", ["q_prj"], r"^--lora-targets q_prj: no such linear layer in this model; valid names: .*q_proj.*v_proj"),
    ("modules_to_save", ["lm_haed"], r"^--modules-to-save lm_haed: no such module in this model; valid names: .*embed_tokens.*lm_head"),
])
def test_misspelled_module_names(tiny_model_dir, sft_dataset, tmp_path, flag, value, pattern):
    with pytest.raises(CuteGPTError, match=pattern):
        run_sft(_cfg(tiny_model_dir, sft_dataset, tmp_path / "run", **{flag: value}))


@pytest.mark.parametrize("value", ["0", "-5", "1"])
def test_pt_max_length_bounds(value):
    with pytest.raises(CuteGPTError, match=r"--max-length"):
        parse_config(PTConfig, ["--data", "x.txt", "--max-length", value], prog="t")


def test_default_keeps_two_checkpoints():
    assert SFTConfig().save_total_limit == 2
