"""Packed rows: the loss of a packed batch equals the per-sample losses computed alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from cutegpt.training.data import PackedCollator, pack_documents, position_ids_for
from tests.training.conftest import encode_samples


def _sum_loss(model, batch) -> tuple[float, int]:
    """Sum of token losses and the number of trained tokens (labels shifted as in the model)."""
    out = model(**{k: v for k, v in batch.items() if k not in ("labels", "n_tokens")})
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss.item(), int((labels != -100).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager", "segments"])
def test_packed_loss_equals_samples_alone(tiny_model_dir, tiny_tokenizer, attn):
    from cutegpt.training.prepare import pick_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=pick_attention(attn)).eval()
    assert model.config.use_cache  # the default that leaks between samples unless the batch says otherwise
    samples = encode_samples(tiny_tokenizer)[:5]
    collate = PackedCollator(pad_id=tiny_tokenizer.pad_token_id)
    # two packed rows of unequal length (the shorter one padded), samples in order
    rows = [
        {"input_ids": sum((s[0] for s in samples[:3]), []), "labels": sum((s[1] for s in samples[:3]), []),
         "seq_lens": [len(s[0]) for s in samples[:3]]},
        {"input_ids": sum((s[0] for s in samples[3:]), []), "labels": sum((s[1] for s in samples[3:]), []),
         "seq_lens": [len(s[0]) for s in samples[3:]]},
    ]
    with torch.no_grad():
        packed_sum, packed_n = _sum_loss(model, collate(rows))
        alone = [_sum_loss(model, collate([{"input_ids": s[0], "labels": s[1], "seq_lens": [len(s[0])]}])) for s in samples]
        alone_sum, alone_n = sum(a[0] for a in alone), sum(a[1] for a in alone)
        assert packed_n == alone_n
        assert packed_sum / packed_n == pytest.approx(alone_sum / alone_n, abs=1e-5)

        # the model's own loss (what the Trainer optimises) is the same token mean
        batch = collate(rows)
        batch.pop("n_tokens")
        assert model(**batch).loss.item() == pytest.approx(alone_sum / alone_n, abs=1e-5)

        # and the check is sharp: with the cache on, the later samples of a row see the earlier ones
        batch["use_cache"] = True
        leaky = model(**batch).loss.item()
        assert abs(leaky - alone_sum / alone_n) > 1e-3


def test_position_ids_restart_per_sample_and_padding_continues():
    assert position_ids_for([3, 2], 7) == [0, 1, 2, 0, 1, 2, 3]
    assert position_ids_for([4], 4) == [0, 1, 2, 3]


def test_pack_documents_keeps_every_token_and_marks_pieces():
    docs = [[1, 1, 1, 1, 1, 1], [2, 2, 2], [3, 3, 3, 3]]
    rows = pack_documents(docs, 5)
    assert rows["input_ids"] == [[1, 1, 1, 1, 1], [1, 2, 2, 2, 3], [3, 3, 3]]
    assert rows["seq_lens"] == [[5], [1, 3, 1], [3]]
    assert rows["labels"] == [[-100, 1, 1, 1, 1], [-100, -100, 2, 2, -100], [-100, 3, 3]]
