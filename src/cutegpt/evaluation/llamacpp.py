"""Score multiple-choice prompts on a GGUF file in llama.cpp: the same items and rule as `scoring.py`.

    shared prefix (once per subject):  slot 0 evaluates header + shots, saves its KV cache,
                                       slots 1..P-1 restore it (llama.cpp's slot save/restore)
    questions, P at a time:            each takes a free slot, whose cache already holds the prefix,
                                       so only the question's own tokens are computed
    per question:                      the exact log-probability of every option token over the whole
                                       vocabulary (runtime.llamacpp.choice_logprobs: one request when the
                                       letters are among the 20 likeliest tokens, else two)

Scores are log-probabilities, where the torch path's logits method keeps raw logits: the two differ by
one constant per question (log of the softmax's normaliser), so the letters and the option
probabilities are the same quantity.
"""

from __future__ import annotations

import math
import queue
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from cutegpt.evaluation.scoring import Item, Scored, common_prefix_length


def _softmax(xs: Sequence[float]) -> tuple[float, ...]:
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    total = sum(e)
    return tuple(v / total for v in e)


def _option_scores(server: Any, item: Item, method: str, slot: int, reuse: bool, top_n: int) -> tuple[float, ...]:
    from cutegpt.runtime.llamacpp import choice_logprobs, token_logprob

    conts = item.continuations
    firsts = [c[0] for c in conts]
    if all(len(c) == 1 for c in conts) and len(set(firsts)) == len(firsts):
        return tuple(choice_logprobs(server, list(item.ids), firsts, slot, reuse, top_n))
    if method == "logits":  # two options share a first token: the logits rule reads that token only
        return tuple(token_logprob(server, list(item.ids), t, slot, reuse) for t in firsts)
    return tuple(sum(token_logprob(server, list(item.ids) + list(c[:k]), tok, slot, reuse) for k, tok in enumerate(c))
                 for c in conts)


def score_items_llamacpp(lm: Any, items: Sequence[Item], method: str = "logits", parallel: int = 1,
                         use_prefix_cache: bool = True, progress: Callable[[int], None] | None = None,
                         share: bool = True, top_n: int | None = None) -> list[Scored]:
    """Score `items` (one subject's questions) on `lm` (a LlamaCppModel loaded with `parallel` slots).

    use_prefix_cache=False computes every prompt whole (the reference the tests compare against).
    share=False leaves the prefix to the server's own prompt cache (an endpoint: no slot save/restore).
    top_n: the unbiased top-n asked first (runtime.llamacpp.choice_logprobs; 0: the biased requests alone).
    """
    from cutegpt.runtime.llamacpp import TOP_N, share_prefix

    top_n = TOP_N if top_n is None else top_n

    if not items:
        return []
    prefix_len = common_prefix_length([it.ids for it in items]) if use_prefix_cache else 0
    if prefix_len and share:
        share_prefix(lm, list(items[0].ids[:prefix_len]), f"prefix-{uuid.uuid4().hex}.bin", parallel)
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for k in range(parallel):
        free.put(k)

    def one(item: Item) -> Scored:
        slot = free.get()  # both requests of a question go to the slot that holds its prompt
        try:
            scores = _option_scores(lm.server, item, method, slot, use_prefix_cache, top_n)
        finally:
            free.put(slot)
        if progress is not None:
            progress(1)
        return Scored(scores, _softmax(scores))

    if parallel == 1:
        return [one(it) for it in items]
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, items))


class ServerTokenizer:
    """The GGUF file's tokenizer as llama.cpp itself applies it, shaped like the transformers tokenizer calls
    evaluation makes (`tok(text, add_special_tokens=...)["input_ids"]`); names of ids come from `hf`.

    transformers' reading of a GGUF vocabulary can differ from llama.cpp's (it drops SmolLM2's digit
    splitting, for one), and llama.cpp runs what it tokenizes: plain prompts are encoded here.
    """

    def __init__(self, server: Any, hf: Any):
        self.server = server
        self.hf = hf
        self.name_or_path = getattr(hf, "name_or_path", "")
        self.pad_token_id = getattr(hf, "pad_token_id", None)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        from cutegpt.runtime.llamacpp import server_tokenize

        own = getattr(self.server, "tokenize", None)  # an endpoint: its own HTTP call (with the API key)
        ids = own(text, add_special_tokens) if own is not None else server_tokenize(self.server, text, add_special=add_special_tokens)
        return {"input_ids": ids}

    def convert_ids_to_tokens(self, ids: Any) -> Any:
        if self.hf is None:  # an endpoint: ids only
            return [str(i) for i in ids] if isinstance(ids, list) else str(ids)
        return self.hf.convert_ids_to_tokens(ids)
