"""`cutegpt train sft` vs LLaMA-Factory, side by side: LoRA and QLoRA on CPU, tokens/s and peak RSS.

    python benchmarks/bench_llamafactory.py --llamafactory-python /path/to/venv/bin/python [--steps 2] [--repeats 3]

(or set $LLAMAFACTORY_PYTHON). LLaMA-Factory lives in its own virtual environment (it pins other
transformers/peft versions); see docs/benchmarks.md for how it was installed.

Both sides train the embedded SmolLM2-135M-Instruct on the original CuteGPT sample data
(../shared/data/cutegpt_ift_sample.pkl, or $CUTEGPT_SHARED/data/...) with the same settings: LoRA r 8,
alpha 16, dropout 0.05 on q_proj/v_proj, lr 3e-4 constant, AdamW (0.98, 0.999, eps 1e-9), rows of at most
512 tokens, micro-batch 2 x accumulation 2, bf16 (cutegpt `--precision bf16`, LLaMA-Factory `bf16: true`),
one torch thread, the same number of optimizer steps.
LLaMA-Factory gets the data as sharegpt JSON (written by cutegpt's own reader into a temporary folder) and a
template registered to render exactly cutegpt's (system line, `问：...\\n答：\\n`, answer + `<end>`, EOS once at
the end), packed with its `neat_packing` (samples kept apart, like cutegpt's bins).

Every run is its own process, and the measurement is taken inside that process by the same code for both
sides (`measure` below, which patches transformers' Trainer):
  - tokens/s = loss-bearing tokens (labels != -100 at positions 1.., i.e. what the loss averages over) in the
    batches given to `Trainer.training_step`, divided by the wall time of `Trainer.train()` (no model loading,
    no tokenization, no final save);
  - peak RSS = VmHWM of the training process at its end (not ru_maxrss, which inherits the parent's peak).
The runs are interleaved (A B C ... A B C ...) so a load change on the shared machine hits every side alike,
and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_train import DATA, ROOT  # run from benchmarks/ like the other side-by-side benchmarks

MAX_LENGTH = 512
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}


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
        default_system="你是复旦大学知识工场实验室训练出来的语言模型CuteGPT。给定任务描述，请给出对应请求的回答。\n",
        efficient_eos=True,
    )


def measure(result: Path, tool: str, args: list[str]) -> None:
    """Train once in this process (cutegpt CLI or LLaMA-Factory's run_exp) and write what it trained and its peak."""
    import torch
    import transformers

    torch.set_num_threads(1)  # LLaMA-Factory has no thread flag; cutegpt sets the same with --threads 1
    counted = {"loss_tokens": 0, "positions": 0, "seconds": 0.0, "steps": 0}
    step, train = transformers.Trainer.training_step, transformers.Trainer.train

    def counting_step(self, model, inputs, *a, **kw):  # both trainers reach this (cutegpt's through super())
        labels = inputs["labels"]
        counted["loss_tokens"] += int((labels[..., 1:] != -100).sum())
        counted["positions"] += labels.numel()  # what the model computes on, padding included
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


# ---------------------------------------------------------------- the two sides' settings

@dataclass
class Side:
    name: str
    tool: str  # cutegpt | llamafactory
    quant: bool = False
    checkpointing: bool = False
    runs: list[dict] = field(default_factory=list)


def cutegpt_args(side: Side, model: Path, out: Path, steps: int) -> list[str]:
    args = ["train", "sft", "--model", str(model), "--template", "cutegpt", "--data", str(DATA),
            "--max-length", str(MAX_LENGTH), "--packing", "bins", "--out", str(out), "--overwrite",
            "--method", "lora", "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]),
            "--lora-dropout", str(LORA["dropout"]), "--lora-targets", *LORA["targets"],
            "--micro-batch", "2", "--grad-accum", "2", "--max-steps", str(steps), "--lr", "3e-4",
            "--lr-scheduler", "constant", "--warmup-steps", "0", "--adam-betas", "0.98", "0.999", "--adam-eps", "1e-9",
            "--precision", "bf16", "--threads", "1", "--save-steps", "100000", "--report-to", "none", "--seed", "42"]
    if side.checkpointing:
        args.append("--gradient-checkpointing")
    if side.quant:
        args += ["--quantization", "4bit", "--bnb-4bit-type", "nf4", "--double-quant"]
    return args


def llamafactory_config(side: Side, model: Path, dataset_dir: Path, out: Path, steps: int) -> dict:
    """LLaMA-Factory's YAML keys; gradient checkpointing stays at its default (on)."""
    cfg = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"],
        "lora_target": ",".join(LORA["targets"]),
        "dataset": "cutegpt_sample", "dataset_dir": str(dataset_dir), "template": "cutegpt",
        "cutoff_len": MAX_LENGTH, "neat_packing": True, "overwrite_cache": True,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": steps,
        "learning_rate": 3e-4, "lr_scheduler_type": "constant", "warmup_steps": 0,
        "adam_beta1": 0.98, "adam_beta2": 0.999, "adam_epsilon": 1e-9, "max_grad_norm": 1.0, "weight_decay": 0.0,
        "bf16": True, "use_cpu": True,  # use_cpu: without it the Trainer refuses bf16 on a machine with no GPU
        "output_dir": str(out), "overwrite_output_dir": True, "save_strategy": "no", "logging_steps": 1,
        "report_to": "none", "seed": 42, "dataloader_num_workers": 0,
    }
    if side.quant:
        cfg.update(quantization_bit=4, quantization_method="bnb", quantization_type="nf4", double_quantization=True)
    return cfg


def write_llamafactory_dataset(folder: Path) -> int:
    """The sample data as sharegpt JSON + dataset_info.json, read with cutegpt's own (safe) pickle reader."""
    from cutegpt.data.readers import Source

    records = []
    for conv in (source := Source(DATA)):
        messages = []
        for t in conv.turns:  # cutegpt renders `问：{instruction}\n{input}\n答：`: the user text is instruction\ninput
            messages += [{"from": "human", "value": t.instruction + (f"\n{t.input}" if t.input else "")},
                         {"from": "gpt", "value": t.output}]
        if conv.system is not None:
            raise SystemExit("the sample data has a record with its own system line; this converter expects none")
        records.append({"conversations": messages})  # no system: the template's default line, as cutegpt's
    source.close()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cutegpt_sample.json").write_text(json.dumps(records, ensure_ascii=False))
    info = {"cutegpt_sample": {"file_name": "cutegpt_sample.json", "formatting": "sharegpt",
                               "columns": {"messages": "conversations"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return len(records)


# ---------------------------------------------------------------- the parent: interleave, collect, print

def run_once(side: Side, i: int, steps: int, lf_python: str, model: Path, work: Path) -> dict:
    out = work / f"{side.name.replace(' ', '_')}-{i}"
    result, log = out.with_suffix(".json"), out.with_suffix(".log")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(work / "hf-datasets"))
    if side.tool == "cutegpt":
        python, args = sys.executable, cutegpt_args(side, model, out, steps)
        env["PYTHONPATH"] = str(ROOT / "src")
    else:
        config = out.with_suffix(".config.json")
        config.write_text(json.dumps(llamafactory_config(side, model, work / "lf-data", out, steps)))
        python, args = lf_python, [str(config)]
        # LLaMA-Factory imports torchaudio, whose CUDA wheel was uninstalled: an empty stub package satisfies it
        env["PYTHONPATH"] = str(work / "stubs")
    with open(log, "w") as f:
        subprocess.run([python, __file__, "--measure", str(result), side.tool, *args], env=env, stdout=f,
                       stderr=subprocess.STDOUT, cwd=work)
    if not result.exists():
        raise SystemExit(f"{side.name} run {i} died before measuring; see {log}")
    r = json.loads(result.read_text())
    if r["error"]:
        r["error"] = refusal_line(log, r["error"])
    return r


def refusal_line(log: Path, fallback: str) -> str:
    """The last exception line of a failed run's log (its one-line refusal)."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln and not ln.startswith(" ")]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]]
    return errors[-1] if errors else fallback


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def rate(r: dict) -> float:
    return r["loss_tokens"] / r["seconds"]


def medians(side: Side) -> tuple[float, float] | str:
    """(tokens/s, peak GiB) medians over the repeats, or the error text if the side could not train."""
    errors = [r["error"] for r in side.runs if r["error"]]
    if errors:
        return errors[0]
    return statistics.median(rate(r) for r in side.runs), median(side.runs, "peak_kib") / 1024 ** 2


def versions(python: str) -> str:
    code = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
            "('torch', 'transformers', 'peft', 'accelerate', 'bitsandbytes', 'llamafactory') "
            "if __import__('importlib.util').util.find_spec(p.replace('-', '_'))))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        measure(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llamafactory-python", default=os.environ.get("LLAMAFACTORY_PYTHON"),
                   help="python of the virtual environment with llamafactory installed (default: $LLAMAFACTORY_PYTHON)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per side (the median is reported)")
    p.add_argument("--no-qlora", action="store_true", help="LoRA only (QLoRA roughly doubles the run time)")
    a = p.parse_args()
    if not DATA.is_file():
        print(f"skipped: the shared sample data {DATA} is absent (set $CUTEGPT_SHARED to the folder holding data/)")
        return
    if not a.llamafactory_python or not Path(a.llamafactory_python).is_file():
        print("skipped: no LLaMA-Factory python (give --llamafactory-python or set $LLAMAFACTORY_PYTHON to the python of a "
              f"venv with llamafactory installed); got {a.llamafactory_python!r}")
        return
    from cutegpt.model.embedded import embedded_model_dir

    model = embedded_model_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-lf-"))
    (work / "stubs" / "torchaudio").mkdir(parents=True)
    (work / "stubs" / "torchaudio" / "__init__.py").write_text("")
    n = write_llamafactory_dataset(work / "lf-data")
    sides = [Side("cutegpt LoRA", "cutegpt"),
             Side("cutegpt LoRA, checkpointing", "cutegpt", checkpointing=True),
             Side("LLaMA-Factory LoRA (neat_packing, checkpointing)", "llamafactory", checkpointing=True)]
    if not a.no_qlora:
        sides += [Side("cutegpt QLoRA", "cutegpt", quant=True),
                  Side("cutegpt QLoRA, checkpointing", "cutegpt", quant=True, checkpointing=True),
                  Side("LLaMA-Factory QLoRA (neat_packing, checkpointing)", "llamafactory", quant=True, checkpointing=True)]
    print(f"{n} conversations; {a.steps} steps of 2 x 2 rows <= {MAX_LENGTH} tokens; 1 thread per run; "
          f"{a.repeats} interleaved repeats; load average at start {os.getloadavg()[0]:.2f}; work dir {work}", flush=True)
    start = time.time()
    for i in range(a.repeats):
        for side in sides:
            if side.runs and side.runs[-1]["error"]:
                continue  # a refusal does not change with repeating
            r = run_once(side, i, a.steps, a.llamafactory_python, model, work)
            side.runs.append(r)
            shown = f"{rate(r):.1f} tok/s" if not r["error"] else r["error"]
            print(f"  [{time.time() - start:5.0f} s] {side.name} #{i + 1}: {shown}, {r['loss_tokens']} loss-bearing of "
                  f"{r['positions']} positions, {r['steps']} steps, peak {r['peak_kib'] / 1024 ** 2:.2f} GiB", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; cutegpt: {versions(sys.executable)}; "
          f"LLaMA-Factory: {versions(a.llamafactory_python)}\n")
    print_table(sides)


def print_table(sides: list[Side]) -> None:
    """Markdown: each side's medians, and ours / theirs against the LLaMA-Factory row of the same method.

    Computed tokens/s (every position of the batches, padding included) is the work rate; loss-bearing tokens/s
    also depends on how much of each row is prompt, which differs where the two tools cut long conversations.
    """
    print("| side | loss-bearing tokens/s | computed tokens/s | peak RSS GiB | loss-bearing / computed tokens | "
          "tokens/s ours/theirs | peak RSS ours/theirs |\n|---|---|---|---|---|---|---|")
    for side in sides:
        theirs = next(s for s in sides if s.tool == "llamafactory" and s.quant == side.quant)
        mine, ref = medians(side), medians(theirs)
        if isinstance(mine, str):
            print(f"| {side.name} | failed: `{mine}` | | | | | |")
            continue
        computed = statistics.median(r["positions"] / r["seconds"] for r in side.runs)
        share = f"{median(side.runs, 'loss_tokens'):.0f} / {median(side.runs, 'positions'):.0f}"
        ratios = ["", ""] if side.tool == "llamafactory" or isinstance(ref, str) else \
            [f"{mine[0] / ref[0]:.2f}", f"{mine[1] / ref[1]:.2f}"]
        print(f"| {side.name} | {mine[0]:.1f} | {computed:.1f} | {mine[1]:.2f} | {share} | {ratios[0]} | {ratios[1]} |")

if __name__ == "__main__":
    main()
