"""`cutegpt generate`: answers for a JSON Lines file of prompts or conversations, in batches.

Each input line is one of
    {"instruction": "...", "input": "..."}          (or {"prompt": "..."}) a single question
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  ending with a user turn
Prompts are rendered by the model's template, sorted by length so a batch wastes
little padding, left-padded, and generated with `model.generate`; answers are
written in input order, each line the input record plus `answer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from tqdm import tqdm

from cutegpt.chat.args import GenerationArgs
from cutegpt.config import arg
from cutegpt.threads import THREADS_HELP
from cutegpt.errors import CuteGPTError
from cutegpt.io import atomic_file
from cutegpt.model.args import ModelArgs
from cutegpt.templates import Turn, encode_segments

if TYPE_CHECKING:
    from cutegpt.model.loading import LoadedModel


@dataclass
class GenerateConfig(ModelArgs, GenerationArgs):
    input: str = arg("", "JSON Lines file of prompts or conversations", positional=True)
    out: str = arg("answers.jsonl", "where to write the answers (JSON Lines)", aliases=("--output", "--output-dir", "--output_dir"))
    overwrite: bool = arg(False, "replace an existing --out file")
    batch_size: int = arg(8, "prompts generated together", ge=1)
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    system: str | None = arg(None, "replace the template's system line")


def record_to_turns(record: Any, where: str) -> tuple[list[Turn], str | None]:
    """The conversation a record asks to continue: (turns ending with an open one, system line)."""
    if not isinstance(record, dict):
        raise CuteGPTError(f"{where}: expected a JSON object.")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise CuteGPTError(f"{where}: field 'messages' must be a non-empty list.")
        system, turns, pending = None, [], None
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
                raise CuteGPTError(f"{where}: messages[{k}] needs 'role' (system, user or assistant) and text 'content'.")
            if m["role"] == "system":
                system = m["content"]
            elif m["role"] == "user":
                if pending is not None:
                    raise CuteGPTError(f"{where}: messages[{k}] is a second user message in a row.")
                pending = m["content"]
            else:
                if pending is None:
                    raise CuteGPTError(f"{where}: messages[{k}] is an assistant message without a user message before it.")
                turns.append(Turn(pending, output=m["content"]))
                pending = None
        if pending is None or not pending.strip():
            raise CuteGPTError(f"{where}: the last message must be a non-empty user message.")
        return turns + [Turn(pending)], system
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
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise CuteGPTError(f"{path}, line {lineno}: not valid JSON ({e.msg}).") from None
    if not records:
        raise CuteGPTError(f"{path} holds no prompts.")
    return records


def generate_batch(lm: LoadedModel, prompts: list[list[int]], gen: GenerationArgs) -> list[tuple[str, list[int]]]:
    """Answers for several prompt-id lists at once (left padding), cut at the stop marker."""
    import torch

    from cutegpt.chat.engine import cut_at_stop, stop_token_ids

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


def run_generate(cfg: GenerateConfig) -> int:
    """Generate answers for every prompt of a JSON Lines file."""
    if not cfg.input:
        raise CuteGPTError("give the input JSON Lines file: cutegpt generate prompts.jsonl --output answers.jsonl")
    if cfg.batch_size < 1:
        raise CuteGPTError(f"--batch-size must be at least 1, not {cfg.batch_size}.")
    path = Path(cfg.input)
    records = read_records(path)
    conversations = [record_to_turns(rec, f"{path}, line {lineno}") for lineno, rec in records]
    import torch

    from cutegpt.model.loading import load_model

    lm = load_model(cfg)
    gen = GenerationArgs.of(cfg)
    if gen.seed is not None:
        torch.manual_seed(gen.seed)
    prompts = [encode_segments(lm.tokenizer, lm.template.segments(turns, system if system is not None else cfg.system))[0]
               for turns, system in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, tuple[str, list[int]]] = {}
    with tqdm(total=len(prompts), desc="generating", unit="prompt") as bar:
        for start in range(0, len(order), cfg.batch_size):
            chunk = order[start: start + cfg.batch_size]
            for i, result in zip(chunk, generate_batch(lm, [prompts[i] for i in chunk], gen)):
                answers[i] = result
            bar.update(len(chunk))
    with atomic_file(cfg.out) as f:
        for i, (lineno, rec) in enumerate(records):
            text, ids = answers[i]
            f.write(json.dumps({**rec, "answer": text, "new_tokens": len(ids)}, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} answers to {cfg.out}")
    return 0
