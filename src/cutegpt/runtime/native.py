"""llama.cpp built for this machine: `cutegpt llamacpp build` compiles the installed xllamacpp's sdist with
native CPU flags, once, into the cache; every command that imports xllamacpp (through
`runtime.llamacpp.xllamacpp_module`) then loads that build instead of the PyPI wheel.

    CACHE/llamacpp/xllamacpp-<version>-<cpu>/site/xllamacpp/   the package (`pip install --target`)
                                            /build.json         version, CPU, CMake arguments, llama.cpp's system info

The PyPI wheel is built for AVX2 only; a native build also uses AVX-512, VNNI and BF16 where the CPU has
them. A build belongs to one xllamacpp version (cutegpt's code talks to its Python API) and one CPU (it may
use instructions another CPU lacks, and caches are shared between machines): both are in the folder's name.

Which llama.cpp loads, from $CUTEGPT_LLAMACPP:
    auto    (default) the native build for this CPU and version when there is one, else the wheel;
    native  the same, saying in one line why when it falls back to the wheel;
    wheel   the wheel.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cutegpt.config import arg
from cutegpt.errors import CuteGPTError

ENV = "CUTEGPT_LLAMACPP"
MODES = ("auto", "native", "wheel")
KIND = "llamacpp"  # the cache folder (cutegpt cache lists it)
# llama.cpp's optional parts that download sources at configure time (BoringSSL, llguidance's Rust crates):
# off, so the build needs PyPI only; the loopback server needs no TLS and cutegpt no grammar engine but GBNF
OFFLINE_CMAKE = ("-DGGML_NATIVE=ON", "-DLLAMA_BUILD_BORINGSSL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_LLGUIDANCE=OFF")


# --- which build: a pure choice, then applying it -------------------------------------------------

@dataclass(frozen=True)
class Choice:
    site: Path | None  # folder to import xllamacpp from; None = the installed wheel
    note: str | None = None  # the one line said when a native build was wanted but is not used


def cpu_key() -> str:
    """A short name for this CPU's model and instruction sets (what `-march=native` compiles for)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = " ".join(sorted(value.split()))
                    break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{model}|{flags}".encode()).hexdigest()[:10]


def build_folder(root: Path, version: str, cpu: str) -> Path:
    return root / KIND / f"xllamacpp-{version}-{cpu}"


def wheel_version() -> str | None:
    """The installed xllamacpp's version (without importing it), None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xllamacpp")
    except PackageNotFoundError:
        return None


def mode_from_env() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise CuteGPTError(f"${ENV} must be one of {', '.join(MODES)}, not {os.environ[ENV]!r}.")
    return mode


def choose(mode: str, root: Path, version: str | None, cpu: str) -> Choice:
    """Where xllamacpp is imported from for `mode`, given the cache `root`, the wheel's version and the CPU."""
    if mode == "wheel" or version is None:
        return Choice(None)
    folder = build_folder(root, version, cpu)
    if (folder / "build.json").is_file() and (folder / "site" / "xllamacpp").is_dir():
        return Choice(folder / "site")
    stale = sorted(p.name for p in (root / KIND).glob(f"xllamacpp-*-{cpu}") if p.name != folder.name) if (root / KIND).is_dir() else []
    if stale:  # built for another xllamacpp: say so even in auto, or an upgrade silently loses the speed
        return Choice(None, f"the native llama.cpp build in {root / KIND} is for another xllamacpp ({stale[-1]}), the "
                            f"installed one is {version}: using the wheel; run `cutegpt llamacpp build` again.")
    if mode == "native":
        return Choice(None, f"${ENV}=native but {root / KIND} holds no native llama.cpp build for this CPU and xllamacpp "
                            f"{version}: using the wheel; run `cutegpt llamacpp build` first.")
    return Choice(None)


_chosen: Choice | None = None


def import_xllamacpp() -> Any:
    """Import xllamacpp from the build `choose` picks (once per process; later calls return the same module)."""
    global _chosen
    if "xllamacpp" in sys.modules:
        return sys.modules["xllamacpp"]
    from cutegpt.model.embedded import cache_dir

    choice = choose(mode_from_env(), cache_dir(), wheel_version(), cpu_key())
    if choice.site is not None:
        sys.path.insert(0, str(choice.site))
        try:
            module = importlib.import_module("xllamacpp")
            _chosen = choice
            return module
        except ImportError as e:  # a damaged build: the wheel still works
            sys.path.remove(str(choice.site))
            for name in [n for n in sys.modules if n == "xllamacpp" or n.startswith("xllamacpp.")]:
                del sys.modules[name]
            choice = Choice(None, f"the native llama.cpp build in {choice.site.parent} does not load ({e}): using the "
                                  "wheel; run `cutegpt llamacpp build --rebuild`.")
    _chosen = choice
    if choice.note:
        print(choice.note, file=sys.stderr)
    return importlib.import_module("xllamacpp")


def loaded_build() -> str:
    """'native' or 'wheel': which llama.cpp this process imported (for benchmarks and --verbose)."""
    return "native" if _chosen is not None and _chosen.site is not None else "wheel"


_hinted = False


def build_hint() -> str | None:
    """One line, once per process, for a long llama.cpp run (eval) on the wheel when no native build is there and
    nothing was said about builds yet; None otherwise."""
    global _hinted
    if _hinted or _chosen is None or _chosen.site is not None or _chosen.note or mode_from_env() == "wheel":
        return None
    _hinted = True
    return ("llama.cpp runs from the prebuilt AVX2 wheel: `cutegpt llamacpp build` compiles it for this CPU once (about "
            "10 minutes on 2 cores), which made GGUF scoring about 2x faster on an AVX2 AMD EPYC (docs/benchmarks.md).")


# --- cutegpt llamacpp build ---------------------------------------------------------------------------------

@dataclass
class LlamaCppBuildConfig:
    """Build llama.cpp for this machine's CPU from the installed xllamacpp's sdist, once, into the cache."""

    sdist: str | None = arg(None, "an xllamacpp sdist (.tar.gz) downloaded beforehand (the build still takes setuptools "
                                  "and Cython from PyPI)",
                            absent="the installed xllamacpp version's sdist, downloaded from PyPI")
    jobs: int = arg(0, "compile jobs; 0 = the cores other processes leave free", ge=0, le=1024)
    cmake_args: str = arg("", "extra CMake arguments for llama.cpp, e.g. \"-DGGML_AVX512=ON\" (see docs/chat.md)")
    rebuild: bool = arg(False, "build again even when this CPU and version already have a build")


def _tools() -> None:
    """Refuse before downloading anything when the compilers the build needs are missing."""
    if shutil.which("cmake") is None:
        raise CuteGPTError("cutegpt llamacpp build needs cmake, which is not on PATH: install it (`apt-get install cmake` "
                           "or `pip install cmake`).")
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None or shutil.which(cxx) is None:
        raise CuteGPTError("cutegpt llamacpp build needs a C++ compiler (c++, g++ or clang++; $CXX names another), none is "
                           "on PATH: install one (`apt-get install g++`).")


def _check_sdist(sdist: str | None, version: str) -> Path | None:
    if sdist is None:
        return None
    path = Path(sdist)
    if not path.exists():
        raise CuteGPTError(f"--sdist {path} does not exist.")
    if not path.is_file():
        raise CuteGPTError(f"--sdist {path} is a folder, not an sdist file (xllamacpp-{version}.tar.gz).")
    if not path.name.endswith(".tar.gz"):
        raise CuteGPTError(f"--sdist {path} is not an sdist (xllamacpp-{version}.tar.gz).")
    if path.name != f"xllamacpp-{version}.tar.gz":
        raise CuteGPTError(f"--sdist {path} is not the installed xllamacpp's sdist (xllamacpp-{version}.tar.gz): build the "
                           "version cutegpt runs with, or install the other one first.")
    return path


def progress_step(line: str, shown: int) -> int | None:
    """The tenth of CMake's progress to print for this output line, None when it does not move. CMake counts each
    target set from 0 again (xllamacpp builds one helper library first), so a step back is printed too."""
    m = re.match(r"\s*\[\s*(\d+)%\]", line)
    if m is None:
        return None
    step = int(m.group(1)) // 10 * 10
    return None if step == shown else step


def _pip(args: list[str], log: Path, env: dict[str, str] | None = None, progress: bool = False) -> int:
    """Run pip with its output in `log`; with `progress`, print CMake's percentages as they pass each tenth."""
    shown = -10
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ pip {' '.join(args)}\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "pip", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            step = progress_step(line, shown) if progress else None
            if step is not None:
                shown = step
                print(f"  compiling: {shown}%", file=sys.stderr, flush=True)
        return proc.wait()


def _last_error(log: Path) -> str:
    """The line of pip's output that says what went wrong: the compiler's or CMake's first error, else pip's."""
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for pattern in (r"CMake Error|\berror:|fatal:", r"^ERROR:"):
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            return found[0][:300]
    return (lines[-1] if lines else "no output")[:300]


def build_env(cfg: LlamaCppBuildConfig, jobs: int) -> dict[str, str]:
    """The environment xllamacpp's build script reads: parallel jobs, CMake arguments (user's last, so they win)."""
    env = dict(os.environ)
    env.pop("XLLAMACPP_RELEASE", None)  # its release mode turns GGML_NATIVE off
    env["NPROC"] = str(jobs)
    env["CMAKE_ARGS"] = " ".join([*OFFLINE_CMAKE, *shlex.split(cfg.cmake_args)])
    return env


def _verify(site: Path) -> str:
    """Import the build in a fresh process (an illegal instruction kills that one, not us); llama.cpp's system info."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import xllamacpp; "
            "assert xllamacpp.__file__.startswith(sys.argv[1]), xllamacpp.__file__; print(xllamacpp.get_system_info())")
    r = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise CuteGPTError(f"the native llama.cpp build does not load on this machine ({(r.stderr.strip().splitlines() or ['exit ' + str(r.returncode)])[-1][:200]}); "
                           "nothing was kept, the wheel stays in use.")
    return r.stdout.strip()


def run_build(cfg: LlamaCppBuildConfig) -> int:
    from cutegpt.io import atomic_dir, os_errors
    from cutegpt.model.embedded import cache_dir
    from cutegpt.threads import resolve_threads

    version = wheel_version()
    if version is None:
        raise CuteGPTError("cutegpt llamacpp build compiles the installed xllamacpp's sdist, and xllamacpp is not installed: "
                           "run `pip install xllamacpp` first.")
    sdist = _check_sdist(cfg.sdist, version)
    try:
        shlex.split(cfg.cmake_args)
    except ValueError as e:
        raise CuteGPTError(f"--cmake-args cannot be split into arguments ({e}).") from None
    _tools()
    final = build_folder(cache_dir(), version, cpu_key())
    if final.is_dir() and not cfg.rebuild:
        print(f"llama.cpp is already built for this CPU and xllamacpp {version}: {final} (--rebuild builds it again).")
        return 0
    jobs = resolve_threads(cfg.jobs)
    log = final.parent / f"build-{final.name}.log"
    start = time.monotonic()
    with atomic_dir(final, overwrite=True) as tmp:
        with os_errors(log):
            log.write_text("", encoding="utf-8")
        if sdist is None:
            print(f"downloading the xllamacpp {version} sdist from PyPI (38 MB) ...", file=sys.stderr, flush=True)
            if _pip(["download", f"xllamacpp=={version}", "--no-binary", "xllamacpp", "--no-deps",
                     "-d", str(tmp / "sdist")], log) != 0:
                raise CuteGPTError(f"could not download the xllamacpp {version} sdist from PyPI ({_last_error(log)}); check the "
                                   f"network, or download xllamacpp-{version}.tar.gz elsewhere and pass --sdist FILE.")
            sdist = next((tmp / "sdist").glob("xllamacpp-*.tar.gz"))
        print(f"building llama.cpp for this CPU with {jobs} job{'s' if jobs != 1 else ''} (minutes; log: {log}) ...",
              file=sys.stderr, flush=True)
        env = build_env(cfg, jobs)
        if _pip(["wheel", str(sdist), "--no-deps", "-v", "-w", str(tmp / "wheel")], log, env, progress=True) != 0:
            raise CuteGPTError(f"the llama.cpp build failed ({_last_error(log)}); the whole output is in {log}. Nothing was "
                               "kept: the wheel stays in use.")
        wheel = next((tmp / "wheel").glob("xllamacpp-*.whl"))
        if _pip(["install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)], log) != 0:
            raise CuteGPTError(f"pip could not unpack the built wheel ({_last_error(log)}); see {log}.")
        info = _verify(tmp / "site")
        shutil.rmtree(tmp / "wheel", ignore_errors=True)
        shutil.rmtree(tmp / "sdist", ignore_errors=True)
        (tmp / "build.json").write_text(json.dumps({
            "xllamacpp": version, "cpu": cpu_key(), "cmake_args": env["CMAKE_ARGS"], "system_info": info,
            "seconds": round(time.monotonic() - start, 1)}, indent=2) + "\n", encoding="utf-8")
    print(f"built llama.cpp for this CPU in {time.monotonic() - start:.0f} s: {final}\n  {info}\n"
          f"chat, generate, serve and eval now load it (${ENV}=wheel goes back to the wheel).")
    return 0
