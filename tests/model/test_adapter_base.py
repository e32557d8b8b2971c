"""How an adapter records its base and finds it again (model/adapter_base.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cutegpt.errors import CuteGPTError
from cutegpt.model import adapter_base
from cutegpt.model.adapter_base import EMBEDDED_BASE, find_base, fingerprint, record_base, same_base
from cutegpt.model.loading import ModelArgs, load_model


def _adapter(folder: Path, base: str | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return folder


def test_record_base(tmp_path, monkeypatch):
    assert record_base(None) == EMBEDDED_BASE
    cache = tmp_path / "cache" / "models" / "smollm2-135m-instruct-0123456789ab"  # the embedded model's converted folder
    assert record_base(str(cache)) == EMBEDDED_BASE
    snapshot = tmp_path / "hub" / "models--Org--Some-Model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert record_base(str(snapshot)) == "Org/Some-Model"
    assert record_base("Org/Some-Model") == "Org/Some-Model"
    assert record_base("./my-base") == "./my-base"  # the path as given


def test_find_base(tmp_path, monkeypatch, tiny_model_dir):
    from cutegpt.model import embedded

    monkeypatch.setattr(embedded, "embedded_model_dir", lambda: tiny_model_dir)
    assert find_base(_adapter(tmp_path / "a", EMBEDDED_BASE)) == tiny_model_dir
    assert find_base(_adapter(tmp_path / "b", None)) == tiny_model_dir
    # written by an older cutegpt on another machine: its cache folder
    assert find_base(_adapter(tmp_path / "c", "/home/someone/.cache/cutegpt/models/smollm2-135m-instruct-feedc0ffee00")) == tiny_model_dir
    assert find_base(_adapter(tmp_path / "d", str(tiny_model_dir))) == tiny_model_dir
    monkeypatch.setattr("cutegpt.model.hub._from_hub_cache", lambda repo: tiny_model_dir if repo == "Org/Cached" else None)
    assert find_base(_adapter(tmp_path / "e", "Org/Cached")) == tiny_model_dir
    with pytest.raises(CuteGPTError, match=r"\(Org/Missing\) is not a local folder nor in the local hub cache: pass the base model as --model"):
        find_base(_adapter(tmp_path / "f", "Org/Missing"))
    with pytest.raises(CuteGPTError, match="not recorded"):
        find_base(tmp_path / "b", missing="error")


def test_embedded_name_as_model(monkeypatch, tiny_model_dir):
    from cutegpt.model import embedded

    monkeypatch.setattr(embedded, "embedded_model_dir", lambda: tiny_model_dir)
    assert load_model(ModelArgs(model=EMBEDDED_BASE)).model_path == tiny_model_dir


def test_fingerprint_same_base_in_bf16_other_weights_not(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert same_base(fingerprint(fp32), fingerprint(bf16)) is None
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # the embedding scaled by 5%: like a fine-tuned copy of the same base
        dict(other.named_parameters())["model.embed_tokens.weight"].mul_(1.05)
    assert same_base(fingerprint(fp32), fingerprint(other)) == "it has the same shape but other weights"
    fp = fingerprint(fp32)
    assert same_base({**fp, "structure": "0" * 16}, fp) == "its architecture or tensor shapes differ"
    assert adapter_base.SAMPLE_TENSORS * adapter_base.SAMPLE_VALUES >= len(fp["sample"]) > 100


def test_fingerprint_of_a_large_tensor_stays_in_bounds():
    """An embedding of SmolLM2's size (28,311,552 entries): float32 spacing rounded past the last index."""
    model = torch.nn.Module()
    model.config = type("C", (), {})()
    model.embed = torch.nn.Parameter(torch.arange(49152 * 576, dtype=torch.float32).reshape(49152, 576))
    sample = fingerprint(model)["sample"]
    assert sample[0] == 0.0 and sample[-1] == float(f"{49152 * 576 - 1:.5g}") and len(sample) == 16
