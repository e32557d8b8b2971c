"""`cutegpt train sft` vs LLaMA-Factory, side by side: LoRA and QLoRA on CPU, tokens/s and peak RSS.

    python benchmarks/bench_llamafactory.py --llamafactory-python /path/to/venv/bin/python [--steps 2] [--repeats 3]

(or set $LLAMAFACTORY_PYTHON). LLaMA-Factory lives in its own virtual environment (it pins other
transformers/peft versions); see docs/benchmarks.md for how it was installed.

Both sides train the embedded SmolLM2-135M-Instruct on the original CuteGPT sample data
(../shared/data/cutegpt_ift_sample.pkl, or $CUTEGPT_SHARED/data/...) with the same settings: LoRA r 8,
alpha 16, dropout 0.05 on q_proj/v_proj, lr 3e-4 constant, AdamW (0.98, 0.999, eps 1e-9), rows of at most
512 tokens, micro-batch 2 x accumulation 2, one precision for both (`--precision`; auto = what `cutegpt train` picks:
bf16 (cutegpt `--precision bf16`, LLaMA-Factory `bf16: true`) where the CPU has native bf16, else fp32, where
emulated bf16 would only measure the emulation), one torch thread, the same number of optimizer steps.
LLaMA-Factory gets the data as sharegpt JSON (written by cutegpt's own reader into a temporary folder) and a
template registered to render exactly cutegpt's (system line, `问：...\\n答：\\n`, answer + `<end>`, EOS once at
the end), packed with its `neat_packing` (samples kept apart, like cutegpt's bins).

Every run is its own process, measured from inside by lf_harness.py, the same code for both sides (counter
"sft": loss-bearing tokens, labels != -100 at positions 1.., over the wall and the CPU time of `Trainer.train()`;
peak RSS = VmHWM). The runs are interleaved (A B C ... A B C ...) and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench_train import DATA, ROOT  # run from benchmarks/ like the other side-by-side benchmarks
from lf_harness import Side, cpu_model, interleave, out_dir, print_table, run_measured, versions, work_dir

MAX_LENGTH = 512
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}


def cutegpt_args(side: Side, model: Path, out: Path, steps: int, precision: str, max_length: int = MAX_LENGTH) -> list[str]:
    args = ["train", "sft", "--model", str(model), "--template", "cutegpt", "--data", str(DATA),
            "--max-length", str(max_length), "--packing", "bins", "--out", str(out), "--overwrite",
            "--method", "lora", "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]),
            "--lora-dropout", str(LORA["dropout"]), "--lora-targets", *LORA["targets"],
            "--micro-batch", "2", "--grad-accum", "2", "--max-steps", str(steps), "--lr", "3e-4",
            "--lr-scheduler", "constant", "--warmup-steps", "0", "--adam-betas", "0.98", "0.999", "--adam-eps", "1e-9",
            "--precision", precision, "--threads", "1", "--save-steps", "100000", "--report-to", "none", "--seed", "42"]
    if side.checkpointing:
        args.append("--gradient-checkpointing")
    if side.quant:
        args += ["--quantization", "4bit", "--bnb-4bit-type", "nf4", "--double-quant"]
    return args + side.extra


def llamafactory_config(side: Side, model: Path, dataset_dir: Path, out: Path, steps: int, precision: str,
                        max_length: int = MAX_LENGTH) -> dict:
    """LLaMA-Factory's YAML keys; gradient checkpointing stays at its default (on)."""
    cfg = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"],
        "lora_target": ",".join(LORA["targets"]),
        "dataset": "cutegpt_sample", "dataset_dir": str(dataset_dir), "template": "cutegpt",
        "cutoff_len": max_length, "neat_packing": True, "overwrite_cache": True,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": steps,
        "learning_rate": 3e-4, "lr_scheduler_type": "constant", "warmup_steps": 0,
        "adam_beta1": 0.98, "adam_beta2": 0.999, "adam_epsilon": 1e-9, "max_grad_norm": 1.0, "weight_decay": 0.0,
        "bf16": precision == "bf16", "use_cpu": True,  # use_cpu: without it the Trainer refuses bf16 on a machine with no GPU
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llamafactory-python", default=os.environ.get("LLAMAFACTORY_PYTHON"),
                   help="python of the virtual environment with llamafactory installed (default: $LLAMAFACTORY_PYTHON)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per side (the median is reported)")
    p.add_argument("--no-qlora", action="store_true", help="LoRA only (QLoRA roughly doubles the run time)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="both sides' compute precision; auto = bf16 on a CPU with native bf16, else fp32 (as `cutegpt train`)")
    p.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                   help="with --checkpoint-keep or N > 1: also run cutegpt with --gradient-checkpointing --checkpoint-every N")
    p.add_argument("--checkpoint-keep", choices=("inputs", "matmuls"), default="inputs",
                   help="with matmuls: also run cutegpt with --gradient-checkpointing --checkpoint-keep matmuls")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH,
                   help="row length of both sides (LLaMA-Factory's cutoff_len; its own default is 2048): longer rows hold "
                        "several conversations")
    p.add_argument("--compare-sdpa", action="store_true",
                   help="also run cutegpt with checkpointing on plain SDPA (--attn-implementation sdpa: every block of a "
                        "packed row) beside its CPU default (segments: each sample's causal triangle)")
    p.add_argument("--only-partial", action="store_true",
                   help="of cutegpt, run only the partial-checkpointing sides (and LLaMA-Factory's)")
    a = p.parse_args()
    if not DATA.is_file():
        print(f"skipped: the shared sample data {DATA} is absent (set $CUTEGPT_SHARED to the folder holding data/)")
        return
    if not a.llamafactory_python or not Path(a.llamafactory_python).is_file():
        print("skipped: no LLaMA-Factory python (give --llamafactory-python or set $LLAMAFACTORY_PYTHON to the python of a "
              f"venv with llamafactory installed); got {a.llamafactory_python!r}")
        return
    from cutegpt.model.embedded import embedded_model_dir

    from cutegpt.training.prepare import resolve_precision

    precision = resolve_precision(a.precision)
    model = embedded_model_dir()
    work = work_dir("bench-lf-")
    n = write_llamafactory_dataset(work / "lf-data")
    sides = []
    for quant in (False, True) if not a.no_qlora else (False,):
        method = "QLoRA" if quant else "LoRA"
        if not a.only_partial:
            sides += [Side(f"cutegpt {method}", "cutegpt", quant=quant),
                      Side(f"cutegpt {method}, checkpointing", "cutegpt", quant=quant, checkpointing=True)]
        if a.checkpoint_every > 1 or a.checkpoint_keep != "inputs":
            what = ", ".join(w for w in (f"every {a.checkpoint_every} layers" if a.checkpoint_every > 1 else "",
                                         f"keeping {a.checkpoint_keep}" if a.checkpoint_keep != "inputs" else "") if w)
            sides.append(Side(f"cutegpt {method}, checkpointing {what}", "cutegpt", quant=quant, checkpointing=True,
                              extra=["--checkpoint-every", str(a.checkpoint_every), "--checkpoint-keep", a.checkpoint_keep]))
        if a.compare_sdpa:
            sides.append(Side(f"cutegpt {method}, checkpointing, plain SDPA", "cutegpt", quant=quant, checkpointing=True,
                              extra=["--attn-implementation", "sdpa"]))
        sides.append(Side(f"LLaMA-Factory {method} (neat_packing, checkpointing)", "llamafactory", quant=quant, checkpointing=True))
    print(f"{n} conversations; {a.steps} steps of 2 x 2 rows <= {a.max_length} tokens; 1 thread per run; "
          f"{a.repeats} interleaved repeats; {precision}; CPU {cpu_model()}; load average at start {os.getloadavg()[0]:.2f}; work dir {work}", flush=True)

    def run(side: Side, i: int) -> dict:
        out = out_dir(side, i, work)
        if side.tool == "cutegpt":
            return run_measured(side, i, "sft", work, sys.executable, cutegpt_args(side, model, out, a.steps, precision, a.max_length), ROOT / "src")
        return run_measured(side, i, "sft", work, a.llamafactory_python,
                            [llamafactory_config(side, model, work / "lf-data", out, a.steps, precision, a.max_length)], ROOT / "src")

    interleave(sides, a.repeats, run)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; cutegpt: {versions(sys.executable)}; "
          f"LLaMA-Factory: {versions(a.llamafactory_python)}\n")
    # loss-bearing tokens/s also depends on how much of each row is prompt, which differs where the two tools cut
    # long conversations: the computed positions/s column is the work rate
    print_table(sides, "loss-bearing tokens")


if __name__ == "__main__":
    main()
