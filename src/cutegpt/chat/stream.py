"""Backend-independent pieces of answer generation (no torch import): the result record,
the stop-marker rules for streamed text, and the per-answer footer."""

from __future__ import annotations

from dataclasses import dataclass, field

from cutegpt.generation import GenerationArgs, resolve_generation


@dataclass
class GenerationResult:
    text: str  # the answer, without the stop marker
    token_ids: list[int]  # generated ids, stop marker/EOS included when hit (empty when the backend does not report ids)
    stop_reason: str  # "stop" (marker or EOS), "length", "interrupted"
    prompt_tokens: int
    reused_tokens: int  # prompt tokens served from the cache
    time_to_first_token: float
    decode_seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    n_generated: int | None = None  # generated tokens, when token_ids is not filled

    @property
    def new_tokens(self) -> int:
        return self.n_generated if self.n_generated is not None else len(self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float:
        n = self.new_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def footer(self) -> str:
        """The one line chat prints under an answer."""
        cut = ", cut at --max-new-tokens" if self.stop_reason == "length" else ""
        return (f"[{self.new_tokens} tokens{cut}, {self.decode_tokens_per_second:.1f} tokens/s, "
                f"first token after {self.time_to_first_token:.2f} s]")


def complete(gen: GenerationArgs, template_name: str) -> GenerationArgs:
    """`gen` with every unset sampling field filled from the template's defaults (for callers that did not resolve)."""
    return gen if gen.is_resolved() else resolve_generation(gen, {}, "", template_name)[0]


def cut_at_stop(text: str, stop: str | None) -> str:
    """The answer before the stop marker; without one, minus a trailing incomplete character."""
    if stop and stop in text:
        return text[: text.index(stop)]
    return text.rstrip("\ufffd")


def held_back(text: str, stop: str | None) -> int:
    """How many trailing characters must wait: a partial stop marker or an incomplete UTF-8 character."""
    n = 0
    while n < len(text) and text[len(text) - 1 - n] == "\ufffd":
        n += 1
    if stop:
        body = text[: len(text) - n] if n else text
        for k in range(min(len(stop) - 1, len(body)), 0, -1):
            if body.endswith(stop[:k]):
                return n + k
    return n
