"""`cutegpt chat`: interactive chat in the terminal, or turns from a file/stdin to JSON Lines."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator

from cutegpt.chat.args import GenerationArgs
from cutegpt.chat.batch import record_to_turns
from cutegpt.config import arg
from cutegpt.threads import THREADS_HELP
from cutegpt.errors import CuteGPTError
from cutegpt.model.args import ModelArgs

if TYPE_CHECKING:
    from cutegpt.chat.session import ChatSession

HELP = """commands: /clear forget the conversation, /history show it, /exit quit
multi-line input: end a line with \\ to continue on the next one, or wrap the text in triple quotes \"\"\"
Ctrl-C stops an answer (the conversation is kept); Ctrl-D or /exit quits."""


@dataclass
class ChatConfig(ModelArgs, GenerationArgs):
    memory_limit: int = arg(3, "how many earlier (question, answer) pairs the model sees", ge=0)
    system: str | None = arg(None, "replace the template's system line")
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    input: str | None = arg(None, "non-interactive: read one turn per line (text or JSON) from this file, '-' for stdin; answers go to stdout as JSON Lines")
    no_cache_reuse: bool = arg(False, "re-encode the whole history every turn (the original's way; for comparison)")


def _read_turns(source: str) -> Iterator[tuple[int, str, str]]:
    """(line number, question, input) for each non-empty line; a line may be JSON with instruction/input."""
    stream: IO[bytes]
    if source == "-":
        stream = sys.stdin.buffer
        name = "<stdin>"
    else:
        path = Path(source)
        if not path.is_file():
            raise CuteGPTError(f"input file {path} does not exist.")
        stream = path.open("rb")
        name = str(path)
    with stream:
        for lineno, raw in enumerate(stream, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise CuteGPTError(f"{name}, line {lineno}: not UTF-8 text.") from None
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CuteGPTError(f"{name}, line {lineno}: not valid JSON ({e.msg}).") from None
                turn = record_to_turns(obj, f"{name}, line {lineno}")[0][-1]
                yield lineno, turn.instruction, turn.input
            else:
                yield lineno, line, ""


def run_batch_turns(session: ChatSession, source: str, out: IO[str]) -> None:
    for lineno, question, inp in _read_turns(source):
        if question.strip() == "/clear":
            session.clear()
            session.engine.reset()
            continue
        r = session.ask(question, inp)
        record = {"turn": len(session.history), "line": lineno, "question": question, "answer": r.text,
                  "stop_reason": r.stop_reason, "prompt_tokens": r.prompt_tokens, "reused_tokens": r.reused_tokens,
                  "new_tokens": len(r.token_ids)}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()


def _read_message(prompt: str = ">>> ") -> str | None:
    """One user message; `\\` at line end or triple quotes continue it. None on EOF."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if line.strip().startswith('"""'):
        parts = [line.strip()[3:]]
        while not parts[-1].rstrip().endswith('"""'):
            try:
                parts.append(input("... "))
            except EOFError:
                break
        text = "\n".join(parts)
        return text.rstrip()[:-3] if text.rstrip().endswith('"""') else text
    parts = [line]
    while parts[-1].endswith("\\"):
        parts[-1] = parts[-1][:-1]
        try:
            parts.append(input("... "))
        except EOFError:
            break
    return "\n".join(parts)


def interactive(session: ChatSession) -> None:
    print(f"CuteGPT chat — {session.lm.describe()}\n{HELP}\n", flush=True)
    while True:
        try:
            message = _read_message()
        except KeyboardInterrupt:
            print()
            continue
        if message is None or message.strip() in ("/exit", "/quit"):
            print()
            return
        command = message.strip()
        if not command:
            continue
        if command == "/clear":
            session.clear()
            print("(conversation cleared)")
            continue
        if command == "/history":
            window = session.history[-session.memory_limit:] if session.memory_limit else []
            if not session.history:
                print("(no history)")
            for i, turn in enumerate(session.history, 1):
                mark = "" if turn in window else "  [outside the memory window]"
                print(f"[{i}] you: {turn.instruction}{mark}\n    model: {turn.output}")
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}. {HELP.splitlines()[0]}")
            continue
        try:
            result = session.ask(message, on_text=lambda t: print(t, end="", flush=True))
        except CuteGPTError as e:
            print(f"error: {e}")
            continue
        except KeyboardInterrupt:  # Ctrl-C before the first token: keep the conversation as it was
            session.engine.reset()
            print("\n(stopped)")
            continue
        if result.stop_reason == "interrupted":
            print("\n(stopped)")
        else:
            print()


def run_chat(cfg: ChatConfig) -> int:
    """Chat with a model; multi-turn, streaming, KV cache reused across turns."""
    if cfg.max_new_tokens <= 0:
        raise CuteGPTError(f"--max-new-tokens must be positive, not {cfg.max_new_tokens}.")
    gen = GenerationArgs.of(cfg)
    from cutegpt.chat.session import ChatSession
    from cutegpt.model.loading import load_model

    lm = load_model(cfg)
    session = ChatSession(lm, gen, cfg.memory_limit, cfg.system, reuse_cache=not cfg.no_cache_reuse)
    if cfg.input is not None:
        run_batch_turns(session, cfg.input, sys.stdout)
    elif not sys.stdin.isatty():
        run_batch_turns(session, "-", sys.stdout)
    else:
        interactive(session)
    return 0
