"""Token generation for chat: a KV cache kept across turns, streaming, stop markers.

Each turn's prompt (system + history + new question) usually extends the
previous prompt + answer. The engine keeps the KV cache of the tokens it has
already processed and prefills only the new ones:

    turn 1: [system q1 ........] -> a1      cache = system q1 a1
    turn 2: [system q1 a1 | q2 ] -> a2      prefill only q2, keep the rest
    turn 5: oldest turn dropped  -> the prefix changed: crop the cache to the
            longest common prefix (here: the system line) and prefill the rest

Sampling uses transformers' own logits processors in the order `generate`
applies them, so greedy output equals `model.generate(do_sample=False)`
token for token.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from cutegpt.generation import GenerationArgs
from cutegpt.chat.stream import GenerationResult, complete, cut_at_stop, held_back
from cutegpt.model.kv import cache_kwarg, new_cache
from cutegpt.model.loading import LoadedModel

_held_back = held_back  # older name, kept for tests and callers

__all__ = ["Engine", "GenerationArgs", "GenerationResult", "cut_at_stop", "logits_processors", "stop_token_ids"]


def logits_processors(gen: GenerationArgs) -> Any:
    """The processors `generate` would build for these settings, in its order."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if gen.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
    if not gen.greedy:
        if gen.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(gen.temperature))
        if gen.top_k:
            procs.append(TopKLogitsWarper(gen.top_k))
        if gen.top_p < 1.0:
            procs.append(TopPLogitsWarper(gen.top_p))
    return procs


def stop_token_ids(lm: LoadedModel) -> set[int]:
    """The ids llama.cpp ends an answer at (model.tokenizer.end_of_generation_ids: EOS, the stop marker when it is
    one token, the end-of-text tokens llama.cpp knows by name), plus the generation config's EOS ids."""
    from cutegpt.model.tokenizer import end_of_generation_ids

    ids = set(end_of_generation_ids(lm.tokenizer, lm.template.stop))
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    return ids


class Engine:
    """Generates answers for one conversation at a time, reusing the KV cache between calls."""

    def __init__(self, lm: LoadedModel, reuse_cache: bool = True):
        self.lm = lm
        self.reuse_cache = reuse_cache
        self.stop_ids = stop_token_ids(lm)
        self._cache: Any = None
        self._cached_ids: list[int] = []  # tokens whose keys/values are in the cache
        self._cache_kw = cache_kwarg(lm.model)

    def reset(self) -> None:
        self._cache, self._cached_ids = None, []

    def _prepare_cache(self, prompt_ids: list[int]) -> int:
        """Crop the cache to the longest prefix it shares with the prompt; return that length."""
        n = 0
        if self.reuse_cache and self._cache is not None:
            limit = min(len(self._cached_ids), len(prompt_ids) - 1)  # at least one token must be fed
            while n < limit and self._cached_ids[n] == prompt_ids[n]:
                n += 1
        if n == 0:
            self._cache = new_cache(self.lm.model)
        elif n < self._cache.get_seq_length():
            self._cache.crop(n - self._cache.get_seq_length())  # transformers 5: a negative count removes tokens
        self._cached_ids = list(prompt_ids[:n])
        return n

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        gen: GenerationArgs,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate one answer for `prompt_ids`; `on_text` receives the answer as it grows."""
        model, tok = self.lm.model, self.lm.tokenizer
        gen = complete(gen, self.lm.template.name)
        device = self.lm.device
        stop = self.lm.template.stop
        procs = logits_processors(gen)
        rng = None
        if gen.seed is not None and not gen.greedy:
            rng = torch.Generator(device=device).manual_seed(gen.seed)

        t0 = time.perf_counter()
        reused = self._prepare_cache(prompt_ids)
        all_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        feed = all_ids[:, reused:]
        generated: list[int] = []
        text, emitted, reason = "", 0, "length"
        t_first = t0
        try:
            for step in range(gen.max_new_tokens):
                out = model(input_ids=feed, use_cache=True, logits_to_keep=1, **{self._cache_kw: self._cache})
                self._cached_ids.extend(feed[0].tolist())
                scores = procs(all_ids, out.logits[:, -1, :].float())
                if gen.greedy:
                    next_id = int(scores.argmax(-1))
                else:
                    probs = torch.softmax(scores, dim=-1)
                    next_id = int(torch.multinomial(probs, 1, generator=rng))
                if step == 0:
                    t_first = time.perf_counter()
                generated.append(next_id)
                if next_id in self.stop_ids and not gen.ignore_eos:
                    reason = "stop"
                    break
                text = tok.decode(generated, skip_special_tokens=False)
                if stop and not gen.ignore_eos and stop in text[max(0, emitted - len(stop)):]:
                    text = text[: text.index(stop, max(0, emitted - len(stop)))]
                    reason = "stop"
                    break
                safe = len(text) - held_back(text, stop)
                if on_text is not None and safe > emitted:
                    on_text(text[emitted:safe])
                    emitted = safe
                feed = torch.tensor([[next_id]], dtype=torch.long, device=device)
                all_ids = torch.cat([all_ids, feed], dim=1)
        except KeyboardInterrupt:
            # A forward pass may have been cut between layers: the cache cannot be trusted.
            self.reset()
            reason = "interrupted"
            text = cut_at_stop(tok.decode(generated, skip_special_tokens=False), stop)
        if reason == "length":
            text = cut_at_stop(text, stop)
        if on_text is not None and len(text) > emitted:
            on_text(text[emitted:])
        t_end = time.perf_counter()
        return GenerationResult(
            text=text,
            token_ids=generated,
            stop_reason=reason,
            prompt_tokens=len(prompt_ids),
            reused_tokens=reused,
            time_to_first_token=t_first - t0,
            decode_seconds=t_end - t_first,
        )
