"""C-Eval val: `cutegpt eval` vs lm-evaluation-harness, same prompt, same local data, one run.

Both tools run as subprocesses on the same model folder (default: the embedded
SmolLM2-135M-Instruct), with the same number of torch threads, on a fixed
subset of C-Eval val subjects, zero- and five-shot. lm-eval is configured with
the official C-Eval prompt (header as `description`, `答案：` cue, no target
delimiter, first-n dev examples) and single-token choices A-D read from the same
CSV files (converted losslessly to JSON Lines, see `to_jsonl`); it runs in its own virtual environment so it cannot change ours:

    python -m venv /tmp/venv-lmeval
    /tmp/venv-lmeval/bin/pip install torch==2.13.0 transformers==5.23.0 lm-eval

(or, quicker, `python -m venv --system-site-packages DIR` and `DIR/bin/pip install lm-eval`, which
reuses the installed torch and transformers). Then:

    python benchmarks/bench_eval.py --threads 1 --lmeval-python /tmp/venv-lmeval/bin/python --lmeval-batch-size 1 8

lm-eval runs once per `--lmeval-batch-size` and the fastest is compared (lm-eval at its best batch size).

Without lm-eval (no --lmeval-python, or the interpreter is absent) only our side runs and is
reported. The data: --data, else $CEVAL_DATA, else ../shared/data/ceval beside the repository
($CUTEGPT_SHARED/data/ceval when set); when none exists the benchmark says so and exits (skipped).

With `--gguf FILE.gguf …` (`cutegpt export --format gguf --quant f16|q8_0|q4_1` makes them) our
llama.cpp path scores each file too, and its letters are compared with our torch path's, question by question:

    python benchmarks/bench_eval.py --threads 1 --shots 5 --gguf f16.gguf q8_0.gguf q4_1.gguf

With `--lmeval-gguf` as well, lm-eval's own llama.cpp path scores each --gguf file too: its `gguf` backend
against llama-cpp-python's server on the same file (one request per choice; lm-eval needs the prompt's
log-probabilities, `echo`, which llama.cpp's own server does not return, so llama-cpp-python's server is the
one its backend was written for). Install it in the lm-eval venv, built for this CPU (AVX2, no native
detection, which crashes on some CPUs):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        /tmp/venv-lmeval/bin/pip install "llama-cpp-python[server]"
    python benchmarks/bench_eval.py --threads 1 --shots 5 --lmeval-python /tmp/venv-lmeval/bin/python \
        --gguf f16.gguf --lmeval-gguf

(On an AVX2-only CPU without AMX, `CMAKE_ARGS="-DGGML_NATIVE=ON"` builds for the machine itself and is safe.
`--lmeval-gguf` ran on 2026-12-08 (docs/benchmarks.md): about 50 s per lm-eval request, four per question, so
stop it after a few requests unless you have hours; llama-cpp-python's build takes 10-40 minutes on 2 cores.)

Printed: the CPU model and load, wall time and questions/s of each tool (model loading included), the
scoring time alone (ours: `results.json` timing; lm-eval: the elapsed time of its loglikelihood progress bar), both
ratios, accuracy, and the agreement of predicted letters
question by question with every disagreement listed.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from machine import cpu_model  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CUTEGPT_SHARED") or ROOT.parent / "shared")
SUBJECTS = ["computer_network", "high_school_physics", "law", "basic_medicine"]  # one per category; physics is Hard
LETTERS = "ABCD"


def to_jsonl(csv_path: Path, out: Path) -> Path:
    """The same rows as JSON Lines of strings.

    lm-eval's `dataset_path: csv` goes through pandas, which turns all-numeric
    columns into numbers ("0.50" -> 0.5) and "NA" into NaN. On C-Eval val/dev
    that changes no cell (checked), but JSON keeps every cell exact by construction.
    """
    with open(csv_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out


def task_yaml(dev: Path, val: Path, subject: str, zh: str) -> str:
    header = f"以下是中国关于{zh}考试的单项选择题，请选出其中的正确答案。\\n\\n"
    return f"""task: cg_ceval_{subject}
dataset_path: json
dataset_kwargs:
  data_files:
    dev: {dev}
    val: {val}
output_type: multiple_choice
validation_split: val
fewshot_split: dev
fewshot_config:
  sampler: first_n
description: "{header}"
doc_to_text: "{{{{question}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


CPU_SECONDS: dict[str, float] = {}  # log file -> CPU seconds (user + system) of the command that wrote it


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Wall seconds of `cmd`; its CPU seconds go to CPU_SECONDS, which other jobs' load barely moves."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[str(log)] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")
    return wall


def lmeval_predictions(out: Path, subjects: list[str]) -> tuple[dict[tuple[str, int], str], dict[tuple[str, int], list[float]], float | None]:
    preds, lls = {}, {}
    for subject in subjects:
        files = glob.glob(str(out / "**" / f"samples_cg_ceval_{subject}_*.jsonl"), recursive=True)
        if not files:
            sys.exit(f"no lm-eval samples for {subject} under {out}")
        for line in Path(sorted(files)[-1]).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            ll = [float(r[0]) for r in rec["filtered_resps"]]
            preds[(subject, int(rec["doc_id"]))] = LETTERS[max(range(4), key=lambda i: (ll[i], -i))]
            lls[(subject, int(rec["doc_id"]))] = ll
    eval_seconds = None
    for f in glob.glob(str(out / "**" / "results_*.json"), recursive=True):
        eval_seconds = float(json.loads(Path(f).read_text())["total_evaluation_time_seconds"])
    return preds, lls, eval_seconds


def lmeval_scoring_seconds(log: Path) -> float:
    """lm-eval's scoring time alone: the elapsed time of its final "Running loglikelihood requests" progress bar
    (its `total_evaluation_time_seconds` also counts loading the model and building the tasks)."""
    import re

    bars = re.findall(r"Running loglikelihood requests: 100%[^\[]*\[(?:(\d+):)?(\d+):(\d+)<", log.read_text(errors="replace"))
    if not bars:
        return float("nan")
    h, m, sec = bars[-1]
    return 3600 * int(h or 0) + 60 * int(m) + int(sec)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmeval_gguf(gguf: str, lm_python: str, tasks: Path, subjects: list[str], env: dict[str, str], work: Path, shots: int,
                threads: int, ctx: int = 2048) -> tuple[float, float, dict, dict]:
    """lm-eval's gguf backend against llama-cpp-python's server on `gguf`: (lm-eval wall s, server start s, letters, lls)."""
    import urllib.request

    port = free_port()
    log = open(work / f"llama-cpp-python-server-{Path(gguf).stem}.log", "w")
    t0 = time.perf_counter()
    server = subprocess.Popen([lm_python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
                               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(ctx)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"llama-cpp-python's server exited with {server.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)
        start_s = time.perf_counter() - t0
        out = work / f"lmeval-gguf-{Path(gguf).stem}-{shots}shot"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [lm_python, "-m", "lm_eval", "--model", "gguf", "--model_args", f"base_url=http://127.0.0.1:{port}",
               "--tasks", ",".join(f"cg_ceval_{s}" for s in subjects), "--include_path", str(tasks),
               "--num_fewshot", str(shots), "--output_path", str(out), "--log_samples"]
        wall = run(cmd, env, work / f"lmeval-gguf-{Path(gguf).stem}-{shots}shot.log")
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    preds, lls, _ = lmeval_predictions(out, subjects)
    return wall, start_s, preds, lls


def compare_gguf(gguf: str, ours_cmd: list[str], ours: dict, ours_wall: float, ours_score_s: float, env: dict[str, str],
                 work: Path, shots: int, threads: int, lm_python: str | None = None, tasks: Path | None = None,
                 subjects: list[str] | None = None) -> None:
    """Our llama.cpp path on `gguf` beside our torch path: speed, and letters question by question."""
    out = work / f"gguf-{Path(gguf).stem}-{shots}shot"
    cmd = list(ours_cmd)
    cmd[cmd.index("--model") + 1] = gguf
    cmd[cmd.index("--out") + 1] = str(out)
    wall = run(cmd, env, work / f"gguf-{Path(gguf).stem}-{shots}shot.log")
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    score_s = res["timing"]["seconds_this_run"]
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    by_key: dict = {}
    for r in recs:
        by_key[(r["subject"], sum(1 for k in by_key if k[0] == r["subject"]))] = r
    n = len(ours)
    agree = sum(by_key[k]["pred"] == ours[k]["pred"] for k in ours)
    max_dp = max(max(abs(by_key[k]["probs"][L] - ours[k]["probs"][L]) for L in LETTERS) for k in ours)
    acc = 100 * sum(bool(r["correct"]) for r in recs) / n
    print(f"\n{shots}-shot, {n} questions, {Path(gguf).name} ({res['weights']}) on llama.cpp vs torch, {threads} thread(s)")
    print(f"  llama.cpp wall {wall:7.1f} s ({n / wall:.3f} q/s); scoring alone {score_s:.1f} s ({n / score_s:.3f} q/s)")
    print(f"  torch     wall {ours_wall:7.1f} s ({n / ours_wall:.3f} q/s); scoring alone {ours_score_s:.1f} s ({n / ours_score_s:.3f} q/s)")
    print(f"  speed-up llama.cpp / torch: wall {ours_wall / wall:.2f}x, scoring {ours_score_s / score_s:.2f}x; "
          f"letter agreement {agree}/{n} = {100 * agree / n:.1f}%; accuracy {acc:.1f}%; max |p_gguf - p_torch| {max_dp:.3f}")
    for k in sorted(ours):
        if by_key[k]["pred"] != ours[k]["pred"]:
            print(f"  difference {k}: gguf {by_key[k]['pred']} {by_key[k]['probs']} | torch {ours[k]['pred']} {ours[k]['probs']}")
    if lm_python is None:
        return
    lm_wall, start_s, lm_pred, lm_ll = lmeval_gguf(gguf, lm_python, tasks, subjects, env, work, shots, threads)
    if set(lm_pred) != set(ours):
        sys.exit(f"question sets differ: ours {len(ours)}, lm-eval gguf {len(lm_pred)}")
    agree_gguf = sum(lm_pred[k] == by_key[k]["pred"] for k in ours)
    agree_torch = sum(lm_pred[k] == ours[k]["pred"] for k in ours)
    max_dp = max(max(abs(by_key[k]["probs"][L] - p) for L, p in zip(LETTERS, softmax(lm_ll[k]))) for k in ours)
    print(f"  lm-eval gguf backend (llama-cpp-python server, started in {start_s:.1f} s, not counted): wall {lm_wall:7.1f} s "
          f"({n / lm_wall:.3f} q/s)")
    print(f"  speed-up ours on llama.cpp / lm-eval's llama.cpp path: wall {lm_wall / wall:.2f}x, scoring alone {lm_wall / score_s:.2f}x; "
          f"letters lm-eval gguf = ours gguf {agree_gguf}/{n}, = ours torch {agree_torch}/{n}; max |p_ours_gguf - p_lmeval_gguf| {max_dp:.3f}")
    for k in sorted(ours):
        if lm_pred[k] != by_key[k]["pred"]:
            print(f"  lm-eval gguf differs {k}: lm-eval {lm_pred[k]} {dict(zip(LETTERS, (round(p, 6) for p in softmax(lm_ll[k]))))} "
                  f"| ours gguf {by_key[k]['pred']} {by_key[k]['probs']}")


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("CEVAL_DATA") or str(SHARED / "data" / "ceval"))
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    ap.add_argument("--subjects", nargs="+", default=SUBJECTS)
    ap.add_argument("--shots", nargs="+", type=int, default=[0, 5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lmeval-python", default=None, help="python of a venv with lm-eval (omit: ours only)")
    ap.add_argument("--lmeval-batch-size", nargs="+", default=["1"],
                    help="lm-eval batch sizes, each run in turn; the fastest is the one compared (give several to find its best)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each tool, alternating which goes first; the best is reported")
    ap.add_argument("--work", default="/tmp/bench-eval")
    ap.add_argument("--gguf", nargs="+", default=[], help="GGUF files scored by our llama.cpp path beside the torch path")
    ap.add_argument("--lmeval-gguf", action="store_true", help="also score each --gguf file with lm-eval's gguf backend "
                    "(llama-cpp-python's server, installed in the --lmeval-python venv)")
    ap.add_argument("--skip-lmeval-hf", action="store_true", help="do not run lm-eval's hf backend (with --lmeval-gguf: its gguf path only)")
    args = ap.parse_args()
    if not (Path(args.data) / "val").is_dir():
        print(f"skipped: no C-Eval data at {args.data} (pass --data, or set $CEVAL_DATA or $CUTEGPT_SHARED)")
        return
    with_lm = bool(args.lmeval_python) and Path(args.lmeval_python).is_file()
    if args.lmeval_python and not with_lm:
        print(f"lm-eval interpreter {args.lmeval_python} is absent: reporting ours only")

    from cutegpt.evaluation.data import resource
    from cutegpt.evaluation.results import fmt_acc

    if args.model is None:
        from cutegpt.model.embedded import embedded_model_dir

        args.model = str(embedded_model_dir())
    data = Path(args.data).resolve()
    work = Path(args.work)
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    names = resource("ceval")["subjects"]
    for s in args.subjects:
        dev = to_jsonl(data / "dev" / f"{s}_dev.csv", tasks / f"{s}_dev.jsonl")
        val = to_jsonl(data / "val" / f"{s}_val.csv", tasks / f"{s}_val.jsonl")
        (tasks / f"cg_ceval_{s}.yaml").write_text(task_yaml(dev, val, s, names[s]["zh"]), encoding="utf-8")

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(work / "hf-datasets"))
    print(f"CPU: {cpu_model()}")
    print(f"model {args.model}; {len(args.subjects)} C-Eval val subjects: {', '.join(args.subjects)}; "
          f"torch threads {args.threads}; lm-eval batch sizes {', '.join(args.lmeval_batch_size)}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for shots in args.shots:
        ours_out = work / f"ours-{shots}shot"
        ours_cmd = [sys.executable, "-m", "cutegpt", "eval", "ceval", "--data", str(data), "--model", args.model,
                    "--shots", str(shots), "--subjects", *args.subjects, "--no-resume", "--threads", str(args.threads),
                    "--out", str(ours_out), "--overwrite", "--prompt", "official", "--method", "logits"]
        def lm_cmd(bs: str) -> list[str]:
            return [args.lmeval_python, "-m", "lm_eval", "--model", "hf",
                    "--model_args", f"pretrained={args.model},dtype=float32", "--device", "cpu",
                    "--tasks", ",".join(f"cg_ceval_{s}" for s in args.subjects), "--include_path", str(tasks),
                    "--num_fewshot", str(shots), "--batch_size", bs,
                    "--output_path", str(work / f"lmeval-{shots}shot-b{bs}"), "--log_samples"]
        # Alternate the order (ours first, then lm-eval first, ...) and keep each tool's best run:
        # on a shared machine the background load drifts, and this keeps it from favouring one tool.
        ours_walls, ours_scoring = [], []
        lm_walls: dict[str, list[float]] = {bs: [] for bs in args.lmeval_batch_size}
        lm_scoring: dict[str, list[float]] = {bs: [] for bs in args.lmeval_batch_size}
        for rep in range(args.repeats):
            tools = ["ours", *(f"lm:{bs}" for bs in args.lmeval_batch_size if with_lm and not args.skip_lmeval_hf)]
            for tool in (tools if rep % 2 == 0 else tools[::-1]):
                if tool == "ours":
                    ours_walls.append(run(ours_cmd, env, work / f"ours-{shots}shot.log"))
                    res = json.loads((ours_out / "results.json").read_text(encoding="utf-8"))
                    ours_scoring.append(res["timing"]["seconds_this_run"])
                else:
                    bs = tool.split(":", 1)[1]
                    shutil.rmtree(work / f"lmeval-{shots}shot-b{bs}", ignore_errors=True)
                    lm_walls[bs].append(run(lm_cmd(bs), env, work / f"lmeval-{shots}shot-b{bs}.log"))
                    lm_scoring[bs].append(lmeval_scoring_seconds(work / f"lmeval-{shots}shot-b{bs}.log"))
        ours_wall, ours_score_s = min(ours_walls), min(ours_scoring)
        print("  CPU seconds (user + system, whole process): " + ", ".join(f"{Path(k).stem} {v:.1f}" for k, v in CPU_SECONDS.items()
                                                                          if f"-{shots}shot" in k), flush=True)
        print(f"  runs (wall s): ours {[round(w, 1) for w in ours_walls]} (scoring {[round(w, 1) for w in ours_scoring]}), lm-eval "
              + ", ".join(f"batch {bs} {[round(w, 1) for w in ws]} (scoring {[round(w, 1) for w in lm_scoring[bs]]})"
                          for bs, ws in lm_walls.items() if ws), flush=True)
        ours = {(r["subject"], i): r for s in args.subjects
                for i, r in enumerate(x for x in map(json.loads, (ours_out / "predictions.jsonl").read_text(encoding="utf-8").splitlines())
                                      if x["subject"] == s)}
        for gguf in args.gguf:
            compare_gguf(gguf, ours_cmd, ours, ours_wall, ours_score_s, env, work, shots, args.threads,
                         args.lmeval_python if with_lm and args.lmeval_gguf else None, tasks, args.subjects)
        if not with_lm or args.skip_lmeval_hf:
            n = len(ours)
            correct = sum(bool(r["correct"]) for r in ours.values())
            rows.append((shots, n, ours_wall, ours_score_s, None, None, None, 100 * correct / n, None, None, None))
            print(f"\n{shots}-shot, {n} questions (ours only)\n  ours    wall {ours_wall:7.1f} s ({n / ours_wall:.3f} q/s); "
                  f"scoring alone {ours_score_s:.1f} s ({n / ours_score_s:.3f} q/s); accuracy {fmt_acc(100 * correct / n, n)}", flush=True)
            continue
        best_bs = min(lm_walls, key=lambda bs: min(lm_walls[bs]))  # lm-eval at its best batch size
        lm_wall = min(lm_walls[best_bs])
        lm_pred, lm_ll, _ = lmeval_predictions(work / f"lmeval-{shots}shot-b{best_bs}", args.subjects)
        lm_eval_s = min(lm_scoring[best_bs])

        n = len(ours)
        if set(lm_pred) != set(ours):
            sys.exit(f"question sets differ: ours {len(ours)}, lm-eval {len(lm_pred)}")
        agree = sum(ours[k]["pred"] == lm_pred[k] for k in ours)
        max_dp = max(max(abs(ours[k]["probs"][L] - p) for L, p in zip(LETTERS, softmax(lm_ll[k]))) for k in ours)
        acc_ours = 100 * sum(r["correct"] for r in ours.values()) / n
        acc_lm = 100 * sum(lm_pred[k] == ours[k]["gold"] for k in ours) / n
        rows.append((shots, n, ours_wall, ours_score_s, lm_wall, lm_eval_s, agree, acc_ours, acc_lm, max_dp, best_bs))
        print(f"\n{shots}-shot, {n} questions", flush=True)
        print(f"  ours    wall {ours_wall:7.1f} s ({n / ours_wall:.3f} q/s); scoring alone {ours_score_s:.1f} s ({n / ours_score_s:.3f} q/s)")
        print(f"  lm-eval wall {lm_wall:7.1f} s ({n / lm_wall:.3f} q/s) at its best batch size {best_bs}" +
              (f"; scoring alone {lm_eval_s:.1f} s" if lm_eval_s == lm_eval_s else ""))
        print(f"  speed-up: wall {lm_wall / ours_wall:.2f}x, scoring alone {lm_eval_s / ours_score_s:.2f}x; agreement {agree}/{n} = {100 * agree / n:.1f}%; "
              f"accuracy ours {fmt_acc(acc_ours, n)}, lm-eval {fmt_acc(acc_lm, n)} (question-weighted); "
              f"max |p_ours - p_lmeval| over the 4 letters {max_dp:.2e}")
        for k in sorted(ours):
            if ours[k]["pred"] != lm_pred[k]:
                print(f"  disagreement {k}: ours {ours[k]['pred']} {ours[k]['probs']} | lm-eval {lm_pred[k]} "
                      f"{dict(zip(LETTERS, (round(p, 6) for p in softmax(lm_ll[k]))))}")

    print(f"\nCPU: {cpu_model()}; load average at the end {os.getloadavg()[0]:.1f}")
    print("| setting | questions | ours wall s (q/s) | ours scoring s | lm-eval wall s (q/s) | lm-eval scoring s | lm-eval batch | "
          "speed-up wall | speed-up scoring | letter agreement | accuracy ours / lm-eval |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shots, n, ow, os_, lw, ls, agree, ao, al, _dp, bs in rows:
        if lw is None:
            print(f"| {shots}-shot | {n} | {ow:.1f} ({n / ow:.2f}) | {os_:.1f} | not run | - | - | - | - | - | {fmt_acc(ao, n)} / - |")
            continue
        print(f"| {shots}-shot | {n} | {ow:.1f} ({n / ow:.2f}) | {os_:.1f} | {lw:.1f} ({n / lw:.2f}) | {ls:.1f} | {bs} | {lw / ow:.2f}x | "
              f"{ls / os_:.2f}x | {100 * agree / n:.1f}% | {ao:.1f} / {al:.1f} |")


if __name__ == "__main__":
    main()
