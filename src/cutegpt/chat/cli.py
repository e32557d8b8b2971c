"""`cutegpt chat`: interactive chat in the terminal, or turns from a file/stdin to JSON Lines."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator

from cutegpt.generation import GenerationArgs
from cutegpt.chat.backend import BACKEND_HELP, Backend, choose_backend
from cutegpt.chat.batch import record_to_turns
from cutegpt.config import arg
from cutegpt.threads import THREADS_HELP
from cutegpt.errors import CuteGPTError
from cutegpt.io import describe_os_error, load_json_text
from cutegpt.model.args import ModelArgs

if TYPE_CHECKING:
    from cutegpt.chat.session import ChatSession

COMMANDS_HELP = """commands:
  /help            this list
  /clear           forget the conversation
  /history         show the conversation
  /system TEXT     replace the system line (/system alone shows it, /system default restores the template's)
  /save FILE       write the conversation as JSON ({"messages": [...]}, readable by `cutegpt generate` and `data convert`)
  /load FILE       continue a saved conversation (a last user message without an answer is answered)
  /exit            quit (also Ctrl-D)
multi-line input: end a line with \\ to continue on the next one, or wrap the text in triple quotes \"\"\"
Ctrl-C stops an answer (the conversation is kept); arrow keys edit the line and recall earlier ones."""
HELP = "type /help for commands; Ctrl-C stops an answer, Ctrl-D quits."


@dataclass
class ChatConfig(ModelArgs, GenerationArgs):
    memory_limit: int = arg(3, "how many earlier (question, answer) pairs the model sees", ge=0)
    system: str | None = arg(None, "replace the template's system line")
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    input: str | None = arg(None, "non-interactive: read one turn per line (text or JSON) from this file, '-' for stdin; answers go to stdout as JSON Lines")
    no_cache_reuse: bool = arg(False, "re-encode the whole history every turn (the original's way; for comparison)")
    backend: Backend = arg("auto", BACKEND_HELP)
    quiet: bool = arg(False, "no footer (tokens, tokens/s, time to first token) after each answer")
    verbose: bool = arg(False, "print the backend and where each generation setting came from")

    def check(self) -> None:
        choose_backend(self)


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
                obj = load_json_text(line, f"{name}, line {lineno}")
                turn = record_to_turns(obj, f"{name}, line {lineno}")[0][-1]
                yield lineno, turn.instruction, turn.input
            else:
                yield lineno, line, ""


EMBEDDED_HINT = ("note: the embedded SmolLM2-135M model answers in English only and gives nonsense in Chinese; "
                 "bring a Chinese-capable model with --model, or train one with the recipe (cutegpt recipe).")


def has_chinese(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in text)


def hint_if_chinese(session: ChatSession, text: str) -> None:
    """One line on stderr, once per chat, when Chinese text meets the English-only embedded model."""
    if getattr(session, "embedded", False) and not getattr(session, "hinted", False) and has_chinese(text):
        session.hinted = True
        print(EMBEDDED_HINT, file=sys.stderr, flush=True)


def run_batch_turns(session: ChatSession, source: str, out: IO[str]) -> None:
    for lineno, question, inp in _read_turns(source):
        hint_if_chinese(session, question + inp)
        if question.strip() == "/clear":
            session.clear()
            session.engine.reset()
            continue
        r = session.ask(question, inp)
        record = {"turn": len(session.history), "line": lineno, "question": question, "answer": r.text,
                  "stop_reason": r.stop_reason, "prompt_tokens": r.prompt_tokens, "reused_tokens": r.reused_tokens,
                  "new_tokens": r.new_tokens, "time_to_first_token": round(r.time_to_first_token, 4),
                  "tokens_per_second": round(r.decode_tokens_per_second, 2)}
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


def _setup_readline() -> None:
    """Line editing and history recall (arrow keys) for input(); history kept between sessions."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input still works
        return
    import atexit
    import os

    path = os.environ.get("CUTEGPT_CHAT_HISTORY")
    if path is None:
        from cutegpt.model.embedded import cache_dir

        path = str(cache_dir() / "chat_history")
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


def save_conversation(session: ChatSession, path: Path) -> None:
    from cutegpt.io import atomic_file

    if not path.parent.is_dir():  # a typo in a folder name should not silently create a tree of folders
        raise CuteGPTError(f"{path}: the folder {path.parent} does not exist; create it first.")
    with atomic_file(path) as f:
        f.write(json.dumps({"messages": session.messages()}, ensure_ascii=False, indent=1) + "\n")


MAX_CONVERSATION_BYTES = 8 * 2**20  # a 60 MB file made the chat hang and grow to 9 GB; 8 MiB is ~2M tokens, past any context


def load_conversation(session: ChatSession, path: Path) -> str | None:
    """Replace the session's conversation with the one in `path`; returns a trailing unanswered user message."""
    from cutegpt.chat.batch import messages_to_conversation

    if not path.is_file():
        raise CuteGPTError(f"{path} does not exist." if not path.exists() else f"{path} is a folder, not a conversation file.")
    size = path.stat().st_size
    if size > MAX_CONVERSATION_BYTES:
        raise CuteGPTError(f"{path} is {size / 2**20:.0f} MiB; a conversation file may be at most "
                           f"{MAX_CONVERSATION_BYTES // 2**20} MiB (the model sees the last --memory-limit turns only).")
    try:
        text = path.read_bytes()
    except OSError as e:
        raise CuteGPTError(describe_os_error(e, path, "reading")) from None
    data = load_json_text(text, str(path))
    if not isinstance(data, dict) or "messages" not in data:
        raise CuteGPTError(f'{path}: expected {{"messages": [...]}}, the format /save writes.')
    system, turns, pending = messages_to_conversation(data["messages"], str(path), allow_answered=True)
    session.history = list(turns)
    session.system = system
    session.engine.reset()
    return pending


def _answer(session: ChatSession, message: str, quiet: bool) -> None:
    hint_if_chinese(session, message)
    try:
        result = session.ask(message, on_text=lambda t: print(t, end="", flush=True))
    except CuteGPTError as e:
        print(f"error: {e}")
        return
    except KeyboardInterrupt:  # Ctrl-C before the first token: keep the conversation as it was
        session.engine.reset()
        print("\n(stopped)")
        return
    print("\n(stopped)" if result.stop_reason == "interrupted" else "")
    if not quiet:
        print(result.footer(), flush=True)


def _command(session: ChatSession, command: str, quiet: bool) -> bool:
    """Run a /command; False when `command` is not one."""
    name, _, rest = command.partition(" ")
    rest = rest.strip()
    if name == "/help":
        print(COMMANDS_HELP)
    elif name == "/clear":
        session.clear()
        print("(conversation cleared)")
    elif name == "/history":
        window = session.history[-session.memory_limit:] if session.memory_limit else []
        if not session.history:
            print("(no history)")
        for i, turn in enumerate(session.history, 1):
            mark = "" if turn in window else "  [outside the memory window]"
            print(f"[{i}] you: {turn.instruction}{mark}\n    model: {turn.output}")
    elif name == "/system":
        if not rest:
            print(f"(system line: {session.system!r})" if session.system is not None else "(the template's system line)")
        else:
            session.system = None if rest == "default" else rest
            print("(system line set)" if session.system is not None else "(the template's system line again)")
    elif name in ("/save", "/load"):
        if not rest:
            print(f"usage: {name} FILE")
            return True
        path = Path(rest).expanduser()
        try:
            if name == "/save":
                save_conversation(session, path)
                print(f"(saved {len(session.history)} turns to {path})")
            else:
                pending = load_conversation(session, path)
                print(f"(loaded {len(session.history)} turns from {path})")
                if pending is not None:
                    _answer(session, pending, quiet)
        except CuteGPTError as e:
            print(f"error: {e}")
        except OSError as e:  # the conversation is kept whatever the file system says
            print(f"error: {describe_os_error(e, path, 'saving' if name == '/save' else 'reading')}")
    else:
        return False
    return True


def interactive(session: ChatSession, name: str, quiet: bool = False) -> None:
    _setup_readline()
    english = " (English only: --model brings a Chinese-capable model)" if getattr(session, "embedded", False) else ""
    print(f"CuteGPT chat — {name}{english}\n{HELP}\n", flush=True)
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
        if command.startswith("/") and _command(session, command, quiet):
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}. {HELP}")
            continue
        _answer(session, message, quiet)


def run_chat(cfg: ChatConfig) -> int:
    """Chat with a model; multi-turn, streaming, history reused through the KV / prompt cache."""
    from cutegpt.chat.backend import display_name, load_chat_model, make_engine, resolved_generation, setup_threads
    from cutegpt.chat.session import ChatSession

    backend = choose_backend(cfg)
    threads = setup_threads(cfg.threads, backend)
    lm = load_chat_model(cfg, backend, threads)
    name = display_name(cfg, lm)
    if cfg.verbose:
        print(f"backend: {backend}; {lm.describe()}; {threads} thread{'s' if threads != 1 else ''}", file=sys.stderr, flush=True)
    gen = resolved_generation(cfg, lm, cfg.verbose)
    session = ChatSession(lm, gen, cfg.memory_limit, cfg.system, reuse_cache=not cfg.no_cache_reuse,
                          engine=make_engine(lm, not cfg.no_cache_reuse))
    session.embedded = cfg.model is None  # type: ignore[attr-defined]
    if cfg.input is not None:
        run_batch_turns(session, cfg.input, sys.stdout)
    elif not sys.stdin.isatty():
        run_batch_turns(session, "-", sys.stdout)
    else:
        interactive(session, f"{name}, {backend}", cfg.quiet)
    return 0
