"""GGUF export of every supported architecture: tiny random Llama-3, Mistral, Qwen2, Qwen3 and Gemma 2 models,
each with a tokenizer of its own family -> GGUF -> llama.cpp (xllamacpp) against transformers in float32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("xllamacpp")
gguf = pytest.importorskip("gguf")

from cutegpt.errors import CuteGPTError  # noqa: E402
from cutegpt.export import gguf as gx  # noqa: E402
from cutegpt.export.verify import PROBE_CORPUS, LlamaCpp, _hf_greedy  # noqa: E402
from tests.export.archs import ARCH_VARIANTS  # noqa: E402
from tests.export.probe import load_reference, positions, worst_difference  # noqa: E402


def compare(path: Path, folder: Path) -> dict[str, float]:
    """llama.cpp vs transformers (float32) at every position of the probe corpus.

    worst: largest |log-probability difference| over llama.cpp's top-5 tokens; top1: share of positions where both
    pick the same next token; greedy: share of probes whose 12 greedy tokens after a chat prompt are identical.
    """
    tok, model = load_reference(folder)
    worst, same, n, greedy = 0.0, 0, 0, 0
    with LlamaCpp(path) as cpp:
        for got, ref in positions(cpp, tok, model):
            n += 1
            same += int(got[0][0] == int(ref.argmax()))
            worst = max(worst, worst_difference(got, ref))
        for text in PROBE_CORPUS:
            prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            pids = tok(prompt, add_special_tokens=not prompt.startswith(tok.bos_token or "\0"))["input_ids"]
            want = _hf_greedy(model, pids, 12)
            got_ids = cpp.greedy(pids, 12)
            greedy += int(got_ids == want[: len(got_ids)] and len(got_ids) > 0)
    return {"worst": worst, "top1": same / n, "positions": n, "greedy": greedy / len(PROBE_CORPUS)}


@pytest.mark.parametrize("name", list(ARCH_VARIANTS))
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_each_architecture_matches_transformers(arch_dirs, tmp_path, name, quant):
    """Export with the family's own chat template; verification passes and llama.cpp's logits are transformers'."""
    out = gx.export_gguf(str(arch_dirs[name]), tmp_path / f"{name}.gguf", quant=quant, template="auto", progress=False)
    report = gx.last_report["verification"]
    assert report["tokenization"]["ok"] and report["template"]["checked"] == 2
    r = compare(out, arch_dirs[name])
    assert r["positions"] > 100
    if quant == "f16":
        assert report["top1"]["greedy_same"] and r["top1"] >= 0.99 and r["greedy"] == 1.0
        assert r["worst"] < 0.03, f"{name} f16: log-probabilities differ by up to {r['worst']:.4f}"
    else:
        assert r["top1"] >= 0.85 and r["greedy"] >= 0.5
        assert r["worst"] < 0.5, f"{name} q8_0: log-probabilities differ by up to {r['worst']:.4f}"


@pytest.mark.parametrize("name,field", [("llama3-bpe-gqa", "permute_qk"), ("mistral-sp-gqa", "permute_qk"),
                                        ("gemma2-sp-tied", "norm_offset")])
def test_each_transform_is_needed(arch_dirs, tmp_path, monkeypatch, name, field):
    """Without its transform (q/k permutation, Gemma's +1 on norms) the same file disagrees with transformers."""
    import dataclasses

    arch = gx.ARCHITECTURES[{"llama3-bpe-gqa": "LlamaForCausalLM", "mistral-sp-gqa": "MistralForCausalLM",
                             "gemma2-sp-tied": "Gemma2ForCausalLM"}[name]]
    key = next(k for k, v in gx.ARCHITECTURES.items() if v is arch)
    monkeypatch.setitem(gx.ARCHITECTURES, key, dataclasses.replace(arch, **{field: type(getattr(arch, field))()}))
    out = gx.export_gguf(str(arch_dirs[name]), tmp_path / "m.gguf", quant="f32", template="auto", verify=False, progress=False)
    assert compare(out, arch_dirs[name])["worst"] > 0.3


def _fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    return {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF") and k not in skip}, \
        {t.name: t.tensor_type.name for t in r.tensors}


def test_metadata_per_architecture(arch_dirs, tmp_path):
    got = {}
    for name, folder in arch_dirs.items():
        out = gx.export_gguf(str(folder), tmp_path / f"{name}.gguf", quant="q8_0", template="auto", verify=False, progress=False)
        got[name] = _fields(out)
    f, t = got["llama3-bpe-gqa"]
    assert f["general.architecture"] == "llama" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert t["rope_freqs.weight"] == "F32" and f["tokenizer.ggml.add_bos_token"] is True
    assert "<|start_header_id|>" in f["tokenizer.chat_template"]
    f, t = got["mistral-sp-gqa"]
    assert f["general.architecture"] == "llama" and f["llama.context_length"] == 256  # the sliding window, not 512
    assert f["tokenizer.ggml.model"] == "llama" and "[INST]" in f["tokenizer.chat_template"]
    f, t = got["qwen2-bpe-tied"]
    assert f["general.architecture"] == "qwen2" and f["tokenizer.ggml.pre"] == "qwen2" and f["qwen2.context_length"] == 512
    assert t["blk.0.attn_q.bias"] == t["blk.1.attn_v.bias"] == "F32" and "output.weight" not in t
    assert "tokenizer.ggml.bos_token_id" not in f and f["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>
    f, t = got["qwen3-bpe-mha"]
    assert f["general.architecture"] == "qwen3" and f["qwen3.attention.key_length"] == 16
    assert t["blk.0.attn_q_norm.weight"] == t["blk.0.attn_k_norm.weight"] == "F32" and t["output.weight"] == "Q8_0"
    f, t = got["gemma2-sp-tied"]
    assert f["general.architecture"] == "gemma2" and f["gemma2.attn_logit_softcapping"] == 50.0
    assert f["gemma2.final_logit_softcapping"] == 30.0 and f["gemma2.attention.sliding_window"] == 4096
    assert f["tokenizer.ggml.add_space_prefix"] is False and f["tokenizer.ggml.bos_token_id"] == 2
    assert t["blk.0.post_attention_norm.weight"] == t["blk.1.post_ffw_norm.weight"] == "F32" and "output.weight" not in t


@pytest.mark.parametrize("name,marker", [("llama3-bpe-gqa", "<|eot_id|>"), ("qwen2-bpe-tied", "<|im_end|>"),
                                         ("gemma2-sp-tied", "<end_of_turn>"), ("mistral-sp-gqa", "</s>")])
def test_end_of_turn_of_the_own_template(arch_dirs, tmp_path, name, marker):
    """With --template auto the file's end-of-turn id is the template's own marker, where llama.cpp stops."""
    from transformers import AutoTokenizer

    out = gx.export_gguf(str(arch_dirs[name]), tmp_path / "m.gguf", quant="f16", template="auto", verify=False, progress=False)
    f, _ = _fields(out)
    assert f["tokenizer.ggml.eot_token_id"] == AutoTokenizer.from_pretrained(arch_dirs[name]).convert_tokens_to_ids(marker)
    with LlamaCpp(out) as cpp:  # llama.cpp reads the marker as that one token
        assert cpp.tokenize(marker) == [f["tokenizer.ggml.eot_token_id"]]


def test_gemma_norms_get_one_added(arch_dirs, tmp_path):
    from safetensors import safe_open

    folder = arch_dirs["gemma2-sp-tied"]
    out = gx.export_gguf(str(folder), tmp_path / "g.gguf", quant="f32", template="auto", verify=False, progress=False)
    data = {t.name: t.data for t in gguf.GGUFReader(out).tensors}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as st:
        hf = st.get_tensor("model.layers.1.pre_feedforward_layernorm.weight").float().numpy()
    assert (data["blk.1.ffn_norm.weight"] == hf + 1).all()


# ---------------------------------------------------------------------------------------------- bad input


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_architecture_is_named_with_the_list(arch_dirs, tmp_path):
    other = _copy_with_config(arch_dirs["qwen2-bpe-tied"], tmp_path / "phi", architectures=["PhiForCausalLM"], model_type="phi")
    with pytest.raises(CuteGPTError, match=r"is a PhiForCausalLM, and GGUF export supports LlamaForCausalLM, MistralForCausalLM, "
                                           r"Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM\.$"):
        gx.export_gguf(str(other), tmp_path / "out" / "m.gguf", progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_config_key_is_named(arch_dirs, tmp_path):
    other = _copy_with_config(arch_dirs["gemma2-sp-tied"], tmp_path / "g", final_logit_softcapping=None)
    with pytest.raises(CuteGPTError, match=r"config.json has no 'final_logit_softcapping', which a Gemma2ForCausalLM needs"):
        gx.export_gguf(str(other), tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_gemma2_attention_scale_llamacpp_cannot_reproduce(arch_dirs, tmp_path):
    other = _copy_with_config(arch_dirs["gemma2-sp-tied"], tmp_path / "g", query_pre_attn_scalar=32)
    with pytest.raises(CuteGPTError, match=r"query_pre_attn_scalar is 32, and llama.cpp's gemma2 scales attention by 8"):
        gx.export_gguf(str(other), tmp_path / "m.gguf", progress=False)


def test_unknown_pre_tokenizer_is_refused(arch_dirs, tmp_path):
    other = tmp_path / "q"
    shutil.copytree(arch_dirs["qwen2-bpe-tied"], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,5}|\s+|[^\s\p{N}]+"
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(CuteGPTError, match=r"pre-tokenizer \(Split \+ ByteLevel\) is not one llama.cpp is known to reproduce"):
        gx.export_gguf(str(other), tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_pre_tokenizer_found_by_its_split_rule(arch_dirs):
    """Trained anew, the vocabularies have no known fingerprint: the split regex alone names the family."""
    for name, pre in (("qwen2-bpe-tied", "qwen2"), ("llama3-bpe-gqa", "llama-bpe")):
        tj = json.loads((arch_dirs[name] / "tokenizer.json").read_text())
        assert gx.pre_tokenizer_name(tj) == pre


def _ends_at(cpp, prompt: list[int], token: int) -> bool:
    """Whether llama.cpp ends the answer right after `token` (forced by a logit bias; no stop string given)."""
    r = cpp._post("/completion", {"prompt": prompt, "n_predict": 3, "temperature": 0, "return_tokens": True,
                                  "logit_bias": [[token, 1000.0]], "cache_prompt": False})
    assert r["tokens"][0] == token
    return len(r["tokens"]) == 1


@pytest.mark.parametrize("name", ["llama3-bpe-gqa", "qwen2-bpe-tied", "gemma2-sp-tied"])
def test_both_backends_end_answers_at_the_tokens_llamacpp_ends_them(arch_dirs, tmp_path, name):
    """Every added token is forced in llama.cpp: those it ends the answer at are end_of_generation_ids (which the torch
    engine stops at, and the file lists for ollama), e.g. Llama-3's <|end_of_text|> beside <|eot_id|>."""
    from cutegpt.chat.engine import stop_token_ids
    from cutegpt.model.tokenizer import end_of_generation_ids, load_tokenizer
    from cutegpt.templates import get_template

    tok = load_tokenizer(arch_dirs[name])
    out = gx.export_gguf(str(arch_dirs[name]), tmp_path / "m.gguf", quant="f32", template="auto", verify=False, progress=False)
    stop = get_template("auto", tok).stop
    ours = set(end_of_generation_ids(tok, stop))
    candidates = sorted(set(tok.added_tokens_decoder) | {tok.convert_tokens_to_ids(t) for t in ("hello", "a") if t in tok.get_vocab()})
    prompt = tok("hello", add_special_tokens=False)["input_ids"]
    with LlamaCpp(out) as cpp:
        llamacpp = {t for t in candidates if _ends_at(cpp, prompt, t)}
    assert llamacpp == ours & set(candidates) and ours <= set(candidates)
    if name.startswith("llama3"):
        assert tok.convert_tokens_to_ids("<|end_of_text|>") in llamacpp
    lm = SimpleNamespace(tokenizer=tok, template=get_template("auto", tok), model=None)
    assert ours <= stop_token_ids(lm)
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.eos_token_ids"].contents() == sorted(ours)
