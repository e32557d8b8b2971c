"""The hostile-input corpus (made by make_corpus.py at test time) through every command that reads such files.

Two promises, checked separately:
  security   no file runs code: the canary a payload would create never exists (never an xfail);
  messages   exit 1, one line naming the file, no traceback, no "unexpected", never "weights_only=False",
             nothing written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from cutegpt.cli import main
from cutegpt.data.readers import Source
from cutegpt.errors import CuteGPTError
from tests.hostile.make_corpus import DISGUISES, json_cases, payloads, write_json_cases, write_pickles, write_weight_folders

FAMILIES = sorted(payloads(Path("CANARY")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("hostile")
    canary = root / "CANARY"
    write_pickles(root / "pickles", canary)
    c = {"root": root, "canary": canary, "pickles": root / "pickles", "json": write_json_cases(root / "json")}
    c.update(write_weight_folders(root / "weights", tiny_model_dir, canary))
    return c


def _tree(folder: Path) -> dict[str, str]:
    return {str(p): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.rglob("*"))}


def _one_sentence(err: str, name: str | None = None) -> None:
    # the command may have said what it is about to do ("cutegpt: memory plan ..."); the error is one last line
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: "), err[-800:]
    assert all(line.startswith("cutegpt: ") for line in lines[:-1]), err[-800:]
    assert "Traceback" not in err and "unexpected" not in err and "weights_only" not in err, err[-800:]
    if name is not None:
        assert name in err, err


def run_cli(argv, capsys, corpus, work) -> tuple[int, str]:
    before = _tree(work)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert not corpus["canary"].exists(), f"a hostile file ran code: {argv}"
    assert _tree(work) == before, "files changed"
    return code, err


@pytest.fixture()
def work(tmp_path, monkeypatch):
    w = tmp_path / "work"
    w.mkdir()
    monkeypatch.chdir(w)
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    return w


# ---------------------------------------------------------------- every pickle through the reader


@pytest.mark.parametrize("family", FAMILIES)
def test_every_pickle_is_refused_by_the_reader(corpus, family):
    for p in range(6):
        for ext in DISGUISES:
            path = corpus["pickles"] / f"{family}-p{p}{ext}"
            with pytest.raises(CuteGPTError) as e:
                Source(path)
            assert str(path) in str(e.value) and "\n" not in str(e.value)
            assert not corpus["canary"].exists(), f"{path.name} ran code"


def test_the_payloads_are_live(corpus, tmp_path):
    """The corpus is real: a plain unpickler in a child process runs the payload (so the test above can fail)."""
    import subprocess
    import sys

    canary = tmp_path / "LIVE"
    data = payloads(canary)["global_reduce_os_system"][2]
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"], input=data, check=True)
    assert canary.exists()


# ---------------------------------------------------------------- through the commands


def _convert_argv(path, work, model, *extra):
    return ["data", "convert", str(path), "--out", str(work / "ds"), "--model", str(model), "--max-length", "64", *extra]


@pytest.mark.parametrize("family", FAMILIES)
def test_data_convert_refuses_each_family(corpus, family, tiny_model_dir, work, capsys):
    path = corpus["pickles"] / f"{family}-p2.json"
    code, err = run_cli(_convert_argv(path, work, tiny_model_dir), capsys, corpus, work)
    assert code == 1
    _one_sentence(err, path.name)


@pytest.mark.parametrize("ext", DISGUISES)
@pytest.mark.parametrize("protocol", range(6))
def test_data_convert_refuses_each_protocol_and_disguise(corpus, protocol, ext, tiny_model_dir, work, capsys):
    path = corpus["pickles"] / f"global_reduce_exec-p{protocol}{ext}"
    code, err = run_cli(_convert_argv(path, work, tiny_model_dir, "--skip-invalid"), capsys, corpus, work)
    assert code == 1
    _one_sentence(err, path.name)


@pytest.mark.parametrize("name", sorted(json_cases()))
def test_data_convert_json_cases(corpus, name, tiny_model_dir, work, capsys):
    path = corpus["json"][name]
    if "_text" in name:
        pytest.skip("a pre-training text case")
    if name == "lines_named.json":  # JSON Lines named .json is fine
        assert main(_convert_argv(path, work, tiny_model_dir)) == 0
        return
    code, err = run_cli(_convert_argv(path, work, tiny_model_dir, "--max-record-bytes", "100000"), capsys, corpus, work)
    assert code == 1
    _one_sentence(err, name)
    if name != "deep_array.json":  # a whole-file array cannot skip its only value
        assert main(_convert_argv(path, work, tiny_model_dir, "--max-record-bytes", "100000", "--skip-invalid",
                                  "--out", str(work / "skipped"))) == 0
        m = json.loads((work / "skipped" / "manifest.json").read_text())
        assert m["counts"]["records_skipped"] == 1 and m["counts"]["conversations"] == 1


@pytest.mark.parametrize("name", ["deep_array.jsonl", "deep_object.jsonl", "surrogate_text.jsonl", "huge_int_text.jsonl", "not_utf8.jsonl"])
@pytest.mark.parametrize("command", ["vocab train", "train pt"])
def test_text_corpora_refuse_escaping_content(corpus, name, command, tiny_model_dir, work, capsys):
    path = corpus["json"][name]
    if command == "vocab train":
        argv = ["vocab", "train", str(path), "--out", str(work / "zh"), "--model", str(tiny_model_dir), "--vocab-size", "400"]
    else:
        argv = ["train", "pt", "--data", str(path), "--out", str(work / "pt"), "--model", str(tiny_model_dir), "--max-steps", "1",
                "--max-length", "32", "--micro-batch", "1", "--grad-accum", "1", "--threads", "1"]
    code, err = run_cli(argv, capsys, corpus, work)
    assert code == 1
    _one_sentence(err, name)


@pytest.mark.parametrize("family", ["global_reduce_os_system", "inst", "reduce_inside_records"])
def test_train_sft_on_the_fly_refuses_pickles(corpus, family, tiny_model_dir, work, capsys):
    path = corpus["pickles"] / f"{family}-p2.pkl"
    argv = ["train", "sft", "--data", str(path), "--out", str(work / "sft"), "--model", str(tiny_model_dir), "--max-steps", "1",
            "--max-length", "64", "--micro-batch", "1", "--grad-accum", "1", "--threads", "1"]
    code, err = run_cli(argv, capsys, corpus, work)
    assert code == 1
    _one_sentence(err, path.name)


# hostile weights and broken model files: model loading (the lead's model/ and the commands' owners)
WEIGHT_CASES = {
    "chat-model_bin": lambda c, w, m: ["chat", "--model", str(c["model_bin"]), "--input", str(_prompt(w)), "--max-new-tokens", "1"],
    "generate-model_bin": lambda c, w, m: ["generate", str(_prompts(w)), "--model", str(c["model_bin"]), "--out", str(w / "a.jsonl"),
                                           "--max-new-tokens", "1"],
    "export-lora_bin": lambda c, w, m: ["export", "--model", str(m), "--lora", str(c["adapter_bin"]), "--out", str(w / "merged")],
    "chat-lora_bin": lambda c, w, m: ["chat", "--model", str(m), "--lora", str(c["adapter_bin"]), "--input", str(_prompt(w)),
                                      "--max-new-tokens", "1"],
    "vocab_extend-model_bin": lambda c, w, m: ["vocab", "extend", "--model", str(c["model_bin"]), "--pieces", str(c["model_bin"]),
                                               "--out", str(w / "ext")],
    "chat-config_big": lambda c, w, m: ["chat", "--model", str(c["config_big"]), "--input", str(_prompt(w)), "--max-new-tokens", "1"],
    "export-adapter_list": lambda c, w, m: ["export", "--model", str(m), "--lora", str(c["adapter_list"]), "--out", str(w / "merged")],
    "train_sft-resume_lora_bin": lambda c, w, m: ["train", "sft", "--model", str(m), "--resume-lora", str(c["adapter_bin"]), "--data",
                                                  str(_conv(w)), "--out", str(w / "sft"), "--max-steps", "1", "--max-length", "64",
                                                  "--micro-batch", "1", "--grad-accum", "1", "--threads", "1"],
}
# Filled from a run: message problems outside the safety helper's area (the canary check still runs and must pass).
WEIGHT_KNOWN: dict[str, str] = {}


def _prompt(w: Path) -> Path:
    p = w.parent / "chat.txt"
    p.write_text("hi\n")
    return p


def _prompts(w: Path) -> Path:
    p = w.parent / "prompts.jsonl"
    p.write_text('{"instruction": "hi"}\n')
    return p


def _conv(w: Path) -> Path:
    p = w.parent / "conv.jsonl"
    p.write_text(json.dumps({"instruction": "中国的首都是哪里？", "output": "北京。"}, ensure_ascii=False) + "\n")
    return p


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_hostile_weights_never_run_code(corpus, case, tiny_model_dir, work, capsys):
    argv = WEIGHT_CASES[case](corpus, work, tiny_model_dir)
    main(argv)
    capsys.readouterr()
    assert not corpus["canary"].exists(), f"a hostile weights file ran code: {case}"
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=WEIGHT_KNOWN[c])) if c in WEIGHT_KNOWN else c
                                  for c in sorted(WEIGHT_CASES)])
def test_hostile_weights_one_sentence(corpus, case, tiny_model_dir, work, capsys):
    argv = WEIGHT_CASES[case](corpus, work, tiny_model_dir)
    code, err = run_cli(argv, capsys, corpus, work)
    assert code == 1, err[-500:]
    _one_sentence(err)
