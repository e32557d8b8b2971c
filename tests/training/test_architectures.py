"""Every base architecture on the training side: the --plan parameter count from config.json alone equals the
model's, LoRA targets in each spelling users type resolve (and a wrong name is refused before anything loads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cutegpt.errors import CuteGPTError
from cutegpt.model.architectures import FAMILIES, check_lora_targets, split_lora_targets
from cutegpt.training.plan import PlanInput, estimate, lora_params, read_shape
from tests.tiny import _tiny_config

ARCHS = {  # arch -> config overrides that exercise its differences from LLaMA
    "llama": dict(heads=4, kv_heads=2, tie=False),
    "mistral": dict(heads=4, kv_heads=2, tie=False),
    "qwen2": dict(heads=4, kv_heads=2, tie=True),
    "qwen3": dict(heads=4, kv_heads=4, tie=False, head_dim=16),
    "gemma2": dict(heads=4, kv_heads=2, tie=True, head_dim=8, query_pre_attn_scalar=8),
}


def _config_only(tmp_path: Path, arch: str) -> tuple[Path, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    spec = dict(ARCHS[arch])
    config = _tiny_config(arch, 300, spec.pop("tie"), spec.pop("heads"), spec.pop("kv_heads"), **spec)
    folder = tmp_path / arch
    config.save_pretrained(folder)  # config.json only: no weights
    return folder, AutoModelForCausalLM.from_config(config)


def test_every_architecture_is_in_the_table():
    assert set(FAMILIES) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM"}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_plan_counts_the_model_from_config_alone(tmp_path, arch):
    from peft import LoraConfig, get_peft_model

    folder, model = _config_only(tmp_path, arch)
    shape = read_shape(folder)
    assert shape.total == sum(p.numel() for p in model.parameters())
    for targets in (["q_proj", "v_proj"], ["all-linear"], ["o_proj", "down_proj"]):
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=targets[0] if targets == ["all-linear"] else targets))
        trained = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
        assert lora_params(shape, PlanInput(lora_r=4, lora_targets=tuple(targets))) == trained, (arch, targets)
        model = peft.unload()


@pytest.mark.parametrize("typed,want", [
    (["q_proj,v_proj"], ["q_proj", "v_proj"]), (["all"], ["all-linear"]), (["all-linear"], ["all-linear"]),
    (["q_proj", "k_proj,o_proj"], ["q_proj", "k_proj", "o_proj"]), ([" q_proj , v_proj "], ["q_proj", "v_proj"]),
])
def test_lora_target_spellings(typed, want):
    assert split_lora_targets(typed) == want


@pytest.mark.parametrize("arch", list(ARCHS))
def test_wrong_target_refused_from_config(tmp_path, arch):
    folder, _ = _config_only(tmp_path, arch)
    check_lora_targets(["q_proj", "gate_proj"], folder / "config.json")
    with pytest.raises(CuteGPTError, match=r"--lora-targets c_attn: no such linear layer in this model; valid names: "
                                           r"q_proj k_proj v_proj o_proj gate_proj up_proj down_proj .*\(\w+ForCausalLM\)\.$"):
        check_lora_targets(["q_proj", "c_attn"], folder / "config.json")


def test_plan_with_all_and_comma_list_counts_trainable(tmp_path, capsys, monkeypatch):
    """`--lora_target all` and `q_proj,v_proj` (LLaMA-Factory's spellings) give the trainable count of their meaning."""
    from cutegpt.cli import main
    from cutegpt.training import plan as plan_module

    folder, _ = _config_only(tmp_path, "qwen2")
    shape = read_shape(folder)
    seen = []
    real = plan_module.estimate
    monkeypatch.setattr(plan_module, "estimate", lambda shape, inp: seen.append(real(shape, inp)) or seen[-1])
    counts = []
    for typed, targets in (("all", ("all-linear",)), ("q_proj,v_proj", ("q_proj", "v_proj"))):
        assert main(["train", "sft", "--model", str(folder), "--plan", "--lora_target", typed, "--lora-r", "8"]) == 0
        want = lora_params(shape, PlanInput(lora_r=8, lora_targets=targets))
        assert want > 0 and seen[-1].trainable == want
        counts.append(seen[-1].trainable)
    assert counts[0] > counts[1]


def test_wrong_target_refused_before_loading(tmp_path, capsys, monkeypatch):
    from cutegpt.cli import main
    from cutegpt.model import loading

    folder, _ = _config_only(tmp_path, "gemma2")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    assert main(["train", "sft", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--lora-targets", "q_proj,qkv_proj"]) == 1
    err = capsys.readouterr().err
    assert "--lora-targets qkv_proj: no such linear layer in this model" in err and "(Gemma2ForCausalLM)" in err
    assert not (tmp_path / "run").exists()
