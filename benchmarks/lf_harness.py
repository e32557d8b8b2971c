"""The side-by-side harness of bench_llamafactory.py (SFT) and bench_dpo.py (DPO): one training per process,
measured from inside by the same code for cutegpt and for LLaMA-Factory (in its own venv).

    python lf_harness.py --measure RESULT.json COUNTER TOOL ARGS...      (the child; stdlib imports only at the top)

Inside the child, transformers' Trainer is patched (both tools reach `Trainer.training_step` and `Trainer.train`):
  - tokens: what COUNTER counts in the batches given to `training_step` ("sft": loss-bearing labels at positions 1..;
    "pref": non-padding tokens of the chosen and rejected sequences), positions: every position computed on;
  - seconds: wall time of `Trainer.train()` (no loading, no tokenization, no final save); cpu_seconds: this process's
    CPU time over the same span (on a shared machine the wall time includes waiting for a core; with one thread
    the CPU time does not);
  - peak_kib: VmHWM of the process at its end (not ru_maxrss, which inherits the parent's peak).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from machine import cpu_model  # noqa: F401  (bench_dpo and bench_llamafactory take it from here)

CUTEGPT_SYSTEM = "你是复旦大学知识工场实验室训练出来的语言模型CuteGPT。给定任务描述，请给出对应请求的回答。\n"


# ---------------------------------------------------------------- inside the training process (either venv)

def register_cutegpt_template() -> None:
    """cutegpt's template in LLaMA-Factory's terms (src/cutegpt/templates.py renders the same text).

    efficient_eos: the answer ends with `<end>` only and EOS comes once after the last answer, as cutegpt does.
    No stop_words: LLaMA-Factory would add `<end>` to the tokenizer as a new special token (one new id, a
    resized vocabulary), where cutegpt trains it as the plain text it is; stop words matter only for inference.
    The one difference LLaMA-Factory imposes: in a multi-turn sample it also trains EOS at the first token of
    each later question (one extra loss-bearing token per extra turn; the input ids are identical).
    """
    from llamafactory.data.formatter import StringFormatter
    from llamafactory.data.template import register_template

    register_template(
        name="cutegpt",
        format_user=StringFormatter(slots=["问：{{content}}\n答：\n"]),
        format_assistant=StringFormatter(slots=["{{content}}<end>"]),
        format_system=StringFormatter(slots=["{{content}}"]),
        default_system=CUTEGPT_SYSTEM,
        efficient_eos=True,
    )


def count_sft(inputs) -> tuple[int, int]:
    labels = inputs["labels"]
    return int((labels[..., 1:] != -100).sum()), labels.numel()


def count_pref(inputs) -> tuple[int, int]:
    mask = inputs["attention_mask"]  # both tools stack the chosen and the rejected rows of a batch
    return int(mask.sum()), mask.numel()


COUNTERS = {"sft": count_sft, "pref": count_pref}


def measure(result: Path, counter: str, tool: str, args: list[str]) -> None:
    """Train once in this process (cutegpt CLI or LLaMA-Factory's run_exp) and write what it trained and its peak."""
    import runpy

    import torch
    import transformers

    torch.set_num_threads(1)  # LLaMA-Factory has no thread flag; cutegpt sets the same with --threads 1
    count = COUNTERS[counter]
    counted = {"tokens": 0, "positions": 0, "seconds": 0.0, "cpu_seconds": 0.0, "steps": 0}
    step, train = transformers.Trainer.training_step, transformers.Trainer.train

    def counting_step(self, model, inputs, *a, **kw):  # both trainers reach this (cutegpt's through super())
        tokens, positions = count(inputs)
        counted["tokens"] += tokens
        counted["positions"] += positions
        return step(self, model, inputs, *a, **kw)

    def timed_train(self, *a, **kw):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return train(self, *a, **kw)
        finally:
            counted["seconds"] += time.perf_counter() - start
            counted["cpu_seconds"] += time.process_time() - cpu
            counted["steps"] = self.state.global_step

    transformers.Trainer.training_step, transformers.Trainer.train = counting_step, timed_train
    error = None
    try:
        if tool == "cutegpt":
            sys.argv = ["cutegpt", *args]
            runpy.run_module("cutegpt", run_name="__main__", alter_sys=True)
        else:
            from llamafactory.train.tuner import run_exp

            register_cutegpt_template()
            run_exp(json.loads(Path(args[0]).read_text()))  # in this process: no launcher, no torchrun child
    except SystemExit as e:
        error = None if not e.code else f"exit {e.code}"
    except Exception as e:  # recorded as the result (e.g. a refusal), not hidden
        error = f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        counted["peak_kib"] = vm_hwm_kib()
        counted["error"] = error
        result.write_text(json.dumps(counted))


def vm_hwm_kib() -> int:
    """Peak resident set of this process (VmHWM); stdlib only, so it runs in LLaMA-Factory's venv too."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


# ---------------------------------------------------------------- the parent: one run, interleaving, tables

@dataclass
class Side:
    name: str
    tool: str  # cutegpt | llamafactory
    quant: bool = False
    checkpointing: bool = False
    extra: list[str] = field(default_factory=list)  # more cutegpt flags
    src: Path | None = None  # another source tree of cutegpt (before/after a change); default: this checkout's
    runs: list[dict] = field(default_factory=list)


def work_dir(prefix: str) -> Path:
    """A temporary folder with an empty `torchaudio` package: LLaMA-Factory imports it, and its CUDA wheel was
    uninstalled from the venv (docs/benchmarks.md)."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=prefix))
    (work / "stubs" / "torchaudio").mkdir(parents=True)
    (work / "stubs" / "torchaudio" / "__init__.py").write_text("")
    return work


def run_measured(side: Side, i: int, counter: str, work: Path, python: str, args: list[str], src: Path) -> dict:
    """One training in a fresh process (`python` is ours or LLaMA-Factory's venv), its measurement as a dict."""
    out = out_dir(side, i, work)
    result, log = out.with_suffix(".json"), out.with_suffix(".log")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(work / "hf-datasets"),
               PYTHONPATH=str(side.src or src) if side.tool == "cutegpt" else str(work / "stubs"))
    if side.tool != "cutegpt":
        config = out.with_suffix(".config.json")
        config.write_text(json.dumps(args[0]))
        args = [str(config)]
    with open(log, "w") as f:
        subprocess.run([python, __file__, "--measure", str(result), counter, side.tool, *args], env=env, stdout=f,
                       stderr=subprocess.STDOUT, cwd=work)
    if not result.exists():
        raise SystemExit(f"{side.name} run {i} died before measuring; see {log}")
    r = json.loads(result.read_text())
    if r["error"]:
        r["error"] = refusal_line(log, r["error"])
    return r


def out_dir(side: Side, i: int, work: Path) -> Path:
    import re

    return work / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', side.name)}-{i}"


def refusal_line(log: Path, fallback: str) -> str:
    """The last exception line of a failed run's log (its one-line refusal)."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln and not ln.startswith(" ")]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]]
    return errors[-1] if errors else fallback


def interleave(sides: list[Side], repeats: int, run) -> None:
    """A B C ... A B C ...: a load change on the shared machine hits every side alike. `run(side, i)` -> result."""
    start = time.time()
    for i in range(repeats):
        for side in sides:
            if side.runs and side.runs[-1]["error"]:
                continue  # a refusal does not change with repeating
            r = run(side, i)
            side.runs.append(r)
            shown = (f"{r['tokens'] / r['seconds']:.1f} tok/s wall, {r['tokens'] / max(r['cpu_seconds'], 1e-9):.1f} per CPU-s"
                     if not r["error"] else r["error"])
            print(f"  [{time.time() - start:5.0f} s] {side.name} #{i + 1}: {shown}, {r['tokens']} of {r['positions']} "
                  f"positions, {r['steps']} steps, peak {r['peak_kib'] / 1024 ** 2:.2f} GiB", flush=True)


def medians(side: Side) -> dict | str:
    """Medians over the repeats (tokens/s wall and per CPU-second, computed positions/s, peak GiB), or the error."""
    errors = [r["error"] for r in side.runs if r["error"]]
    if errors or not side.runs:
        return errors[0] if errors else "not run"
    m = statistics.median
    return {"rate": m(r["tokens"] / r["seconds"] for r in side.runs),
            "cpu_rate": m(r["tokens"] / r["cpu_seconds"] for r in side.runs),
            "computed": m(r["positions"] / r["seconds"] for r in side.runs),
            "peak": m(r["peak_kib"] for r in side.runs) / 1024 ** 2,
            "share": f"{m(r['tokens'] for r in side.runs):.0f} / {m(r['positions'] for r in side.runs):.0f}"}


def print_table(sides: list[Side], tokens: str) -> None:
    """Markdown: each side's medians, and ours / theirs against the LLaMA-Factory row of the same method."""
    print(f"| side | {tokens}/s | {tokens} per CPU-second | computed positions/s | peak RSS GiB | {tokens} / positions | "
          "tokens/s ours/theirs | per CPU-s ours/theirs | peak RSS ours/theirs |\n|---|---|---|---|---|---|---|---|---|")
    for side in sides:
        theirs = next((s for s in sides if s.tool == "llamafactory" and s.quant == side.quant), None)
        mine = medians(side)
        ref = medians(theirs) if theirs else "not run"
        if isinstance(mine, str):
            print(f"| {side.name} | failed: `{mine}` | | | | | | | |")
            continue
        ratios = ["", "", ""] if side.tool == "llamafactory" or isinstance(ref, str) else \
            [f"{mine['rate'] / ref['rate']:.2f}", f"{mine['cpu_rate'] / ref['cpu_rate']:.2f}", f"{mine['peak'] / ref['peak']:.2f}"]
        print(f"| {side.name} | {mine['rate']:.1f} | {mine['cpu_rate']:.1f} | {mine['computed']:.1f} | {mine['peak']:.2f} | "
              f"{mine['share']} | {' | '.join(ratios)} |")


def versions(python: str) -> str:
    code = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
            "('torch', 'transformers', 'peft', 'trl', 'accelerate', 'bitsandbytes', 'llamafactory') "
            "if __import__('importlib.util').util.find_spec(p.replace('-', '_'))))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__" and len(sys.argv) > 4 and sys.argv[1] == "--measure":
    measure(Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
