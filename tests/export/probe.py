"""llama.cpp against transformers (float32), position by position over the probe corpus: the one
reference loop of the GGUF tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from cutegpt.export.verify import PROBE_CORPUS, LlamaCpp


def load_reference(folder: Path):
    """(tokenizer, float32 model) of an HF folder, as transformers loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def positions(cpp: LlamaCpp, tok, model, texts: Sequence[str] = PROBE_CORPUS) -> Iterator[tuple[list[tuple[int, float]], torch.Tensor]]:
    """(llama.cpp's top-5 (token, log-probability), transformers' log-probabilities) at every position of every text."""
    for text in texts:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for k in range(1, len(ids)):
            got = cpp.next_logprobs(ids[:k], 5)
            if got is None:  # llama.cpp held back a partial UTF-8 character and gave no probabilities
                continue
            yield got, ref[k - 1]


def worst_difference(got: list[tuple[int, float]], ref: torch.Tensor) -> float:
    """Largest |llama.cpp - transformers| log-probability over llama.cpp's top tokens at one position."""
    return max(abs(lp - float(ref[tid])) for tid, lp in got)
