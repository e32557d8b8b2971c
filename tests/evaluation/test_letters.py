"""Official-prompt letter ids equal each benchmark's own scoring code, re-implemented by brute force.

    CMMLU  src/hf_causal_model.py: tokenizer.convert_tokens_to_ids(letter)            -> the bare letter token
    MMLU   evaluate.py (hendrycks/test): the log-probability of the token " A" after "Answer:"
    C-Eval the letter token its own five-shot prompt shows after 答案： (found by character offsets in the
           tokenized prompt); on byte-level BPE also its LLaMA evaluator's encode("A")[0]
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cutegpt.evaluation.cli import CUE_CONTEXT, letter_token_ids
from cutegpt.evaluation.data import LETTERS, Question, Subject
from cutegpt.evaluation.prompts import PromptStyle
from cutegpt.model.tokenizer import load_tokenizer
from tests.tiny import build_sp_layout, build_tokenizer

MMLU_LINES = ("Answer: A", "Answer: B", "Answer: C", "Answer: D")  # so that " A" is one token, as in MMLU's GPT-3 vocabulary
SPACE = {"sentencepiece": "▁", "bpe": "Ġ"}  # how each family spells a leading space in its vocabulary


@pytest.fixture(scope="module", params=["sentencepiece", "bpe"])
def family_tok(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "sentencepiece":
        build_sp_layout(out, "llama1", end=True, extra_text=MMLU_LINES)
    else:
        build_tokenizer(out, extra_text=MMLU_LINES)
    return request.param, load_tokenizer(out)


def ours(tok, bench: str) -> list[int]:
    style = PromptStyle(bench, "official")
    return letter_token_ids(tok, style.target_delimiter, CUE_CONTEXT + style.parts[2])[0]


def shot_letter_ids(tok, bench: str) -> list[int]:
    """Build a real five-shot prompt whose shots answer A, B, C, D; find each answer letter's token by offsets."""
    style = PromptStyle(bench, "official")
    subject = Subject("computer_network", "计算机网络", "computer network", ["STEM"])
    shots = [Question("computer_network", str(i), f"问题{i}：网络协议？", ("TCP", "UDP", "IP 地址", "HTTP/2"), L)
             for i, L in enumerate(LETTERS)]
    text = style.prefix(subject, shots)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    found = []
    start = 0
    for L in LETTERS:
        at = text.index(style.parts[2] + style.target_delimiter + L + "\n\n", start) + len(style.parts[2])
        start = at
        # the token covering the letter's character (its span may include the delimiter's space)
        tid = next(t for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if a <= at + len(style.target_delimiter) < b)
        found.append(tid)
    return found


def test_cmmlu_bare_letters(family_tok):
    family, tok = family_tok
    want = [tok.convert_tokens_to_ids(L) for L in LETTERS]  # CMMLU's own code
    assert ours(tok, "cmmlu") == want
    if family == "sentencepiece":  # the bug this replaces: encoding the letter alone gives ▁A
        assert [tok(L, add_special_tokens=False)["input_ids"][0] for L in LETTERS] != want


def test_mmlu_space_letters(family_tok):
    family, tok = family_tok
    want = [tok.convert_tokens_to_ids(SPACE[family] + L) for L in LETTERS]  # hendrycks: top_logprobs[" A"]
    assert tok.unk_token_id not in want
    assert ours(tok, "mmlu") == want


def test_ceval_letters_are_the_shots_letters(family_tok):
    family, tok = family_tok
    assert ours(tok, "ceval") == shot_letter_ids(tok, "ceval")
    if family == "bpe":  # C-Eval's LLaMA evaluator: tokenizer.encode("A")[0]
        assert ours(tok, "ceval") == [tok(L, add_special_tokens=False)["input_ids"][0] for L in LETTERS]


@pytest.mark.parametrize("bench", ["cmmlu", "mmlu"])
def test_shots_agree_with_the_scored_letters(family_tok, bench):
    _family, tok = family_tok
    assert ours(tok, bench) == shot_letter_ids(tok, bench)


def test_evaluate_uses_the_cue(tmp_path: Path):
    """The run's recorded letter ids come from the cue (a tiny SentencePiece LLaMA, CMMLU official)."""
    from cutegpt.evaluation.cli import letter_context, style_of, EvalConfig
    from types import SimpleNamespace

    cfg = EvalConfig(benchmark="cmmlu")
    assert letter_context(SimpleNamespace(), "cmmlu", cfg).endswith("答案是：")
    assert style_of("cmmlu", cfg).parts[2] == "答案是："
