"""Readers: instruction data files -> validated `Conversation`s.

Containers (detected from the first bytes, whatever the file is called):

    pickle      the original `ift_data.pkl`, loaded with a restricted unpickler
    JSON        one array of records
    JSON Lines  one record a line, streamed (memory does not grow with the file)

Record shapes (detected per record, or forced with --format):

    cutegpt    [{"instruction", "input", "output"}, ...]            one conversation, the original's
    alpaca     {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
    sharegpt   {"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}],
                "system"?, "tools"?}                                  LLaMA-Factory's tool turns
    messages   {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content", "tool_calls"?}], "tools"?}

Tool calls (an assistant's `tool_calls`, a sharegpt `function_call` value: one
{"name", "arguments"} object or a list of them) become `ToolRound`s, rendered by
the template; the results (`tool` messages, `observation`) are never trained on.

Every problem names the file, the record ([i] for arrays, line N for JSON
Lines), the turn and the field.
"""

from __future__ import annotations

import io
import json
import math
import random
from array import array
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from cutegpt.errors import CuteGPTError
from cutegpt.templates import ToolCall, ToolRound, Turn

FORMATS = ("auto", "cutegpt", "alpaca", "sharegpt", "messages")
Format = Literal["auto", "cutegpt", "alpaca", "sharegpt", "messages"]

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    system: str | None = None  # None = the template's default system line
    tools: tuple[dict, ...] | None = None  # OpenAI-style {"type": "function", "function": {...}} the system part describes

    @property
    def n_turns(self) -> int:
        """Exchanges, each tool round and a tool list counting as one: a conversation with tools is never a
        single turn, so --group-single-turns never merges it into another (whose tools it would lose)."""
        return len(self.turns) + sum(len(t.rounds) for t in self.turns) + (1 if self.tools else 0)

    def text_bytes(self) -> int:
        turns = sum(len(t.instruction.encode()) + len(t.input.encode()) + len((t.output or "").encode())
                    + sum(len(c.arguments.encode()) + sum(len(x.encode()) for x in r.results)
                          for r in t.rounds for c in r.calls) for t in self.turns)
        return turns + (len(json.dumps(self.tools).encode()) if self.tools else 0)


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
    except (EOFError, ValueError, IndexError, TypeError, KeyError, AttributeError, MemoryError, OverflowError, RecursionError) as e:
        raise CuteGPTError(f"{path}: truncated or corrupt pickle file ({type(e).__name__}: {e}).") from None


# ---------------------------------------------------------------- containers

MAX_RECORD_BYTES = 4 << 20  # one JSON Lines record (a line); larger ones are refused or skipped, never parsed
# The most --max-record-bytes may raise it to: parsing and tokenizing a line costs ~300x its size in memory
# (a 50 MB line took 14 GB), so 64 MiB is already ~19 GB.
RECORD_BYTES_LIMIT = 64 << 20


def _first_lines(path: Path, limit: int, n: int = 2) -> list[bytes | None]:
    """The first `n` non-blank lines (None for one longer than `limit` bytes), read with bounded memory."""
    out: list[bytes | None] = []
    with open(path, "rb") as f:
        while len(out) < n:
            raw, size = _read_line(f, limit)
            if size == 0:
                break
            if raw is not None and not raw.strip():
                continue
            out.append(raw)
    return out


def _read_line(f: Any, limit: int) -> tuple[bytes | None, int]:
    """(the next line, its length in bytes); the line is None when it is longer than `limit` (read past, not kept).

    At the end of the file: (None, 0).
    """
    raw = f.readline(limit + 1)
    if not raw:
        return None, 0
    if len(raw) <= limit or raw.endswith(b"\n"):  # at most `limit` bytes before the newline
        return raw, len(raw)
    size = len(raw)
    while not raw.endswith(b"\n"):  # skip the rest of the over-long line in bounded pieces
        raw = f.readline(1 << 16)
        if not raw:
            break
        size += len(raw)
    return None, size


def _json_value(raw: bytes | None) -> tuple[bool, Any]:
    if raw is None:
        return False, None
    try:
        return True, json.loads(raw.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False, None


def sniff_container(path: Path, max_record_bytes: int = MAX_RECORD_BYTES) -> Literal["pickle", "json", "jsonl"]:
    """pickle / json / jsonl from the content, whatever the file is called.

    JSON Lines: the first line is a whole JSON value and more follows (or the
    second line is a whole value), or the file is named .jsonl; a single scalar
    value is read as JSON Lines too, so its error names line 1 and the record.
    """
    if not path.exists():
        raise CuteGPTError(f"input file {path} does not exist.")
    if path.is_dir():
        raise CuteGPTError(f"{path} is a folder; give an instruction data file (.pkl, .json or .jsonl).")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        from cutegpt.io import describe_os_error

        raise CuteGPTError(describe_os_error(e, path, "reading")) from None
    if not head.strip():
        raise CuteGPTError(f"{path}: the file is empty.")
    if head[:1] == b"\x80":  # pickle protocol >= 2
        return "pickle"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    if text[:1] in (b"[", b"{"):
        lines = _first_lines(path, max_record_bytes)
        ok1, _ = _json_value(lines[0] if lines else None)
        if len(lines) > 1 and (ok1 or _json_value(lines[1])[0]):
            return "jsonl"
        return "json"
    if path.suffix.lower() in (".pkl", ".pickle"):
        return "pickle"  # protocol 0/1 pickles; load_pickle reports a corrupt one
    lines = _first_lines(path, max_record_bytes, 1)
    if lines and _json_value(lines[0])[0]:
        return "jsonl"  # a scalar first line: reported as line 1's record, not as an unknown format
    if _looks_like_pickle(path):
        return "pickle"
    raise CuteGPTError(f"{path}: neither a pickle nor JSON / JSON Lines (it starts with {head[:20]!r}).")


def _looks_like_pickle(path: Path) -> bool:
    """A protocol 0/1 pickle not named .pkl: the restricted unpickler reads it, or refuses an object in it."""
    try:
        load_pickle(path)
    except CuteGPTError as e:
        return "carries a Python object" in str(e)
    return True


class LineError(Exception):
    """A JSON Lines line that is not one JSON value (its message names the line)."""


def iter_jsonl(path: Path, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, int, Any, str | None]]:
    """(line number, byte offset, value, problem) for each non-blank line, streamed with bounded memory.

    `problem` is None for a valid JSON value, else the reason the line was not
    parsed (too long, not UTF-8, not JSON); the value is then None.
    """
    with open(path, "rb") as f:
        offset = 0
        lineno = 0
        while True:
            raw, size = _read_line(f, max_record_bytes)
            if size == 0:
                return
            lineno += 1
            start, offset = offset, offset + size
            if raw is None:
                yield lineno, start, None, (f"line {lineno} is {size:,} bytes, more than --max-record-bytes "
                                            f"({max_record_bytes:,}), so it was not read")
                continue
            if not raw.strip():
                continue
            try:
                yield lineno, start, _parse_line(lineno, raw), None
            except LineError as e:
                yield lineno, start, None, str(e)


def _parse_line(lineno: int, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise LineError(f"line {lineno} is not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError(f"line {lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise LineError(f"line {lineno} is nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise LineError(f"line {lineno} is not valid JSON ({str(e).splitlines()[0][:120]})") from None


def read_jsonl_at(f: Any, path: Path, offset: int, lineno: int) -> Any:
    f.seek(offset)
    try:
        return _parse_line(lineno, f.readline())
    except LineError as e:
        raise CuteGPTError(f"{path}: {e} (the file changed while it was read).") from None


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
        except RecursionError:
            raise CuteGPTError(f"{path}: the JSON is nested too deeply to read.") from None
        except ValueError as e:
            raise CuteGPTError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]}).") from None
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
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # "\ud800" in JSON: a lone surrogate no tokenizer can encode
        raise RecordError(f"{where}: field '{key}' holds {v[e.start]!r} at character {e.start}, a lone surrogate, "
                          "which is not valid Unicode text") from None
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


def _json_field(value: Any, where: str, field: str) -> Any:
    """A field that holds JSON, given as JSON text (LLaMA-Factory's way) or already as a value."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise RecordError(f"{where}: field '{field}' is not valid JSON text") from None


def _tools(rec: dict) -> tuple[dict, ...] | None:
    """The record's tool list as OpenAI tools; LLaMA-Factory's bare function objects are wrapped."""
    if rec.get("tools") in (None, "", []):
        return None
    tools = _json_field(rec["tools"], "record", "tools")
    if not isinstance(tools, list):
        raise RecordError(f"field 'tools' is {_typename(tools)}, not a list of functions")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RecordError(f"tools [{i}]: field 'name' is missing (a tool is {{\"name\", \"description\", \"parameters\"}})")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise RecordError(f"tools [{i}]: field 'parameters' is {_typename(fn['parameters'])}, not a JSON Schema object")
        out.append({"type": "function", "function": fn})
    return tuple(out)


def _calls(value: Any, where: str, field: str) -> tuple[ToolCall, ...]:
    """Tool calls from OpenAI `tool_calls` or a sharegpt function_call value (one call or a list)."""
    value = _json_field(value, where, field)
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RecordError(f"{where}: field '{field}' holds no call")
    calls = []
    for j, c in enumerate(items):
        at = f"{where}: field '{field}'" + (f" [{j}]" if isinstance(value, list) else "")
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RecordError(f"{at} has no function name (a call is {{\"name\", \"arguments\"}})")
        args = _json_field(fn.get("arguments", fn.get("parameters", {})), at, "arguments")
        if not isinstance(args, dict):
            raise RecordError(f"{at}: the arguments are {_typename(args)}, not a JSON object")
        call_id = c.get("id") if isinstance(c.get("id"), str) else ""
        calls.append(ToolCall(fn["name"], json.dumps(args, ensure_ascii=False), call_id))
    return tuple(calls)


def _parse_dialogue(items: Any, key: str, role_key: str, text_key: str, system: str | None,
                    tools: tuple[dict, ...] | None = None) -> Conversation:
    """Messages -> turns. A user message opens a turn; assistant tool calls and their results (`tool` /
    `observation`) become its rounds; a plain assistant message closes it. A conversation may end with calls."""
    if not isinstance(items, list):
        raise RecordError(f"field '{key}' is {_typename(items)}, not a list")
    turns: list[Turn] = []
    question: str | None = None
    rounds: list[ToolRound] = []
    for i, m in enumerate(items):
        where = f"{key} [{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"{where} is {_typename(m)}, not a mapping")
        role = _text(m, role_key, where).lower()
        calls_field = "tool_calls" if role_key == "role" else None
        has_calls = role in ASSISTANT_ROLES and calls_field is not None and m.get(calls_field) not in (None, [])
        text = _text(m, text_key, where, required=not has_calls)
        if role == "system":
            if turns or question is not None:
                raise RecordError(f"{where}: a system message may only come first")
            system = text
        elif role in USER_ROLES:
            if question is not None:
                raise RecordError(f"{where}: two user messages in a row" if not rounds else
                                  f"{where}: a user message before the assistant answered the tool results")
            if not text.strip():  # as alpaca refuses an empty instruction: nothing to answer
                raise RecordError(f"{where}: field '{text_key}' is empty")
            question = text
        elif has_calls or role == "function_call":
            if question is None:
                raise RecordError(f"{where}: a tool call without a user message before it")
            if rounds and not rounds[-1].results:
                raise RecordError(f"{where}: tool calls while the previous calls have no results")
            calls = _calls(m[calls_field] if has_calls else text, where, calls_field or text_key)
            rounds.append(ToolRound(calls, (), text if has_calls else ""))
        elif role in ("tool", "observation"):
            if not rounds:
                raise RecordError(f"{where}: a tool result without an assistant tool call before it")
            last = rounds[-1]
            if role == "tool" and len(last.results) >= len(last.calls):
                raise RecordError(f"{where}: more tool results than the {len(last.calls)} call(s) before them")
            rounds[-1] = ToolRound(last.calls, last.results + (text,), last.content)
        elif role in ASSISTANT_ROLES:
            if question is None:
                raise RecordError(f"{where}: an assistant message without a user message before it")
            if rounds and not rounds[-1].results:
                raise RecordError(f"{where}: an answer while the tool calls before it have no results")
            if not text.strip():
                raise RecordError(f"{where}: field '{text_key}' is empty")
            turns.append(Turn(question, "", text, tuple(rounds)))
            question, rounds = None, []
        else:
            raise RecordError(f"{where}: field '{role_key}' is {role!r}, not a user, assistant, system or tool role")
    if question is not None:
        if not rounds or rounds[-1].results:
            raise RecordError(f"{key} [{len(items) - 1}]: the last user message has no answer" if not rounds else
                              f"{key} [{len(items) - 1}]: the tool results have no answer after them")
        turns.append(Turn(question, "", None, tuple(rounds)))  # ends with calls: the calls are the trained answer
    if not turns:
        raise RecordError(f"field '{key}' holds no exchange")
    if tools is None and any(t.rounds for t in turns):
        raise RecordError("the conversation calls tools but has no 'tools' field describing them")
    return Conversation(tuple(turns), system, tools)


def _parse_sharegpt(rec: Any) -> Conversation:
    if not isinstance(rec, dict) or "conversations" not in rec:
        raise RecordError("field 'conversations' is missing")
    return _parse_dialogue(rec["conversations"], "conversations", "from", "value", _system(rec), _tools(rec))


def _parse_messages(rec: Any) -> Conversation:
    if not isinstance(rec, dict) or "messages" not in rec:
        raise RecordError("field 'messages' is missing")
    return _parse_dialogue(rec["messages"], "messages", "role", "content", None, _tools(rec))


_PARSERS = {"cutegpt": _parse_cutegpt, "alpaca": _parse_alpaca, "sharegpt": _parse_sharegpt, "messages": _parse_messages}


# ---------------------------------------------------------------- one interface over all files

class Source:
    """Random access to the valid conversations of one file.

    JSON Lines keeps only byte offsets in memory and re-reads a line when asked
    (a line longer than `max_record_bytes` is never read whole); pickle and JSON
    arrays are loaded (their format allows nothing else). With `skip_invalid`,
    every bad record (unparseable, not UTF-8, too long, wrong shape) is skipped
    and counted; without it the first one stops with its line or index.
    """

    def __init__(self, path: str | Path, fmt: str = "auto", skip_invalid: bool = False,
                 max_record_bytes: int = MAX_RECORD_BYTES):
        if fmt not in FORMATS:
            raise CuteGPTError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
        self.path = Path(path)
        self.fmt = fmt
        self.max_record_bytes = max_record_bytes
        self.container = sniff_container(self.path, max_record_bytes)
        self.read = 0
        self.skipped: list[str] = []  # messages of the skipped records
        # compact per-conversation columns: memory stays ~20 bytes a record for JSON Lines
        self._where = array("q")  # line number (JSON Lines) or index (arrays) of each valid record
        self.n_turns = array("l")
        self._offsets = array("q")
        self._items: list[Any] | None = None
        self._fh: Any = None
        try:
            if self.container == "jsonl":
                for lineno, offset, rec, problem in iter_jsonl(self.path, max_record_bytes):
                    if problem is not None:
                        self.read += 1
                        self._invalid(f"{self.path}: {problem}.", skip_invalid)
                        continue
                    self._add(lineno, f"line {lineno}", rec, skip_invalid, offset=offset)
            else:
                items = load_array(self.path, self.container)
                self._items = []
                for i, rec in enumerate(items):
                    self._add(i, f"record [{i}]", rec, skip_invalid)
                del items
        except OSError as e:
            from cutegpt.io import describe_os_error

            raise CuteGPTError(describe_os_error(e, self.path, "reading")) from None
        if not len(self._where):
            raise CuteGPTError(f"{self.path}: no valid conversation in the file ({self.read} records read, {len(self.skipped)} skipped).")

    def _invalid(self, msg: str, skip_invalid: bool) -> None:
        if not skip_invalid:
            raise CuteGPTError(msg + " Fix it, or pass --skip-invalid to skip such records.")
        self.skipped.append(msg)

    def _add(self, where: int, label: str, rec: Any, skip_invalid: bool, offset: int = 0) -> None:
        self.read += 1
        try:
            conv = parse_record(rec, self.fmt)
            if self._items is not None:
                size = conv.text_bytes()
                if size > self.max_record_bytes:
                    raise RecordError(f"its text is {size:,} bytes, more than --max-record-bytes ({self.max_record_bytes:,})")
        except RecordError as e:
            self._invalid(f"{self.path}: {label}: {e}.", skip_invalid)
            return
        self._where.append(where)
        self.n_turns.append(conv.n_turns)
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


# ---------------------------------------------------------------- several files and folders, with weights

DATA_SUFFIXES = (".pkl", ".pickle", ".json", ".jsonl")
MAX_WEIGHT = 100.0


def parse_spec(spec: str | Path, flag: str = "INPUT") -> tuple[Path, float]:
    """`a.pkl` -> (a.pkl, 1.0); `a.pkl:2` -> (a.pkl, 2.0) unless a file is really called `a.pkl:2`."""
    text = str(spec)
    path = Path(text).expanduser()
    head, sep, tail = text.rpartition(":")
    if sep and head and not path.exists():
        try:
            weight = float(tail)
        except ValueError:
            return path, 1.0
        if not math.isfinite(weight) or weight <= 0:
            raise CuteGPTError(f"{flag} {text}: the weight after ':' must be a positive number, not {tail!r}.")
        if weight > MAX_WEIGHT:  # a weight repeats records: 1e6 ran for minutes, 1e9 ran out of memory, 1e300 overflowed
            raise CuteGPTError(f"{flag} {text}: the weight after ':' must be at most {MAX_WEIGHT:g} (it repeats each record "
                               f"that many times), not {tail}.")
        return Path(head).expanduser(), weight
    return path, 1.0


def source_files(specs: Sequence[str | Path], flag: str = "INPUT") -> list[tuple[Path, float]]:
    """(file, weight) for each data file named, folders expanded to their .pkl/.json/.jsonl files (sorted).

    A folder's weight applies to each file in it. Raises one sentence naming the
    flag for a missing path, an empty folder or a converted dataset folder.
    """
    if not specs:
        raise CuteGPTError(f"{flag} is required: one or more conversation files (.pkl, .json, .jsonl) or folders of them.")
    out: list[tuple[Path, float]] = []
    for spec in specs:
        path, weight = parse_spec(spec, flag)
        if not path.exists():
            raise CuteGPTError(f"{flag} {path} does not exist.")
        if path.is_dir():
            from cutegpt.data.manifest import MANIFEST

            if (path / MANIFEST).is_file():
                raise CuteGPTError(f"{flag} {path} is a converted dataset folder, not conversation files; "
                                   "a converted dataset is used alone (`train sft --data FOLDER`), never mixed with other inputs.")
            files = sorted(q for q in path.rglob("*") if q.suffix.lower() in DATA_SUFFIXES and q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(path).parts))
            if not files:
                raise CuteGPTError(f"{flag} {path} is a folder without .pkl, .json or .jsonl files.")
            out += [(q, weight) for q in files]
        else:
            out.append((path, weight))
    return out


class Sources:
    """Several Sources as one, each repeated by its weight.

    A weight w takes the source's conversations floor(w) times plus a seeded
    random share (w - floor(w)) of them once more: `a.pkl:2` doubles a, `b.jsonl:0.5`
    takes half of b. The combined order is source by source; `plan_units` shuffles it.
    """

    def __init__(self, specs: Sequence[str | Path], fmt: str = "auto", skip_invalid: bool = False,
                 max_record_bytes: int = MAX_RECORD_BYTES, seed: int = 0, flag: str = "INPUT"):
        self.files = source_files(specs, flag)
        self.sources: list[Source] = []
        self.weights: list[float] = []
        self._src = array("l")
        self._rec = array("q")
        self.n_turns = array("l")
        self.used: list[int] = []
        rng = random.Random(seed)
        try:
            for k, (path, weight) in enumerate(self.files):
                src = Source(path, fmt, skip_invalid, max_record_bytes)
                self.sources.append(src)
                self.weights.append(weight)
                n = len(src)
                whole = int(weight)
                picks = list(range(n)) * whole
                extra = round((weight - whole) * n)
                if extra:
                    picks += sorted(rng.sample(range(n), extra))
                if not picks:
                    raise CuteGPTError(f"{flag} {path}:{weight:g} takes no conversation of its {n}; raise the weight.")
                self.used.append(len(picks))
                for i in picks:
                    self._src.append(k)
                    self._rec.append(i)
                    self.n_turns.append(src.n_turns[i])
        except BaseException:
            self.close()
            raise

    @property
    def read(self) -> int:
        return sum(s.read for s in self.sources)

    @property
    def skipped(self) -> list[str]:
        return [m for s in self.sources for m in s.skipped]

    @property
    def container(self) -> str:
        kinds = {s.container for s in self.sources}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def describe(self) -> list[dict[str, Any]]:
        """What each file gave, for the manifest."""
        return [{"path": str(s.path.resolve()), "weight": w, "container": s.container, "records_read": s.read,
                 "records_skipped": len(s.skipped), "conversations": len(s), "used": u}
                for s, w, u in zip(self.sources, self.weights, self.used)]

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> Conversation:
        return self.sources[self._src[i]][self._rec[i]]

    def close(self) -> None:
        for s in self.sources:
            s.close()
