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
proportional rule), bf16 or fp32 (--precision) on both sides, one torch thread, the same steps.

Measured inside each training process by lf_harness.py (the same code as the SFT comparison, counter "pref"):
tokens = non-padding tokens of the chosen and rejected sequences given to `Trainer.training_step`, over the wall
time and over the CPU time of `Trainer.train()`; peak RSS = VmHWM. Runs are interleaved and medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench_train import DATA, ROOT
from lf_harness import Side, cpu_model, interleave, out_dir, print_table, run_measured, versions, work_dir

MAX_LENGTH = 512
PRECISION = ["bf16"]  # --precision sets it, for both sides
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}


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
        "lr_scheduler_type": "constant", "warmup_steps": 0, "bf16": PRECISION[0] == "bf16", "use_cpu": True, "output_dir": str(out),
        "overwrite_output_dir": True, "save_strategy": "no", "logging_steps": 1, "report_to": "none", "seed": 42,
        "dataloader_num_workers": 0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llamafactory-python", default=os.environ.get("LLAMAFACTORY_PYTHON"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--references-only", action="store_true", help="only our reference strategies (memory)")
    p.add_argument("--lora-only", action="store_true", help="no full-tuning sides")
    p.add_argument("--pairs", type=int, default=None, help="use the first N pairs (default: all)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="both sides (fp32 on CPUs without native bf16, where torch emulates it)")
    p.add_argument("--compare-src", type=Path, default=None,
                   help="also run our LoRA side from this source tree (another commit's src/): before/after")
    p.add_argument("--only", nargs="+", default=None, help="run only the sides whose name contains one of these words")
    a = p.parse_args()
    PRECISION[0] = a.precision
    if not DATA.is_file():
        print(f"skipped: the shared sample data {DATA} is absent (set $CUTEGPT_SHARED)")
        return
    from cutegpt.model.embedded import embedded_model_dir

    model = embedded_model_dir()
    work = work_dir("bench-dpo-")
    n = write_pairs(work / "data", a.pairs)
    sides = [Side("cutegpt LoRA (reference: adapter disabled)", "cutegpt")]
    have_lf = bool(a.llamafactory_python and Path(a.llamafactory_python).is_file()) and not a.references_only
    if have_lf:
        sides.append(Side("LLaMA-Factory LoRA (checkpointing, its default)", "llamafactory", checkpointing=True))
    elif not a.references_only:
        print("no LLaMA-Factory python (--llamafactory-python / $LLAMAFACTORY_PYTHON): our side only")
    if a.compare_src:
        sides.append(Side(f"cutegpt LoRA from {a.compare_src}", "cutegpt", src=a.compare_src))
    if not a.references_only:
        sides.append(Side("cutegpt LoRA, checkpointing", "cutegpt", checkpointing=True))
    if not a.lora_only:
        full_lr = ["--method", "full", "--lr", "5e-7"]
        sides += [Side("cutegpt full (reference: frozen copy)", "cutegpt", extra=full_lr),
                  Side("cutegpt full, --precompute-ref", "cutegpt", extra=[*full_lr, "--precompute-ref"])]
    if a.only:
        sides = [s for s in sides if any(word in s.name for word in a.only)]
    print(f"{cpu_model()}; {n} pairs; {a.steps} steps of 2 x 2 pairs <= {MAX_LENGTH} tokens; 1 thread; {a.repeats} "
          f"interleaved repeats; load average at start {os.getloadavg()[0]:.2f}; work dir {work}", flush=True)

    def run(side: Side, i: int) -> dict:
        out = out_dir(side, i, work)
        if side.tool == "llamafactory":
            return run_measured(side, i, "pref", work, a.llamafactory_python,
                                [llamafactory_config(model, work / "data", out, a.steps)], ROOT / "src")
        return run_measured(side, i, "pref", work, sys.executable,
                            cutegpt_args(side, model, work / "data" / "pairs.json", out, a.steps), ROOT / "src")

    interleave(sides, a.repeats, run)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; cutegpt: {versions(sys.executable)}"
          + (f"; LLaMA-Factory: {versions(a.llamafactory_python)}" if have_lf else "") + "\n")
    print_table(sides, "tokens")


if __name__ == "__main__":
    main()
