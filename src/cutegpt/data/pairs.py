"""Preference data: pairs (chosen / rejected) and KTO's unpaired answers -> validated, tokenized rows.

Record shapes (JSON array or JSON Lines, detected per record):

    alpaca     {"instruction", "input"?, "system"?, "history"?: [[q, a], ...], "chosen", "rejected"}
    sharegpt   {"conversations": [... ending with a human turn], "system"?, "chosen", "rejected"}
    messages   {"messages": [... ending with a user message], "chosen", "rejected"}
    prompt     {"prompt": text or messages, "chosen", "rejected"}
    KTO        any of the above with {"completion", "label": true|false} instead of chosen/rejected

An answer is a text, or one assistant message ({"from": "gpt", "value"} / {"role": "assistant", "content"}, or a
list holding one), as LLaMA-Factory's and trl's files have them.

Rendering uses the template objects of SFT and chat: the prompt is `template.prompt(turns)` (the bytes `chat`
sends), the answer is what the template adds for it (answer + stop marker) followed by the EOS SFT trains on;
each segment is tokenized alone, as in `data convert`.

Truncation rules (tokens; counted and reported, never silent):

    prompt > --max-prompt-length      the prompt keeps its last --max-prompt-length tokens (the question stays)
    prompt + 1 > --max-length         refused: no room for any answer (or skipped with --skip-invalid)
    prompt + answer > --max-length    the answer keeps its first tokens; a cut answer loses its stop marker and EOS
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from cutegpt.data.readers import (ASSISTANT_ROLES, Conversation, RecordError, _parse_alpaca, _parse_dialogue, _text,
                                  _typename, iter_jsonl, load_array, sniff_container)
from cutegpt.errors import CuteGPTError
from cutegpt.templates import Template, Turn

PLACEHOLDER = "\x00"  # stands for the final answer while the history is parsed by the SFT readers


@dataclass(frozen=True)
class PrefRecord:
    """One prompt (history + open question) with its answers: chosen/rejected, or one completion and its label."""

    where: str  # "FILE line N" / "FILE [i]"
    turns: tuple[Turn, ...]  # the last one is open (output None)
    system: str | None
    chosen: str = ""
    rejected: str = ""
    completion: str = ""
    label: bool | None = None  # KTO only

    @property
    def kto(self) -> bool:
        return self.label is not None


@dataclass
class PrefStats:
    records: int = 0
    skipped: list[str] = field(default_factory=list)
    counts: collections.Counter = field(default_factory=collections.Counter)


# ---------------------------------------------------------------- records

def _answer(rec: dict, key: str, where: str) -> str:
    """An answer field: text, one assistant message, or a list holding one."""
    if key not in rec or rec[key] is None:
        raise RecordError(f"{where}: field '{key}' is missing")
    v = rec[key]
    if isinstance(v, list):
        if len(v) != 1:
            raise RecordError(f"{where}: field '{key}' is a list of {len(v)} messages, not one assistant message")
        v = v[0]
    if isinstance(v, dict):
        role_key, text_key = ("from", "value") if "value" in v else ("role", "content")
        role = str(v.get(role_key, "assistant")).lower()
        if role not in ASSISTANT_ROLES:
            raise RecordError(f"{where}: field '{key}' is a {role!r} message, not an assistant answer")
        return _text(v, text_key, f"{where}: field '{key}'", nonempty=True)
    if not isinstance(v, str):
        raise RecordError(f"{where}: field '{key}' is {_typename(v)}, not text")
    return _text(rec, key, where, nonempty=True)


def _open_turns(conv: Conversation) -> tuple[Turn, ...]:
    """The conversation with its placeholder final answer removed (the open turn)."""
    *history, last = conv.turns
    return (*history, Turn(last.instruction, last.input, None))


def _prompt(rec: dict, where: str) -> tuple[tuple[Turn, ...], str | None]:
    """(turns ending with the open question, system line) from whichever prompt fields the record has."""
    if "conversations" in rec or "messages" in rec or isinstance(rec.get("prompt"), list):
        key = "conversations" if "conversations" in rec else ("messages" if "messages" in rec else "prompt")
        items = rec[key]
        if not isinstance(items, list):
            raise RecordError(f"{where}: field '{key}' is {_typename(items)}, not a list of messages")
        role_key, text_key = ("from", "value") if key == "conversations" else ("role", "content")
        closing = {role_key: "assistant", text_key: PLACEHOLDER}
        system = _text(rec, "system", where) if rec.get("system") is not None else None
        try:
            conv = _parse_dialogue(list(items) + [closing], key, role_key, text_key, system)
        except RecordError as e:
            if f"{key} [{len(items)}]" in str(e):
                raise RecordError(f"{where}: field '{key}' must end with a user message (the answers are chosen/rejected)") from None
            raise RecordError(f"{where}: {e}") from None
        return _open_turns(conv), conv.system
    if "instruction" in rec:
        try:
            conv = _parse_alpaca({**rec, "output": PLACEHOLDER})
        except RecordError as e:
            raise RecordError(f"{where}: {e}".replace("record: ", "")) from None
        return _open_turns(conv), conv.system
    if "prompt" in rec:
        text = _text(rec, "prompt", where, nonempty=True)
        system = _text(rec, "system", where) if rec.get("system") is not None else None
        return (Turn(text, "", None),), system
    raise RecordError(f"{where}: no prompt: expected instruction, conversations, messages or prompt "
                      f"(fields: {', '.join(sorted(map(str, rec))[:6])})")


def parse_pref(rec: Any, where: str) -> PrefRecord:
    """Validate one record (raises RecordError naming `where` and the field)."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where} is {_typename(rec)}, not a mapping")
    turns, system = _prompt(rec, where)
    if "label" in rec or "completion" in rec:
        label = rec.get("label")
        if not isinstance(label, bool):
            raise RecordError(f"{where}: field 'label' is {_typename(label) if 'label' in rec else 'missing'}, "
                              "not true (desirable) or false (undesirable)")
        return PrefRecord(where, turns, system, completion=_answer(rec, "completion", where), label=label)
    chosen, rejected = _answer(rec, "chosen", where), _answer(rec, "rejected", where)
    if chosen.strip() == rejected.strip():
        raise RecordError(f"{where}: fields 'chosen' and 'rejected' are the same answer, which teaches no preference")
    return PrefRecord(where, turns, system, chosen=chosen, rejected=rejected)


def iter_records(path: Path) -> Iterator[tuple[Any, str]]:
    """(record or None, where / problem) for each record of a JSON array or JSON Lines file."""
    container = sniff_container(path)
    if container == "pickle":
        raise CuteGPTError(f"{path}: preference data is read from JSON or JSON Lines, not a pickle.")
    if container == "jsonl":
        for lineno, _offset, value, problem in iter_jsonl(path):
            yield value, problem or f"{path} line {lineno}"
        return
    for i, value in enumerate(load_array(path, container)):
        yield value, f"{path} [{i}]"


def read_prefs(paths: Sequence[str | Path], skip_invalid: bool = False, flag: str = "--data") -> tuple[list[PrefRecord], PrefStats]:
    """Every valid record of the files; the first invalid one stops with file, line and field unless --skip-invalid."""
    stats = PrefStats()
    out: list[PrefRecord] = []
    for given in paths:
        path = Path(given)
        if not path.is_file():
            raise CuteGPTError(f"{flag} {path}: no such file (preference data is a JSON or JSON Lines file).")
        for value, where in iter_records(path):
            stats.records += 1
            try:
                if value is None:
                    raise RecordError(f"{path}: {where}")
                out.append(parse_pref(value, where))
            except RecordError as e:
                if not skip_invalid:
                    raise CuteGPTError(f"{e}; fix it or pass --skip-invalid.") from None
                stats.skipped.append(str(e))
    if not out:
        raise CuteGPTError(f"{flag} {' '.join(map(str, paths))}: no valid preference record"
                           f"{f' ({len(stats.skipped)} skipped as invalid)' if stats.skipped else ''}.")
    kinds = {r.kto for r in out}
    if len(kinds) > 1:
        first = next(r for r in out if r.kto != out[0].kto)
        raise CuteGPTError(f"{first.where}: paired (chosen/rejected) and unpaired (completion/label) records are mixed; "
                           "use one kind per run (--loss kto reads completion/label, the others chosen/rejected).")
    return out, stats


# ---------------------------------------------------------------- tokenizing

@dataclass(frozen=True)
class Lengths:
    max_length: int
    max_prompt_length: int | None = None


class PrefEncoder:
    """Records -> token ids with the SFT template objects; truncation as the module docstring says."""

    def __init__(self, tokenizer: Any, template: Template, lengths: Lengths):
        self.tokenizer = tokenizer
        self.template = template
        self.lengths = lengths
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise CuteGPTError("the tokenizer has no EOS token, which ends every trained answer.")
        stop = template.stop
        self.stop_ids = tokenizer(stop, add_special_tokens=False)["input_ids"] if stop else []
        self.eos_after = template.eos_after_conversation

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt_ids(self, rec: PrefRecord) -> list[int]:
        """The prompt's tokens: each template segment tokenized alone, as `data convert` and training do."""
        ids: list[int] = []
        for seg in self.template.segments(rec.turns, rec.system):
            ids.extend(self._ids(seg.text))
        return ids

    def answer_ids(self, rec: PrefRecord, answer: str) -> list[int]:
        """What the template adds after the prompt for this answer, up to its stop marker, then EOS."""
        open_segs = self.template.segments(rec.turns, rec.system)
        *history, last = rec.turns
        full = self.template.segments((*history, Turn(last.instruction, last.input, answer)), rec.system)
        if [s.text for s in full[:len(open_segs)]] != [s.text for s in open_segs]:
            raise CuteGPTError(f"the '{self.template.name}' template renders the prompt differently once an answer follows; "
                               "use --template cutegpt.")
        tail = list(full[len(open_segs):])
        while tail and not tail[-1].train:  # e.g. ChatML's newline after <|im_end|>: the next prompt's, not the answer's
            tail.pop()
        ids: list[int] = []
        for seg in tail:
            ids.extend(self._ids(seg.text))
        return ids + ([self.eos] if self.eos_after else [])

    def _fit_prompt(self, ids: list[int], rec: PrefRecord, counts: collections.Counter) -> list[int]:
        limit = self.lengths.max_prompt_length
        if limit and len(ids) > limit:
            counts["truncated_prompts"] += 1
            ids = ids[-limit:]
        if len(ids) + 1 > self.lengths.max_length:
            raise RecordError(f"{rec.where}: the prompt is {len(ids)} tokens, which leaves no room for an answer within "
                              f"--max-length {self.lengths.max_length}; raise --max-length or set --max-prompt-length")
        return ids

    def _fit_answer(self, ids: list[int], room: int, counts: collections.Counter) -> list[int]:
        if len(ids) <= room:
            return ids
        counts["truncated_answers"] += 1
        body = ids[:-1] if self.eos_after else ids  # a cut answer keeps neither EOS nor (part of) its stop marker
        n = len(self.stop_ids)
        if n and body[-n:] == self.stop_ids:
            body = body[:-n]
        return body[:room]

    def encode(self, rec: PrefRecord, counts: collections.Counter) -> dict[str, Any]:
        prompt = self._fit_prompt(self.prompt_ids(rec), rec, counts)
        room = self.lengths.max_length - len(prompt)
        if rec.kto:
            return {"prompt_ids": prompt, "completion_ids": self._fit_answer(self.answer_ids(rec, rec.completion), room, counts),
                    "label": rec.label}
        chosen = self._fit_answer(self.answer_ids(rec, rec.chosen), room, counts)
        rejected = self._fit_answer(self.answer_ids(rec, rec.rejected), room, counts)
        if chosen == rejected:
            raise RecordError(f"{rec.where}: 'chosen' and 'rejected' are the same {len(chosen)} tokens once cut to "
                              f"--max-length {self.lengths.max_length}; raise --max-length")
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def encode_prefs(records: Sequence[PrefRecord], encoder: PrefEncoder, stats: PrefStats, skip_invalid: bool) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        try:
            rows.append(encoder.encode(rec, stats.counts))
        except RecordError as e:
            if not skip_invalid:
                raise CuteGPTError(f"{e}.") from None
            stats.skipped.append(str(e))
    if not rows:
        raise CuteGPTError(f"no preference record fits --max-length {encoder.lengths.max_length} ({len(stats.skipped)} skipped).")
    return rows


def check_kto_labels(rows: Sequence[dict[str, Any]], source: str) -> None:
    labels = {bool(r["label"]) for r in rows}
    if len(labels) < 2:
        which = "desirable (label true)" if labels == {True} else "undesirable (label false)"
        raise CuteGPTError(f"{source}: every KTO record is {which}; KTO needs both kinds of answers.")


# ---------------------------------------------------------------- the tokenized pairs, cached with a manifest

PAIRS_FORMAT = "cutegpt-pairs"
PAIRS_VERSION = 1
MANIFEST = "manifest.json"


def pairs_settings(paths: Sequence[str | Path], tokenizer: Any, template_name: str, lengths: Lengths,
                   skip_invalid: bool) -> dict[str, Any]:
    """What decides the tokenized rows: the files' bytes, the tokenizer (vocabulary and tokenization rule), the
    template, the lengths; a cache whose manifest says otherwise is made again."""
    import hashlib

    from cutegpt.data.manifest import tokenizer_info

    sources = []
    for given in paths:
        h = hashlib.sha256()
        with open(given, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        sources.append({"name": Path(given).name, "sha256": h.hexdigest()})
    info = tokenizer_info(tokenizer)
    info.pop("name_or_path")  # the same tokenizer from another folder tokenizes the same
    return {"format": PAIRS_FORMAT, "version": PAIRS_VERSION, "sources": sources, "tokenizer": info,
            "template": template_name, "max_length": lengths.max_length, "max_prompt_length": lengths.max_prompt_length,
            "skip_invalid": skip_invalid}


def pairs_key(settings: dict[str, Any]) -> str:
    import hashlib
    import json

    return "pairs-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def save_pairs(folder: Path, rows: Sequence[dict[str, Any]], stats: PrefStats, settings: dict[str, Any]) -> None:
    """OUT/data (Arrow) + OUT/manifest.json: the settings, the counts (cut, skipped) and the token lengths."""
    import datasets
    from datasets import Dataset

    from cutegpt.io import atomic_dir, write_json

    datasets.disable_progress_bars()  # milliseconds; the run's own log line says what was written

    answers = [k for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in rows[0]]
    lengths = {k.removesuffix("_ids"): {"max": max(len(r[k]) for r in rows), "mean": round(sum(len(r[k]) for r in rows) / len(rows), 1)}
               for k in ("prompt_ids", *answers)}
    with atomic_dir(folder, overwrite=True) as tmp:
        Dataset.from_list(list(rows)).save_to_disk(str(tmp / "data"))
        write_json(tmp / MANIFEST, {**settings, "counts": {"records": stats.records, "rows": len(rows), **stats.counts},
                                    "skipped": stats.skipped, "lengths": lengths})


def load_pairs(folder: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], PrefStats] | None:
    """The cached rows and their counts when the manifest matches `settings`; None otherwise (made again)."""
    import json

    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in settings.items()):
            return None
        from datasets import load_from_disk

        rows = load_from_disk(str(folder / "data")).to_list()
        counts = dict(manifest["counts"])
        if len(rows) != counts.pop("rows"):
            return None
        stats = PrefStats(records=counts.pop("records"), skipped=list(manifest["skipped"]),
                          counts=collections.Counter(counts))
        return rows, stats
    except Exception:  # noqa: BLE001 - missing, half-removed, another datasets version: a cache, made again
        return None
