"""Where the time of a LoRA SFT step goes: `cutegpt train sft` on the embedded model under torch.profiler.

    python benchmarks/profile_sft.py [--steps 3] [-- EXTRA CUTEGPT FLAGS ...]

The real CLI runs in this process with bench_llamafactory.py's settings (LoRA r 8 q/v, dropout 0.05, rows <= 512,
micro-batch 2 x accumulation 2, one thread) in fp32 with gradient checkpointing, unless the extra flags say otherwise.
The first optimizer step is warm-up; the profiler records the second one (its two micro-batches and the optimizer).
Every aten op's own CPU time is put into one bucket: matmuls by their shapes (which layer they belong to),
attention, elementwise parts of the layers, the loss, the optimizer. Recomputation by checkpointing is not an op of
its own: compare a run with `--gradient-checkpointing` to one without (the forward buckets grow by one forward).
"""

from __future__ import annotations

import argparse
import collections
import runpy
import sys
import tempfile
from pathlib import Path

from bench_llamafactory import LORA, MAX_LENGTH
from bench_train import DATA
from machine import cpu_model


def classify(name: str, shapes: list, hidden: int, inter: int, vocab: int, rank: int) -> str:
    """The bucket of one aten op, from its name and its input shapes."""
    dims = {d for s in shapes if isinstance(s, (list, tuple)) for d in s if isinstance(d, int)}
    if name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "aten::linear"):
        if vocab in dims:
            return "lm_head + loss (chunked)"
        if rank in dims:
            return "LoRA matmuls"
        if inter in dims:
            return "MLP matmuls"
        return "attention projections (q, k, v, o)"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention core (SDPA)"
    if any(k in name for k in ("logsumexp", "gather", "exp_", "index_put", "scatter")):
        return "lm_head + loss (chunked)"
    if any(k in name for k in ("bernoulli", "dropout", "native_dropout")):
        return "LoRA dropout"
    if any(k in name for k in ("_foreach", "adam", "addcdiv", "lerp", "sqrt", "norm", "clamp")) and "rsqrt" not in name:
        return "optimizer + grad clipping"
    if any(k in name for k in ("silu",)):
        return "MLP activation"
    if any(k in name for k in ("rsqrt", "pow", "mean")):
        return "RMSNorm"
    if any(k in name for k in ("cat", "neg", "slice_backward", "cos", "sin")):
        return "rotary embedding"
    if any(k in name for k in ("embedding",)):
        return "embeddings"
    if name in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::empty_like",
                "aten::zeros", "aten::zero_", "aten::fill_", "aten::empty", "aten::empty_strided", "aten::full"):
        return "copies / allocation"
    if name in ("aten::mul", "aten::add", "aten::add_", "aten::mul_", "aten::sub", "aten::div", "aten::sum", "aten::div_"):
        return "other elementwise (residual adds, scales, norm/rope/activation muls)"
    return "other ops"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (only the second is profiled)")
    p.add_argument("--top", type=int, default=25, help="also print the N ops with the most own CPU time")
    p.add_argument("extra", nargs="*", help="more cutegpt train sft flags (after --), e.g. --precision fp32")
    a = p.parse_args()
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    from cutegpt.model.embedded import embedded_model_dir

    model = embedded_model_dir()
    cfg = transformers.AutoConfig.from_pretrained(model)
    out = Path(tempfile.mkdtemp(prefix="profile-sft-")) / "run"
    args = ["train", "sft", "--model", str(model), "--template", "cutegpt", "--data", str(DATA), "--max-length", str(MAX_LENGTH),
            "--out", str(out), "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]),
            "--lora-dropout", str(LORA["dropout"]), "--lora-targets", *LORA["targets"], "--micro-batch", "2", "--grad-accum", "2",
            "--max-steps", str(a.steps), "--lr-scheduler", "constant", "--warmup-steps", "0", "--threads", "1",
            "--save-steps", "100000", "--report-to", "none", "--precision", "fp32", "--gradient-checkpointing", *a.extra]
    if "--no-gradient-checkpointing" in a.extra:
        args = [x for x in args if x not in ("--gradient-checkpointing", "--no-gradient-checkpointing")]
    torch.set_num_threads(1)
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    micro = {"n": 0, "positions": 0, "tokens": 0}
    step = transformers.Trainer.training_step

    def profiled_step(self, model, inputs, *x, **kw):
        micro["n"] += 1
        if micro["n"] == 3:  # after the first optimizer step (2 micro-batches)
            prof.start()
        if micro["n"] == 5:  # one optimizer step recorded (more makes the trace large and slow to summarise)
            prof.stop()
        if micro["n"] in (3, 4):
            micro["positions"] += inputs["labels"].numel()
            micro["tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
        with torch.profiler.record_function("## forward + backward"):
            return step(self, model, inputs, *x, **kw)

    transformers.Trainer.training_step = profiled_step
    sys.argv = ["cutegpt", *args]
    try:
        runpy.run_module("cutegpt", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code:
            raise
    finally:
        if micro["n"] < 5:
            prof.stop()
    events = prof.key_averages(group_by_input_shape=True)
    buckets: dict[str, float] = collections.Counter()
    for ev in events:
        if not ev.key.startswith("aten::"):
            continue
        buckets[classify(ev.key, ev.input_shapes or [], cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, LORA["r"])] += ev.self_cpu_time_total
    total = sum(buckets.values())
    step_us = next((ev.cpu_time_total for ev in prof.key_averages() if ev.key == "## forward + backward"), 0)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, transformers {transformers.__version__}; flags: {' '.join(args[args.index('--threads'):])}")
    print(f"profiled 2 micro-batches ({micro['positions']} positions, {micro['tokens']} loss-bearing): "
          f"{total / 1e6:.2f} s in aten ops, of which forward + backward {step_us / 1e6:.2f} s (the rest: optimizer, collation, loop)")
    print("| bucket | own CPU s | share |\n|---|---|---|")
    for name, us in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {us / 1e6:.2f} | {100 * us / total:.1f}% |")
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))


if __name__ == "__main__":
    main()
