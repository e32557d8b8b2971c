"""Every tokenizer cutegpt saves carries the cutegpt template as Jinja; int8 loading gives its memory back."""

from __future__ import annotations

from pathlib import Path

import pytest

from cutegpt.model.loading import ModelArgs, load_model, process_rss, save_tokenizer
from cutegpt.templates import CuteGPTTemplate, Turn, chat_template_jinja
from tests.tiny import CHATML


def _render(folder: Path) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)


def test_cutegpt_template_saved_as_jinja(tiny_tokenizer, tmp_path):
    save_tokenizer(tiny_tokenizer, tmp_path / "out", "cutegpt")
    assert _render(tmp_path / "out") == CuteGPTTemplate().prompt([Turn("你好")])
    assert tiny_tokenizer.chat_template == CHATML  # the object in memory is left as it was


@pytest.mark.parametrize("name", ["auto", "raw", None])
def test_auto_keeps_the_models_own_template(tiny_tokenizer, tmp_path, name):
    save_tokenizer(tiny_tokenizer, tmp_path / "out", name)
    assert _render(tmp_path / "out").startswith("<|im_start|>user\n你好<|im_end|>")


def test_export_hf_carries_the_template(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cutegpt.cli import main

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    out = tmp_path / "merged"
    assert main(["export", "--model", str(tiny_model_dir), "--lora", str(adapter), "--out", str(out), "--template", "cutegpt"]) == 0
    assert _render(out) == CuteGPTTemplate().prompt([Turn("你好")])
    assert chat_template_jinja("cutegpt") in (out / "tokenizer_config.json").read_text(encoding="utf-8") + \
        ((out / "chat_template.jinja").read_text(encoding="utf-8") if (out / "chat_template.jinja").exists() else "")


def test_int8_reports_rss(tiny_model_dir):
    lm = load_model(ModelArgs(model=str(tiny_model_dir), load_in_8bit=True, device="cpu"))
    assert lm.int8 == "quanto"
    rss = process_rss()
    assert 50 * 2**20 < rss < 64 * 2**30  # a plausible process size in bytes, not pages or KiB
