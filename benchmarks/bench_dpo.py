"""`cutegpt train dpo` vs LLaMA-Factory's DPO (`stage: dpo`), side by side; and the memory of our reference strategies.

    python benchmarks/bench_dpo.py --llamafactory-python /path/to/venv/bin/python [--steps 4] [--repeats 3]
    python benchmarks/bench_dpo.py --references-only          # reference strategies only (no LLaMA-Factory)

Both sides train the embedded SmolLM2-135M-Instruct with DPO (β 0.1, sigmoid loss) on the same pairs, built from
the original CuteGPT sample data (../shared/data/cutegpt_ift_sample.pkl): prompt = the conversation up to its
last question, chosen = its last answer, rejected = the last answer of the next conversation. One sharegpt
ranking file serves both (LLaMA-Factory's `ranking: true` format, which `cutegpt train dpo` reads too), rendered
by the cutegpt template (registered in LLaMA-Factory as in bench_llamafactory.py). LoRA r 8, alpha 16, dropout
0.05 on q_proj/v_proj (the reference: the base with the adapter disabled, on both sides), lr 5e-6 constant,
micro-batch 2 x accumulation 2, at most 512 tokens per sequence (ours: prompts cut to their last 256; LLaMA-Factory: its own
proportional rule), bf16, one torch thread, the same steps.

Measured inside each training process by the same code (a patch of transformers' Trainer):
  - tokens/s = non-padding tokens of the chosen and rejected sequences given to `Trainer.training_step`, over the
    wall time of `Trainer.train()` (no loading, no tokenization, no save);
  - peak RSS = VmHWM of the training process.
Runs are interleaved (A B C ... A B C ...) and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_llamafactory import register_cutegpt_template, versions, vm_hwm_kib
from bench_train import DATA, ROOT

MAX_LENGTH = 512
PRECISION = ["bf16"]  # --precision sets it (our side; LLaMA-Factory runs bf16)
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}


def measure(result: Path, tool: str, args: list[str]) -> None:
    import torch
    import transformers

    torch.set_num_threads(1)
    counted = {"tokens": 0, "positions": 0, "seconds": 0.0, "steps": 0}
    step, train = transformers.Trainer.training_step, transformers.Trainer.train

    def counting_step(self, model, inputs, *a, **kw):
        mask = inputs["attention_mask"]
        counted["tokens"] += int(mask.sum())
        counted["positions"] += mask.numel()
        return step(self, model, inputs, *a, **kw)

    def timed_train(self, *a, **kw):
        start = time.perf_counter()
        try:
            return train(self, *a, **kw)
        finally:
            counted["seconds"] += time.perf_counter() - start
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
            run_exp(json.loads(Path(args[0]).read_text()))
    except SystemExit as e:
        error = None if not e.code else f"exit {e.code}"
    except Exception as e:
        error = f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        counted["peak_kib"] = vm_hwm_kib()
        counted["error"] = error
        result.write_text(json.dumps(counted))


@dataclass
class Side:
    name: str
    tool: str
    extra: list[str] = field(default_factory=list)
    checkpointing: bool = False
    runs: list[dict] = field(default_factory=list)


def write_pairs(folder: Path, limit: int | None = None) -> int:
    """The sample data as sharegpt ranking pairs + LLaMA-Factory's dataset_info.json (the first `limit` pairs)."""
    from cutegpt.data.readers import Source

    convs = list(source := Source(DATA))
    source.close()
    records = []
    for i, conv in enumerate(convs):
        msgs = []
        for t in conv.turns:
            msgs += [{"from": "human", "value": t.instruction + (f"\n{t.input}" if t.input else "")}, {"from": "gpt", "value": t.output}]
        other = convs[(i + 1) % len(convs)].turns[-1].output
        if other.strip() == conv.turns[-1].output.strip():
            continue
        records.append({"conversations": msgs[:-1], "chosen": msgs[-1], "rejected": {"from": "gpt", "value": other}})
    records = records[:limit] if limit else records
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.json").write_text(json.dumps(records, ensure_ascii=False))
    info = {"cutegpt_pairs": {"file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
                              "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return len(records)


def cutegpt_args(side: Side, model: Path, data: Path, out: Path, steps: int) -> list[str]:
    args = ["train", "dpo", "--model", str(model), "--template", "cutegpt", "--data", str(data), "--loss", "dpo",
            "--beta", "0.1", "--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_LENGTH // 2), "--out", str(out), "--overwrite",
            "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]), "--lora-dropout", str(LORA["dropout"]),
            "--lora-targets", *LORA["targets"], "--micro-batch", "2", "--grad-accum", "2", "--max-steps", str(steps),
            "--lr", "5e-6", "--lr-scheduler", "constant", "--warmup-steps", "0", "--precision", PRECISION[0], "--threads", "1",
            "--save-steps", "100000", "--report-to", "none", "--seed", "42", *side.extra]
    if side.checkpointing:
        args.append("--gradient-checkpointing")
    return args


def llamafactory_config(model: Path, dataset_dir: Path, out: Path, steps: int) -> dict:
    return {
        "model_name_or_path": str(model), "stage": "dpo", "do_train": True, "finetuning_type": "lora",
        "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"], "lora_target": ",".join(LORA["targets"]),
        "pref_beta": 0.1, "pref_loss": "sigmoid", "dataset": "cutegpt_pairs", "dataset_dir": str(dataset_dir),
        "template": "cutegpt", "cutoff_len": MAX_LENGTH, "overwrite_cache": True,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": steps, "learning_rate": 5e-6,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "bf16": True, "use_cpu": True, "output_dir": str(out),
        "overwrite_output_dir": True, "save_strategy": "no", "logging_steps": 1, "report_to": "none", "seed": 42,
        "dataloader_num_workers": 0,
    }


def run_once(side: Side, i: int, steps: int, lf_python: str | None, model: Path, work: Path) -> dict:
    out = work / f"{side.name.replace(' ', '_').replace(',', '')}-{i}"
    result, log = out.with_suffix(".json"), out.with_suffix(".log")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(work / "hf-datasets"))
    if side.tool == "cutegpt":
        python, args = sys.executable, cutegpt_args(side, model, work / "data" / "pairs.json", out, steps)
        env["PYTHONPATH"] = str(ROOT / "src")
    else:
        config = out.with_suffix(".config.json")
        config.write_text(json.dumps(llamafactory_config(model, work / "data", out, steps)))
        python, args = lf_python, [str(config)]
        env["PYTHONPATH"] = str(work / "stubs")  # LLaMA-Factory imports torchaudio: an empty stub satisfies it
    with open(log, "w") as f:
        subprocess.run([python, __file__, "--measure", str(result), side.tool, *args], env=env, stdout=f,
                       stderr=subprocess.STDOUT, cwd=work)
    if not result.exists():
        raise SystemExit(f"{side.name} run {i} died before measuring; see {log}")
    return json.loads(result.read_text())


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        measure(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llamafactory-python", default=os.environ.get("LLAMAFACTORY_PYTHON"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--references-only", action="store_true", help="only our reference strategies (memory)")
    p.add_argument("--pairs", type=int, default=None, help="use the first N pairs (default: all)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="our side's precision")
    a = p.parse_args()
    PRECISION[0] = a.precision
    if not DATA.is_file():
        print(f"skipped: the shared sample data {DATA} is absent (set $CUTEGPT_SHARED)")
        return
    from cutegpt.model.embedded import embedded_model_dir

    model = embedded_model_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    (work / "stubs" / "torchaudio").mkdir(parents=True)
    (work / "stubs" / "torchaudio" / "__init__.py").write_text("")
    n = write_pairs(work / "data", a.pairs)
    sides = [Side("cutegpt LoRA (reference: adapter disabled)", "cutegpt")]
    if not a.references_only:
        sides.append(Side("cutegpt LoRA, checkpointing", "cutegpt", checkpointing=True))
    have_lf = bool(a.llamafactory_python and Path(a.llamafactory_python).is_file()) and not a.references_only
    if have_lf:
        sides.append(Side("LLaMA-Factory LoRA (checkpointing, its default)", "llamafactory", checkpointing=True))
    elif not a.references_only:
        print(f"no LLaMA-Factory python (--llamafactory-python / $LLAMAFACTORY_PYTHON): our side only")
    full_lr = ["--method", "full", "--lr", "5e-7"]
    sides += [Side("cutegpt full (reference: frozen copy)", "cutegpt", extra=full_lr),
              Side("cutegpt full, --precompute-ref", "cutegpt", extra=[*full_lr, "--precompute-ref"])]
    print(f"{cpu_model()}; {n} pairs; {a.steps} steps of 2 x 2 pairs <= {MAX_LENGTH} tokens; 1 thread; {a.repeats} "
          f"interleaved repeats; load average at start {os.getloadavg()[0]:.2f}; work dir {work}", flush=True)
    start = time.time()
    for i in range(a.repeats):
        for side in sides:
            if side.runs and side.runs[-1]["error"]:
                continue
            r = run_once(side, i, a.steps, a.llamafactory_python, model, work)
            side.runs.append(r)
            shown = f"{r['tokens'] / r['seconds']:.1f} tok/s" if not r["error"] else r["error"]
            print(f"  [{time.time() - start:5.0f} s] {side.name} #{i + 1}: {shown}, {r['tokens']} of {r['positions']} positions, "
                  f"{r['steps']} steps, peak {r['peak_kib'] / 1024 ** 2:.2f} GiB", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; cutegpt: {versions(sys.executable)}"
          + (f"; LLaMA-Factory: {versions(a.llamafactory_python)}" if have_lf else "") + "\n")
    lf = next((s for s in sides if s.tool == "llamafactory" and s.runs and not s.runs[0]["error"]), None)
    lf_rate = statistics.median(r["tokens"] / r["seconds"] for r in lf.runs) if lf else None
    lf_peak = statistics.median(r["peak_kib"] for r in lf.runs) / 1024 ** 2 if lf else None
    print("| side | tokens/s | peak RSS GiB | tokens/s ours/LLaMA-Factory | peak ours/LLaMA-Factory |\n|---|---|---|---|---|")
    for side in sides:
        if not side.runs or side.runs[0]["error"]:
            print(f"| {side.name} | failed: `{side.runs[0]['error'] if side.runs else 'not run'}` | | | |")
            continue
        rate = statistics.median(r["tokens"] / r["seconds"] for r in side.runs)
        peak = statistics.median(r["peak_kib"] for r in side.runs) / 1024 ** 2
        ratio = f"| {rate / lf_rate:.2f} | {peak / lf_peak:.2f} |" if lf and side.tool == "cutegpt" else "| | |"
        print(f"| {side.name} | {rate:.1f} | {peak:.2f} {ratio}")


if __name__ == "__main__":
    main()
