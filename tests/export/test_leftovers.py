"""A GGUF export killed mid-way leaves nothing for good: SIGTERM unwinds and removes its temporary file and LoRA merge;
after SIGKILL the next export into the same place removes them (their process is gone), never a live run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.export import gguf as gx

ROOT = Path(__file__).resolve().parents[2]

# Runs `cutegpt export` with write_gguf stopped half-way (after a first chunk), so the test can kill it there.
STUCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import cutegpt.export.gguf as gx

    def stuck(plan, path, progress=True):
        Path(path).write_bytes(b"GGUF" + bytes(4096))
        Path(sys.argv[1]).write_text("writing")
        time.sleep(300)

    gx.write_gguf = stuck
    from cutegpt.cli import main
    raise SystemExit(main(sys.argv[2:]))
""")


@pytest.fixture(scope="module")
def adapter(bpe_dir, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bpe_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(out)
    return out


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _start_stuck(tmp_path: Path, bpe_dir: Path, adapter: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    script, flag = tmp_path / "stuck.py", tmp_path / "writing"
    script.write_text(STUCK)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(flag), "export", "--format", "gguf", "--model", str(bpe_dir),
                             "--lora", str(adapter), "--out", str(out), "--quant", "f32", "--no-verify", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.2)
    return proc, flag


def test_leftovers_of_dead_exports_go_and_a_live_ones_stay(bpe_dir, tmp_path):
    dead, live = _dead_pid(), os.getpid()
    (tmp_path / f".m.gguf.tmp-{dead}-x1y2").write_bytes(b"GGUF" + bytes(1000))
    (tmp_path / f".m.gguf.tmp-{dead}-merge-abc").mkdir()
    (tmp_path / f".m.gguf.tmp-{dead}-merge-abc" / "model.safetensors").write_bytes(bytes(1000))
    (tmp_path / f".other.gguf.tmp-{live}-q").write_bytes(b"at work")
    gx.export_gguf(str(bpe_dir), tmp_path / "m.gguf", quant="f32", verify=False, progress=False)
    assert _hidden(tmp_path) == [f".other.gguf.tmp-{live}-q"]
    assert (tmp_path / "m.gguf").stat().st_size > 1000


@pytest.mark.slow
def test_sigkill_leftovers_are_removed_by_the_next_export(bpe_dir, adapter, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc, _ = _start_stuck(tmp_path, bpe_dir, adapter, out_dir / "m.gguf")
    proc.kill()
    proc.communicate()
    left = _hidden(out_dir)
    assert any(".tmp-" in n and "-merge-" in n for n in left) and any("-merge-" not in n for n in left), left
    gx.export_gguf(str(bpe_dir), out_dir / "m.gguf", lora=str(adapter), quant="f32", verify=False, progress=False)
    assert _hidden(out_dir) == [] and (out_dir / "m.gguf").is_file()


@pytest.mark.slow
def test_sigterm_removes_the_merge_and_the_partial_file(bpe_dir, adapter, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc, _ = _start_stuck(tmp_path, bpe_dir, adapter, out_dir / "m.gguf")
    assert any("-merge-" in n for n in _hidden(out_dir))  # the float32 merge exists while the export writes
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "terminated; nothing half-written was kept." in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_lora_merge_is_removed_when_the_export_fails(bpe_dir, adapter, tmp_path, monkeypatch):
    def interrupted(plan, path, progress=True):
        assert any("-merge-" in n for n in _hidden(tmp_path))
        raise KeyboardInterrupt

    monkeypatch.setattr(gx, "write_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gx.export_gguf(str(bpe_dir), tmp_path / "m.gguf", lora=str(adapter), quant="f32", verify=False, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_short_write_is_reported_as_a_full_disk(bpe_dir, tmp_path, monkeypatch):
    """numpy's tofile says "N requested and M written" (no errno) when the disk fills up."""
    import numpy as np

    def short(plan, path, progress=True):
        with open(path, "wb") as f:
            f.write(b"GGUF")
        with open("/dev/full", "wb") as full:  # the real error numpy raises on a full disk
            np.zeros(4800, dtype=np.float32).tofile(full)

    monkeypatch.setattr(gx, "write_gguf", short)
    with pytest.raises(CuteGPTError) as e:
        gx.export_gguf(str(bpe_dir), tmp_path / "m.gguf", quant="f32", verify=False, progress=False)
    assert f"the disk is full while writing {tmp_path / 'm.gguf'}" in str(e.value) and "requested" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
