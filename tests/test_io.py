"""Atomic writes: an error (or Ctrl-C) leaves neither a half-written result nor a temporary file."""

import pytest

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
