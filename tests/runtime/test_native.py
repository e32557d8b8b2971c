"""Which llama.cpp loads (a native build from `cutegpt llamacpp build` or the wheel), on fake build folders, and
the build command's refusals. Nothing is compiled here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cutegpt.cli import main
from cutegpt.errors import CuteGPTError
from cutegpt.runtime.native import Choice, build_folder, choose, cpu_key, mode_from_env, progress_step, wheel_version

SRC = Path(__file__).resolve().parents[2] / "src"


def fake_build(root: Path, version: str, cpu: str, body: str = "FAKE_NATIVE = True\n") -> Path:
    """A build folder as `cutegpt llamacpp build` leaves it, whose xllamacpp package is `body`."""
    folder = build_folder(root, version, cpu)
    (folder / "site" / "xllamacpp").mkdir(parents=True)
    (folder / "site" / "xllamacpp" / "__init__.py").write_text(body, encoding="utf-8")
    (folder / "build.json").write_text(json.dumps({"xllamacpp": version, "cpu": cpu}), encoding="utf-8")
    return folder


def test_choice_table(tmp_path):
    root = tmp_path / "cache"
    assert choose("auto", root, "1.0", "cpuA") == Choice(None)  # nothing built: the wheel, silently
    assert choose("native", root, None, "cpuA") == Choice(None)  # no xllamacpp at all: the import error says so
    missing = choose("native", root, "1.0", "cpuA")
    assert missing.site is None and "cutegpt llamacpp build" in missing.note and "CUTEGPT_LLAMACPP=native" in missing.note
    built = fake_build(root, "1.0", "cpuA")
    assert choose("auto", root, "1.0", "cpuA") == Choice(built / "site")
    assert choose("native", root, "1.0", "cpuA") == Choice(built / "site")
    assert choose("wheel", root, "1.0", "cpuA") == Choice(None)
    assert choose("auto", root, "1.0", "cpuB") == Choice(None)  # another machine sharing the cache: its own key, silent
    upgraded = choose("auto", root, "2.0", "cpuA")  # xllamacpp upgraded after the build: said even in auto
    assert upgraded.site is None and "xllamacpp-1.0-cpuA" in upgraded.note and "2.0" in upgraded.note
    (built / "build.json").unlink()  # a build killed before it finished is not a build
    assert choose("auto", root, "1.0", "cpuA").site is None


def test_progress_prints_each_tenth_once_and_the_restart_of_a_second_target():
    lines = ["-- Configuring done", "  [ 50%] Building CXX object build-info.cpp.o", "  [100%] Linking CXX static library",
             "  [100%] Built target llama-common-base", "  [  3%] Built target llama-common-base", "  [  6%] Building C object ggml.c.o",
             "  [ 12%] Building CXX object ggml-cpu.cpp.o", "  [ 18%] Building CXX object ops.cpp.o", "gcc -O3 -march=native"]
    shown, printed = -10, []
    for line in lines:
        step = progress_step(line, shown)
        if step is not None:
            shown = step
            printed.append(step)
    assert printed == [50, 100, 0, 10]


def test_cpu_key_is_stable_and_short():
    assert cpu_key() == cpu_key() and len(cpu_key()) == 10


def test_mode_from_env(monkeypatch):
    for value, want in (("", "auto"), ("Native", "native"), ("wheel", "wheel")):
        monkeypatch.setenv("CUTEGPT_LLAMACPP", value)
        assert mode_from_env() == want
    monkeypatch.setenv("CUTEGPT_LLAMACPP", "fast")
    with pytest.raises(CuteGPTError, match=r"\$CUTEGPT_LLAMACPP must be one of auto, native, wheel, not 'fast'"):
        mode_from_env()


def _import_in_child(cache: Path, mode: str | None) -> tuple[str, str]:
    """(the loaded module's file and FAKE_NATIVE flag, stderr) of a fresh process asking the runtime for xllamacpp."""
    env = {k: v for k, v in os.environ.items() if k != "CUTEGPT_LLAMACPP"}
    env.update(CUTEGPT_CACHE=str(cache), PYTHONPATH=str(SRC))
    if mode is not None:
        env["CUTEGPT_LLAMACPP"] = mode
    code = ("from cutegpt.runtime.llamacpp import xllamacpp_module; from cutegpt.runtime.native import loaded_build; "
            "m = xllamacpp_module(); xllamacpp_module(); print(getattr(m, 'FAKE_NATIVE', False), loaded_build(), m.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r.stderr.strip()


def test_the_runtime_loads_the_build_the_choice_names(tmp_path):
    pytest.importorskip("xllamacpp")
    cache, version = tmp_path / "cache", wheel_version()
    out, err = _import_in_child(cache, "native")  # nothing built: the wheel, with one line saying why
    assert out.startswith("False wheel ") and out.endswith("/xllamacpp/__init__.py") and str(cache) not in out
    assert len(err.splitlines()) == 1 and "cutegpt llamacpp build" in err
    assert _import_in_child(cache, None) == (out, "")  # auto: the same wheel, silently
    built = fake_build(cache, version, cpu_key())
    out, err = _import_in_child(cache, None)
    assert out == f"True native {built / 'site' / 'xllamacpp' / '__init__.py'}" and err == ""
    out, err = _import_in_child(cache, "wheel")
    assert out.startswith("False wheel") and err == ""
    # a damaged build (its extension does not load): the wheel, and one line naming the build and the fix
    (built / "site" / "xllamacpp" / "__init__.py").write_text("from .xllamacpp import *  # no such module\n")
    out, err = _import_in_child(cache, None)
    assert out.startswith("False wheel") and len(err.splitlines()) == 1
    assert str(built) in err and "--rebuild" in err


# --- cutegpt llamacpp build: refusals before anything is downloaded or compiled ----------------------------------

@pytest.fixture()
def cache(tmp_path, monkeypatch):
    pytest.importorskip("xllamacpp")
    root = tmp_path / "cache"
    monkeypatch.setenv("CUTEGPT_CACHE", str(root))
    return root


def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    # progress lines may come first (as a progress bar does); the error is the one last line
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == err.splitlines()[-1:] and "Traceback" not in err, err
    return errors[0]


def test_build_refuses_without_cmake_or_compiler(cache, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert "needs cmake, which is not on PATH" in _refused(["llamacpp", "build"], capsys)
    (empty / "cmake").write_text("#!/bin/sh\n")
    (empty / "cmake").chmod(0o755)
    monkeypatch.delenv("CXX", raising=False)
    assert "needs a C++ compiler" in _refused(["llamacpp", "build"], capsys)
    assert not cache.exists()


def test_build_refuses_a_wrong_sdist(cache, tmp_path, capsys):
    assert "--sdist" in _refused(["llamacpp", "build", "--sdist", str(tmp_path / "none.tar.gz")], capsys)
    other = tmp_path / "xllamacpp-0.0.1.tar.gz"
    other.write_bytes(b"")
    err = _refused(["llamacpp", "build", "--sdist", str(other)], capsys)
    assert f"xllamacpp-{wheel_version()}.tar.gz" in err and str(other) in err
    assert "--cmake-args" in _refused(["llamacpp", "build", "--cmake-args", '-DX="unclosed'], capsys)
    assert not cache.exists()


def test_build_without_pypi_is_one_sentence(cache, monkeypatch, capsys):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    err = _refused(["llamacpp", "build"], capsys)
    assert "could not download the xllamacpp" in err and "--sdist FILE" in err
    assert not list((cache / "llamacpp").glob("xllamacpp-*")) and not list((cache / "llamacpp").glob(".xllamacpp-*"))


def test_a_failed_build_keeps_nothing_but_its_log(cache, tmp_path, capsys):
    sdist = tmp_path / f"xllamacpp-{wheel_version()}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:  # an sdist with no build files: pip fails at once, offline
        note = tmp_path / "README"
        note.write_text("not a project\n")
        tar.add(note, arcname=f"xllamacpp-{wheel_version()}/README")
    err = _refused(["llamacpp", "build", "--sdist", str(sdist), "--jobs", "1"], capsys)
    assert "the llama.cpp build failed" in err and "the wheel stays in use" in err
    logs = list((cache / "llamacpp").glob("build-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err and "pip wheel" in logs[0].read_text()
    assert sorted(p.name for p in (cache / "llamacpp").iterdir()) == [logs[0].name]


def test_an_existing_build_is_not_built_again(cache, capsys):
    built = fake_build(cache, wheel_version(), cpu_key())
    assert main(["llamacpp", "build"]) == 0
    out = capsys.readouterr().out
    assert "already built" in out and str(built) in out and "--rebuild" in out


def test_cache_lists_the_build(cache, capsys):
    built = fake_build(cache, wheel_version(), cpu_key())
    assert main(["cache", "llamacpp"]) == 0
    assert f"llamacpp/{built.name}" in capsys.readouterr().out


def test_the_build_hint_is_said_once_and_only_on_the_wheel_without_a_build(monkeypatch):
    from cutegpt.runtime import native

    monkeypatch.delenv(native.ENV, raising=False)
    for chosen, said in [(None, False), (native.Choice(Path("/x/site")), False),
                         (native.Choice(None, "a native build is for another xllamacpp"), False), (native.Choice(None), True)]:
        monkeypatch.setattr(native, "_chosen", chosen)
        monkeypatch.setattr(native, "_hinted", False)
        hint = native.build_hint()
        assert (hint is not None) == said and (hint is None or "cutegpt llamacpp build" in hint)
        assert native.build_hint() is None  # once per process
    monkeypatch.setattr(native, "_hinted", False)
    monkeypatch.setenv(native.ENV, "wheel")  # the user chose the wheel: nothing to suggest
    assert native.build_hint() is None
