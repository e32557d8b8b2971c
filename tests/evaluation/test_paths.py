"""Shared data is found beside the repository (or through $CUTEGPT_SHARED), never at one machine's path,
and the benchmark skips with a reason where it is absent."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_bench(monkeypatch, shared: Path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when the script runs: its helpers import by name
    monkeypatch.setenv("CUTEGPT_SHARED", str(shared))
    monkeypatch.delenv("CEVAL_DATA", raising=False)
    spec = importlib.util.spec_from_file_location("bench_eval_under_test", ROOT / "benchmarks" / "bench_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_eval_skips_with_a_reason_without_shared_data(tmp_path, monkeypatch, capsys):
    mod = _load_bench(monkeypatch, tmp_path / "no-shared-here")
    monkeypatch.setattr(sys, "argv", ["bench_eval.py", "--work", str(tmp_path / "work")])
    mod.main()
    out = capsys.readouterr().out
    assert out.startswith("skipped: no C-Eval data at ") and str(tmp_path / "no-shared-here") in out


def test_bench_eval_finds_shared_data_beside_the_repository(tmp_path, monkeypatch):
    mod = _load_bench(monkeypatch, tmp_path / "shared")
    assert mod.SHARED == tmp_path / "shared"
    monkeypatch.delenv("CUTEGPT_SHARED")
    spec = importlib.util.spec_from_file_location("bench_eval_default", ROOT / "benchmarks" / "bench_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.SHARED == ROOT.parent / "shared"


def test_no_machine_paths_in_tests_benchmarks_docs():
    """No absolute path to one machine's shared folder, no citation of files outside the repository."""
    bad = re.compile(r"/work/shared|/work/main|FACTS\.md")
    hits = []
    for folder in ("tests", "benchmarks", "docs"):
        for f in (ROOT / folder).rglob("*"):
            if f.suffix in (".py", ".md", ".yaml", ".yml", ".txt") and f.is_file() and f.name != "test_paths.py":
                for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                    if bad.search(line):
                        hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
