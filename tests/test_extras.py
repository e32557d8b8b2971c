"""The core install runs chat, generate, serve, export and eval without the train extra; a command that needs
the extra says so in one sentence with the pip line, before anything is written.

A missing package is simulated by `sys.modules[name] = None` in a fresh interpreter (Python then refuses to
import it, as when it is not installed), so the test needs no second virtual environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cutegpt.extras import OPTIONAL

REPO = Path(__file__).resolve().parents[1]
CORE_COMMANDS = ("cutegpt.chat.cli", "cutegpt.chat.batch", "cutegpt.serve.cli", "cutegpt.export.cli",
                 "cutegpt.evaluation.cli", "cutegpt.vocab.train", "cutegpt.vocab.extend", "cutegpt.cli")


def _python(code: str, block: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + (f"for m in {sorted(OPTIONAL)!r}: sys.modules[m] = None\n" if block else "")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=cwd)


def test_core_command_modules_import_no_training_package():
    code = ("import importlib\n"
            f"for m in {CORE_COMMANDS!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {sorted(OPTIONAL)!r} if sys.modules.get(m) is not None))")
    proc = _python(code, block=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # none was imported, even where installed
    blocked = _python(code)
    assert blocked.returncode == 0, blocked.stderr  # and they import where none is installed


@pytest.mark.slow  # a real generate and export in a fresh interpreter: tens of seconds on a loaded machine
def test_generate_and_export_run_without_the_train_extra(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "你好"}) + "\n", encoding="utf-8")
    generate = ["generate", str(prompts), "--model", str(tiny_model_dir), "--out", str(tmp_path / "a.jsonl"),
                "--greedy", "--max-new-tokens", "4", "--threads", "1", "--template", "cutegpt"]
    export = ["export", "--format", "gguf", "--model", str(tiny_model_dir), "--out", str(tmp_path / "m.gguf"),
              "--quant", "f16", "--no-verify"]
    proc = _python(f"from cutegpt.cli import main\nsys.exit(main({generate!r}) or main({export!r}))", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "a.jsonl").read_text(encoding="utf-8"))["new_tokens"] >= 1
    assert (tmp_path / "m.gguf").stat().st_size > 0


CASES = [  # (arguments, the package named): one interpreter runs them all (each import of torch costs seconds)
    (["train", "sft", "--data", "DATA", "--out", "OUT"], "accelerate"),
    (["train", "dpo", "--data", "DATA", "--out", "OUT"], "accelerate"),
    (["data", "convert", "DATA", "--out", "OUT"], "datasets"),
    (["recipe", "--out", "OUT"], "accelerate"),
    (["chat", "--model", "MODEL", "--lora", "DATA", "--input", "DATA"], "peft"),
]


def test_a_command_needing_the_train_extra_says_so(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    runs = [[str(data) if a == "DATA" else str(out) if a == "OUT" else str(tiny_model_dir) if a == "MODEL" else a for a in args]
            for args, _package in CASES]
    code = ("import contextlib, io, json\nfrom cutegpt.cli import main\nresults = []\n"
            f"for args in {runs!r}:\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        rc = main(args)\n"
            "    results.append([rc, err.getvalue()])\n"
            "print(json.dumps(results))")
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for (args, package), (rc, stderr) in zip(CASES, json.loads(proc.stdout.strip().splitlines()[-1])):
        lines = stderr.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), (args, stderr)
        assert f"needs {package}, which the train extra installs: pip install 'cutegpt[train]'" in lines[0], (args, stderr)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_a_missing_module_deep_inside_a_command_names_the_extra(tmp_path):
    """Where no up-front check knew (a lazy import of an optional package), the CLI still gives the pip line."""
    code = ("import cutegpt.cli as c\n"
            "c.COMMANDS[('boom',)] = ('tests.test_extras', 'BoomConfig', 'run_boom', 'x')\n"
            "sys.exit(c.main(['boom']))")
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: cutegpt boom needs optimum-quanto, which the train extra installs: "
                                   "pip install 'cutegpt[train]' (in a clone: pip install -e '.[train]').")


@dataclass
class BoomConfig:  # a command whose body imports an optional package lazily (as --load-in-8bit does)
    pass


def run_boom(cfg: BoomConfig) -> int:
    from optimum.quanto import qint8  # noqa: F401

    return 0


def test_pyproject_extras():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    extras = project["optional-dependencies"]
    train = {d.split(">")[0].split("=")[0].strip() for d in extras["train"]}
    for module, (package, extra) in OPTIONAL.items():
        assert package not in core, f"{package} is in the core install"
        assert package in train, f"{package} ({module}) is not in the {extra} extra"
    assert "cutegpt[train]" in extras["test"] and "cutegpt[train]" in extras["all"]
