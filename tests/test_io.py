"""Atomic writes: an error (or Ctrl-C) leaves neither a half-written result nor a temporary file."""

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.io import atomic_dir, atomic_file


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_leaves_nothing_on_error(tmp_path, error):
    with pytest.raises(error):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise error
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_existing_unless_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "answers.jsonl"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as f:
            f.write("partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]


def test_files_get_the_umask_mode(tmp_path):
    """transformers writes weights 0600; a finished output folder is readable by others (umask 022 here)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            os.chmod(tmp / "model.safetensors", 0o600)
        mode = stat.S_IMODE((tmp_path / "model" / "model.safetensors").stat().st_mode)
        assert mode == 0o644
        assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    finally:
        os.umask(old)


def test_leftovers_of_dead_runs_are_cleaned(tmp_path):
    import os

    dead = 2**22 + 12345  # above the default pid_max: never a live process
    (tmp_path / f".run.old-{dead}").mkdir()
    (tmp_path / f".run.tmp-{dead}-abcd").mkdir()
    (tmp_path / f".run.tmp-{os.getpid()}-live").mkdir()  # ours: still at work
    (tmp_path / "notes.txt").write_text("keep")
    with atomic_dir(tmp_path / "other") as tmp:
        (tmp / "x").write_text("x")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".run.tmp-{os.getpid()}-live", "notes.txt", "other"]


def test_disk_full_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from cutegpt.errors import CuteGPTError

    target = tmp_path / "answers.jsonl"
    target.write_text("old\n")

    class Full:
        def write(self, _text):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CuteGPTError) as e:
        with atomic_file(target) as f:
            Full().write("x")
    assert str(target) in str(e.value) and "disk is full" in str(e.value)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]


def test_check_output_refuses_what_would_destroy_data(tmp_path):
    from cutegpt.errors import CuteGPTError
    from cutegpt.io import check_output

    data = tmp_path / "data"
    data.mkdir()
    (data / "in.jsonl").write_text("{}\n")
    cases = {
        str(data / "in.jsonl"): "is the input",
        str(tmp_path): "contains the input",
        str(data / "sub"): "lies inside the input folder",
        str(data): "contains the input",
    }
    for out, words in cases.items():
        with pytest.raises(CuteGPTError) as e:
            check_output(out, inputs=[data / "in.jsonl", data if out == str(data / "sub") else None], overwrite=True)
        assert words in str(e.value), (out, str(e.value))
    (tmp_path / "old").mkdir()
    with pytest.raises(CuteGPTError, match="already exists; pass --overwrite"):
        check_output(tmp_path / "old", inputs=[data / "in.jsonl"])
    with pytest.raises(CuteGPTError, match="is a file; it must be a folder"):
        check_output(data / "in.jsonl", kind="folder", overwrite=True)
    assert check_output(tmp_path / "old", overwrite=True) == tmp_path / "old"
    assert check_output(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"


def test_torch_save_on_a_full_disk_is_one_sentence(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError "[enforce fail ...] unexpected pos" (here from /dev/full)."""
    import collections
    import shutil as _shutil

    import torch

    from cutegpt import io as cio

    target = tmp_path / "checkpoint-2"
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))  # the disk is now full
    with pytest.raises(CuteGPTError) as e:
        with cio.os_errors(target, "saving a checkpoint"):
            torch.save({"w": torch.zeros(10_000)}, "/dev/full")
    assert str(e.value) == f"{target}: failed saving a checkpoint: the disk is full; free some space (nothing was left half-written)."
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage(10 << 30, 1 << 30, 9 << 30))  # space left: another fault
    with pytest.raises(CuteGPTError, match=r"failed saving a checkpoint: the write failed \(an I/O error\)"):
        with cio.os_errors(target, "saving a checkpoint"):
            torch.save({"w": torch.zeros(10_000)}, "/dev/full")
