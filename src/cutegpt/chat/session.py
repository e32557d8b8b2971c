"""A multi-turn conversation: history window, prompt building, and the engine."""

from __future__ import annotations

from typing import Any, Callable

from cutegpt.generation import GenerationArgs
from cutegpt.chat.stream import GenerationResult, complete
from cutegpt.errors import CuteGPTError
from cutegpt.templates import Turn, encode_segments


class ChatSession:
    """Keeps the last `memory_limit` (question, answer) pairs, as the original did (default 3)."""

    def __init__(self, lm: Any, gen: GenerationArgs, memory_limit: int = 3,
                 system: str | None = None, reuse_cache: bool = True, engine: Any = None):
        """`lm` is a torch `LoadedModel` or a `LlamaCppModel`; `engine` defaults to the torch engine."""
        if memory_limit < 0:
            raise CuteGPTError(f"--memory-limit must be 0 or more, not {memory_limit}.")
        self.lm = lm
        self.gen = complete(gen, lm.template.name)
        self.memory_limit = memory_limit
        self.system = system
        if engine is None:
            from cutegpt.chat.engine import Engine

            engine = Engine(lm, reuse_cache=reuse_cache)
        self.engine = engine
        self.history: list[Turn] = []

    def clear(self) -> None:
        self.history = []

    def prompt_ids(self, question: str, input: str = "") -> list[int]:
        """Token ids for history + question, dropping the oldest turns that do not fit the context."""
        budget = self.lm.context_length - self.gen.max_new_tokens
        window = self.history[-self.memory_limit:] if self.memory_limit else []
        while True:
            turns = window + [Turn(question, input)]
            ids, _ = encode_segments(self.lm.tokenizer, self.lm.template.segments(turns, self.system))
            if len(ids) <= budget or not window:
                break
            window = window[1:]
        if len(ids) > budget:
            raise CuteGPTError(
                f"the question is {len(ids)} tokens with the system line; with --max-new-tokens {self.gen.max_new_tokens} "
                f"it does not fit the model's context of {self.lm.context_length} tokens."
            )
        return ids

    def messages(self) -> list[dict[str, str]]:
        """The conversation as OpenAI-style messages (what /save writes and `generate` reads)."""
        out: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system is not None else []
        for turn in self.history:
            user = {"role": "user", "content": turn.instruction}
            if turn.input:
                user["input"] = turn.input
            out += [user, {"role": "assistant", "content": turn.output or ""}]
        return out

    def ask(self, question: str, input: str = "", on_text: Callable[[str], None] | None = None) -> GenerationResult:
        if not question.strip():
            raise CuteGPTError("the question is empty.")
        ids = self.prompt_ids(question, input)
        result = self.engine.generate(ids, self.gen, on_text)
        self.history.append(Turn(question, input, result.text))
        return result
