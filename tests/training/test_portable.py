"""A trained adapter is portable: copied anywhere under another name, `--lora DIR` alone finds its base and gives
the logits it gave before the copy; another base of the same shape is refused; a base that is not here names --model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cutegpt.cli import main
from cutegpt.errors import CuteGPTError
from cutegpt.model.loading import ModelArgs, load_model
from cutegpt.training.sft import SFTConfig, run_sft
from tests.tiny import build_tiny_llama

IDS = [[5, 17, 42, 99, 3, 250, 7, 8]]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sft_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("portable") / "run"
    cfg = SFTConfig(model=str(tiny_model_dir), data=[str(sft_dataset)], out=str(out), micro_batch=4, grad_accum=1,
                    lr=1e-2, warmup_steps=0, max_steps=4, save_steps=1000, precision="fp32", seed=0, logging_steps=1)
    assert run_sft(cfg) == 0
    return out / "final"


def _logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor(IDS)).logits


def _moved(trained: Path, tmp_path: Path) -> Path:
    moved = tmp_path / "elsewhere" / "my-shared-adapter"
    shutil.copytree(trained, moved)
    return moved


def test_final_records_base_by_name_and_fingerprint(trained, tiny_model_dir):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)  # the path as given, what peft reads
    record = json.loads((trained / "cutegpt_training.json").read_text())
    assert record["base_model"] == str(tiny_model_dir)
    assert len(record["base_fingerprint"]["structure"]) == 16 and len(record["base_fingerprint"]["sample"]) > 100


def test_copied_adapter_loads_with_lora_alone(trained, tiny_model_dir, tmp_path):
    before = load_model(ModelArgs(model=str(tiny_model_dir), lora=str(trained)))
    moved = _moved(trained, tmp_path)
    after = load_model(ModelArgs(lora=str(moved)))
    assert after.model_path == tiny_model_dir and after.lora_path == moved
    torch.testing.assert_close(_logits(after), _logits(before), atol=0, rtol=0)
    base = load_model(ModelArgs(model=str(tiny_model_dir)))
    assert (_logits(base) - _logits(after)).abs().max() > 1e-4  # the adapter is really on


def test_copied_adapter_chats_from_the_command_line(trained, tmp_path, capsys):
    moved = _moved(trained, tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("中国的首都是哪里？\n", encoding="utf-8")
    code = main(["chat", "--lora", str(moved), "--input", str(prompts), "--max-new-tokens", "4", "--greedy"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len([json.loads(line) for line in captured.out.splitlines() if line.strip()]) == 1


def test_base_moved_too_is_given_with_model(trained, tiny_model_dir, tmp_path):
    """A copy of the base elsewhere (here saved in bfloat16, as another machine may hold it) passes the check."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    copy = tmp_path / "base-copy"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(copy)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(copy)
    moved = _moved(trained, tmp_path)
    lm = load_model(ModelArgs(model=str(copy), lora=str(moved), dtype="float32"))
    assert lm.model_path == copy


def test_other_base_of_the_same_shape_is_refused_unless_forced(trained, tiny_model_dir, tmp_path, capsys):
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    build_tiny_llama(other, vocab_size=vocab, seed=7)  # same architecture, other weights
    moved = _moved(trained, tmp_path)
    with pytest.raises(CuteGPTError, match="same shape but other weights.*--model.*--force"):
        load_model(ModelArgs(model=str(other), lora=str(moved)))
    forced = load_model(ModelArgs(model=str(other), lora=str(moved), force=True))
    assert forced.model_path == other
    code = main(["chat", "--model", str(other), "--lora", str(moved), "--input", "-"])
    err = capsys.readouterr().err
    assert code == 1 and "was trained on another base model" in err and "Traceback" not in err


def test_base_not_on_this_machine_names_the_flag(trained, tmp_path, capsys):
    moved = _moved(trained, tmp_path)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base")  # the folder it was trained on, not here
    (moved / "adapter_config.json").write_text(json.dumps(config))
    code = main(["chat", "--lora", str(moved), "--input", "-"])
    err = capsys.readouterr().err
    assert code == 1 and "is not a local folder nor in the local hub cache: pass the base model as --model" in err


def test_copied_adapter_exports_with_lora_alone(trained, tiny_model_dir, tmp_path):
    from cutegpt.export.cli import ExportConfig, run_export

    moved = _moved(trained, tmp_path)
    want = _logits(load_model(ModelArgs(model=str(tiny_model_dir), lora=str(trained))))
    merged = tmp_path / "merged"
    assert run_export(ExportConfig(lora=str(moved), out=str(merged), dtype="float32")) == 0
    torch.testing.assert_close(_logits(load_model(ModelArgs(model=str(merged)))), want, atol=2e-4, rtol=0)


def test_copied_adapter_exports_to_gguf_on_its_base(trained, tiny_model_dir, tmp_path, monkeypatch):
    """`export --format gguf --lora DIR` merges onto the recorded base, not the embedded model."""
    from cutegpt.export import gguf as gguf_export

    seen = []

    def stop(folder):  # the folder it would convert is all this test needs
        seen.append(folder)
        raise CuteGPTError("stop")

    monkeypatch.setattr(gguf_export, "_check_source", stop)
    moved = _moved(trained, tmp_path)
    with pytest.raises(CuteGPTError, match="stop"):
        gguf_export.export_gguf(None, tmp_path / "out.gguf", lora=str(moved), verify=False)
    assert seen == [tiny_model_dir]
