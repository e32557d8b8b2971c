"""Batched + prefix-cached scoring equals the brute-force path (one question, full prompt, no cache)."""

from __future__ import annotations

import pytest
import torch

from cutegpt.evaluation.cli import EvalConfig, continuations, encode_prompt, letter_token_ids, subject_prompts
from cutegpt.evaluation.data import load_benchmark
from cutegpt.evaluation.scoring import Item, Scored, brute_force, common_prefix_length, score_items


def _items(lm, bench, shots, method, chat=False):
    ids, _ = letter_token_ids(lm.tokenizer)
    conts = continuations(lm.tokenizer, method, bench.name, ids)
    cfg = EvalConfig(benchmark="ceval", shots=shots)
    out = []
    for sub in bench.subjects.values():
        out.append([Item(tuple(encode_prompt(lm, t, chat)), conts) for _q, t in subject_prompts(bench, sub, cfg)])
    return out


def _same(a: list[Scored], b: list[Scored]) -> None:
    assert [s.best for s in a] == [s.best for s in b]
    for x, y in zip(a, b):
        assert max(abs(p - q) for p, q in zip(x.probs, y.probs)) < 1e-4
        assert max(abs(p - q) for p, q in zip(x.scores, y.scores)) < 1e-3


@pytest.mark.parametrize("shots", [0, 5])
@pytest.mark.parametrize("method", ["logits", "loglikelihood"])
@pytest.mark.parametrize("chat", [False, True])
def test_batched_prefix_cached_equals_brute_force(tiny_lm, ceval_dir, shots, method, chat):
    bench = load_benchmark("ceval", ceval_dir, "val")
    for items in _items(tiny_lm, bench, shots, method, chat):
        ref = brute_force(tiny_lm.model, items, method)
        if shots:  # the shared prefix really is served from the cache
            assert common_prefix_length([it.ids for it in items]) > 100
        for batch_size, max_tokens in [(16, 4096), (3, 40)]:
            got = score_items(tiny_lm.model, items, method, batch_size, max_tokens, pad_id=2)
            _same(got, ref)


def test_zero_shot_shares_the_subject_header(tiny_lm, ceval_dir):
    """Zero-shot too, every question of a subject starts with the subject's header: that is the prefix the
    scorer computes once (all of it but a token that may merge across the header/question boundary)."""
    from cutegpt.evaluation.prompts import PromptStyle

    bench = load_benchmark("ceval", ceval_dir, "val")
    for sub, items in zip(bench.subjects.values(), _items(tiny_lm, bench, 0, "logits")):
        header = tiny_lm.tokenizer(PromptStyle("ceval").header(sub), add_special_tokens=True)["input_ids"]
        assert len(header) - 1 <= common_prefix_length([it.ids for it in items]) < min(len(it.ids) for it in items)


def test_probabilities_differ_between_questions(tiny_lm, ceval_dir):
    """Guard against a scorer that returns the same numbers for every option or question."""
    bench = load_benchmark("ceval", ceval_dir, "val")
    items = _items(tiny_lm, bench, 5, "logits")[0]
    got = score_items(tiny_lm.model, items)
    assert len({s.probs for s in got}) == len(items)
    assert all(len(set(s.scores)) == 4 for s in got)


def test_multi_token_continuations(tiny_lm):
    """Options of different token lengths (loglikelihood of option text): one row per option."""
    tok = tiny_lm.tokenizer
    ctx = tok("问：中国的首都是哪里？\n答：\n")["input_ids"]
    ctx2 = tok("问：请推荐五本名著。\n答：\n")["input_ids"]
    conts = tuple(tuple(tok(t, add_special_tokens=False)["input_ids"]) for t in ["北京", "红楼梦、西游记", "Paris", "A"])
    assert len({len(c) for c in conts}) > 1
    items = [Item(tuple(ctx), conts), Item(tuple(ctx2), conts)]
    ref = brute_force(tiny_lm.model, items, "loglikelihood")
    _same(score_items(tiny_lm.model, items, "loglikelihood", batch_size=3), ref)
    # the score is the sum of the continuation's token log-probabilities, checked by hand for one option
    full = torch.tensor([list(ctx) + list(conts[1])])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_lm.model(full).logits[0].float(), -1)
    by_hand = sum(float(logp[len(ctx) - 1 + t, tok_id]) for t, tok_id in enumerate(conts[1]))
    assert abs(ref[0].scores[1] - by_hand) < 1e-4


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps one own token
    assert common_prefix_length([[7]]) == 0


def test_rank_and_ties():
    s = Scored((1.0, 3.0, 3.0, 0.0), (0.1, 0.4, 0.4, 0.1))
    assert s.best == 1 and s.rank_of(1) == 2 and s.rank_of(0) == 3 and s.rank_of(3) == 4


def test_letter_fallback_warns():
    class Tok:
        name_or_path = "fake"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [100 + ord(text[-1]), 7] if text.endswith("C") else [100 + ord(text[-1])]}

        def convert_ids_to_tokens(self, i):
            return f"t{i}"

    with pytest.warns(UserWarning, match="no single token for 'C'"):
        ids, notes = letter_token_ids(Tok())
    assert ids == [165, 166, 167, 168] and len(notes) == 1


def test_prefix_cached_scoring_raises_no_deprecation(tiny_lm, capfd):
    """transformers 5.24 renamed the cache argument and output field (old names warn, gone in 5.40): we use the new."""
    import warnings

    tok = tiny_lm.tokenizer
    ctx = tok("以下是单项选择题。\n问：中国的首都是哪里？\n答：")["input_ids"]
    ctx2 = tok("以下是单项选择题。\n问：请推荐五本名著。\n答：")["input_ids"]
    items = [Item(tuple(ctx), ((5,), (6,))), Item(tuple(ctx2), ((5,), (6,)))]
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        got = score_items(tiny_lm.model, items, "logits", batch_size=2)
    assert "deprecated" not in capfd.readouterr().err  # transformers logs the output-field rename, it does not warn
    _same(got, brute_force(tiny_lm.model, items, "logits"))
