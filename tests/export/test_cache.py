"""The export cache chat, generate and serve share: one GGUF file per base + adapter + quant + template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("xllamacpp")


def _adapter(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


@pytest.fixture()
def counted_exports(monkeypatch, tmp_path):
    """Every call of the real exporter, by output path."""
    import cutegpt.export.gguf as gguf_export

    calls: list[Path] = []
    real = gguf_export.export_gguf

    def export_gguf(model, out, **kw):
        calls.append(Path(out))
        return real(model, out, **kw)

    monkeypatch.setattr(gguf_export, "export_gguf", export_gguf)
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    return calls


def test_serve_reuses_what_chat_exported_and_a_changed_adapter_is_exported_again(tiny_model_dir, tmp_path, counted_exports):
    from cutegpt.chat.backend import _exported_gguf
    from cutegpt.serve.source import resolve_model

    lora = _adapter(tiny_model_dir, tmp_path / "runs" / "sft" / "final", seed=1)
    chat_file = _exported_gguf(tiny_model_dir, str(lora), None)  # chat --backend llamacpp --lora (f16)
    assert len(counted_exports) == 1
    stamp = chat_file.stat().st_mtime_ns
    served = resolve_model(None, str(lora), None, "f16", progress=False)  # serve --lora: its recorded base
    assert served.gguf == chat_file and len(counted_exports) == 1 and chat_file.stat().st_mtime_ns == stamp
    assert served.name == "sft"

    _adapter(tiny_model_dir, lora, seed=2)  # retrained in place: new weights, same names
    served_again = resolve_model(None, str(lora), None, "f16", progress=False)
    assert len(counted_exports) == 2 and served_again.gguf != chat_file
    assert _exported_gguf(tiny_model_dir, str(lora), None) == served_again.gguf and len(counted_exports) == 2


def test_key_names_the_template_not_where_it_came_from(tmp_path, monkeypatch):
    """`--template cutegpt` and a folder that records cutegpt are one file; another template or quant is another."""
    import json

    from cutegpt.export.cache import cached_gguf

    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "cutegpt.json").write_text(json.dumps({"template": "cutegpt"}))
    calls = []

    def fake(model, out, *, template=None, **kw):
        calls.append(template)
        Path(out).write_bytes(b"GGUF")
        return Path(out)

    a = cached_gguf(str(model), None, template=None, exporter=fake, progress=False)
    b = cached_gguf(str(model), None, template="cutegpt", exporter=fake, progress=False)
    c = cached_gguf(str(model), None, template="auto", exporter=fake, progress=False)
    d = cached_gguf(str(model), None, template="cutegpt", quant="q8_0", exporter=fake, progress=False)
    assert a == b and len({a, c, d}) == 3 and calls == ["cutegpt", "auto", "cutegpt"]
