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
import resource
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

    def prepare():
        kept["p"] = prepare_sft(cfg)
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


def main() -> None:
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
        res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
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
