"""Benchmark: `cutegpt data convert` vs a faithful re-implementation of the original convert_data.py.

    python benchmarks/bench_data.py --n 100000

Generates N conversations (seeded; mixed Chinese and English, 1-5 turns) as the
original pickle and as JSON Lines, then runs each variant in a fresh process
and reports wall time, conversations/s, peak RSS and packing efficiency at
L = 2048, all with the embedded SmolLM2 tokenizer. torch is not used for
compute here (torch.set_num_threads(1) anyway); tokenizer threads are stated
per row: the fast tokenizer's batch encoding uses its own thread pool
(RAYON_NUM_THREADS), a per-sample loop cannot.

The baseline (`original`) is the original code path, kept here as a faithful
re-implementation: `get_multiround_data` (shuffle, group 1-10 conversations,
template pools with their bugs) then `GPT2Dataset_onlyres._preprocess` (one
tokenizer call per prompt and per answer, Python lists, concat with EOS) and a
pickle dump. The original used the slow SentencePiece `LlamaTokenizer`; this
baseline gets the fast tokenizer, which only flatters it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ZH = ("机器学习是人工智能的一个分支。", "深度学习使用多层神经网络。", "今天天气很好，我们去公园散步吧。", "请推荐五本名著。",
      "中国的首都是北京。", "红楼梦、西游记、水浒传、三国演义。", "健康饮食对人体十分重要。", "我们需要摄入平衡的营养。",
      "气候变化是当今最严重的环保问题之一。", "请解释一下这个概念。", "复旦大学位于上海。", "这个问题的答案是什么？")
EN = ("the quick brown fox jumps over the lazy dog language models predict next token write a python function that "
      "returns sum of two numbers capital of france is paris please explain why sky blue during day answer briefly "
      "summarize following text in one sentence translate into english").split()

# the original pools, bugs included (code/config.py)
ORIG_INPUT_POOL = ["Input:{}", "Question:{}", "Problem:{}", "Q:{}", "*Question*:{}", "(Problem){}", "{}", "{}", "{}"]
ORIG_POOL = {"wround_woinput": ["问：{}\n答：{}\n", "Instruction:{}\\Response:{}\n", "{}\n{}\n"],
             "wround_winput": ["背景：{}\n{}\n答：{}\n", "已知：{}\n{}\n回答：{}\n", "问：{}\n{}\n答：{}\n",
                               "Instruction:{}\n{}\nResponse:{}\n", "{}\n{}\n{}\n"]}
META = "你是复旦大学知识工场实验室训练出来的语言模型CuteGPT。给定任务描述，请给出对应请求的回答。\n"


def _text(rng: random.Random, zh: bool, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    if zh:
        return "".join(rng.choice(ZH) for _ in range(max(1, n // 12)))
    return " ".join(rng.choice(EN) for _ in range(max(1, n // 5))).capitalize() + "."


def generate(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        zh = rng.random() < 0.5
        turns = []
        for _ in range(rng.randint(1, 5)):
            turns.append({"instruction": _text(rng, zh, 10, 80),
                          "input": _text(rng, zh, 10, 120) if rng.random() < 0.3 else "",
                          "output": _text(rng, zh, 20, 600)})
        convs.append(turns)
    return convs


# ---------------------------------------------------------------- the baseline: the original's code path


def original_convert(data_pkl: Path, tokenizer, max_length: int, out_pkl: Path) -> dict:
    with open(data_pkl, "rb") as f:
        res = pickle.load(f)
    random.seed(0)
    random.shuffle(res)
    begin_idx, datas = 0, []
    while begin_idx < len(res):  # get_multiround_data
        num = random.randint(1, 10)
        samples = [e for lis in res[begin_idx:min(begin_idx + num, len(res))] for e in lis]
        prompts = [META]
        for s in samples:
            if s["input"] == "":
                text = (random.choice(ORIG_POOL["wround_woinput"]).format(s["instruction"], ""), s["output"] + "<end>")
            else:
                text = (random.choice(ORIG_POOL["wround_winput"]).format(s["instruction"], random.choice(ORIG_INPUT_POOL).format(s["input"]), ""),
                        s["output"] + "<end>")
            prompts.append(text)
        begin_idx += num
        datas.append(prompts)
    input_ids, labels = [], []  # GPT2Dataset_onlyres._preprocess
    meta_tokens = tokenizer(datas[0][0], padding=False, truncation=False, add_special_tokens=False)["input_ids"][-max_length // 3:]
    for data in datas:
        sample_input_ids = copy.copy(meta_tokens)
        sample_labels = [-100] * len(sample_input_ids)
        for idx, item in enumerate(data):
            if idx > 0:
                inp, out = item[0], item[1]
                input_tokens = tokenizer(inp, padding=False, truncation=False, add_special_tokens=False)["input_ids"][:max_length // 3]
                output_tokens = tokenizer(out, padding=False, truncation=False, add_special_tokens=False)["input_ids"][:2 * (max_length // 3) - 1]
                sample_input_ids += input_tokens + output_tokens
                sample_labels += [-100] * len(input_tokens) + output_tokens
        if len(sample_input_ids) != len(meta_tokens):
            input_ids += sample_input_ids
            labels += sample_labels
            input_ids += [tokenizer.eos_token_id]
            labels += [tokenizer.eos_token_id]
    attention_mask = [1] * len(input_ids)
    with open(out_pkl, "wb") as f:
        pickle.dump({"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}, f)
    return {"tokens": len(input_ids), "rows": len(input_ids) // max_length}


# ---------------------------------------------------------------- one variant in this process


class AnonPeak:
    """Peak anonymous resident memory (RssAnon), sampled every 20 ms.

    ru_maxrss also counts file pages mapped while reading Arrow files, which the
    kernel can drop at any time; RssAnon is the memory the process really holds.
    """

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]))
            self._stop.wait(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return self.peak / 1024


def _cpu() -> float:
    """CPU seconds of this process, its threads and its finished children: robust to other jobs on the machine."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    from cutegpt.model.embedded import embedded_model_dir

    src = Path(args.src)
    out = Path(args.work) / f"out-{args.variant}"
    anon = AnonPeak()
    t0 = time.perf_counter()
    c0 = _cpu()
    if args.variant == "tokenize-only":
        # the floor: the same texts through the Rust tokenizer and nothing else (what no converter can avoid)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(embedded_model_dir())
        convs = pickle.loads(src.read_bytes())
        texts = [META] + [t for c in convs for turn in c for t in (f"问：{turn['instruction']}\n答：\n", turn["output"] + "<end>")]
        t0 = time.perf_counter()
        c0 = _cpu()
        tokens = 0
        for k in range(0, len(texts), 2048):
            tokens += sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch_fast(texts[k:k + 2048], add_special_tokens=False))
        info = {"tokens": tokens, "rows": 0, "efficiency": None}
    elif args.variant == "original":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(embedded_model_dir())
        info = original_convert(src, tok, args.max_length, out.with_suffix(".pkl"))
        info["efficiency"] = None
    else:
        from cutegpt.data.convert import ConvertConfig, convert
        from cutegpt.data.manifest import read_manifest

        cfg = ConvertConfig(input=str(src), out=str(out), packing=args.packing, workers=args.workers, max_length=args.max_length,
                            template_pool=args.pool, group_single_turns=args.pool, overwrite=True)
        convert(cfg)
        m = read_manifest(out)
        info = {"tokens": m["counts"]["tokens"], "rows": m["counts"]["rows"], "efficiency": m["packing_efficiency"]}
    info["seconds"] = time.perf_counter() - t0
    info["cpu_seconds"] = _cpu() - c0
    info["peak_anon_mb"] = anon.stop()
    info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info["peak_rss_children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return info


def spawn(work: Path, variant: str, src: Path, env_extra: dict, **kw) -> dict:
    cmd = [sys.executable, __file__, "--_run", variant, "--_src", str(src), "--work", str(work)]
    for k, v in kw.items():
        cmd += [f"--_{k}", str(v)]
    env = {**os.environ, **env_extra}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100_000, help="conversations to generate")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--work", default="/tmp/cutegpt-bench-data")
    p.add_argument("--skip-original", action="store_true")
    p.add_argument("--_run"), p.add_argument("--_src"), p.add_argument("--_packing", default="bins")
    p.add_argument("--_workers", type=int, default=1), p.add_argument("--_pool", default="False")
    p.add_argument("--only", choices=["tokenize", "jsonl", "compare"],
                   help="tokenize: only the tokenizer floor on an existing WORK/gen.pkl; jsonl: only ours on JSON Lines (N and N/4); "
                        "compare: only the original vs ours (pickle 1 thread, JSON Lines 2 threads)")
    args = p.parse_args()
    if args._run:
        ns = argparse.Namespace(variant=args._run, src=args._src, work=args.work, packing=args._packing, workers=args._workers,
                                pool=args._pool == "True", max_length=args.max_length)
        print(json.dumps(run_variant(ns)))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.only == "tokenize":
        r = spawn(work, "tokenize-only", work / "gen.pkl", {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        print(f"tokenizer alone (Rust encode_batch_fast, 1 thread): {r['seconds']:.1f} s for {r['tokens']:,} tokens")
        return
    convs = generate(args.n)
    pkl, jsonl, jsonl_q = work / "gen.pkl", work / "gen.jsonl", work / "gen-quarter.jsonl"
    pkl.write_bytes(pickle.dumps(convs))
    with open(jsonl, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    with open(jsonl_q, "w", encoding="utf-8") as f:
        for c in convs[: args.n // 4]:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    n_turns = sum(len(c) for c in convs)
    del convs
    print(f"generated {args.n:,} conversations ({n_turns:,} turns, {pkl.stat().st_size / 1e6:.0f} MB pickle, "
          f"{jsonl.stat().st_size / 1e6:.0f} MB JSON Lines); L = {args.max_length}; machine: {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)

    one = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    two = {"RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}
    runs = []
    if args.only == "jsonl":  # the memory claim at full size, without the slow baseline
        runs.append(("ours JSONL, bins, 2 tokenizer threads", args.n, spawn(work, "bins-jsonl-2t", jsonl, two)))
        runs.append(("ours JSONL (N/4), bins, 2 tokenizer threads", args.n // 4, spawn(work, "bins-jsonl-q", jsonl_q, two)))
        _table(runs, with_baseline=False)
        return
    if not args.skip_original:
        runs.append(("original loop (pickle, concat, pools)", args.n, spawn(work, "original", pkl, one)))
    if args.only == "compare":  # the larger-N check of the speed-up, where start-up weighs less
        runs.append(("ours pickle, bins, 1 thread", args.n, spawn(work, "bins-pkl-1t", pkl, one)))
        runs.append(("ours JSONL, bins, 2 tokenizer threads", args.n, spawn(work, "bins-jsonl-2t", jsonl, two)))
        _table(runs, with_baseline=True)
        return
    runs.append(("floor: the Rust tokenizer alone, 1 thread", args.n, spawn(work, "tokenize-only", pkl, one)))
    runs.append(("ours pickle, concat, pools+grouping, 1 thread", args.n, spawn(work, "concat-pool", pkl, one, packing="concat", pool=True)))
    runs.append(("ours pickle, bins, 1 thread", args.n, spawn(work, "bins-pkl-1t", pkl, one)))
    runs.append(("ours JSONL, bins, 2 tokenizer threads", args.n, spawn(work, "bins-jsonl-2t", jsonl, two)))
    runs.append(("ours JSONL, bins, --workers 2", args.n, spawn(work, "bins-jsonl-w2", jsonl, one, workers=2)))
    runs.append(("ours JSONL (N/4), bins, 2 tokenizer threads", args.n // 4, spawn(work, "bins-jsonl-q", jsonl_q, two)))
    runs.append(("ours JSONL, pad, 2 tokenizer threads", args.n, spawn(work, "pad-jsonl", jsonl, two, packing="pad")))
    _table(runs, with_baseline=not args.skip_original)


def _table(runs: list, with_baseline: bool) -> None:
    """Wall time is at the mercy of the other jobs on this machine; CPU time much less so: both are shown."""
    base = runs[0][2] if with_baseline else None
    print(f"\n{'variant':<46} {'conv':>7} {'wall s':>7} {'conv/s':>7} {'x wall':>7} {'CPU s':>7} {'x CPU':>6} "
          f"{'RSS MB':>7} {'anon MB':>7} {'rows':>7} {'effic.':>7}")
    for name, n, r in runs:
        rss = max(r["peak_rss_mb"], r["peak_rss_children_mb"])
        xw = f"{(base['seconds'] / runs[0][1]) / (r['seconds'] / n):.1f}" if base else "-"
        xc = f"{(base['cpu_seconds'] / runs[0][1]) / (r['cpu_seconds'] / n):.1f}" if base else "-"
        eff = f"{r['efficiency']:.1%}" if r["efficiency"] is not None else "-"
        print(f"{name:<46} {n:>7,} {r['seconds']:>7.1f} {n / r['seconds']:>7,.0f} {xw:>7} {r['cpu_seconds']:>7.1f} {xc:>6} "
              f"{rss:>7,.0f} {r['peak_anon_mb']:>7,.0f} {r['rows']:>7,} {eff:>7}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores shared with other jobs)")


if __name__ == "__main__":
    main()
