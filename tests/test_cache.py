"""`cutegpt cache`: lists entries with their sizes; --clear removes what it names, after asking, and nothing else."""

from __future__ import annotations

import os
import sys

import pytest

from cutegpt.cli import main


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    files = {"models/smollm2-abc/model.safetensors": 5000, "models/smollm2-abc/config.json": 120,
             "gguf/smollm2-abc.f16.gguf": 3000, "tokenizers/bpe-1/tokenizer.json": 700,
             "datasets/d-1/data/shard.arrow": 2048, "chat_history": 40}
    for rel, size in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * size)
    monkeypatch.setenv("CUTEGPT_CACHE", str(root))
    return root


def _listed(out: str) -> dict[str, str]:
    rows = [line.split() for line in out.splitlines()[1:] if "total" not in line]
    return {row[2]: f"{row[0]} {row[1]}" for row in rows}


def _du(path) -> int:
    """Brute force: every file's size under path."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) if path.is_dir() else path.stat().st_size


def test_lists_every_entry_with_its_size(cache, capsys):
    from cutegpt.cache import human

    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    listed = _listed(out)
    want = {rel: human(_du(cache / rel)) for rel in ("chat_history", "datasets/d-1", "gguf/smollm2-abc.f16.gguf",
                                                       "models/smollm2-abc", "tokenizers/bpe-1")}
    assert listed == want
    assert human(_du(cache)) in out.splitlines()[-1] and "5 entries" in out
    assert human(5120) == "5.0 KB" and human(3 * 2**30) == "3.0 GB" and human(40) == "40 B"


def test_clear_with_yes_keeps_the_chat_history_unless_named(cache, capsys):
    assert main(["cache", "--clear", "--yes"]) == 0
    assert "removed 4 entries" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir() if p.is_file() or any(p.iterdir())) == ["chat_history"]
    assert main(["cache", "--clear", "--yes", "chat_history"]) == 0
    assert not (cache / "chat_history").exists()


def test_clear_names_a_kind_or_one_entry(cache):
    assert main(["cache", "--clear", "-y", "gguf", "tokenizers/bpe-1"]) == 0
    assert not list((cache / "gguf").iterdir()) and not (cache / "tokenizers" / "bpe-1").exists()
    assert (cache / "models" / "smollm2-abc" / "model.safetensors").stat().st_size == 5000  # the rest is untouched


def test_unknown_name_is_one_sentence_and_nothing_is_removed(cache, capsys):
    before = _du(cache)
    assert main(["cache", "--clear", "--yes", "gguf", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 'nosuch' is not in the cache ") and err.count("\n") == 1
    assert _du(cache) == before


def test_clear_asks_first(cache, capsys, monkeypatch):
    before = _du(cache)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    assert main(["cache", "--clear"]) == 1  # no terminal to ask in, no --yes
    assert "add --yes" in capsys.readouterr().err and _du(cache) == before
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    answers = iter(["", "y"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    assert main(["cache", "--clear", "gguf"]) == 0  # Enter = no
    assert "nothing removed" in capsys.readouterr().out and _du(cache) == before
    assert main(["cache", "--clear", "gguf"]) == 0
    assert not list((cache / "gguf").iterdir())


def test_links_are_removed_not_followed(cache, tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"w" * 100)
    (cache / "models" / "linked").symlink_to(model, target_is_directory=True)
    assert main(["cache", "--clear", "--yes", "models"]) == 0
    assert not (cache / "models" / "linked").exists() and (model / "weights.bin").read_bytes() == b"w" * 100


def test_a_running_commands_temporary_folder_is_left_alone(cache):
    live = cache / "gguf" / f".x.gguf.tmp-{os.getpid()}-1"
    dead = cache / "gguf" / ".y.gguf.tmp-999999999-1"
    for p in (live, dead):
        p.write_bytes(b"t")
    assert main(["cache", "--clear", "--yes"]) == 0
    assert live.exists() and not dead.exists()


def test_empty_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "none"))
    assert main(["cache"]) == 0 and "nothing is cached yet" in capsys.readouterr().out
    assert main(["cache", "--clear", "--yes"]) == 0 and "nothing to clear" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()


def test_serve_gguf_of_older_versions_is_listed_as_unused_and_removed_with_its_folder(cache, capsys):
    """serve used to export into serve-gguf/; it shares gguf/ now, so nothing reads that folder any more."""
    from cutegpt.cache import human

    (cache / "serve-gguf" / "smollm2-q8_0-cutegpt").mkdir(parents=True)
    (cache / "serve-gguf" / "smollm2-q8_0-cutegpt" / "model.gguf").write_bytes(b"x" * 4096)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "serve-gguf/smollm2-q8_0-cutegpt" in line)
    assert row.split()[:2] == human(4096).split() and row.endswith("(unused: left by an older cutegpt)")
    assert "`cutegpt cache --clear serve-gguf` removes it" in out.splitlines()[-1]
    assert sum("unused" in line for line in out.splitlines()) == 1  # only that entry is marked
    assert main(["cache", "--clear", "-y", "serve-gguf"]) == 0
    assert not (cache / "serve-gguf").exists() and (cache / "gguf" / "smollm2-abc.f16.gguf").is_file()
    assert main(["cache"]) == 0
    assert "unused" not in capsys.readouterr().out


def test_embedded_folders_of_an_older_tokenizer_rule_are_listed_as_unused(cache, capsys):
    """The embedded model's folder key holds the tokenizer rule: a folder an older rule converted is never read
    again (a stale one had lost SmolLM2's digit split), so it is marked, and the current one is not."""
    from cutegpt.errors import CuteGPTError
    from cutegpt.model.embedded import MODEL_PREFIX, embedded_gguf, embedded_model_target

    try:
        current = embedded_model_target(embedded_gguf()).name
    except CuteGPTError as e:
        pytest.skip(str(e))
    stale = MODEL_PREFIX + "000000000000"
    for name in (current, stale):
        (cache / "models" / name).mkdir(parents=True)
        (cache / "models" / name / "config.json").write_text("{}")
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    marked = [line.split()[2] for line in out.splitlines() if line.endswith("(unused: left by an older cutegpt)")]
    assert marked == [f"models/{stale}"]  # not the current folder, nor models/smollm2-abc (not the embedded prefix)
    assert f"`cutegpt cache --clear models/{stale}` removes it" in out.splitlines()[-1]
    assert main(["cache", "--clear", "-y", f"models/{stale}"]) == 0
    assert not (cache / "models" / stale).exists() and (cache / "models" / current).is_dir()
