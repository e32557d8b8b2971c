"""Chat inference on the embedded SmolLM2-135M-Instruct, ours vs plain transformers, side by side.

    python benchmarks/bench_chat_engine.py [--threads 1] [--repeats 3] [--tokens 128]

Prints three tables:
  1. decode tokens/s: `model.generate` vs our engine (same weights, greedy, same token count),
     and our engine on int8 / bf16 weights;
  2. time to first token at turn 8 (~1,500 tokens of history): KV reuse vs re-encoding everything;
  3. 8-bit weights: real bytes, decode tokens/s, top-1 agreement with fp32 (English / Chinese).
Medians of --repeats runs, interleaved so that machine load hits every variant alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cutegpt.chat.engine import Engine, GenerationArgs
from cutegpt.chat.session import ChatSession
from cutegpt.model.loading import ModelArgs, load_model, weight_bytes
from cutegpt.templates import Turn, encode_segments

from bench_chat import CHINESE, ENGLISH, PROMPT  # the same texts as the backend comparison (run from benchmarks/)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def plain_generate_decode(lm, ids: list[int], n: int) -> tuple[float, list[int]]:
    """Decode tokens/s of `model.generate`: (total - first-token time) over n-1 tokens."""
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    common = dict(attention_mask=mask, do_sample=False, repetition_penalty=1.1, pad_token_id=lm.tokenizer.pad_token_id)
    with torch.inference_mode():
        t0 = time.perf_counter()
        lm.model.generate(x, max_new_tokens=1, **common)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = lm.model.generate(x, max_new_tokens=n, min_new_tokens=n, **common)
        total = time.perf_counter() - t0
    return (n - 1) / (total - first), out[0, len(ids):].tolist()


def engine_decode(lm, ids: list[int], n: int) -> tuple[float, list[int]]:
    gen = GenerationArgs(greedy=True, max_new_tokens=n, ignore_eos=True)
    r = Engine(lm, reuse_cache=False).generate(ids, gen)
    return r.decode_tokens_per_second, r.token_ids


def teacher_forced_top1(lm, ref_lm, text: str) -> float:
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        a = lm.model(ids).logits.argmax(-1)
        b = ref_lm.model(ids).logits.argmax(-1)
    return float((a == b).float().mean())


def bench_decode(variants: dict, ids: list[int], n: int, repeats: int) -> dict:
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    tokens: dict[str, list[int]] = {}
    for _ in range(repeats):
        for name, (fn, lm) in variants.items():
            tps, toks = fn(lm, ids, n)
            speeds[name].append(tps)
            tokens[name] = toks
    return {k: median(v) for k, v in speeds.items()}, tokens


def bench_turn8(lm, repeats: int) -> dict:
    """Turn 8 of a conversation whose first 7 turns hold ~1,500 tokens."""
    answer = ("Rayleigh scattering makes short wavelengths scatter more than long ones, so blue light fills the sky "
              "while the sun itself looks yellow; at sunset light crosses more air and the blue is scattered away. ") * 5
    history = [Turn(f"Question {i}: tell me about light and colour, part {i}.", output=answer) for i in range(6)]
    gen = GenerationArgs(greedy=True, max_new_tokens=16)
    results = {"reuse": [], "re-encode": []}
    outputs = {}
    prompt_tokens = 0
    for _ in range(repeats):
        for mode in ("reuse", "re-encode"):
            s = ChatSession(lm, gen, memory_limit=8, reuse_cache=(mode == "reuse"))
            s.history = list(history)
            s.ask("Question 6: and what about rainbows?")  # turn 7 fills the cache
            r = s.ask("Question 7: summarise everything in one sentence.")  # turn 8
            results[mode].append(r.time_to_first_token)
            outputs[mode] = r.token_ids
            prompt_tokens = r.prompt_tokens
            if mode == "reuse":
                reused = r.reused_tokens
    return {"prompt_tokens": prompt_tokens, "reused_tokens": reused,
            "ttft_reuse_s": median(results["reuse"]), "ttft_reencode_s": median(results["re-encode"]),
            "same_tokens": outputs["reuse"] == outputs["re-encode"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    fp32 = load_model(ModelArgs(dtype="float32"))
    bf16 = load_model(ModelArgs(dtype="bfloat16"))
    q8 = load_model(ModelArgs(load_in_8bit=True, int8_backend="quanto"))
    bnb = load_model(ModelArgs(load_in_8bit=True, int8_backend="bitsandbytes"))
    ids = encode_segments(fp32.tokenizer, fp32.template.segments([Turn(PROMPT)]))[0]

    # warm-up (first calls allocate and pick kernels)
    for lm in (fp32, bf16, q8, bnb):
        engine_decode(lm, ids, 4)
    plain_generate_decode(fp32, ids, 4)

    variants = {
        "transformers generate, fp32": (plain_generate_decode, fp32),
        "cutegpt engine, fp32": (engine_decode, fp32),
        "transformers generate, bf16": (plain_generate_decode, bf16),
        "cutegpt engine, bf16": (engine_decode, bf16),
        "cutegpt engine, int8 quanto (bf16 compute)": (engine_decode, q8),
        "cutegpt engine, int8 bitsandbytes": (engine_decode, bnb),
    }
    speeds, tokens = bench_decode(variants, ids, args.tokens, args.repeats)
    base = speeds["transformers generate, fp32"]
    same = tokens["cutegpt engine, fp32"] == tokens["transformers generate, fp32"]
    print(f"\n## 1. Decode, {args.tokens} greedy tokens after a {len(ids)}-token prompt, {args.threads} thread(s), median of {args.repeats}")
    print("| variant | decode tok/s | vs generate fp32 |\n|---|---|---|")
    for k, v in speeds.items():
        print(f"| {k} | {v:.1f} | {v / base:.2f}x |")
    print(f"fp32 engine tokens identical to generate: {same}")

    t8 = bench_turn8(fp32, args.repeats)
    print(f"\n## 2. Time to first token at turn 8 ({t8['prompt_tokens']} prompt tokens, {t8['reused_tokens']} served from the cache)")
    print("| mode | TTFT s |\n|---|---|")
    print(f"| re-encode whole history (original, LLaMA-Factory, FastChat) | {t8['ttft_reencode_s']:.3f} |")
    print(f"| cutegpt KV reuse | {t8['ttft_reuse_s']:.3f} |")
    print(f"speed-up: {t8['ttft_reencode_s'] / t8['ttft_reuse_s']:.1f}x; identical answers: {t8['same_tokens']}")

    mem = {name: weight_bytes(lm.model) for name, lm in [("fp32", fp32), ("bf16", bf16), ("int8 quanto", q8), ("int8 bitsandbytes", bnb)]}
    agree = {name: (teacher_forced_top1(lm, fp32, ENGLISH), teacher_forced_top1(lm, fp32, CHINESE))
             for name, lm in [("bf16", bf16), ("int8 quanto", q8), ("int8 bitsandbytes", bnb)]}
    print("\n## 3. 8-bit weights (real bytes of parameters and buffers; top-1 agreement with fp32, teacher-forced)")
    print("| weights | MB | vs bf16 | decode tok/s | top-1 agree EN / ZH |\n|---|---|---|---|---|")
    speed_of = {"fp32": speeds["cutegpt engine, fp32"], "bf16": speeds["cutegpt engine, bf16"],
                "int8 quanto": speeds["cutegpt engine, int8 quanto (bf16 compute)"],
                "int8 bitsandbytes": speeds["cutegpt engine, int8 bitsandbytes"]}
    for name, b in mem.items():
        a = agree.get(name)
        agree_s = f"{a[0] * 100:.1f} / {a[1] * 100:.1f} %" if a else "reference"
        print(f"| {name} | {b / 1e6:.0f} | {b / mem['bf16']:.2f}x | {speed_of[name]:.1f} | {agree_s} |")
    # LLaMA-13B: 40 layers, hidden 5120, MLP 13824, vocab 32000, untied head; embeddings + head stay 16-bit
    layers = 40 * (4 * 5120 * 5120 + 3 * 5120 * 13824)
    emb = 2 * 32000 * 5120
    print(f"Projection for LLaMA-13B: embeddings + head are {emb / (layers + emb) * 100:.1f}% of the weights; "
          f"int8 layers + 16-bit embeddings = {(layers + 2 * emb) / 1e9:.1f} GB vs {2 * (layers + emb) / 1e9:.1f} GB bf16 "
          f"({(layers + 2 * emb) / (2 * (layers + emb)):.2f}x).")
    if args.json:
        Path(args.json).write_text(json.dumps({"decode": speeds, "turn8": t8, "bytes": mem, "agreement": agree}, indent=2))


if __name__ == "__main__":
    main()
