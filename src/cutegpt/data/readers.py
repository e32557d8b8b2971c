"""Readers: instruction data files -> validated `Conversation`s.

Containers (detected from the first bytes, whatever the file is called):

    pickle      the original `ift_data.pkl`, loaded with a restricted unpickler
    JSON        one array of records
    JSON Lines  one record a line, streamed (memory does not grow with the file)

Record shapes (detected per record, or forced with --format):

    cutegpt    [{"instruction", "input", "output"}, ...]            one conversation, the original's
    alpaca     {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
    sharegpt   {"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?}
    messages   {"messages": [{"role": "system"|"user"|"assistant", "content"}]}

Every problem names the file, the record ([i] for arrays, line N for JSON
Lines), the turn and the field.
"""

from __future__ import annotations

import io
import json
from array import array
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from cutegpt.errors import CuteGPTError
from cutegpt.templates import Turn

FORMATS = ("auto", "cutegpt", "alpaca", "sharegpt", "messages")
Format = Literal["auto", "cutegpt", "alpaca", "sharegpt", "messages"]

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    system: str | None = None  # None = the template's default system line


class RecordError(ValueError):
    """A record is invalid; the message names the record and field (the file is added by the caller)."""


# ---------------------------------------------------------------- pickle safety

class _PlainUnpickler(pickle.Unpickler):
    """Builds only what needs no import: lists, dicts, str, int, float, bool, None (and tuples/bytes, refused later).

    Any class, function or reduce target goes through `find_class`, which
    refuses it before anything is imported or called, so a malicious pickle
    cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent object reference")


def load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f).load()
    except pickle.UnpicklingError as e:
        msg = str(e)
        if msg.startswith("refused"):
            raise CuteGPTError(
                f"{path}: the pickle carries a Python object ({msg[len('refused '):]}); only lists, dicts, strings, numbers, "
                "booleans and None are allowed, so it was not loaded (a pickle can run code)."
            ) from None
        raise CuteGPTError(f"{path}: not a valid pickle file ({msg}).") from None
    except (EOFError, ValueError, IndexError, TypeError, KeyError, AttributeError, MemoryError, OverflowError) as e:
        raise CuteGPTError(f"{path}: truncated or corrupt pickle file ({type(e).__name__}: {e}).") from None


# ---------------------------------------------------------------- containers

def sniff_container(path: Path) -> Literal["pickle", "json", "jsonl"]:
    """pickle / json / jsonl from the content (a JSON file with more than one top-level value is JSON Lines)."""
    if not path.exists():
        raise CuteGPTError(f"input file {path} does not exist.")
    if path.is_dir():
        raise CuteGPTError(f"{path} is a folder; give an instruction data file (.pkl, .json or .jsonl).")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise CuteGPTError(f"{path}: the file is empty.")
    if head[:1] == b"\x80":  # pickle protocol >= 2
        return "pickle"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text[:1] not in (b"[", b"{"):
        if path.suffix in (".pkl", ".pickle"):
            return "pickle"  # protocol 0/1 pickles; load_pickle reports a corrupt one
        raise CuteGPTError(f"{path}: neither a pickle nor JSON / JSON Lines (it starts with {head[:20]!r}).")
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".json":
        return "json"
    first_line = text.split(b"\n", 1)
    try:
        json.loads(first_line[0])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "json"  # a value spread over several lines
    return "jsonl" if len(first_line) > 1 and first_line[1].strip() else "json"


def iter_jsonl(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(record label, byte offset, value) for each non-empty line, streamed."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            yield f"line {lineno}", start, _parse_line(path, lineno, raw)


def _parse_line(path: Path, lineno: int, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise CuteGPTError(f"{path}: line {lineno} is not UTF-8 text (byte {e.start}); convert the file to UTF-8.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CuteGPTError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}).") from None


def read_jsonl_at(f: Any, path: Path, offset: int, lineno: int) -> Any:
    f.seek(offset)
    return _parse_line(path, lineno, f.readline())


def load_array(path: Path, container: str) -> list[Any]:
    if container == "pickle":
        data = load_pickle(path)
    else:
        try:
            with open(path, "rb") as f:
                data = json.load(io.TextIOWrapper(f, encoding="utf-8-sig"))
        except UnicodeDecodeError as e:
            raise CuteGPTError(f"{path}: not UTF-8 text (byte {e.start}); convert the file to UTF-8.") from None
        except json.JSONDecodeError as e:
            raise CuteGPTError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    if isinstance(data, dict):
        data = [data]  # one record
    if not isinstance(data, list):
        raise CuteGPTError(f"{path}: the top level must be a list of records, not {_typename(data)}.")
    return data


# ---------------------------------------------------------------- records

def _typename(v: Any) -> str:
    return {str: "text", list: "a list", dict: "a mapping", type(None): "null", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _text(d: dict, key: str, where: str, required: bool = True, nonempty: bool = False) -> str:
    if key not in d or d[key] is None:
        if required:
            raise RecordError(f"{where}: field '{key}' is missing")
        return ""
    v = d[key]
    if not isinstance(v, str):
        raise RecordError(f"{where}: field '{key}' is {_typename(v)}, not text")
    if nonempty and not v.strip():
        raise RecordError(f"{where}: field '{key}' is empty")
    return v


def record_kind(rec: Any, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if isinstance(rec, list):
        return "cutegpt"
    if isinstance(rec, dict):
        if "conversations" in rec:
            return "sharegpt"
        if "messages" in rec:
            return "messages"
        if "instruction" in rec or "output" in rec:
            return "alpaca"
        raise RecordError(f"unknown record shape with fields {sorted(map(str, rec))[:6]}; expected instruction/output, "
                          "conversations or messages")
    raise RecordError(f"a record must be a list of turns or a mapping, not {_typename(rec)}")


def parse_record(rec: Any, fmt: str = "auto") -> Conversation:
    """Validate one record and turn it into a Conversation (raises RecordError)."""
    kind = record_kind(rec, fmt)
    return _PARSERS[kind](rec)


def _turn(d: Any, where: str) -> Turn:
    if not isinstance(d, dict):
        raise RecordError(f"{where} is {_typename(d)}, not a mapping with instruction/input/output")
    instruction = _text(d, "instruction", where)
    inp = _text(d, "input", where, required=False)
    if not instruction.strip() and not inp.strip():
        raise RecordError(f"{where}: field 'instruction' is empty (and there is no input)")
    return Turn(instruction, inp, _text(d, "output", where, nonempty=True))


def _system(rec: dict) -> str | None:
    """A record's own system line; "" means none at all, a missing key the template's default."""
    return _text(rec, "system", "record") if rec.get("system") is not None else None


def _parse_cutegpt(rec: Any) -> Conversation:
    if not isinstance(rec, list):
        raise RecordError(f"a cutegpt conversation must be a list of turns, not {_typename(rec)}")
    if not rec:
        raise RecordError("the conversation is empty")
    return Conversation(tuple(_turn(t, f"turn [{i}]") for i, t in enumerate(rec)))


def _parse_alpaca(rec: Any) -> Conversation:
    if not isinstance(rec, dict):
        raise RecordError(f"an alpaca record must be a mapping, not {_typename(rec)}")
    turns: list[Turn] = []
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise RecordError(f"field 'history' is {_typename(history)}, not a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError(f"history [{i}] is not a [question, answer] pair of texts")
        if not pair[1].strip():
            raise RecordError(f"history [{i}]: the answer is empty")
        turns.append(Turn(pair[0], "", pair[1]))
    turns.append(_turn(rec, "record"))
    return Conversation(tuple(turns), _system(rec))


def _parse_dialogue(items: Any, key: str, role_key: str, text_key: str, system: str | None) -> Conversation:
    if not isinstance(items, list):
        raise RecordError(f"field '{key}' is {_typename(items)}, not a list")
    turns: list[Turn] = []
    question: str | None = None
    for i, m in enumerate(items):
        where = f"{key} [{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"{where} is {_typename(m)}, not a mapping")
        role = _text(m, role_key, where).lower()
        text = _text(m, text_key, where)
        if role == "system":
            if turns or question is not None:
                raise RecordError(f"{where}: a system message may only come first")
            system = text
        elif role in USER_ROLES:
            if question is not None:
                raise RecordError(f"{where}: two user messages in a row")
            question = text
        elif role in ASSISTANT_ROLES:
            if question is None:
                raise RecordError(f"{where}: an assistant message without a user message before it")
            if not text.strip():
                raise RecordError(f"{where}: field '{text_key}' is empty")
            turns.append(Turn(question, "", text))
            question = None
        else:
            raise RecordError(f"{where}: field '{role_key}' is {role!r}, not a user, assistant or system role")
    if question is not None:
        raise RecordError(f"{key} [{len(items) - 1}]: the last user message has no answer")
    if not turns:
        raise RecordError(f"field '{key}' holds no exchange")
    return Conversation(tuple(turns), system)


def _parse_sharegpt(rec: Any) -> Conversation:
    if not isinstance(rec, dict) or "conversations" not in rec:
        raise RecordError("field 'conversations' is missing")
    return _parse_dialogue(rec["conversations"], "conversations", "from", "value", _system(rec))


def _parse_messages(rec: Any) -> Conversation:
    if not isinstance(rec, dict) or "messages" not in rec:
        raise RecordError("field 'messages' is missing")
    return _parse_dialogue(rec["messages"], "messages", "role", "content", None)


_PARSERS = {"cutegpt": _parse_cutegpt, "alpaca": _parse_alpaca, "sharegpt": _parse_sharegpt, "messages": _parse_messages}


# ---------------------------------------------------------------- one interface over all files

class Source:
    """Random access to the valid conversations of one file.

    JSON Lines keeps only byte offsets in memory and re-reads a line when asked;
    pickle and JSON arrays are loaded (their format allows nothing else).
    """

    def __init__(self, path: str | Path, fmt: str = "auto", skip_invalid: bool = False):
        if fmt not in FORMATS:
            raise CuteGPTError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
        self.path = Path(path)
        self.fmt = fmt
        self.container = sniff_container(self.path)
        self.read = 0
        self.skipped: list[str] = []  # messages of the skipped records
        # compact per-conversation columns: memory stays ~20 bytes a record for JSON Lines
        self._where = array("q")  # line number (JSON Lines) or index (arrays) of each valid record
        self.n_turns = array("l")
        self._offsets = array("q")
        self._items: list[Any] | None = None
        self._fh: Any = None
        if self.container == "jsonl":
            for label, offset, rec in iter_jsonl(self.path):
                self._add(int(label.split()[-1]), label, rec, skip_invalid, offset=offset)
        else:
            items = load_array(self.path, self.container)
            self._items = []
            for i, rec in enumerate(items):
                self._add(i, f"record [{i}]", rec, skip_invalid)
            del items
        if not len(self._where):
            raise CuteGPTError(f"{self.path}: no valid conversation in the file ({self.read} records read, {len(self.skipped)} skipped).")

    def _add(self, where: int, label: str, rec: Any, skip_invalid: bool, offset: int = 0) -> None:
        self.read += 1
        try:
            conv = parse_record(rec, self.fmt)
        except RecordError as e:
            msg = f"{self.path}: {label}: {e}."
            if not skip_invalid:
                raise CuteGPTError(msg + " Fix it, or pass --skip-invalid to skip such records.") from None
            self.skipped.append(msg)
            return
        self._where.append(where)
        self.n_turns.append(len(conv.turns))
        if self._items is not None:
            self._items.append(conv)
        else:
            self._offsets.append(offset)

    def __len__(self) -> int:
        return len(self._where)

    def label(self, i: int) -> str:
        return f"record [{self._where[i]}]" if self._items is not None else f"line {self._where[i]}"

    def __getitem__(self, i: int) -> Conversation:
        if self._items is not None:
            return self._items[i]
        if self._fh is None:
            self._fh = open(self.path, "rb")
        return parse_record(read_jsonl_at(self._fh, self.path, self._offsets[i], self._where[i]), self.fmt)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
