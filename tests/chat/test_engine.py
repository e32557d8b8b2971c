"""The chat engine against plain transformers `generate`, and its stop-marker / interrupt handling."""

from types import SimpleNamespace

import pytest
import torch

from cutegpt.chat.engine import Engine, GenerationArgs, _held_back
from cutegpt.chat.session import ChatSession
from cutegpt.errors import CuteGPTError

QUESTIONS = ["中国的首都是哪里？", "What is the capital of France?", "请推荐五本名著。", "why?"]


def _reference(lm, ids, gen):
    """Greedy tokens from plain `model.generate` for the same prompt ids."""
    from cutegpt.chat.engine import stop_token_ids

    out = lm.model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False, max_new_tokens=gen.max_new_tokens, repetition_penalty=gen.repetition_penalty,
        eos_token_id=sorted(stop_token_ids(lm)), pad_token_id=lm.tokenizer.pad_token_id,
    )
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("reuse", [True, False])
def test_greedy_matches_generate_over_four_turns(tiny_lm, reuse):
    gen = GenerationArgs(greedy=True, max_new_tokens=12, repetition_penalty=1.1)
    session = ChatSession(tiny_lm, gen, memory_limit=3, reuse_cache=reuse)
    reused = []
    for q in QUESTIONS:
        ids = session.prompt_ids(q)
        expected = _reference(tiny_lm, ids, gen)
        result = session.ask(q)
        assert result.token_ids == expected[: len(result.token_ids)]
        if result.stop_reason == "length":
            assert result.token_ids == expected
        reused.append(result.reused_tokens)
    if reuse:
        assert reused[0] == 0 and all(r > 0 for r in reused[1:])
        # turn 2 extends turn 1 entirely: everything but the answer's last token is served from cache
        assert reused[1] > 20
    else:
        assert reused == [0, 0, 0, 0]


def test_memory_limit_drops_oldest_turn(tiny_lm):
    gen = GenerationArgs(greedy=True, max_new_tokens=4)
    session = ChatSession(tiny_lm, gen, memory_limit=1)
    session.ask("first question")
    session.ask("second question")
    prompt = tiny_lm.tokenizer.decode(session.prompt_ids("third"))
    assert "second question" in prompt and "first question" not in prompt


def test_context_overflow_drops_history_then_refuses(tiny_lm):
    gen = GenerationArgs(greedy=True, max_new_tokens=400)  # tiny model context is 512
    session = ChatSession(tiny_lm, gen, memory_limit=3)
    from cutegpt.templates import Turn

    session.history = [Turn("一" * 40, output="二" * 40) for _ in range(3)]
    ids = session.prompt_ids("short")
    assert len(ids) <= 512 - 400
    with pytest.raises(CuteGPTError, match="does not fit the model's context of 512"):
        session.prompt_ids("长" * 300)


def test_empty_question_refused(tiny_lm):
    session = ChatSession(tiny_lm, GenerationArgs())
    with pytest.raises(CuteGPTError, match="empty"):
        session.ask("   ")


def test_sampling_is_seeded(tiny_lm):
    gen = GenerationArgs(max_new_tokens=10, seed=7)
    a = Engine(tiny_lm).generate([5, 6, 7], gen)
    b = Engine(tiny_lm).generate([5, 6, 7], gen)
    assert a.token_ids == b.token_ids


class Scripted(torch.nn.Module):
    """A fake causal LM that emits a fixed token script, one token per forward call."""

    def __init__(self, config, script, interrupt_at=None):
        super().__init__()
        self.config = config
        self.script = script
        self.calls = 0
        self.interrupt_at = interrupt_at
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=1):
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        logits = torch.full((1, 1, self.config.vocab_size), -10.0)
        logits[0, 0, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return SimpleNamespace(logits=logits)


def _scripted_lm(tiny_lm, pieces, interrupt_at=None):
    tok = tiny_lm.tokenizer
    script = [i for p in pieces for i in tok(p, add_special_tokens=False)["input_ids"]]
    model = Scripted(tiny_lm.model.config, script, interrupt_at)
    return SimpleNamespace(**{**tiny_lm.__dict__, "model": model}), script


def test_multi_token_stop_marker_is_never_printed(tiny_lm):
    # "<end>" split over ordinary tokens: the stream must hold back "<", "<en", ... until it resolves
    lm, script = _scripted_lm(tiny_lm, ["Hello", " wor", "ld", "<", "en", "d>", " more"])
    engine = Engine(lm)
    engine.stop_ids = {tiny_lm.tokenizer.eos_token_id}  # the marker is text here, not a token
    chunks = []
    result = engine.generate([5, 6], GenerationArgs(greedy=True, max_new_tokens=30, repetition_penalty=1.0), chunks.append)
    assert result.text == "Hello world"
    assert "".join(chunks) == "Hello world"
    assert not any("<" in c for c in chunks)
    assert result.stop_reason == "stop"


def test_partial_marker_is_released_when_it_does_not_complete(tiny_lm):
    lm, _ = _scripted_lm(tiny_lm, ["a", "<", "b", "</s>"])
    result = Engine(lm).generate([5], GenerationArgs(greedy=True, max_new_tokens=30, repetition_penalty=1.0))
    assert result.text == "a<b" and result.stop_reason == "stop"


def test_ctrl_c_returns_partial_answer_and_resets_cache(tiny_lm):
    tok = tiny_lm.tokenizer
    n = len(tok("Hi", add_special_tokens=False)["input_ids"]) + len(tok(" there", add_special_tokens=False)["input_ids"])
    lm, _ = _scripted_lm(tiny_lm, ["Hi", " there", " friend"], interrupt_at=n)
    engine = Engine(lm)
    result = engine.generate([5, 6, 7], GenerationArgs(greedy=True, max_new_tokens=30, repetition_penalty=1.0))
    assert result.stop_reason == "interrupted"
    assert result.text == "Hi there"
    assert engine._cache is None and engine._cached_ids == []


@pytest.mark.parametrize("text,stop,held", [
    ("abc", "<end>", 0), ("abc<", "<end>", 1), ("abc<en", "<end>", 3), ("abc<x", "<end>", 0),
    ("ab\ufffd", None, 1), ("ab<e\ufffd", "<end>", 3),
])
def test_held_back(text, stop, held):
    assert _held_back(text, stop) == held
