"""The one model loader: LoRA, int8, templates from the model card, and every bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cutegpt.cli import main
from cutegpt.errors import CuteGPTError
from cutegpt.model.loading import ModelArgs, load_model, weight_bytes
from cutegpt.templates import write_model_card
from tests.tiny import build_tiny_llama, build_tokenizer


def _make_adapter(base_dir: Path, out: Path, seed: int = 1, with_tokenizer: bool = False) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    if with_tokenizer:
        shutil.copy(base_dir / "tokenizer.json", out / "tokenizer.json")
        shutil.copy(base_dir / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


IDS = [5, 17, 42, 99, 3, 250, 7, 8]


def test_lora_logits_equal_peft_merged(tiny_model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = load_model(ModelArgs(model=str(tiny_model_dir), lora=str(adapter_dir)))
    ours = _logits(lm.model, IDS)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    ref = _logits(merged, IDS)
    assert torch.allclose(ours, ref, atol=1e-4)
    plain = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), IDS)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter really changes the output


def test_merge_lora_flag_gives_same_logits(tiny_model_dir, adapter_dir):
    a = load_model(ModelArgs(model=str(tiny_model_dir), lora=str(adapter_dir)))
    b = load_model(ModelArgs(model=str(tiny_model_dir), lora=str(adapter_dir), merge_lora=True))
    assert torch.allclose(_logits(a.model, IDS), _logits(b.model, IDS), atol=1e-4)


def test_tokenizer_comes_from_adapter_folder(tiny_model_dir, tmp_path):
    adapter = _make_adapter(tiny_model_dir, tmp_path / "ad", with_tokenizer=True)
    lm = load_model(ModelArgs(model=str(tiny_model_dir), lora=str(adapter)))
    assert Path(lm.tokenizer.name_or_path) == adapter


def test_template_recorded_in_model_card(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    assert load_model(ModelArgs(model=str(folder))).template.name == "auto"  # tokenizer has a chat template
    write_model_card(folder, "cutegpt")
    assert load_model(ModelArgs(model=str(folder))).template.name == "cutegpt"
    assert load_model(ModelArgs(model=str(folder), template="raw")).template.name == "raw"


@pytest.mark.parametrize("backend", ["quanto", "bitsandbytes"])
def test_int8_runs_on_cpu_and_is_smaller_than_bf16(tiny_model_dir, backend):
    bf16 = load_model(ModelArgs(model=str(tiny_model_dir), dtype="bfloat16"))
    fp32 = load_model(ModelArgs(model=str(tiny_model_dir)))
    q = load_model(ModelArgs(model=str(tiny_model_dir), load_in_8bit=True, int8_backend=backend))
    assert q.int8 == backend
    # only the linear layers are int8; embeddings and head stay 16/32-bit, so compare the layers' bytes
    def layer_bytes(m):
        return weight_bytes(m.model.layers if hasattr(m, "model") and hasattr(m.model, "layers") else m)
    assert layer_bytes(q.model) < 0.65 * layer_bytes(bf16.model)
    out_q = _logits(q.model, IDS).float()
    out_f = _logits(fp32.model, IDS)
    cos = torch.nn.functional.cosine_similarity(out_q.flatten(), out_f.flatten(), dim=0)
    assert cos > 0.98


def test_int8_auto_backend_on_cpu_is_quanto(tiny_model_dir):
    assert load_model(ModelArgs(model=str(tiny_model_dir), load_in_8bit=True)).int8 == "quanto"


# ---- bad input: one sentence, exit code 1, no traceback ----

def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_missing_model_path(capsys, tmp_path):
    code, err = _run(capsys, "chat", "--model", str(tmp_path / "nope"), "--input", "-")
    assert code == 1 and f"model path {tmp_path / 'nope'} does not exist" in err
    assert "Traceback" not in err


def test_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    code, err = _run(capsys, "chat", "--model", str(tmp_path))
    assert code == 1 and "is not a model folder: it has no config.json" in err


def test_adapter_given_as_model_finds_its_base(tiny_model_dir, adapter_dir):
    direct = load_model(ModelArgs(model=str(adapter_dir)))
    explicit = load_model(ModelArgs(model=str(tiny_model_dir), lora=str(adapter_dir)))
    assert direct.model_path == tiny_model_dir and direct.lora_path == adapter_dir
    assert torch.allclose(_logits(direct.model, IDS), _logits(explicit.model, IDS))


def test_adapter_whose_base_is_missing(capsys, adapter_dir, tmp_path):
    import json

    moved = tmp_path / "moved-adapter"
    shutil.copytree(adapter_dir, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/some-model"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "chat", "--model", str(moved))
    assert code == 1 and "is a LoRA adapter whose base model (some-org/some-model) is not a local folder" in err


def test_corrupt_weights_file(capsys, tiny_model_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    code, err = _run(capsys, "chat", "--model", str(folder))
    assert code == 1 and f"{weights}: the weights file is corrupt or truncated" in err


def test_garbage_weights_file(capsys, tiny_model_dir, tmp_path):
    folder = tmp_path / "garbage"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x00\x01not safetensors at all")
    code, err = _run(capsys, "chat", "--model", str(folder))
    assert code == 1 and "model.safetensors: the weights file is corrupt or truncated" in err


def test_lora_adapter_for_another_base(capsys, tiny_model_dir, tmp_path):
    other = tmp_path / "other-base"
    tok = build_tokenizer(other)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    adapter = _make_adapter(other, tmp_path / "other-adapter")
    code, err = _run(capsys, "chat", "--model", str(tiny_model_dir), "--lora", str(adapter))
    assert code == 1 and f"the LoRA adapter {adapter} does not fit the base model {tiny_model_dir}" in err
    assert "size mismatch" in err


def test_unknown_template(capsys, tiny_model_dir):
    code, err = _run(capsys, "chat", "--model", str(tiny_model_dir), "--template", "vicuna")
    assert code == 1 and "unknown template 'vicuna'" in err


def test_empty_prompt(capsys, tiny_model_dir, tmp_path):
    f = tmp_path / "turns.jsonl"
    f.write_text('{"instruction": "  "}\n', encoding="utf-8")
    code, err = _run(capsys, "chat", "--model", str(tiny_model_dir), "--input", str(f))
    assert code == 1 and f"{f}, line 1: field 'instruction' (or 'prompt') must be non-empty text" in err


def test_non_utf8_input(capsys, tiny_model_dir, tmp_path):
    f = tmp_path / "turns.txt"
    f.write_bytes("你好\n".encode("utf-8") + "再见\n".encode("gbk"))
    code, err = _run(capsys, "chat", "--model", str(tiny_model_dir), "--input", str(f), "--max-new-tokens", "2")
    assert code == 1 and f"{f}, line 2: not UTF-8 text" in err


def test_bad_flag_value(capsys, tiny_model_dir):
    code, err = _run(capsys, "chat", "--model", str(tiny_model_dir), "--dtype", "int4")
    assert code == 1 and "--dtype must be one of auto, float32, bfloat16, float16, not 'int4'" in err


def test_debug_shows_traceback(capsys, tmp_path):
    code, err = _run(capsys, "--debug", "chat", "--model", str(tmp_path / "nope"))
    assert code == 1 and "Traceback" in err


def test_yaml_config_and_flags(capsys, tiny_model_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nmax-new-tokens: 3\ngreedy: true\ntemplate: cutegpt\n", encoding="utf-8")
    turns = tmp_path / "t.txt"
    turns.write_text("你好\n", encoding="utf-8")
    code = main(["chat", "--config", str(cfg), "--input", str(turns), "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert code == 0
    import json

    record = json.loads(out.strip().splitlines()[-1])
    assert record["new_tokens"] <= 2


def test_yaml_unknown_key(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("modle: x\n", encoding="utf-8")
    code, err = _run(capsys, "chat", "--config", str(cfg))
    assert code == 1 and f"{cfg}: unknown setting 'modle'" in err


def test_save_tokenizer_keeps_sentencepiece_model(tmp_path):
    """transformers 5 saves only tokenizer.json; LLaMA tools still need tokenizer.model."""
    from transformers import AutoTokenizer

    from cutegpt.model.loading import save_tokenizer
    from tests.vocab.conftest import build_sp_base

    src = build_sp_base(tmp_path / "sp")
    tok = AutoTokenizer.from_pretrained(src)
    save_tokenizer(tok, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    again = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert again("中国的首都 is Beijing")["input_ids"] == tok("中国的首都 is Beijing")["input_ids"]


def test_gguf_with_bitsandbytes_refused_before_loading(capsys, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not read")  # never opened: the refusal comes first
    code, err = _run(capsys, "chat", "--model", str(fake), "--load-in-8bit", "--int8-backend", "bitsandbytes")
    assert code == 1 and "needs a model folder, not a GGUF file" in err


def test_corrupt_gguf_named(capsys, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF garbage")
    code, err = _run(capsys, "chat", "--model", str(fake))
    assert code == 1 and err.startswith(f"error: {fake}: ") and "GGUF" in err and err.count("\n") == 1


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_config_values_are_one_sentence(tiny_model_dir, tmp_path):
    import json

    bad = _copy_model(tiny_model_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["hidden_size"] = "big"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CuteGPTError, match="cannot load the model .*hidden_size"):
        load_model(ModelArgs(model=str(bad)))
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(CuteGPTError, match="config.json: must hold a JSON object"):
        load_model(ModelArgs(model=str(bad)))


def test_adapter_config_that_is_a_list(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("[]")
    with pytest.raises(CuteGPTError, match="adapter_config.json: must hold a JSON object"):
        load_model(ModelArgs(model=str(tiny_model_dir), lora=str(adapter)))


def test_hostile_pickle_weights_are_refused_without_running(tiny_model_dir, tmp_path):
    import pickle

    evil = _copy_model(tiny_model_dir, tmp_path / "evil")
    (evil / "model.safetensors").unlink()
    canary = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    for protocol in (2, 4, 5):
        with open(evil / "pytorch_model.bin", "wb") as f:
            pickle.dump({"w": Payload()}, f, protocol=protocol)
        with pytest.raises(CuteGPTError) as e:
            load_model(ModelArgs(model=str(evil)))
        assert "could run code; refused" in str(e.value) and "weights_only=False" not in str(e.value)
        assert not canary.exists()


def test_lora_loading_and_use_raise_no_deprecation(tiny_model_dir, adapter_dir, capfd):
    """peft reads a property transformers 5 deprecated: the user must not see it on every `--lora` load."""
    import warnings

    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        lm = load_model(ModelArgs(model=str(tiny_model_dir), lora=str(adapter_dir)))
        from cutegpt.chat.engine import Engine, GenerationArgs
        from cutegpt.evaluation.scoring import Item, score_items

        Engine(lm).generate([5, 6, 7], GenerationArgs(greedy=True, max_new_tokens=3))  # the cache goes through peft
        score_items(lm.model, [Item((5, 6, 7, 8), ((9,), (10,))), Item((5, 6, 7, 11), ((9,), (10,)))], "logits")
    assert "deprecated" not in capfd.readouterr().err
