"""`cutegpt recipe`: the whole CuteGPT recipe at small scale, end to end, with the project's own commands.

    corpus (zh + en) ─> 1 vocab train ─> 2 vocab extend ─> 3 train pt (full: new rows trained)
                                                                │
    sft conversations ─────────────────> 4 data convert ───> 5 train sft (LoRA, cutegpt template)
                                                                │ (--dpo-steps N: 5a data pairs -> 5b train dpo on the SFT adapter)
                                   8 eval (C-Eval style) <─ 7 chat smoke test <─ 6 export (merge LoRA)

Every step is the Python function behind the matching command (`cutegpt vocab train`, ...), so
the recipe is also a worked example of the commands; `OUT/recipe.json` lists each step's
settings, time, artefact and headline numbers. Without --corpus/--sft-data/--eval-data it runs on
a small bilingual sample bundled with CuteGPT (resources/recipe_data.json, written for this
project) and the embedded SmolLM2-135M; the defaults finish in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import traceback
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal

from cutegpt.config import arg
from cutegpt.threads import THREADS_HELP, resolve_threads
from cutegpt.errors import CuteGPTError
from cutegpt.io import atomic_file, write_json

SUMMARY_FILE = "recipe.json"
CHAT_PROMPTS = [
    {"instruction": "中国的首都是哪里？"},
    {"instruction": "熊猫喜欢吃什么？"},
    {"instruction": "What is the capital of France?"},
]


@dataclass
class RecipeConfig:
    """Vocabulary extension -> continued pre-training -> LoRA instruction tuning -> chat -> evaluation."""

    out: str = arg("runs/recipe", "folder for every artefact of the run", aliases=("--output", "--output-dir", "--output_dir"))
    model: str | None = arg(None, "base model folder", absent="the embedded SmolLM2-135M-Instruct")
    corpus: list[str] = arg([], "Chinese/English text for the vocabulary and pre-training (.txt: a document a line, .jsonl: 'text')", absent="the bundled sample")
    sft_data: str | None = arg(None, "instruction data (the original pickle, JSON or JSON Lines)", absent="the bundled sample")
    eval_data: str | None = arg(None, "C-Eval data folder (dev/ and val/)", absent="a small bundled C-Eval-style fixture")
    eval_split: str = arg("val", "C-Eval split to score")
    eval_shots: int = arg(0, "few-shot examples per question in the evaluation", ge=0)
    eval_limit: int | None = arg(None, "only the first N questions of each subject", ge=1, absent="every question")
    vocab_size: int = arg(3000, "size of the Chinese tokenizer trained in step 1", ge=100)
    pt_steps: int = arg(20, "continued pre-training steps", ge=1)
    pt_method: Literal["full", "lora"] = arg("full", "continued pre-training: full, or LoRA on all linear layers with embed_tokens and lm_head trained in full (either way the new rows train)")
    pt_lr: float = arg(1e-4, "continued pre-training learning rate", gt=0)
    sft_steps: int = arg(20, "LoRA instruction-tuning steps", ge=1)
    sft_lr: float = arg(1e-3, "LoRA learning rate", gt=0)
    dpo_steps: int = arg(0, "preference tuning after SFT: pairs from the SFT data (the model's own answers rejected), then "
                            "this many DPO steps on the SFT adapter; 0 = no preference step", ge=0)
    dpo_lr: float = arg(5e-5, "DPO learning rate (LoRA)", gt=0)
    max_length: int = arg(256, "tokens per training row", ge=16)
    micro_batch: int = arg(4, "rows per forward pass", ge=1)
    grad_accum: int = arg(1, "micro-batches per optimizer step", ge=1)
    deepspeed: str | None = arg(None, "DeepSpeed JSON config for both training steps (see configs/)")
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    max_new_tokens: int = arg(48, "longest answer in the chat smoke test", ge=1)
    eval_base: bool = arg(True, "also evaluate the base model, for a before/after comparison")
    overwrite: bool = arg(False, "replace an existing --out folder (once the new run is complete)")


@dataclass
class Step:
    name: str
    command: str
    artefact: str
    status: str = "pending"  # done | failed | missing (command not in this version) | skipped (an earlier step did not finish)
    seconds: float = 0.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _make(cls: type, **values: Any) -> Any:
    """A config of `cls` from the values it has fields for (other commands' configs may lack some)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


# ---------------------------------------------------------------------------------------------- data


def bundled_data() -> dict[str, Any]:
    return json.loads(resources.files("cutegpt").joinpath("resources/recipe_data.json").read_text(encoding="utf-8"))


def write_bundled(folder: Path, cfg: RecipeConfig) -> dict[str, Path]:
    """The run's inputs under OUT/data: the user's files, or the bundled sample written out."""
    import csv

    data = bundled_data()
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    # Pre-training reads a .txt file as ONE document; JSON Lines keeps the documents apart.
    corpus = folder / "corpus.jsonl"
    if cfg.corpus:
        from cutegpt.vocab.text import read_corpus

        docs = read_corpus(cfg.corpus)
    else:
        docs = data["corpus"]
    with atomic_file(corpus) as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    paths["corpus"] = corpus
    if cfg.sft_data:
        paths["sft"] = Path(cfg.sft_data).expanduser()
    else:
        paths["sft"] = folder / "sft.json"
        write_json(paths["sft"], data["sft"])
    if cfg.eval_data:
        paths["eval"] = Path(cfg.eval_data).expanduser()
    else:
        paths["eval"] = folder / "ceval"
        for subject, splits in data["eval"].items():
            for split, rows in splits.items():
                (paths["eval"] / split).mkdir(parents=True, exist_ok=True)
                with atomic_file(paths["eval"] / split / f"{subject}_{split}.csv", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
                    for i, r in enumerate(rows):
                        w.writerow([i, r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"]])
    paths["chat"] = folder / "chat_prompts.jsonl"
    with atomic_file(paths["chat"]) as f:
        for p in CHAT_PROMPTS:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------- steps


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def drop_checkpoints(run: Path) -> int:
    """Remove a finished training step's checkpoint-N folders; the bytes freed.

    The recipe never resumes a step (a new run starts over), and the later steps read final/ only: the
    checkpoints (weights and optimizer states) left 4.4 GB behind for the embedded model.
    """
    if not ((run / "final").is_dir() and (run / "summary.json").is_file()):
        return 0
    freed = 0
    for ckpt in sorted(run.glob("checkpoint-*")):
        if ckpt.is_dir() and not ckpt.is_symlink():
            freed += sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(ckpt)
    return freed


def _trained(run: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """A training step's headline numbers, once its checkpoints are removed."""
    freed = drop_checkpoints(run)
    return {"steps": summary.get("steps"), "loss": _first_last(summary), "checkpoints_removed_mb": round(freed / 2**20, 1)}


def plan(cfg: RecipeConfig, out: Path, paths: dict[str, Path]) -> list[tuple[Step, Callable[[], dict[str, Any]], list[str]]]:
    """(step, action, names of the steps it needs), in order."""
    d = {name: out / name for name in ("1-vocab", "2-extended", "3-pt", "4-sft-data", "5-sft", "5a-pairs.jsonl", "5b-dpo",
                                       "6-merged", "7-chat.jsonl", "8-eval", "8-eval-base")}
    tuned = d["5b-dpo" if cfg.dpo_steps else "5-sft"] / "final"  # the adapter the later steps take
    train_common = dict(max_length=cfg.max_length, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, save_steps=10**9,
                        threads=cfg.threads, logging_steps=1, warmup_steps=0, deepspeed=cfg.deepspeed)
    pt_model = d["3-pt"] / ("final" if cfg.pt_method == "full" else "merged")
    pt_method: dict[str, Any] = {"method": "full"} if cfg.pt_method == "full" else {
        "method": "lora", "lora_targets": ["all-linear"], "modules_to_save": ["embed_tokens", "lm_head"]}

    def vocab_train() -> dict[str, Any]:
        from cutegpt.vocab.train import VocabTrainConfig, run_vocab_train

        run_vocab_train(VocabTrainConfig(out=str(d["1-vocab"]), corpus=[str(paths["corpus"])], model=cfg.model, vocab_size=cfg.vocab_size))
        return {"vocab_size": _read(d["1-vocab"] / "vocab_train.json").get("vocab_size")}

    def vocab_extend() -> dict[str, Any]:
        from cutegpt.vocab.extend import VocabExtendConfig, run_vocab_extend

        run_vocab_extend(VocabExtendConfig(model=cfg.model, pieces=str(d["1-vocab"]), out=str(d["2-extended"])))
        r = _read(d["2-extended"] / "vocab_report.json")
        return {"pieces_added": r["pieces_added"], "vocab_size": [r["vocab_size_before"], r["vocab_size_after"]],
                "tokens_per_chinese_char": [r["held_out"]["before"]["tokens_per_chinese_char"], r["held_out"]["after"]["tokens_per_chinese_char"]]}

    def pt() -> dict[str, Any]:
        from cutegpt.training.pt import PTConfig, run_pt

        run_pt(_make(PTConfig, model=str(d["2-extended"]), data=[str(paths["corpus"])], out=str(d["3-pt"]),
                     max_steps=cfg.pt_steps, lr=cfg.pt_lr, **pt_method, **train_common))
        s = _read(d["3-pt"] / "summary.json")
        if cfg.pt_method == "lora":  # later steps need a plain model: merge the adapter (embeddings and head included)
            from cutegpt.export.cli import ExportConfig, run_export

            run_export(_make(ExportConfig, model=str(d["2-extended"]), lora=str(d["3-pt"] / "final"), out=str(pt_model), dtype="float32"))
        return {**_trained(d["3-pt"], s), "final": str(pt_model)}

    def convert() -> dict[str, Any]:
        from cutegpt.data.convert import ConvertConfig, run_convert

        run_convert(_make(ConvertConfig, input=str(paths["sft"]), out=str(d["4-sft-data"]), model=str(pt_model),
                          template="cutegpt", max_length=cfg.max_length))
        m = _read(d["4-sft-data"] / "manifest.json")
        return {k: m[k] for k in ("counts", "rows") if k in m}

    def sft() -> dict[str, Any]:
        from cutegpt.training.sft import SFTConfig, run_sft

        run_sft(_make(SFTConfig, model=str(pt_model), data=[str(d["4-sft-data"])], out=str(d["5-sft"]), method="lora",
                      template="cutegpt", max_steps=cfg.sft_steps, lr=cfg.sft_lr, **train_common))
        s = _read(d["5-sft"] / "summary.json")
        return {**_trained(d["5-sft"], s), "final": s.get("final")}

    def pairs() -> dict[str, Any]:
        from cutegpt.chat.pairs import PairsConfig, run_pairs

        run_pairs(_make(PairsConfig, input=str(paths["sft"]), out=str(d["5a-pairs.jsonl"]), model=str(pt_model),
                        lora=str(d["5-sft"] / "final"), greedy=True, max_new_tokens=cfg.max_new_tokens, threads=cfg.threads,
                        backend="torch"))
        return {"pairs": sum(1 for line in d["5a-pairs.jsonl"].read_text(encoding="utf-8").splitlines() if line.strip())}

    def dpo() -> dict[str, Any]:
        from cutegpt.training.dpo import PrefConfig, run_dpo

        run_dpo(_make(PrefConfig, model=str(pt_model), lora=str(d["5-sft"] / "final"), data=[str(d["5a-pairs.jsonl"])],
                      out=str(d["5b-dpo"]), template="cutegpt", max_steps=cfg.dpo_steps, lr=cfg.dpo_lr,
                      max_prompt_length=cfg.max_length // 2, **train_common))  # long prompts keep their end
        s = _read(d["5b-dpo"] / "summary.json")
        return {**_trained(d["5b-dpo"], s), "reward_accuracy": s.get("final_rewards_accuracies"),
                "reference": s.get("reference"), "final": s.get("final")}

    def export() -> dict[str, Any]:
        from cutegpt.export.cli import ExportConfig, run_export

        run_export(_make(ExportConfig, model=str(pt_model), lora=str(tuned), out=str(d["6-merged"]), dtype="float32"))
        return {}

    def chat() -> dict[str, Any]:
        from cutegpt.chat.batch import GenerateConfig, run_generate

        run_generate(_make(GenerateConfig, model=str(d["6-merged"]), input=str(paths["chat"]), out=str(d["7-chat.jsonl"]),
                           greedy=True, max_new_tokens=cfg.max_new_tokens))
        answers = [json.loads(line) for line in d["7-chat.jsonl"].read_text(encoding="utf-8").splitlines() if line.strip()]
        return {"answers": {a.get("instruction", ""): a.get("answer", "") for a in answers}}

    def evaluate(model: str | None, folder: Path) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            from cutegpt.evaluation.cli import EvalConfig, run_eval

            run_eval(_make(EvalConfig, benchmark="ceval", model=model, data=str(paths["eval"]), split=cfg.eval_split,
                           shots=cfg.eval_shots, limit=cfg.eval_limit, out=str(folder), chat_template=True,
                           resume=False, threads=cfg.threads, overwrite=True))
            avg = _read(folder / "results.json").get("summary", {}).get("average", {})
            return {"accuracy_mean_of_subjects": avg.get("mean_of_subjects"), "accuracy_question_weighted": avg.get("question_weighted"),
                    "questions": avg.get("questions"), "correct": avg.get("correct")}
        return run

    steps: list[tuple[Step, Callable[[], dict[str, Any]], list[str]]] = [
        (Step("vocab train", "cutegpt vocab train", str(d["1-vocab"])), vocab_train, []),
        (Step("vocab extend", "cutegpt vocab extend", str(d["2-extended"])), vocab_extend, ["vocab train"]),
        (Step("continued pre-training", "cutegpt train pt", str(pt_model)), pt, ["vocab extend"]),
        (Step("data convert", "cutegpt data convert", str(d["4-sft-data"])), convert, ["continued pre-training"]),
        (Step("instruction tuning (LoRA)", "cutegpt train sft", str(d["5-sft"] / "final")), sft, ["data convert"]),
    ]
    if cfg.dpo_steps:
        steps += [(Step("preference pairs", "cutegpt data pairs", str(d["5a-pairs.jsonl"])), pairs, ["instruction tuning (LoRA)"]),
                  (Step("preference tuning (DPO)", "cutegpt train dpo", str(tuned)), dpo, ["preference pairs"])]
    steps += [
        (Step("export (merge LoRA)", "cutegpt export", str(d["6-merged"])), export,
         ["preference tuning (DPO)" if cfg.dpo_steps else "instruction tuning (LoRA)"]),
        (Step("chat smoke test", "cutegpt generate", str(d["7-chat.jsonl"])), chat, ["export (merge LoRA)"]),
        (Step("evaluation", "cutegpt eval ceval", str(d["8-eval"])), evaluate(str(d["6-merged"]), d["8-eval"]), ["export (merge LoRA)"]),
    ]
    if cfg.eval_base:
        steps.append((Step("evaluation of the base model", "cutegpt eval ceval", str(d["8-eval-base"])),
                      evaluate(cfg.model, d["8-eval-base"]), []))
    return steps


def _first_last(summary: dict[str, Any]) -> list[float] | None:
    curve = summary.get("loss_curve") or []
    return [round(curve[0][1], 4), round(curve[-1][1], 4)] if curve else None


# ---------------------------------------------------------------------------------------------- run


def _inputs(cfg: RecipeConfig) -> list[Path]:
    """The user's inputs, each checked to exist (and be the right kind) before anything is written."""
    from cutegpt.io import check_input

    found: list[Path] = []
    if cfg.corpus:
        from cutegpt.data.text import corpus_files

        for c in cfg.corpus:
            found.append(check_input(Path(c).expanduser(), flag="--corpus"))
        corpus_files(cfg.corpus)
    if cfg.sft_data:
        from cutegpt.data.readers import parse_spec

        found.append(check_input(parse_spec(cfg.sft_data, "--sft-data")[0], flag="--sft-data"))
    if cfg.eval_data:
        found.append(check_input(Path(cfg.eval_data).expanduser(), flag="--eval-data", kind="folder"))
    if cfg.model:  # vocabulary work needs a Hugging Face folder (its tokenizer files), not a .gguf file
        model = check_input(Path(cfg.model).expanduser(), flag="--model", kind="folder")
        if not (model / "config.json").is_file():
            raise CuteGPTError(f"--model {model} is a folder without config.json, not a Hugging Face model folder.")
        found.append(model)
    if cfg.deepspeed:
        found.append(check_input(Path(cfg.deepspeed).expanduser(), flag="--deepspeed", kind="file"))
    return found


def _check_steps(cfg: RecipeConfig) -> None:
    """Every step's own settings, checked as its command would check them, before the first step runs."""
    from cutegpt.config import check_config

    x = "placeholder"
    train_common = dict(max_length=cfg.max_length, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, threads=cfg.threads,
                        logging_steps=1, warmup_steps=0, deepspeed=cfg.deepspeed)
    makers: list[Callable[[], Any]] = []

    def add(module: str, cls: str, **values: Any) -> None:
        makers.append(lambda: _make(getattr(__import__(module, fromlist=[cls]), cls), **values))

    add("cutegpt.vocab.train", "VocabTrainConfig", out=x, corpus=[x], model=cfg.model, vocab_size=cfg.vocab_size)
    add("cutegpt.vocab.extend", "VocabExtendConfig", model=cfg.model, pieces=x, out=x)
    add("cutegpt.training.pt", "PTConfig", model=x, data=[x], out=x, max_steps=cfg.pt_steps, lr=cfg.pt_lr, method=cfg.pt_method, **train_common)
    add("cutegpt.data.convert", "ConvertConfig", input=[x], out=x, model=x, template="cutegpt", max_length=cfg.max_length)
    add("cutegpt.training.sft", "SFTConfig", model=x, data=[x], out=x, method="lora", template="cutegpt", max_steps=cfg.sft_steps,
        lr=cfg.sft_lr, **train_common)
    add("cutegpt.chat.batch", "GenerateConfig", model=x, input=x, out=x, greedy=True, max_new_tokens=cfg.max_new_tokens)
    if cfg.dpo_steps:
        add("cutegpt.training.dpo", "PrefConfig", model=x, lora=x, data=[x], out=x, template="cutegpt", max_steps=cfg.dpo_steps,
            lr=cfg.dpo_lr, max_prompt_length=cfg.max_length // 2, **train_common)
    add("cutegpt.evaluation.cli", "EvalConfig", benchmark="ceval", model=x, data=x, split=cfg.eval_split, shots=cfg.eval_shots,
        limit=cfg.eval_limit, out=x, threads=cfg.threads)
    for make in makers:
        try:
            sub = make()
        except ModuleNotFoundError as e:
            if (e.name or "").startswith("cutegpt"):
                continue  # that step will be reported as missing
            raise
        check_config(sub)


def _relocate(value: Any, old: str, new: str) -> Any:
    """`value` with the temporary folder's path replaced by the final one (for recipe.json)."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    return value


def run_recipe(cfg: RecipeConfig) -> int:
    """Check everything, run the steps in a temporary folder beside --out, then put it in place.

    An existing --out (with --overwrite) is replaced only by a complete run; when a step fails
    the old run stays as it was (the failed run is kept for inspection only when there was none).
    """
    import os
    import tempfile

    from cutegpt.io import check_output, clean_leftovers, os_errors

    out = Path(cfg.out).expanduser()
    inputs = _inputs(cfg)
    check_output(out, flag="--out", inputs=inputs, overwrite=cfg.overwrite, kind="folder")
    if out.is_dir() and not (out / SUMMARY_FILE).is_file() and not (out / "data").is_dir() and any(out.iterdir()):
        raise CuteGPTError(f"{out} does not look like a recipe folder (no {SUMMARY_FILE}); refusing to replace it.")
    _check_steps(cfg)
    with os_errors(out, "creating the output folder"):
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out.parent)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        failure = _run_steps(cfg, out, work)
        if failure is not None and out.exists():
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(failure, KeyboardInterrupt):
                raise failure
            raise CuteGPTError(f"{failure}; the previous run in {out} was kept as it was.")
        with os_errors(out, "putting the run in place"):
            from cutegpt.io import put_in_place

            put_in_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if failure is not None:
        if isinstance(failure, KeyboardInterrupt):
            raise failure
        raise CuteGPTError(str(failure))
    return 0


def _run_steps(cfg: RecipeConfig, out: Path, work: Path) -> BaseException | None:
    """Run every step in `work`; write recipe.json (paths as under `out`); return the failure, if any."""
    paths = write_bundled(work / "data", cfg)
    cfg = dataclasses.replace(cfg, threads=resolve_threads(cfg.threads))
    print(f"CuteGPT recipe -> {out} (built in {work.name}, put in place when complete; torch threads {cfg.threads})", flush=True)
    steps = plan(cfg, work, paths)
    start = time.perf_counter()
    failure: BaseException | None = None
    for step, action, needs in steps:
        blocked = [n for n in needs if next(s for s, _, _ in steps if s.name == n).status != "done"]
        if blocked or failure is not None:
            step.status = "skipped"
            step.info["reason"] = f"needs: {', '.join(blocked)}" if blocked else "an earlier step failed"
            continue
        print(f"\n=== {step.name}  ({step.command}) ===", flush=True)
        t = time.perf_counter()
        try:
            step.info.update(action())
            step.status = "done"
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("cutegpt"):
                raise
            step.status = "missing"
            step.info["reason"] = f"{step.command} is not in this version of CuteGPT ({e.name})"
            print(f"skipped: {step.info['reason']}", flush=True)
        except (CuteGPTError, KeyboardInterrupt) as e:
            step.status = "failed"
            step.info["error"] = str(e) or type(e).__name__
            failure = e
        except Exception as e:  # a bug in a step: keep the record of what ran, then report it
            step.status = "failed"
            step.info["error"] = f"{type(e).__name__}: {e}"
            step.info["traceback"] = traceback.format_exc(limit=8)
            failure = e
        step.seconds = round(time.perf_counter() - t, 1)
    total = round(time.perf_counter() - start, 1)
    for step, _, _ in steps:
        step.artefact = step.artefact.replace(str(work), str(out))
    summary = {"out": str(out), "seconds": total, "settings": dataclasses.asdict(cfg),
               "inputs": {k: str(v) for k, v in paths.items()}, "steps": [dataclasses.asdict(s) for s, _, _ in steps]}
    write_json(work / SUMMARY_FILE, _relocate(summary, str(work), str(out)))
    _print_table([s for s, _, _ in steps], out, total)
    if failure is None or isinstance(failure, KeyboardInterrupt):
        return failure
    step = next(s for s, _, _ in steps if s.status == "failed")
    error = str(step.info["error"]).replace(str(work), str(out)).rstrip(".")
    return CuteGPTError(f"the recipe stopped at '{step.name}': {error} (details in {out / SUMMARY_FILE})")


def _print_table(steps: list[Step], out: Path, total: float) -> None:
    print(f"\nCuteGPT recipe finished in {total:.0f} s; artefacts:")
    width = max(len(s.name) for s in steps)
    for s in steps:
        note = ""
        if s.status != "done":
            note = f"  [{s.status}: {s.info.get('reason') or s.info.get('error', '')}]"
        print(f"  {s.name:<{width}}  {s.seconds:>6.1f} s  {s.artefact}{note}")
    for s in steps:
        if s.name == "vocab extend" and s.status == "done":
            a, b = s.info["tokens_per_chinese_char"]
            print(f"tokens per Chinese character: {a} -> {b} (+{s.info['pieces_added']} tokens)")
        if s.name == "chat smoke test" and s.status == "done":
            for q, a in s.info["answers"].items():
                print(f"  Q: {q}\n  A: {a}")
        if s.name.startswith("evaluation") and s.status == "done" and s.info.get("accuracy_mean_of_subjects") is not None:
            print(f"{s.name}: C-Eval-style accuracy {s.info['accuracy_mean_of_subjects']:.1f}% "
                  f"(mean of subjects; {s.info['questions']} questions)")
    scored = {s.name: s.info for s in steps if s.name.startswith("evaluation") and s.status == "done"
              and s.info.get("correct") is not None and s.info.get("questions")}
    if len(scored) == 2:
        from cutegpt.evaluation.results import compare_accuracy

        tuned, base = scored["evaluation"], scored["evaluation of the base model"]
        print(compare_accuracy(tuned["correct"], tuned["questions"], base["correct"], base["questions"],
                               a_label="tuned", b_label="base"))
    print(f"summary: {out / SUMMARY_FILE}")
