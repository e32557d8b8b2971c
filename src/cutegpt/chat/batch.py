"""`cutegpt generate`: answers for a JSON Lines file of prompts or conversations, in batches.

Each input line is one of
    {"instruction": "...", "input": "..."}          (or {"prompt": "..."}) a single question
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  ending with a user turn
Prompts are rendered by the model's template; on torch, consecutive prompts are
left-padded into batches for `model.generate`, on llama.cpp answered one by one
through its prompt cache. Each answer is written as soon as it is done, in input
order (the input record plus `answer` and `new_tokens`), to OUT.partial, which
becomes OUT when every prompt is answered; `--resume` continues an interrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from tqdm import tqdm

from cutegpt.generation import GenerationArgs
from cutegpt.chat.backend import BACKEND_HELP, Backend, choose_backend
from cutegpt.config import arg
from cutegpt.threads import THREADS_HELP
from cutegpt.errors import CuteGPTError
from cutegpt.io import load_json_text
from cutegpt.model.args import ModelArgs
from cutegpt.templates import Turn, encode_segments

if TYPE_CHECKING:
    from cutegpt.model.loading import LoadedModel


@dataclass
class GenerateConfig(ModelArgs, GenerationArgs):
    input: str = arg("", "JSON Lines file of prompts or conversations", positional=True)
    out: str = arg("answers.jsonl", "where to write the answers (JSON Lines)", aliases=("--output", "--output-dir", "--output_dir"))
    overwrite: bool = arg(False, "replace an existing --out file")
    batch_size: int = arg(8, "prompts generated together (torch backend; llama.cpp answers one at a time)", ge=1)
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    system: str | None = arg(None, "replace the template's system line")
    backend: Backend = arg("auto", BACKEND_HELP)
    resume: bool = arg(False, "continue an interrupted run: keep the answers in OUT.partial and generate the rest")
    verbose: bool = arg(False, "print the backend and where each generation setting came from")

    def check(self) -> None:
        if not self.input:
            raise CuteGPTError("give the input JSON Lines file: cutegpt generate prompts.jsonl --out answers.jsonl")
        choose_backend(self)
        if self.resume and self.overwrite:
            raise CuteGPTError("--resume continues OUT.partial and --overwrite starts again: give one of them.")


def messages_to_conversation(msgs: Any, where: str, allow_answered: bool = False) -> tuple[str | None, list[Turn], str | None]:
    """OpenAI-style messages -> (system line, answered turns, trailing unanswered user message or None).

    A user message may carry an `input` field (CuteGPT's second prompt line), as /save writes it.
    """
    if not isinstance(msgs, list) or not msgs:
        raise CuteGPTError(f"{where}: field 'messages' must be a non-empty list.")
    system, turns, pending, pending_input = None, [], None, ""
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
            raise CuteGPTError(f"{where}: messages[{k}] needs 'role' (system, user or assistant) and text 'content'.")
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            if pending is not None:
                raise CuteGPTError(f"{where}: messages[{k}] is a second user message in a row.")
            pending = m["content"]
            pending_input = m.get("input") if isinstance(m.get("input"), str) else ""
        else:
            if pending is None:
                raise CuteGPTError(f"{where}: messages[{k}] is an assistant message without a user message before it.")
            turns.append(Turn(pending, pending_input, output=m["content"]))
            pending, pending_input = None, ""
    if pending is None and not allow_answered:
        raise CuteGPTError(f"{where}: the last message must be a non-empty user message.")
    if pending is not None and not pending.strip():
        raise CuteGPTError(f"{where}: the last user message is empty.")
    return system, turns, pending


def record_to_turns(record: Any, where: str) -> tuple[list[Turn], str | None]:
    """The conversation a record asks to continue: (turns ending with an open one, system line)."""
    if not isinstance(record, dict):
        raise CuteGPTError(f"{where}: expected a JSON object.")
    if "messages" in record:
        system, turns, pending = messages_to_conversation(record["messages"], where)
        last_input = next((m.get("input") for m in reversed(record["messages"]) if m.get("role") == "user"), "")
        return turns + [Turn(pending or "", last_input if isinstance(last_input, str) else "")], system
    question = record.get("instruction", record.get("prompt"))
    if not isinstance(question, str) or not question.strip():
        raise CuteGPTError(f"{where}: field 'instruction' (or 'prompt') must be non-empty text.")
    return [Turn(question, str(record.get("input") or ""))], None


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise CuteGPTError(f"input file {path} does not exist.")
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CuteGPTError(f"{path}, line {lineno}: not UTF-8 text.") from None
            if not line.strip():
                continue
            records.append((lineno, load_json_text(line, f"{path}, line {lineno}")))
    if not records:
        raise CuteGPTError(f"{path} holds no prompts.")
    return records


def batch_stop_reason(lm: LoadedModel, ids: list[int], max_new_tokens: int) -> str:
    """"stop" (a stop token or the stop marker ended the answer) or "length" (cut at --max-new-tokens).

    `ids` are an answer's tokens before any stop token; a marker of ordinary tokens is among them, and may
    complete exactly at the last allowed token: that answer stopped, it was not cut.
    """
    if len(ids) < max_new_tokens:
        return "stop"
    stop = lm.template.stop
    return "stop" if stop and stop in lm.tokenizer.decode(ids, skip_special_tokens=False) else "length"


def generate_batch(lm: LoadedModel, prompts: list[list[int]], gen: GenerationArgs) -> list[tuple[str, list[int]]]:
    """Answers for several prompt-id lists at once (left padding), cut at the stop marker."""
    import torch

    from cutegpt.chat.engine import cut_at_stop, stop_token_ids
    from cutegpt.chat.stream import complete

    gen = complete(gen, lm.template.name)
    tok, model = lm.tokenizer, lm.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kwargs: dict[str, Any] = dict(
        max_new_tokens=gen.max_new_tokens, do_sample=not gen.greedy, repetition_penalty=gen.repetition_penalty,
        eos_token_id=sorted(stop_token_ids(lm)), pad_token_id=pad,
    )
    if not gen.greedy:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    stop = lm.template.stop
    if stop:
        kwargs.update(stop_strings=[stop], tokenizer=tok)
    with torch.inference_mode():
        out = model.generate(ids.to(lm.device), attention_mask=mask.to(lm.device), **kwargs)
    results = []
    stop_ids = stop_token_ids(lm)
    for row in out[:, width:].tolist():
        kept = []
        for t in row:
            if t in stop_ids:
                break
            kept.append(t)
        results.append((cut_at_stop(tok.decode(kept, skip_special_tokens=False), stop), kept))
    return results


PARTIAL = ".partial"


def _kept_answers(partial: Path, records: list[tuple[int, Any]]) -> int:
    """How many answers of an interrupted run `partial` holds (complete lines that match the input); drops a torn last line."""
    kept, good_bytes = 0, 0
    with partial.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                print(f"the last line of {partial} was cut by the interruption: generating that answer again", file=sys.stderr)
                break
            try:
                obj = load_json_text(raw, f"{partial}, line {kept + 1}")
            except CuteGPTError as e:  # a complete line that is not an answer: the lines after it are kept, so never truncate
                raise CuteGPTError(f"{str(e).rstrip('.')}; fix or remove that line and run --resume again, "
                                   "or start again with --overwrite.") from None
            if kept >= len(records) or not isinstance(obj, dict):
                raise CuteGPTError(f"{partial} holds more answers than the input has prompts: it is from another input; "
                                   "delete it or start again with --overwrite.")
            lineno, rec = records[kept]
            if {k: v for k, v in obj.items() if k not in ("answer", "new_tokens", "stop_reason")} != rec:
                raise CuteGPTError(f"{partial}: answer {kept + 1} does not belong to line {lineno} of the input: "
                                   "it is from another input; delete it or start again with --overwrite.")
            kept += 1
            good_bytes += len(raw)
    with partial.open("r+b") as f:
        f.truncate(good_bytes)
    return kept


SETTINGS = ".partial.settings.json"  # what the answers in OUT.partial were generated with (checked by --resume)


def generation_record(cfg: GenerateConfig, gen: GenerationArgs, backend: str, template: str) -> dict[str, Any]:
    return {"model": cfg.model, "lora": cfg.lora, "backend": backend, "template": template, "system": cfg.system,
            **dataclasses.asdict(gen)}


def check_same_settings(path: Path, now: dict[str, Any], partial: Path) -> None:
    """--resume with other generation settings would mix answers of two runs in one file: refuse, naming them."""
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        print(f"{path.name} is missing or unreadable: cannot check that {partial.name} was generated with the same "
              "settings; continuing.", file=sys.stderr)
        return
    changed = [f"--{k.replace('_', '-')} {before.get(k)} -> {now.get(k)}" for k in now if before.get(k) != now.get(k)]
    if changed:
        raise CuteGPTError(f"--resume: the answers in {partial} were generated with other settings ({'; '.join(changed)}); "
                           "restore them, or start again with --overwrite.")


def run_generate(cfg: GenerateConfig) -> int:
    """Generate answers for every prompt of a JSON Lines file, writing each as soon as it is done.

    Answers go to OUT.partial (one JSON line each, flushed); OUT.partial becomes OUT only when every prompt
    is answered, so an interrupted run keeps what was done and `--resume` continues after the last complete line.
    """
    from cutegpt.io import check_output, describe_os_error

    path = Path(cfg.input)
    out = Path(cfg.out)
    partial = out.with_name(out.name + PARTIAL)
    settings_file = out.with_name(out.name + SETTINGS)
    if cfg.resume and out.is_file() and not partial.exists():
        print(f"nothing to do: {out} is complete (no {partial.name} to continue).", file=sys.stderr)
        return 0
    if not out.parent.is_dir():
        raise CuteGPTError(f"--out {out}: the folder {out.parent} does not exist; create it first.")
    check_output(out, flag="--out", inputs=[path, cfg.model, cfg.lora], overwrite=cfg.overwrite, kind="file")
    if partial.exists() and not (cfg.resume or cfg.overwrite):
        raise CuteGPTError(f"an interrupted run left {partial}: add --resume to continue it, or --overwrite to start again.")
    records = read_records(path)
    conversations = [record_to_turns(rec, f"{path}, line {lineno}") for lineno, rec in records]
    done = _kept_answers(partial, records) if cfg.resume and partial.is_file() else 0
    if cfg.resume and done == 0 and not partial.is_file():
        print(f"nothing to resume ({partial} does not exist): starting from the first prompt", file=sys.stderr)

    from cutegpt.chat.backend import load_chat_model, make_engine, resolved_generation, setup_threads

    backend = choose_backend(cfg)
    threads = setup_threads(cfg.threads, backend)
    lm = load_chat_model(cfg, backend, threads)
    if cfg.verbose:
        print(f"backend: {backend}; {lm.describe()}; {threads} thread{'s' if threads != 1 else ''}", file=sys.stderr, flush=True)
    gen = resolved_generation(cfg, lm, cfg.verbose)
    settings = generation_record(cfg, gen, backend, lm.template.name)
    if cfg.resume and partial.is_file():
        check_same_settings(settings_file, settings, partial)
    prompts = [encode_segments(lm.tokenizer, lm.template.segments(turns, system if system is not None else cfg.system))[0]
               for turns, system in conversations]
    budget = lm.context_length - gen.max_new_tokens
    for (lineno, _), ids in zip(records, prompts):  # the chat rule: refuse a prompt that cannot fit, before generating
        if len(ids) > budget:
            raise CuteGPTError(
                f"{path}, line {lineno}: the prompt is {len(ids)} tokens; with --max-new-tokens {gen.max_new_tokens} "
                f"it does not fit the model's context of {lm.context_length} tokens."
            )
    engine = make_engine(lm, reuse_cache=True) if backend == "llamacpp" else None
    step = 1 if engine is not None else cfg.batch_size
    try:
        if not (cfg.resume and partial.is_file() and settings_file.is_file()):
            settings_file.write_text(json.dumps(settings, ensure_ascii=False) + "\n", encoding="utf-8")
        f = partial.open("ab" if done else "wb")
    except OSError as e:
        raise CuteGPTError(describe_os_error(e, partial, "writing")) from None
    try:
        with f, tqdm(total=len(prompts), initial=done, desc="generating", unit="prompt") as bar:
            for start in range(done, len(prompts), step):
                chunk = list(range(start, min(start + step, len(prompts))))
                if gen.seed is not None and engine is None:
                    import torch

                    torch.manual_seed(gen.seed + start)  # the same answers whether or not the run was resumed
                if engine is not None:
                    g = gen if gen.seed is None else dataclasses.replace(gen, seed=gen.seed + start)
                    r = engine.generate(prompts[chunk[0]], g)
                    if r.stop_reason == "interrupted":  # Ctrl-C reached llama.cpp: never write a cut answer
                        raise KeyboardInterrupt
                    results = [(r.text, r.new_tokens, r.stop_reason)]
                else:
                    results = [(text, len(ids), batch_stop_reason(lm, ids, gen.max_new_tokens))
                               for text, ids in generate_batch(lm, [prompts[i] for i in chunk], gen)]
                for i, (text, n, reason) in zip(chunk, results):
                    line = json.dumps({**records[i][1], "answer": text, "new_tokens": n, "stop_reason": reason},
                                      ensure_ascii=False) + "\n"
                    f.write(line.encode("utf-8"))
                f.flush()
                bar.update(len(chunk))
    except KeyboardInterrupt:
        kept = _count_lines(partial)
        print(f"\ninterrupted: {kept} of {len(prompts)} answers are in {partial}; run the same command with --resume to continue.",
              file=sys.stderr)
        return 130
    except OSError as e:
        raise CuteGPTError(describe_os_error(e, partial, "writing")) from None
    os.replace(partial, out)
    settings_file.unlink(missing_ok=True)
    print(f"wrote {len(records)} answers to {out}")
    return 0


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))
    except OSError:
        return 0
