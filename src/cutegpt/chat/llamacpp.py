"""The llama.cpp backend of `chat` and `generate`: a streaming engine with the torch engine's interface.

llama.cpp only completes text, so everything that makes an answer ours stays
in Python and is shared with the torch engine:

- the prompt: templates.py renders it and our tokenizer (the GGUF's, converted
  once by transformers and kept in the cache) turns it into ids, which llama.cpp
  receives as a token list, so both backends see the same ids;
- the stop rules: the template's marker (e.g. `<end>`, several tokens for most
  vocabularies) is passed to llama.cpp as a stop string *and* checked on the
  streamed text with the same hold-back rule as the torch engine, EOS stops too,
  and neither is ever printed;
- the sampling settings: mapped onto llama.cpp's samplers in transformers' order
  (runtime/llamacpp.py `request_for`);
- the text: a SentencePiece answer's first space, which llama.cpp's pieces keep and
  transformers' decoding drops, is dropped (runtime/llamacpp.py `drops_first_space`).

Loading the file, its tokenizer and template is the runtime's (`runtime.llamacpp.load_llamacpp`).
History is reused through llama.cpp's prompt cache (`cache_prompt`, one slot):
a new turn that extends the previous prompt + answer only prefills the new
tokens. Ctrl-C sets a flag the streaming callback sees at the next token; the
callback then tells llama.cpp to stop, and the conversation is kept.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any, Callable

from cutegpt.generation import GenerationArgs
from cutegpt.chat.stream import GenerationResult, complete, cut_at_stop, held_back
from cutegpt.errors import CuteGPTError
from cutegpt.runtime.llamacpp import LlamaCppModel, request_for


class _SigintFlag:
    """While active (main thread only), Ctrl-C sets a flag instead of raising: llama.cpp is stopped from its callback."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> "_SigintFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.hit = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class LlamaCppEngine:
    """Same interface as the torch `Engine`: generate(prompt_ids, gen, on_text) -> GenerationResult."""

    def __init__(self, lm: LlamaCppModel, reuse_cache: bool = True):
        self.lm = lm
        self.reuse_cache = reuse_cache
        self._last_ids: list[int] = []  # prompt + answer of the previous call (what llama.cpp's slot holds)

    def reset(self) -> None:
        self._last_ids = []  # llama.cpp re-uses only a common prefix, so nothing else to drop

    def generate(self, prompt_ids: list[int], gen: GenerationArgs,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        gen = complete(gen, self.lm.template.name)
        stop = self.lm.template.stop
        req = request_for(prompt_ids, gen, stop, self.lm.context_length, self.reuse_cache)
        state: dict[str, Any] = {"text": "", "emitted": 0, "first": None, "reason": "length", "final": None,
                                 "error": None, "stopped_by_us": False, "lead": self.lm.drops_first_space}
        t0 = time.perf_counter()

        with _SigintFlag() as sigint:
            def on_chunk(chunk: Any) -> bool:
                if isinstance(chunk, str):
                    chunk = json.loads(chunk)
                if "error" in chunk:
                    state["error"] = chunk["error"]
                    return True
                if sigint.hit:
                    state["reason"] = "interrupted"
                    return True
                choice = (chunk.get("choices") or [{}])[0]
                piece = choice.get("text") or ""
                if state["first"] is None and (piece or choice.get("finish_reason")):
                    state["first"] = time.perf_counter()
                if chunk.get("usage") or chunk.get("timings"):
                    state["final"] = chunk
                if choice.get("finish_reason"):
                    state["reason"] = "stop" if choice["finish_reason"] == "stop" else "length"
                if piece and state["lead"]:  # one space at most, as transformers decodes (runtime.llamacpp.drops_first_space)
                    piece, state["lead"] = piece.removeprefix(" "), False
                if piece:
                    text = state["text"] + piece
                    start = max(0, state["emitted"] - len(stop)) if stop else 0
                    if stop and not gen.ignore_eos and stop in text[start:]:
                        state["text"] = text[: text.index(stop, start)]
                        state["reason"], state["stopped_by_us"] = "stop", True
                        return True
                    state["text"] = text
                    safe = len(text) - held_back(text, stop)
                    if on_text is not None and safe > state["emitted"]:
                        on_text(text[state["emitted"]:safe])
                        state["emitted"] = safe
                return False

            self.lm.server.handle_completions(req, on_chunk)
        if state["error"] is not None:
            err = state["error"]
            message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            raise CuteGPTError(f"llama.cpp refused the request: {message}")
        text = cut_at_stop(state["text"], stop) if state["reason"] != "stop" else state["text"]
        if on_text is not None and len(text) > state["emitted"]:
            on_text(text[state["emitted"]:])
        t_end = time.perf_counter()
        final = state["final"] or {}
        usage = final.get("usage") or {}
        timings = final.get("timings") or {}
        n_new = usage.get("completion_tokens")
        if n_new is None:  # stopped before llama.cpp reported usage (our stop check, Ctrl-C): count the text
            n_new = len(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]) + (1 if state["reason"] == "stop" else 0)
        reused = int(timings.get("cache_n", usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)) or 0)
        if not timings:  # no final report: estimate the reuse from what the slot held
            reused = _common_prefix(self._last_ids, prompt_ids) if self.reuse_cache else 0
        if state["reason"] == "interrupted":
            self._last_ids = []
        else:
            self._last_ids = list(prompt_ids)
        first = state["first"] or t_end
        return GenerationResult(
            text=text, token_ids=[], stop_reason=state["reason"], prompt_tokens=len(prompt_ids), reused_tokens=reused,
            time_to_first_token=first - t0, decode_seconds=t_end - first, n_generated=int(n_new),
            timings={k: float(v) for k, v in timings.items() if isinstance(v, (int, float))},
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
