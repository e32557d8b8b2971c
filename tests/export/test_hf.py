"""`cutegpt export --format hf`: an adapter merged into its base gives the adapter model's logits."""

from __future__ import annotations

import pytest
import torch

from cutegpt.errors import CuteGPTError


@pytest.fixture()
def random_adapter(tiny_model_dir, tmp_path):
    """A LoRA adapter with non-zero random weights (peft's init_lora_weights=False), saved like any adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    return out, peft_model.eval()


def test_merged_folder_equals_base_plus_adapter(tiny_model_dir, random_adapter, tmp_path):
    from cutegpt.export.cli import ExportConfig, run_export
    from cutegpt.model.loading import ModelArgs, load_model

    adapter, peft_model = random_adapter
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            assert (peft_model(input_ids=ids).logits - want).abs().max() > 1e-3  # the adapter matters
    out = tmp_path / "merged"
    assert run_export(ExportConfig(model=str(tiny_model_dir), lora=str(adapter), out=str(out), dtype="float32")) == 0
    merged = load_model(ModelArgs(model=str(out)))
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged.model(input_ids=ids).logits, want, atol=2e-4, rtol=0)


def test_merge_needs_an_adapter_and_a_fresh_out(tiny_model_dir, random_adapter, tmp_path):
    from cutegpt.export.cli import ExportConfig

    with pytest.raises(CuteGPTError, match="--lora is required"):
        ExportConfig(model=str(tiny_model_dir), out=str(tmp_path / "m")).check()
    (tmp_path / "taken").mkdir()
    with pytest.raises(CuteGPTError, match="already exists"):
        ExportConfig(model=str(tiny_model_dir), lora=str(random_adapter[0]), out=str(tmp_path / "taken")).check()
