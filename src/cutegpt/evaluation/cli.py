"""`cutegpt eval`: C-Eval / CMMLU / MMLU / XieZhi multiple-choice evaluation.

    cutegpt eval ceval --shots 5 --split val --data DIR
      -> eval-results/ceval-val-5shot-logits-official-<model>[+<adapter>]-<settings hash>/
         (eval-results/latest points at the newest default folder; --out DIR chooses another,
         an existing one is refused unless --overwrite)
           results.json        settings, protocol, token ids, data hash, per-subject and category scores
           predictions.jsonl   one line per question: prompt hash, gold, prediction, option probabilities
           categories.png      accuracy by category (mean of subjects), chance line
           submission.json     C-Eval test split only: {subject: {id: letter}}

Finished subjects are cached under $CUTEGPT_CACHE/eval/<benchmark>-<split>-<key>/, the
key being a hash of the model files and every setting that changes a score, so an
interrupted run resumes where it stopped and a changed setting starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cutegpt.config import arg
from cutegpt.threads import THREADS_HELP, apply_threads
from cutegpt.errors import CuteGPTError
from cutegpt.evaluation.data import LETTERS, SPLITS, Benchmark, Question, Subject, load_benchmark, resolve_data_dir
from cutegpt.evaluation.prompts import PROMPTS, SOURCES, PromptStyle, pick_shots
from cutegpt.evaluation.results import aggregate, bar_chart, fmt_acc, subject_table, submission, table
from cutegpt.model.args import ModelArgs

if TYPE_CHECKING:
    from cutegpt.evaluation.scoring import Item, Scored
    from cutegpt.model.loading import LoadedModel

PROTOCOL_VERSION = 3  # bump when prompt rendering or scoring changes: old caches stop matching
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "test", "xiezhi": "spec"}
RESULT_FILES = {"results.json", "predictions.jsonl", "categories.png", "submission.json", "table.md"}


@dataclass(kw_only=True)
class EvalConfig(ModelArgs):
    """Settings of `cutegpt eval` (model flags come from ModelArgs)."""

    benchmark: Literal["ceval", "cmmlu", "mmlu", "xiezhi"] = arg(help="benchmark: ceval, cmmlu, mmlu or xiezhi", positional=True)
    model: list[str] | None = arg(None, "model folder, .gguf file or hub id found in the local hub cache; several (--model A --model B) "
                                  "are scored in one run, compared with the first", aliases=("--model_name_or_path",),
                                  absent="the embedded SmolLM2-135M-Instruct", repeatable=True)
    lora: list[str] | None = arg(None, "LoRA adapter folder on top of --model; one per --model ('none' for no adapter), "
                                 "or several on one --model", aliases=("--adapter_name_or_path",), repeatable=True)
    data: str | None = arg(None, "the benchmark's official data folder (else $CEVAL_DATA / $CMMLU_DATA / $MMLU_DATA / $XIEZHI_DATA, or $CUTEGPT_DATA/<benchmark>)")
    split: str | None = arg(None, "ceval: val|test|dev; cmmlu: test|dev; mmlu: test|val|dev; xiezhi: spec|inter", absent="val for ceval and mmlu, test for cmmlu, spec for xiezhi")
    shots: int = arg(5, "few-shot examples from the dev set (0 = zero-shot)", ge=0)
    method: Literal["logits", "loglikelihood", "generate"] = arg("logits", "logits: next-token logit of each letter (C-Eval's LLaMA evaluator); loglikelihood: log-probability of each option's continuation, the target delimiter included (lm-evaluation-harness's multiple_choice); generate: the model answers as a chat turn, the letter is read from its text (docs/evaluation.md)")
    prompt: Literal["official", "lm-eval"] = arg("official", "prompt text: the benchmark authors' own (C-Eval, CMMLU, MMLU) or lm-evaluation-harness's task text")
    target_delimiter: str | None = arg(None, "text between the answer cue and the letter, in the shots and in the scored continuation; stock lm-eval uses ' '",
                                       absent="'' for ceval, cmmlu and xiezhi, ' ' for mmlu")
    chat_template: bool = arg(False, "wrap each prompt in the model's template (--template), for instruction-tuned models")
    cot: bool = arg(False, "--method generate: ask for step-by-step reasoning ending with 答案是X / 'The answer is X' (give more --max-new-tokens)")
    max_new_tokens: int = arg(32, "--method generate: most tokens of each answer", ge=1)
    fewshot_order: Literal["file", "random"] = arg("file", "few-shot examples: the first N dev questions (reference) or N seeded-random ones")
    seed: int = arg(1234, "seed for --fewshot-order random")
    subjects: list[str] | None = arg(None, "only these subjects (C-Eval/CMMLU/MMLU keys, XieZhi top-level disciplines)", absent="all")
    limit: int | None = arg(None, "only the first N questions of each subject (quick looks; labelled in the results)", ge=1, absent="every question")
    batch_size: int = arg(4, "most questions in one forward pass (on CPU 2-4 is fastest)", ge=1)
    max_batch_tokens: int = arg(2048, "most (padded) question tokens in one forward pass", ge=1)
    out: str | None = arg(None, "results folder (must not exist unless --overwrite)", aliases=("--output", "--output-dir", "--output_dir"),
                          absent="a new eval-results/<benchmark>-<split>-<shots>shot-<method>-<prompt>-<model>[+<adapter>]-<settings hash>")
    overwrite: bool = arg(False, "replace an existing --out folder (only one holding nothing but cutegpt eval results)")
    resume: bool = arg(True, "reuse finished subjects from the per-subject cache")
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    backend: Literal["auto", "torch", "llamacpp"] = arg("auto", "scoring engine: llama.cpp runs a .gguf file's own weights (its quantization "
                                                        "included), torch any folder (a .gguf file dequantized); auto = llama.cpp for a .gguf file")
    endpoint: str | None = arg(None, "score the model behind an OpenAI-compatible server (llama.cpp's server, cutegpt serve) instead of "
                                     "--model: letters from its completion log-probabilities, or --method generate through its chat endpoint")
    api_key: str | None = arg(None, "API key for --endpoint (sent as a Bearer token)")
    parallel: int = arg(1, "llama.cpp: questions scored side by side in as many slots, each starting from the subject's shared prefix "
                                     "(on CPU scoring is bound by prompt processing: 4 slots were no faster than 1 here)", ge=1)


# --------------------------------------------------------------------------- prompts -> token ids


def encode_prompt(lm: LoadedModel, text: str, chat_template: bool) -> list[int]:
    """Plain: the tokenizer's own special tokens (BOS for LLaMA, as the official evaluator).
    Chat: the template's segments, encoded exactly as `cutegpt chat` encodes them."""
    from cutegpt.templates import Turn, encode_segments

    if chat_template:
        ids, _ = encode_segments(lm.tokenizer, lm.template.segments([Turn(text)]))
        return ids
    return list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])


# What precedes the cue in every prompt: the last option line (prompts.PromptStyle.question).
CUE_CONTEXT = "D. 0\n"


def letter_token_ids(tokenizer: Any, prefix: str = "", context: str = "") -> tuple[list[int], list[str]]:
    """The token each letter is where the prompt puts it: encode `context + prefix + letter`, take what follows
    `context`'s own tokens (its first id; warns when that is not the whole letter).

    With `context` ending in the answer cue this is the token the benchmark's shots show after the cue:
    CMMLU's bare `A` after `答案是：` on a SentencePiece vocabulary, where `encode("A")` alone gives `▁A`.
    A tokenizer that merges the letter into the cue falls back to encoding `prefix + letter` alone.
    """
    ids, notes = [], []
    ctx = list(tokenizer(context, add_special_tokens=False)["input_ids"]) if context else []
    for letter in LETTERS:
        whole = list(tokenizer(context + prefix + letter, add_special_tokens=False)["input_ids"]) if context else []
        if context and whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            enc = whole[len(ctx):]
        else:
            enc = tokenizer(prefix + letter, add_special_tokens=False)["input_ids"]
        if not enc:
            raise CuteGPTError(f"the tokenizer {tokenizer.name_or_path} encodes the letter {letter!r} to nothing.")
        if len(enc) > 1:
            note = (f"the tokenizer has no single token for {prefix + letter!r} ({len(enc)} tokens); "
                    f"the logits method reads its first token {tokenizer.convert_ids_to_tokens(enc[0])!r} (id {enc[0]}).")
            notes.append(note)
            warnings.warn(note, stacklevel=2)
        ids.append(int(enc[0]))
    if len(set(ids)) < len(ids):
        raise CuteGPTError(f"the tokenizer {tokenizer.name_or_path} maps two letters to the same first token {ids}; use --method loglikelihood.")
    return ids, notes


def letter_context(lm: LoadedModel, bench_name: str, cfg: EvalConfig) -> str:
    """The text right before the letter: the answer cue after an option line, or the template's answer prefix."""
    if cfg.chat_template:
        from cutegpt.templates import Turn

        return lm.template.prompt([Turn(CUE_CONTEXT + style_of(bench_name, cfg).parts[2])])
    return CUE_CONTEXT + style_of(bench_name, cfg).parts[2]


def style_of(bench_name: str, cfg: EvalConfig) -> PromptStyle:
    return PromptStyle(bench_name, cfg.prompt, cfg.target_delimiter)


def continuations(tokenizer: Any, method: str, benchmark: str, letter_ids: list[int],
                  delimiter: str | None = None) -> tuple[tuple[int, ...], ...]:
    """The scored continuation of each option, encoded on its own: delimiter + letter."""
    if method == "logits":
        return tuple((i,) for i in letter_ids)
    prefix = PromptStyle(benchmark, delimiter=delimiter).target_delimiter
    return tuple(tuple(tokenizer(prefix + L, add_special_tokens=False)["input_ids"]) for L in LETTERS)


def item_for(lm: LoadedModel, text: str, cfg: EvalConfig, conts: tuple[tuple[int, ...], ...], delimiter: str) -> Item:
    """One question's ids and continuations.

    loglikelihood on plain text follows lm-evaluation-harness: encode context + delimiter + letter
    whole and take the tokens after the context's as the continuation (a SentencePiece tokenizer
    encodes " A" alone differently from " A" after text). When the whole encoding does not start
    with the context's tokens (a merge across the boundary), the separately encoded
    continuation is used.
    """
    from cutegpt.evaluation.scoring import Item

    ids = tuple(encode_prompt(lm, text, cfg.chat_template))
    if cfg.method != "loglikelihood" or cfg.chat_template:
        return Item(ids, conts)
    own = []
    for L, fallback in zip(LETTERS, conts):
        whole = tuple(encode_prompt(lm, text + delimiter + L, False))
        own.append(whole[len(ids):] if whole[: len(ids)] == ids and len(whole) > len(ids) else fallback)
    return Item(ids, tuple(own))


def subject_prompts(bench: Benchmark, sub: Subject, cfg: EvalConfig) -> list[tuple[Question, str]]:
    """Every question's full prompt. On the dev split the questions are the few-shot pool
    itself: each question is left out of its own shots (as lm-evaluation-harness does)."""
    style = style_of(bench.name, cfg)
    questions = sub.questions[: cfg.limit] if cfg.limit else sub.questions
    if bench.split == "dev" and cfg.shots:
        return [(q, style.prefix(sub, pick_shots(sub, cfg.shots, cfg.fewshot_order, cfg.seed, sub.dev_file, leave_out=q))
                 + style.question(q)) for q in questions]
    shots = pick_shots(sub, cfg.shots, cfg.fewshot_order, cfg.seed, sub.dev_file)
    prefix = style.prefix(sub, shots)
    return [(q, prefix + style.question(q)) for q in questions]


# --------------------------------------------------------------------------- backend


def choose_backend(cfg: EvalConfig) -> str:
    """torch, llamacpp or endpoint, decided before anything loads."""
    if cfg.endpoint:
        if cfg.model or cfg.lora:
            raise CuteGPTError("--endpoint scores the model its server runs: give --endpoint or --model/--lora, not both.")
        return "endpoint"
    is_gguf = cfg.model is not None and Path(cfg.model).suffix == ".gguf"
    lora_gguf = cfg.lora is not None and Path(cfg.lora).suffix.lower() == ".gguf"  # export --format gguf-lora
    if lora_gguf and not is_gguf:
        raise CuteGPTError(f"--lora {cfg.lora} is a LoRA GGUF: give the base model's GGUF file as --model "
                           f"(`cutegpt export --format gguf` makes one).")
    if lora_gguf and cfg.backend == "torch":
        raise CuteGPTError(f"--lora {cfg.lora} is a LoRA GGUF, which only llama.cpp runs; leave out --backend torch.")
    torch_only = [flag for flag, on in (("--lora", bool(cfg.lora) and not lora_gguf), ("--load-in-8bit", cfg.load_in_8bit),
                                        ("--dtype", cfg.dtype != "auto"), ("--device cuda", cfg.device == "cuda")) if on]
    if cfg.backend == "llamacpp":
        if not is_gguf:
            raise CuteGPTError("--backend llamacpp scores a .gguf file: give --model FILE.gguf "
                               "(`cutegpt export --format gguf` makes one), or use --backend torch.")
        if torch_only:
            raise CuteGPTError(f"{torch_only[0]} works only with --backend torch; llama.cpp runs the GGUF file's own weights.")
        return "llamacpp"
    if cfg.backend == "torch" or not is_gguf or torch_only:
        return "torch"
    return "llamacpp"


def gguf_quant(path: Path) -> str:
    """The file's weight type as llama.cpp names it (F16, Q8_0, ...)."""
    from cutegpt.model.gguf_header import read_metadata

    ftype = read_metadata(path, lambda k: k == "general.file_type").get("general.file_type")
    try:
        import gguf

        return gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ImportError, TypeError, ValueError):
        return "unknown" if ftype is None else f"file type {ftype}"


def load_llamacpp_for(cfg: EvalConfig, bench: Benchmark, threads: int, slot_dir: Path) -> Any:
    """The GGUF file in llama.cpp with --parallel slots, each as long as the longest prompt needs."""
    from cutegpt.model.gguf_header import read_metadata
    from cutegpt.runtime.llamacpp import gguf_tokenizer, load_llamacpp

    path = Path(cfg.model).expanduser()
    if not path.is_file():
        raise CuteGPTError(f"--model {path} does not exist." if not path.exists() else f"--model {path} is a folder, not a .gguf file.")
    tokenizer = gguf_tokenizer(path)
    probe = _Probe(tokenizer, template_for_probe(cfg, tokenizer))
    longest = max((len(encode_prompt(probe, *model_prompt(bench, cfg, text)))
                   for sub in bench.subjects.values() for _q, text in subject_prompts(bench, sub, cfg)), default=1)
    if cfg.method == "generate":
        longest += cfg.max_new_tokens
    meta = read_metadata(path, lambda k: k.endswith(".context_length") or k == "general.architecture")
    train_ctx = int(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length") or 2048)
    # + the longest continuation; llama.cpp may split more finely than transformers' reading of the vocabulary
    need = longest + longest // 8 + 16
    if longest + 8 > train_ctx:
        raise CuteGPTError(f"--model {path.name}: the longest prompt has {longest} tokens, more than the model's context of "
                           f"{train_ctx}; use fewer --shots.")
    per_slot = min(train_ctx, -(-need // 256) * 256)
    lora = Path(cfg.lora).expanduser() if cfg.lora else None  # a LoRA GGUF (choose_backend sent a folder to torch)
    lm = load_llamacpp(path, template=cfg.template, threads=threads, n_ctx=per_slot * cfg.parallel, tokenizer=tokenizer,
                       parallel=cfg.parallel, slot_save_path=slot_dir, lora=lora)
    if not uses_template(cfg):  # plain prompts: llama.cpp's own tokenization (chat prompts go through the template's segments)
        from cutegpt.evaluation.llamacpp import ServerTokenizer

        lm.tokenizer = ServerTokenizer(lm.server, tokenizer)
    return lm


def uses_template(cfg: EvalConfig) -> bool:
    return cfg.chat_template or cfg.method == "generate"


def model_prompt(bench: Benchmark, cfg: EvalConfig, text: str) -> tuple[str, bool]:
    """What the model reads for a question's prompt text, and whether it goes through the chat template."""
    if cfg.method == "generate":
        from cutegpt.evaluation.generate import chat_text

        return chat_text(text, style_of(bench.name, cfg).parts[2], bench.name, cfg.cot), True
    return text, cfg.chat_template


@dataclass
class _Probe:
    """Just enough of a model for encode_prompt: counts prompt tokens before llama.cpp loads."""

    tokenizer: Any
    template: Any


def template_for_probe(cfg: EvalConfig, tokenizer: Any) -> Any:
    from cutegpt.runtime.llamacpp import template_for

    return template_for(cfg.template, tokenizer)


def check_gguf_tokenizer(lm: Any, bench: Benchmark, prompts: dict[str, list[tuple[Question, str]]], cfg: EvalConfig) -> None:
    """Chat prompts are encoded segment by segment with the file's tokenizer as transformers reads it (the template's
    special tokens kept apart); llama.cpp must read the rendered text the same way."""
    from cutegpt.runtime.llamacpp import server_tokenize

    for name, items in prompts.items():
        if not items or not uses_template(cfg):
            continue
        ours = encode_prompt(lm, *model_prompt(bench, cfg, items[0][1]))
        theirs = server_tokenize(lm.server, lm.tokenizer.decode(ours), add_special=False)
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise CuteGPTError(f"--model {lm.model_path.name}: llama.cpp tokenizes the '{name}' prompt differently from the file's "
                               f"tokenizer read by transformers (from token {at} on), so its letters cannot be scored like the torch path; "
                               f"use --backend torch.")


# --------------------------------------------------------------------------- cache key


def _files_fingerprint(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if path.is_file():
        st = path.stat()
        return {"path": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}
    info: dict[str, Any] = {"path": str(path.resolve())}
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".model", ".gguf")):
            st = f.stat()
            info[f.name] = [st.st_size, st.st_mtime_ns]
    return info


def settings_key(lm: LoadedModel, bench: Benchmark, cfg: EvalConfig, letter_ids: list[int]) -> tuple[str, dict[str, Any]]:
    settings = {
        "protocol_version": PROTOCOL_VERSION,
        "model": ({"endpoint": getattr(lm.server, "url", None), "name": lm.name} if hasattr(getattr(lm, "server", None), "chat")
                  else _files_fingerprint(lm.model_path)),
        "lora": _files_fingerprint(lm.lora_path),
        "dtype": str(getattr(lm, "dtype", "gguf")),
        "backend": ("endpoint" if hasattr(getattr(lm, "server", None), "chat") else
                    "llamacpp" if getattr(lm, "server", None) is not None else "torch"),
        "int8": lm.int8,
        "benchmark": bench.name,
        "split": bench.split,
        "data_hash": bench.data_hash(),
        "shots": cfg.shots,
        "method": cfg.method,
        "prompt": cfg.prompt,
        "target_delimiter": style_of(bench.name, cfg).target_delimiter,
        "fewshot_leaves_out_self": bench.split == "dev",
        "template": getattr(lm.template, "name", "the endpoint's own") if uses_template(cfg) else None,
        "generation": {"cot": cfg.cot, "max_new_tokens": cfg.max_new_tokens} if cfg.method == "generate" else None,
        "fewshot_order": cfg.fewshot_order,
        "seed": cfg.seed if cfg.fewshot_order == "random" else None,
        "limit": cfg.limit,
        "letter_ids": letter_ids,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return key, settings


def default_cache_root() -> Path:
    from cutegpt.model.embedded import cache_dir

    return cache_dir() / "eval"


# --------------------------------------------------------------------------- the run


def _records(sub: Subject, prompts: list[tuple[Question, str]], items: list[Item], scored: list[Scored]) -> list[dict[str, Any]]:
    out = []
    for (q, text), item, s in zip(prompts, items, scored):
        pred = LETTERS[s.best]
        gold_index = LETTERS.index(q.answer) if q.answer else None
        out.append({
            "subject": sub.name,
            "id": q.id,
            "prompt_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
            "prompt_tokens": len(item.ids),
            "gold": q.answer,
            "pred": pred,
            "probs": {L: round(p, 6) for L, p in zip(LETTERS, s.probs)},
            "scores": [round(x, 5) for x in s.scores],
            "correct": (pred == q.answer) if q.answer else None,
            "rank": s.rank_of(gold_index) if gold_index is not None else None,
        })
    return out


def evaluate(lm: LoadedModel, bench: Benchmark, cfg: EvalConfig, cache_root: Path | None = None,
             show_progress: bool = True, use_prefix_cache: bool = True) -> dict[str, Any]:
    """Score every subject of `bench`; returns {records, settings, key, timing, notes, letter_ids}.

    timing: `seconds` / `questions_per_second` are those of the runs that computed the answers
    (a subject served from the cache brings the timing recorded when it was computed);
    `scored_questions` / `seconds_this_run` are this run's own work.
    """
    from tqdm.auto import tqdm

    from cutegpt.evaluation.scoring import score_items

    delimiter = style_of(bench.name, cfg).target_delimiter
    letter_ids, notes = letter_token_ids(lm.tokenizer, delimiter, letter_context(lm, bench.name, cfg))
    conts = continuations(lm.tokenizer, cfg.method, bench.name, letter_ids, delimiter)
    key, settings = settings_key(lm, bench, cfg, letter_ids)
    cache = (cache_root / f"{bench.name}-{bench.split}-{key}") if cache_root is not None else None
    if cache is not None:
        from cutegpt.io import write_json

        cache.mkdir(parents=True, exist_ok=True)
        if not (cache / "settings.json").exists():
            write_json(cache / "settings.json", settings)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    on_llamacpp = getattr(lm, "server", None) is not None
    remote = hasattr(getattr(lm, "server", None), "chat")

    # Build every prompt first: a bad dev file fails before any model time is spent.
    all_prompts = {name: subject_prompts(bench, sub, cfg) for name, sub in bench.subjects.items()}
    if on_llamacpp and not remote:
        check_gguf_tokenizer(lm, bench, all_prompts, cfg)
    records: dict[str, list[dict[str, Any]]] = {}
    scored_questions, seconds, resumed = 0, 0.0, 0
    timed_questions, timed_seconds, untimed = 0, 0.0, []
    outer = tqdm(bench.subjects.items(), desc=f"{bench.name} {bench.split}", unit="subject", disable=not show_progress)
    for name, sub in outer:
        prompts = all_prompts[name]
        path = cache / f"{name}.jsonl" if cache is not None else None
        if path is not None and cfg.resume and path.is_file():
            recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if len(recs) == len(prompts):
                records[name] = recs
                resumed += 1
                timing_path = path.with_suffix(".timing.json")
                try:
                    t = json.loads(timing_path.read_text(encoding="utf-8"))
                    timed_questions += int(t["questions"])
                    timed_seconds += float(t["seconds"])
                except (OSError, ValueError, KeyError, TypeError):
                    untimed.append(name)  # cached by an older version: its timing was not kept
                continue
        if cfg.method == "generate":
            from cutegpt.evaluation.generate import generate_records

            turns = [model_prompt(bench, cfg, text)[0] for _q, text in prompts]
            remote = hasattr(getattr(lm, "server", None), "chat")  # an endpoint applies its own template
            ids = [[] if remote else encode_prompt(lm, turn, True) for turn in turns]
            too_long = [q for q, x in zip(prompts, ids) if len(x) + cfg.max_new_tokens > lm.context_length]
            if too_long:
                raise CuteGPTError(f"{too_long[0][0].source}: the prompt and --max-new-tokens {cfg.max_new_tokens} need more tokens "
                                   f"than the model's context of {lm.context_length}; use fewer --shots.")
            bar = tqdm(total=len(ids), desc=name, leave=False, disable=not show_progress)
            t0 = time.perf_counter()
            records[name] = generate_records(lm, sub, prompts, ids, cfg.max_new_tokens, progress=bar.update, turns=turns)
            took = time.perf_counter() - t0
            bar.close()
            seconds += took
            scored_questions += len(ids)
            timed_questions += len(ids)
            timed_seconds += took
            _cache_subject(path, records[name], took, lm)
            continue
        items = [item_for(lm, text, cfg, conts, delimiter) for _q, text in prompts]
        context = lm.context_length
        too_long = [q for (q, _t), it in zip(prompts, items) if len(it.ids) + max(map(len, it.continuations)) > context]
        if too_long:
            raise CuteGPTError(f"{too_long[0].source}: the prompt has more tokens than the model's context of {context}; use fewer --shots.")
        bar = tqdm(total=len(items), desc=name, leave=False, disable=not show_progress)
        t0 = time.perf_counter()
        if on_llamacpp:
            from cutegpt.evaluation.llamacpp import score_items_llamacpp

            scored = score_items_llamacpp(lm, items, cfg.method, 1 if remote else cfg.parallel, use_prefix_cache,
                                          progress=bar.update, share=not remote)
        else:
            scored = score_items(lm.model, items, cfg.method, cfg.batch_size, cfg.max_batch_tokens, pad_id,
                                 use_prefix_cache=use_prefix_cache, progress=bar.update)
        took = time.perf_counter() - t0
        seconds += took
        bar.close()
        scored_questions += len(items)
        timed_questions += len(items)
        timed_seconds += took
        records[name] = _records(sub, prompts, items, scored)
        _cache_subject(path, records[name], took, lm)
    timing: dict[str, Any] = {
        "questions_timed": timed_questions,
        "seconds": round(timed_seconds, 3),
        "questions_per_second": round(timed_questions / timed_seconds, 3) if timed_seconds else None,
        "scored_questions": scored_questions,
        "seconds_this_run": round(seconds, 3),
        "subjects_resumed": resumed,
    }
    if untimed:
        timing["subjects_without_timing"] = untimed
    return {"records": records, "settings": settings, "key": key, "letter_ids": letter_ids, "notes": notes,
            "timing": timing}


def _cache_subject(path: Path | None, recs: list[dict[str, Any]], took: float, lm: Any) -> None:
    if path is None:
        return
    from cutegpt.io import atomic_file, write_json

    with atomic_file(path) as f:  # a subject is cached whole or not at all
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    write_json(path.with_suffix(".timing.json"), {"questions": len(recs), "seconds": took, "threads": _threads(lm)})


def _threads(lm: Any) -> int:
    if getattr(lm, "server", None) is not None:
        return int(lm.threads)
    import torch

    return torch.get_num_threads()


def _protocol(bench: Benchmark, cfg: EvalConfig, lm: LoadedModel, letter_ids: list[int]) -> dict[str, Any]:
    style = style_of(bench.name, cfg)
    header, lead, cue = style.parts
    return {
        "prompt": cfg.prompt,
        "prompt_source": SOURCES[(bench.name, cfg.prompt)],
        "header": header,
        "question_prefix": lead,
        "answer_cue": cue,
        "target_delimiter": style.target_delimiter,
        "shots": cfg.shots,
        "fewshot_source": "train (xiezhi_train_chn)" if bench.name == "xiezhi" else "dev",
        "fewshot_order": cfg.fewshot_order if cfg.shots else None,
        "fewshot_leaves_out_self": bool(cfg.shots) and bench.split == "dev",
        "fewshot_note": ("dev split: each question is left out of its own shots (lm-evaluation-harness's rule), "
                         "so its shots are the first (or seeded-random) others")
                        if cfg.shots and bench.split == "dev" else None,
        "seed": cfg.seed if cfg.shots and cfg.fewshot_order == "random" else None,
        "method": cfg.method,
        "letter_tokens": {L: {"id": i, "token": lm.tokenizer.convert_ids_to_tokens(i)} for L, i in zip(LETTERS, letter_ids)},
        "letter_convention": ("read from the answer text by evaluation/extract.py's rules (none found: an extraction failure, wrong)"
                              if cfg.method == "generate" else
                              "the token of the letter where the prompt puts it: first id after the answer cue in "
                              "tokenizer.encode(cue + delimiter + letter)" if cfg.method == "logits"
                              else "log-probability of delimiter + letter after the prompt (lm-evaluation-harness)"),
        "template": (getattr(lm.template, "name", "the endpoint's own") if uses_template(cfg)
                     else "none (plain text, tokenizer's own special tokens)"),
        "generation": ({"instruction": __import__("cutegpt.evaluation.generate", fromlist=["instruction"]).instruction(bench.name, cfg.cot),
                        "cot": cfg.cot, "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy, stops at the template's stop marker and EOS"}
                       if cfg.method == "generate" else None),
        "averages": "mean_of_subjects (C-Eval's convention, used in the table) and question_weighted",
        "intervals": "ci95: 95% Wilson score interval in percent (for mean_of_subjects: that of a proportion of the same value over the same question count)",
        "limit_per_subject": cfg.limit,
    }


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60] or "model"


def default_out(bench: Benchmark, cfg: EvalConfig | list[EvalConfig], root: Path = Path("eval-results")) -> Path:
    """A folder of its own for this run: what was evaluated and a hash of every setting.

    The hash covers the model and adapter (path and file sizes/times), the data, and every flag
    that changes a score or the question set (--subjects and --limit too). Running the very same
    settings again gets a time stamp appended, so no earlier result is ever replaced.
    """
    several = cfg if isinstance(cfg, list) else [cfg]
    cfg = several[0]
    model = _safe(Path(cfg.model).name.removesuffix(".gguf")) if cfg.model else "smollm2-135m-instruct"
    if cfg.endpoint:
        model = "endpoint-" + _safe(cfg.endpoint.split("://", 1)[-1])
    if cfg.lora:
        model += "+" + _safe(Path(cfg.lora).name)
    if len(several) > 1:
        model += f"-and-{len(several) - 1}-more"
    models = [{"model": c.model, "model_files": _files_fingerprint(Path(c.model)) if c.model and Path(c.model).exists() else None,
               "lora": c.lora, "lora_files": _files_fingerprint(Path(c.lora)) if c.lora and Path(c.lora).exists() else None,
               "backend": c.backend, "endpoint": c.endpoint}
              for c in several]
    ident = {
        **(models[0] if len(models) == 1 else {"models": models}),
        "dtype": cfg.dtype, "load_in_8bit": cfg.load_in_8bit, "int8_backend": cfg.int8_backend if cfg.load_in_8bit else None,
        "merge_lora": cfg.merge_lora, "data_hash": bench.data_hash(), "benchmark": bench.name, "split": bench.split,
        "subjects": sorted(bench.subjects), "limit": cfg.limit, "shots": cfg.shots, "method": cfg.method,
        "prompt": cfg.prompt, "target_delimiter": style_of(bench.name, cfg).target_delimiter,
        "chat_template": cfg.chat_template, "template": cfg.template if uses_template(cfg) else None,
        **({"cot": cfg.cot, "max_new_tokens": cfg.max_new_tokens} if cfg.method == "generate" else {}),
        "fewshot_order": cfg.fewshot_order, "seed": cfg.seed if cfg.fewshot_order == "random" else None,
        "protocol_version": PROTOCOL_VERSION,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]
    base = f"{bench.name}-{bench.split}-{cfg.shots}shot-{cfg.method}-{cfg.prompt}-{model}-{digest}"
    out = root / base
    if out.exists() or out.is_symlink():
        out = root / f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 2
        while out.exists():
            out = root / f"{base}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
            n += 1
    return out


def _check_replaceable(out: Path) -> None:
    """--overwrite replaces a results folder, never a folder holding the user's own files."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RESULT_FILES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CuteGPTError(f"--out {out} holds files cutegpt eval did not write ({shown}); --overwrite replaces only a "
                           f"results folder, so choose another --out.")


def update_latest(out: Path) -> None:
    """Point <parent>/latest at `out` (a relative symbolic link), replacing an older pointer only."""
    import os

    latest = out.parent / "latest"
    if latest.exists() and not latest.is_symlink():
        return  # a folder or file of the user's named "latest": not ours to replace
    tmp = out.parent / f".latest.tmp-{os.getpid()}"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(out.name, tmp, target_is_directory=True)
        os.replace(tmp, latest)
    except OSError:  # no symbolic links here (some Windows setups): the pointer is a convenience
        with __import__("contextlib").suppress(OSError):
            tmp.unlink()


def model_configs(cfg: EvalConfig) -> list[EvalConfig]:
    """One config per model to score: --model and --lora may each be given several times."""
    models = _as_list(cfg.model) or [None]
    loras = _as_list(cfg.lora)
    if not loras:
        pairs = [(m, None) for m in models]
    elif len(models) == 1:
        pairs = [(models[0], None if lora.lower() == "none" else lora) for lora in loras]
    elif len(loras) == len(models):
        pairs = [(m, None if lora.lower() == "none" else lora) for m, lora in zip(models, loras)]
    else:
        raise CuteGPTError(f"--lora: {len(loras)} adapters for {len(models)} models; give one --lora per --model "
                           f"('none' for no adapter), or any number of adapters on one --model.")
    if len(set(pairs)) < len(pairs):
        raise CuteGPTError("--model/--lora name the same model twice; each model is scored once.")
    return [dataclasses.replace(cfg, model=m, lora=lora) for m, lora in pairs]


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _check_settings(cfg: EvalConfig) -> None:
    if cfg.shots < 0:
        raise CuteGPTError(f"--shots must be 0 or more, not {cfg.shots}.")
    if cfg.limit is not None and cfg.limit < 1:
        raise CuteGPTError(f"--limit must be 1 or more, not {cfg.limit}.")
    if cfg.batch_size < 1 or cfg.max_batch_tokens < 1:
        raise CuteGPTError("--batch-size and --max-batch-tokens must be 1 or more.")
    if cfg.prompt not in PROMPTS:
        raise CuteGPTError(f"--prompt must be one of {', '.join(PROMPTS)}, not {cfg.prompt!r}.")
    if cfg.parallel < 1:
        raise CuteGPTError(f"--parallel must be 1 or more, not {cfg.parallel}.")


def run_eval(cfg: EvalConfig) -> int:
    from cutegpt.io import check_output

    _check_settings(cfg)
    configs = model_configs(cfg)
    backends = [choose_backend(c) for c in configs]
    if "llamacpp" in backends:
        from cutegpt.runtime.llamacpp import xllamacpp_module

        xllamacpp_module("--model FILE.gguf")
    if "torch" in backends:
        threads = apply_threads(cfg.threads)
    else:
        from cutegpt.threads import resolve_threads

        threads = resolve_threads(cfg.threads)
    split = cfg.split or DEFAULT_SPLIT[cfg.benchmark]
    if split not in SPLITS[cfg.benchmark]:
        raise CuteGPTError(f"{cfg.benchmark} has no split '{split}'; choose one of {', '.join(SPLITS[cfg.benchmark])}.")
    bench = load_benchmark(cfg.benchmark, resolve_data_dir(cfg.benchmark, cfg.data), split, cfg.subjects)
    for sub in bench.subjects.values():  # fail on a short dev file before loading the model
        subject_prompts(bench, sub, cfg)
    # The output is checked before the model loads: an existing --out is refused unless --overwrite.
    out_dir = Path(cfg.out) if cfg.out else default_out(bench, configs[0] if len(configs) == 1 else configs)
    inputs = (bench.data_dir, *(c.model for c in configs), *(c.lora for c in configs))
    check_output(out_dir, flag="--out", inputs=inputs, overwrite=cfg.overwrite)
    if cfg.overwrite:
        _check_replaceable(out_dir)

    if len(configs) == 1:
        results, records, lm = score_model(configs[0], bench, backends[0], threads)
        write_single(out_dir, bench, configs[0], lm, results, records)
    else:
        runs = []
        for n, (mcfg, backend) in enumerate(zip(configs, backends), 1):
            print(f"[{n}/{len(configs)}]", end=" ", flush=True)
            results, records, _lm = score_model(mcfg, bench, backend, threads)
            runs.append((results, records))
        write_several(out_dir, bench, cfg, runs)
    if not cfg.out:
        update_latest(out_dir)
    return 0


def score_model(cfg: EvalConfig, bench: Benchmark, backend: str, threads: int) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], Any]:
    """Load one model, score every subject; its results.json content, its records and the model."""
    import torch

    import cutegpt
    from cutegpt.model.loading import load_model

    with tempfile.TemporaryDirectory(prefix="cutegpt-eval-slots-") as slot_dir:
        if backend == "llamacpp":
            lm = load_llamacpp_for(cfg, bench, threads, Path(slot_dir))
            from cutegpt.runtime.native import build_hint

            hint = build_hint()
            if hint:
                print(hint, file=sys.stderr, flush=True)
        elif backend == "endpoint":
            from cutegpt.evaluation.endpoint import load_endpoint

            lm = load_endpoint(str(cfg.endpoint), cfg.api_key, cfg.method)
        else:
            lm = load_model(cfg)
        print(f"model: {lm.describe()}", flush=True)
        run = evaluate(lm, bench, cfg, default_cache_root() if cfg.resume else None)
    weights = ("endpoint" if backend == "endpoint" else f"gguf {gguf_quant(lm.model_path)}" if backend == "llamacpp"
               else f"int8 ({lm.int8})" if lm.int8 else str(lm.dtype).replace("torch.", ""))
    records = run["records"]
    has_gold = all(r["gold"] is not None for recs in records.values() for r in recs)
    setting = f"{cfg.shots}-shot" if cfg.shots else "zero-shot"
    n_questions = sum(len(r) for r in records.values())
    results: dict[str, Any] = {
        "benchmark": bench.name,
        "split": bench.split,
        "setting": setting,
        "model": str(lm.model_path) if backend != "endpoint" else lm.name,
        "name": model_name(cfg, lm, backend),
        "endpoint": cfg.endpoint,
        "adapter": str(lm.lora_path) if lm.lora_path else None,
        "backend": backend,
        "dtype": str(getattr(lm, "dtype", "gguf")).replace("torch.", ""),
        # "weights": what the linear layers hold: the dtype, "int8 (<library>)" with --load-in-8bit, "gguf Q8_0" on llama.cpp
        "weights": weights,
        "device": str(lm.device),
        "data_dir": str(bench.data_dir),
        "data_hash": run["settings"]["data_hash"],
        "cache_key": run["key"],
        "settings": {
            "subjects": cfg.subjects, "subjects_evaluated": list(bench.subjects), "limit": cfg.limit,
            "shots": cfg.shots, "method": cfg.method, "prompt": cfg.prompt,
            "target_delimiter": style_of(bench.name, cfg).target_delimiter, "chat_template": cfg.chat_template,
            "fewshot_order": cfg.fewshot_order, "seed": cfg.seed,
        },
        "protocol": _protocol(bench, cfg, lm, run["letter_ids"]),
        "versions": {"cutegpt": cutegpt.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "questions": n_questions,
        "timing": {**run["timing"], "threads": threads, "parallel": cfg.parallel if backend == "llamacpp" else None},
        "warnings": run["notes"],
    }
    if cfg.method == "generate":
        results["extraction_failures"] = sum(1 for recs in records.values() for r in recs if r["pred"] is None)
    if has_gold:
        results["summary"] = aggregate(bench, records)
    _print_timing(run["timing"])
    return results, records, lm


def _print_timing(t: dict[str, Any]) -> None:
    if t["scored_questions"]:
        seconds = t["seconds_this_run"]  # rounded to ms: 0.0 for answers that took no time (cached, or a stub)
        print(f"{t['scored_questions']} questions in {seconds:.1f} s"
              + (f" ({t['scored_questions'] / seconds:.2f} questions/s)" if seconds > 0 else "")
              + (f", {t['subjects_resumed']} subjects from the cache" if t["subjects_resumed"] else ""))
    elif t["subjects_resumed"]:
        print(f"all {t['subjects_resumed']} subjects from the cache"
              + (f" (computed at {t['questions_per_second']:.2f} questions/s)" if t["questions_per_second"] else ""))


def write_single(out_dir: Path, bench: Benchmark, cfg: EvalConfig, lm: Any, results: dict[str, Any],
                 records: dict[str, list[dict[str, Any]]]) -> None:
    from cutegpt.io import atomic_dir, write_json

    has_gold = "summary" in results
    setting = results["setting"]
    with atomic_dir(out_dir, overwrite=cfg.overwrite) as tmp:
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for recs in records.values():
                for r in recs:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        if has_gold:
            bar_chart(bench, results["summary"], chart_title(bench, cfg, lm, setting, results["questions"], results["backend"]), tmp / "categories.png")
        else:
            write_json(tmp / "submission.json", submission(records))
        write_json(tmp / "results.json", results)

    print(f"\n{bench.name} {bench.split}, {setting}, method {cfg.method}, prompt {cfg.prompt}, "
          f"template {results['protocol']['template']}" + (f", first {cfg.limit} questions per subject" if cfg.limit else ""))
    if has_gold:
        summary = results["summary"]
        if len(summary["subjects"]) <= 20:
            print(subject_table(summary))
            print()
        print(table(bench, summary, setting))
        avg = summary["average"]
        print(f"(category and Average columns: mean of subject accuracies, 95% Wilson intervals; "
              f"question-weighted average {fmt_acc(avg['question_weighted'], avg['questions'])}"
              + (f"; MRR {avg['mrr']:.3f}" if bench.name == "xiezhi" else "") + ")")
    if "extraction_failures" in results:
        print(f"no letter found in {results['extraction_failures']} of {results['questions']} answers (counted as wrong; "
              f"each answer's text is in predictions.jsonl)")
    if not has_gold:
        print(f"no answers in the {bench.split} split: wrote the submission file {out_dir / 'submission.json'}")
    print(f"results: {out_dir}/")


def model_name(cfg: EvalConfig, lm: Any, backend: str) -> str:
    """What the user calls the model: the embedded model's own name (never its cache folder), the served model's id,
    the file's or folder's name."""
    if backend == "endpoint":
        return str(lm.name)
    if cfg.model is None:
        from cutegpt.model.embedded import NAME

        return NAME
    return Path(cfg.model).expanduser().name or str(lm.model_path.name)


def model_label(results: dict[str, Any]) -> str:
    """A model's name in the tables: file or folder, adapter, and what ran it."""
    name = results.get("name") or Path(results["model"]).name
    if results["adapter"]:
        name += " + " + Path(results["adapter"]).name
    return f"{name} ({results['backend']}, {results['weights']})"


def write_several(out_dir: Path, bench: Benchmark, cfg: EvalConfig,
                  runs: list[tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]]) -> None:
    """One folder for several models: results.json (each model's results and the comparison), predictions.jsonl
    (each record with its model), table.md and categories.png (all models side by side)."""
    from cutegpt.evaluation.results import agreement, models_chart, models_table
    from cutegpt.io import atomic_dir, write_json

    labels = [model_label(r) for r, _ in runs]
    labels = [f"{lab} #{i + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    has_gold = all("summary" in r for r, _ in runs)
    setting = runs[0][0]["setting"]
    combined: dict[str, Any] = {"benchmark": bench.name, "split": bench.split, "setting": setting,
                                "models": [{"label": lab, **r} for lab, (r, _) in zip(labels, runs)]}
    text = ""
    if has_gold:
        summaries = [(lab, r["summary"]) for lab, (r, _) in zip(labels, runs)]
        text, comparison = models_table(bench, summaries)
        for row, (_r, recs) in zip(comparison[1:], runs[1:]):
            row["same_letter_as_first"] = agreement(runs[0][1], recs)
        combined["comparison"] = comparison
    with atomic_dir(out_dir, overwrite=cfg.overwrite) as tmp:
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for lab, (_r, records) in zip(labels, runs):
                for recs in records.values():
                    for rec in recs:
                        f.write(json.dumps({"model": lab, **rec}, ensure_ascii=False) + "\n")
        if has_gold:
            (tmp / "table.md").write_text(text + "\n", encoding="utf-8")
            models_chart(bench, summaries, f"{bench.name} {bench.split}, {setting}, {cfg.method}, prompt {cfg.prompt}: "
                         f"{len(runs)} models, mean of subject accuracies with 95% Wilson intervals", tmp / "categories.png")
        write_json(tmp / "results.json", combined)
    print(f"\n{bench.name} {bench.split}, {setting}, method {cfg.method}, prompt {cfg.prompt}, {len(runs)} models")
    if has_gold:
        print(text)
    else:
        print(f"no answers in the {bench.split} split: every model's predictions are in {out_dir / 'predictions.jsonl'}")
    print(f"results: {out_dir}/")


def chart_title(bench: Benchmark, cfg: EvalConfig, lm: LoadedModel, setting: str, n_questions: int, backend: str = "torch") -> str:
    name = model_name(cfg, lm, backend) + (f" + {lm.lora_path.name}" if lm.lora_path else "")
    subjects = (f"subjects: {', '.join(cfg.subjects)}" if cfg.subjects else f"all {len(bench.subjects)} subjects")
    limit = f", first {cfg.limit} questions per subject" if cfg.limit else ""
    return (f"{bench.name} {bench.split}, {setting}, {cfg.method}, prompt {cfg.prompt}: {name} — "
            f"{subjects}{limit}; {n_questions} questions (n per bar)")
