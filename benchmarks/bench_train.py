"""LoRA SFT of the embedded SmolLM2-135M on CPU: `cutegpt train sft` (bins-packed rows) vs plain Trainer + peft (padded batches).

    python benchmarks/bench_train.py [--samples 96] [--max-length 512] [--threads 1] [--two-processes]

Both sides train the same LoRA (r 8, alpha 16, q_proj/v_proj, dropout 0.05),
bf16 autocast, lr 3e-4 constant, one pass over the same single-turn samples of
the original CuteGPT sample data (../shared/data/cutegpt_ift_sample.pkl beside the repository, or
$CUTEGPT_SHARED/data/...,
cutegpt template, truncated to --max-length), with about the same number of
samples per optimizer step. Each side runs in its own process (peak RSS is
that process's). Reported: trained (non-padding) tokens per second of
`trainer.train()`, peak RSS, and the loss of the trained adapter on all the
samples (each alone, token mean) -- the same yardstick for both.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CUTEGPT_SHARED") or ROOT.parent / "shared")
DATA = SHARED / "data" / "cutegpt_ift_sample.pkl"


def samples(tokenizer, n: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    from cutegpt.templates import Turn, encode_segments, get_template

    tpl = get_template("cutegpt")
    convs = pickle.load(open(DATA, "rb"))
    out = []
    for conv in convs:
        for t in conv:
            ids, train = encode_segments(tokenizer, tpl.segments([Turn(t["instruction"], t.get("input") or "", t["output"])]))
            ids, train = ids[: max_length - 1] + [tokenizer.eos_token_id], train[: max_length - 1] + [True]
            labels = [i if m else -100 for i, m in zip(ids, train)]
            labels[0] = -100
            out.append((ids, labels))
    return out[:n]


def eval_loss(model, data) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for ids, labels in data:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            lab = torch.tensor(labels[1:])
            total += torch.nn.functional.cross_entropy(logits, lab, ignore_index=-100, reduction="sum").item()
            count += int((lab != -100).sum())
    return total / count


def role_ours(a, work: Path) -> dict:
    from cutegpt.model.embedded import embedded_model_dir
    from cutegpt.model.loading import load_tokenizer
    from cutegpt.training import engine
    from cutegpt.training.sft import SFTConfig, prepare_sft
    from tests.training.conftest import write_dataset

    tok = load_tokenizer(embedded_model_dir())
    data = samples(tok, a.samples, a.max_length)
    folder = work / "data"
    if os.environ.get("RANK", "0") == "0" and not (folder / "manifest.json").exists():
        write_dataset(folder, tok, data, a.max_length)
    while not (folder / "manifest.json").exists():
        time.sleep(0.5)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = SFTConfig(data=[str(folder)], out=str(work / f"ours-{world}"), template="cutegpt", micro_batch=a.rows // world,
                    grad_accum=1, lr=3e-4, lr_scheduler="constant", warmup_steps=0, epochs=1, save_steps=10**6,
                    precision="bf16", threads=a.threads, seed=0,
                    deepspeed=str(ROOT / "configs" / "ds_zero1_cpu.json") if world > 1 else None)
    kept = {}

    def prepare(check_rows):
        kept["p"] = prepare_sft(cfg, check_rows)
        return kept["p"]

    summary = engine.train(cfg, prepare)
    rows = len(kept["p"].dataset)
    result = {"side": f"cutegpt ({world} proc)", "steps": summary["steps"], "rows": rows, "samples": len(data),
              "tokens": summary["tokens"], "train_seconds": summary["seconds"], "tokens_per_second": summary["tokens_per_second"]}
    if os.environ.get("RANK", "0") == "0":
        result["eval_loss"] = eval_loss(kept["p"].model, data)
    return result


def role_baseline(a, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from cutegpt.model.embedded import embedded_model_dir
    from cutegpt.model.loading import load_tokenizer

    torch.set_num_threads(a.threads)
    path = embedded_model_dir()
    tok = load_tokenizer(path)
    data = samples(tok, a.samples, a.max_length)
    ds = Dataset.from_dict({"input_ids": [d[0] for d in data], "labels": [d[1] for d in data],
                            "attention_mask": [[1] * len(d[0]) for d in data]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(work / "baseline"), per_device_train_batch_size=a.baseline_batch,
                             gradient_accumulation_steps=1, learning_rate=3e-4, lr_scheduler_type="constant",
                             num_train_epochs=1, bf16=True, use_cpu=True, logging_steps=1, save_strategy="no",
                             report_to=[], seed=0, disable_tqdm=True, adam_beta1=0.98, adam_epsilon=1e-9)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = sum(len(d[0]) for d in data)
    return {"side": "Trainer + peft, padded", "steps": trainer.state.global_step, "rows": len(data), "samples": len(data),
            "tokens": tokens, "train_seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 1),
            "eval_loss": eval_loss(model, data)}


def run_role(role: str, a, work: Path, nproc: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=f"{ROOT}:{ROOT / 'src'}")
    result = work / f"{role}-{nproc}.json"
    cmd = [sys.executable, __file__, "--role", role, "--work", str(work), "--samples", str(a.samples),
           "--max-length", str(a.max_length), "--threads", str(a.threads), "--rows", str(a.rows),
           "--baseline-batch", str(a.baseline_batch), "--result", str(result)]
    if nproc > 1:
        from cutegpt.training.ds_config import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *cmd[1:]]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


# ---------------------------------------------------------------- suites added for issue 14

def run_measured(flags: list[str], work: Path, name: str, env_extra: dict | None = None) -> dict:
    """Like measure(), but the child's own peak RSS via a tiny wrapper (RUSAGE_CHILDREN mixes children)."""
    out = work / name
    res = work / f"{name}.rss"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", **(env_extra or {}))
    wrapper = work / "rss_wrapper.py"
    wrapper.write_text(
        "import runpy, sys\n"
        "from cutegpt.model.loading import peak_rss\n"
        "res = sys.argv.pop(1)\n"
        "sys.argv = ['cutegpt'] + sys.argv[1:]\n"
        "code = 0\n"
        "try:\n"
        "    runpy.run_module('cutegpt', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    code = e.code or 0\n"
        "open(res, 'w').write(str(peak_rss() // 1024))\n"
        "sys.exit(code)\n")
    cmd = [sys.executable, str(wrapper), str(res), "train", "sft", "--out", str(out), *flags]
    r = subprocess.run(cmd, env=env, capture_output=True)
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr.decode()[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["peak_rss_gib"] = int(res.read_text()) / 1024 ** 2
    return summary


def base_flags(L: int, steps: int, extra: list[str]) -> list[str]:
    return ["--data", str(DATA), "--max-length", str(L), "--micro-batch", "2", "--grad-accum", "1", "--max-steps", str(steps),
            "--save-steps", "1000", "--precision", "bf16", "--threads", "1", "--lr", "3e-4", "--warmup-steps", "0",
            "--report-to", "none", *extra]


def planned(L: int, method: str, quant: str, ckpt: bool, precision: str = "bf16") -> float:
    from cutegpt.model.embedded import embedded_model_dir
    from cutegpt.training.plan import PlanInput, estimate, read_shape

    shape = read_shape(embedded_model_dir())
    return estimate(shape, PlanInput(method=method, precision=precision, quantization=quant, seq_len=L, micro_batch=2,
                                     gradient_checkpointing=ckpt)).peak / 1024 ** 3


def suite_quant(a, work: Path) -> None:
    """LoRA 16-bit vs 8-bit LoRA vs QLoRA (+ the old full-logits loss), same steps, validation loss after them."""
    rows = []
    for name, extra, env in [
        ("LoRA 16-bit, full-vocabulary logits (before)", [], {"CUTEGPT_FULL_LOGITS": "1"}),
        ("LoRA 16-bit", [], None),
        ("8-bit LoRA", ["--quantization", "8bit"], None),
        ("QLoRA NF4", ["--quantization", "4bit"], None),
    ]:
        flags = base_flags(a.max_length, a.steps, ["--val-ratio", "0.05", "--eval-steps", str(a.steps), *extra])
        r = run_measured(flags, work, name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""), env)
        quant = "8bit" if "8-bit" in name else "4bit" if "QLoRA" in name else "none"
        r["plan_gib"] = planned(a.max_length, "lora", quant, False)
        rows.append((name, r))
        print(f"{name:<46} {r['tokens_per_second']:>9.1f} tok/s  peak {r['peak_rss_gib']:.2f} GiB  plan {r['plan_gib']:.2f} GiB  "
              f"val loss {r.get('final_val_loss', float('nan')):.4f}", flush=True)
    print("\n| run | tokens/s | peak RSS GiB | plan GiB | plan / measured | validation loss |\n|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['tokens_per_second']:.1f} | {r['peak_rss_gib']:.2f} | {r['plan_gib']:.2f} | "
              f"{r['plan_gib'] / r['peak_rss_gib']:.2f} | {r.get('final_val_loss', float('nan')):.4f} |")


def suite_grid(a, work: Path) -> None:
    """The plan's predicted peak vs the measured peak RSS over method x quantization x checkpointing x length."""
    print("| method | L | checkpointing | plan GiB | measured GiB | plan / measured |\n|---|---|---|---|---|---|")
    for method, quant in (("lora", "none"), ("lora", "4bit"), ("full", "none")):
        for ckpt in (False, True):
            for L in a.lengths:
                extra = ["--method", method, "--quantization", quant] + (["--gradient-checkpointing"] if ckpt else [])
                if method == "full":
                    extra += ["--template", "chatml"]
                r = run_measured(base_flags(L, 2, extra), work, f"grid-{method}-{quant}-{ckpt}-{L}")
                p = planned(L, method, quant, ckpt)
                print(f"| {method}{' ' + quant if quant != 'none' else ''} | {L} | {'on' if ckpt else 'off'} | {p:.2f} | "
                      f"{r['peak_rss_gib']:.2f} | {p / r['peak_rss_gib']:.2f} |", flush=True)


def suite_table() -> None:
    """Plan figures for LLaMA 7B/13B on one GPU (weights as `train` loads them, micro-batch 1 x 512 tokens, checkpointing) beside the
    'Hardware Requirement' table of LLaMA-Factory's README (the version for 7B/13B, as kept in forks of it)."""
    from cutegpt.training.args import training_weight_dtype
    from cutegpt.training.plan import ModelShape, PlanInput, estimate

    shapes = {"7B": ModelShape(4096, 11008, 32, 32, 32, 32000, False, "llama-7b"),
              "13B": ModelShape(5120, 13824, 40, 40, 40, 32000, False, "llama-13b")}
    lf = {("full", "none"): {"7B": 160, "13B": 320}, ("lora", "none"): {"7B": 16, "13B": 32},
          ("lora", "8bit"): {"7B": 10, "13B": 16}, ("lora", "4bit"): {"7B": 6, "13B": 12}}
    print("| setting | 7B plan GiB | 7B LLaMA-Factory GB | 13B plan GiB | 13B LLaMA-Factory GB |\n|---|---|---|---|---|")
    for (method, quant), ref in lf.items():
        cells = []
        for size in ("7B", "13B"):
            weights = training_weight_dtype(method, "bf16")  # as `train` loads them
            inp = PlanInput(method=method, precision="bf16", weight_dtype=weights, quantization=quant, seq_len=512,
                            micro_batch=1, gradient_checkpointing=True, device="cuda")
            cells += [f"{estimate(shapes[size], inp).peak / 1024 ** 3:.1f}", str(ref[size])]
        label = {"none": "16-bit", "8bit": "8-bit", "4bit": "4-bit"}[quant]
        print(f"| {method} {label} | " + " | ".join(cells) + " |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("quant", "grid", "table"):
        q = argparse.ArgumentParser()
        q.add_argument("suite")
        q.add_argument("--max-length", type=int, default=512)
        q.add_argument("--steps", type=int, default=4)
        q.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
        a = q.parse_args()
        if a.suite != "table" and not DATA.is_file():
            raise SystemExit(f"{DATA} is missing (set CUTEGPT_SHARED)")
        work = Path(tempfile.mkdtemp(prefix="bench-train-"))
        print(f"one torch thread per run; loaded shared machine; work dir {work}", flush=True)
        {"quant": lambda: suite_quant(a, work), "grid": lambda: suite_grid(a, work), "table": suite_table}[a.suite]()
        return
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=2, help="packed rows per step (ours)")
    p.add_argument("--baseline-batch", type=int, default=0, help="samples per step (baseline); 0 = same samples per step as ours")
    p.add_argument("--two-processes", action="store_true")
    p.add_argument("--role"), p.add_argument("--work"), p.add_argument("--result")
    a = p.parse_args()
    if not DATA.is_file():
        print(f"skipped: the shared sample data {DATA} is absent (set $CUTEGPT_SHARED to the folder holding data/)")
        return
    if a.role:
        work = Path(a.work)
        res = role_ours(a, work) if a.role == "ours" else role_baseline(a, work)
        from cutegpt.model.loading import peak_rss

        res["peak_rss_mb"] = round(peak_rss() / 1024 ** 2)
        if os.environ.get("RANK", "0") == "0":
            Path(a.result).write_text(json.dumps(res))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    print(f"torch threads per process: {a.threads}; samples {a.samples}; L = {a.max_length}; work dir {work}")
    ours = run_role("ours", a, work)
    if a.baseline_batch == 0:
        a.baseline_batch = max(1, round(ours["samples"] / ours["rows"] * a.rows))
    base = run_role("baseline", a, work)
    results = [ours, base]
    if a.two_processes:
        results.append(run_role("ours", a, work, nproc=2))
    print(f"\nsamples per step: ours {ours['samples'] / ours['steps']:.1f} ({a.rows} packed rows), baseline {a.baseline_batch}")
    print(f"{'side':<26}{'steps':>6}{'tokens':>8}{'train s':>9}{'tokens/s':>10}{'peak RSS MB':>13}{'eval loss':>11}")
    for r in results:
        print(f"{r['side']:<26}{r['steps']:>6}{r['tokens']:>8}{r['train_seconds']:>9}{r['tokens_per_second']:>10}"
              f"{r['peak_rss_mb']:>13}{r.get('eval_loss', float('nan')):>11.4f}")
    print(f"\nspeed ours / baseline: {ours['tokens_per_second'] / base['tokens_per_second']:.2f}x; "
          f"peak RSS ours / baseline: {ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}; "
          f"eval loss ours - baseline: {ours['eval_loss'] - base['eval_loss']:+.4f}")
    if a.two_processes:
        print(f"2 processes / 1 process (ours): {results[2]['tokens_per_second'] / ours['tokens_per_second']:.2f}x")


if __name__ == "__main__":
    main()
