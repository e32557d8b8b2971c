"""`--threads 0` (auto): the cores other processes leave free, measured now, not a minute ago."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from cutegpt import threads


@pytest.mark.parametrize("busy, cores, want", [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.9, 2, 1), (5.0, 2, 1), (2.2, 8, 6)])
def test_auto_takes_the_free_cores(monkeypatch, busy, cores, want):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores", lambda window=0.2: busy)
    assert threads.resolve_threads(0) == want
    assert threads.resolve_threads(3) == 3  # an explicit count is never second-guessed


def test_falls_back_to_the_load_average(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda window=0.2: None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.8, 0.0, 0.0))
    assert threads.resolve_threads(0) == 1


def _spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def test_busy_cores_sees_a_spinning_process():
    if threads.busy_cores(0.05) is None:
        pytest.skip("no /proc/stat on this system")
    proc = mp.Process(target=_spin, args=(3.0,))
    proc.start()
    try:
        time.sleep(0.3)
        assert threads.busy_cores(0.5) >= 0.7  # one core kept busy by the spinner (plus whatever else runs)
    finally:
        proc.terminate()
        proc.join()


def test_every_command_that_computes_has_threads():
    """One `--threads` flag on every command that runs a model, a tokenizer or a trainer (issue 13, item 1)."""
    import dataclasses
    import importlib

    from cutegpt.cli import COMMANDS

    # counts, one sample, file sizes: nothing to parallelise; the llama.cpp build runs no model (its compiler takes --jobs)
    reads_only = {("data", "stats"), ("data", "show"), ("cache",), ("llamacpp", "build")}
    missing = []
    for words, (module, cls, *_rest) in COMMANDS.items():
        fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
        if words not in reads_only and "threads" not in fields:
            missing.append(" ".join(words))
    assert not missing, missing


def test_tokenizer_threads_follow_the_flag(monkeypatch):
    import os

    for var in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
        monkeypatch.setenv(var, "x")  # recorded, so both are restored (or removed) after the test
        monkeypatch.delenv(var)
    with threads.tokenizer_threads(1) as n:
        assert n == 1 and os.environ["RAYON_NUM_THREADS"] == "1" and os.environ["RAYON_RS_NUM_CPUS"] == "1"
    assert "RAYON_NUM_THREADS" not in os.environ and "RAYON_RS_NUM_CPUS" not in os.environ  # for the command only
    monkeypatch.setenv("RAYON_NUM_THREADS", "7")
    with threads.tokenizer_threads(1):
        assert os.environ["RAYON_NUM_THREADS"] == "7"  # the user's own setting wins
