import pytest
import torch
import torch.nn.functional as F

from cutegpt.data.collate import packed_attention_inputs


def test_positions_and_mask_hand_case():
    pos, mask = packed_attention_inputs([[3, 2]], 6)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask.dtype == torch.float32 and mask.min() == torch.finfo(torch.float32).min
    with pytest.raises(ValueError):
        packed_attention_inputs([[4, 4]], 6)


def _token_losses(model, ids, labels, **kw):
    logits = model(input_ids=ids, **kw).logits.float()
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_packed_loss_equals_sum_of_separate_losses(tiny_model_dir, attn, use_cache):
    """Three samples in one row, with padding, give the same per-token losses as each alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    model.config.use_cache = use_cache
    g = torch.Generator().manual_seed(0)
    lens = [7, 5, 9]
    samples = [torch.randint(5, model.config.vocab_size, (n,), generator=g) for n in lens]
    sample_labels = []
    for s in samples:
        lab = s.clone()
        lab[: len(s) // 2] = -100  # a prompt part
        lab[0] = -100  # first token of every sample is never a target (what convert writes)
        sample_labels.append(lab)
    row = {"input_ids": torch.cat(samples).tolist(), "labels": torch.cat(sample_labels).tolist(), "seq_lens": lens}
    ids = torch.full((1, 24), 2, dtype=torch.long)  # right-padded to a multiple of 8
    labels = torch.full((1, 24), -100, dtype=torch.long)
    ids[0, :21] = torch.tensor(row["input_ids"])
    labels[0, :21] = torch.tensor(row["labels"])
    position_ids, mask = packed_attention_inputs([row["seq_lens"]], 24)
    batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}
    with torch.no_grad():
        packed = model(**batch, use_cache=use_cache)
        per_token = F.cross_entropy(packed.logits[0, :-1].float(), batch["labels"][0, 1:], ignore_index=-100, reduction="none")
        separate = [_token_losses(model, s[None], lab[None]) for s, lab in zip(samples, sample_labels)]
    starts = [0, 7, 12]
    for st, n, sep in zip(starts, lens, separate):
        # positions st .. st+n-2 predict tokens st+1 .. st+n-1 of the same sample
        assert torch.allclose(per_token[st:st + n - 1], sep, atol=1e-5)
    total_packed = per_token.sum()
    total_separate = sum(s.sum() for s in separate)
    assert torch.allclose(total_packed, total_separate, atol=1e-4)
    # the model's own mean loss equals the token-weighted mean of the separate losses
    n_trained = sum(int((lab[1:] != -100).sum()) for lab in sample_labels)
    assert torch.allclose(packed.loss, total_separate / n_trained, atol=1e-5)
