"""GGUF export: tiny random LLaMAs -> GGUF -> llama.cpp (xllamacpp) agrees with transformers; bad input refused."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("xllamacpp")
gguf = pytest.importorskip("gguf")

from cutegpt.errors import CuteGPTError  # noqa: E402
from cutegpt.export import gguf as gx  # noqa: E402
from cutegpt.export.verify import PROBE_TEXT, LlamaCpp  # noqa: E402
from tests.export.conftest import VARIANTS  # noqa: E402
from tests.export.probe import load_reference, positions, worst_difference  # noqa: E402


def _logprob_diffs(path: Path, folder: Path) -> tuple[float, int]:
    """Largest |llama.cpp - transformers| log-probability over the top-5 tokens at every position, and positions compared."""
    tok, model = load_reference(folder)
    worst, n = 0.0, 0
    with LlamaCpp(path) as cpp:
        for got, ref in positions(cpp, tok, model):
            n += 1
            assert got[0][0] == int(ref.argmax()) or abs(got[0][1] - float(ref.max())) < 0.01
            worst = max(worst, worst_difference(got, ref))
    return worst, n


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("quant,tol", [("f32", 0.01), ("f16", 0.03)])
def test_tiny_llamas_match_transformers(variant_dirs, tmp_path, name, quant, tol):
    out = gx.export_gguf(str(variant_dirs[name]), tmp_path / f"{name}.gguf", quant=quant, template="cutegpt", progress=False)
    report = gx.last_report["verification"]
    assert report["tokenization"]["ok"] and report["template"]["checked"] == 2
    assert report["top1"]["agreement"] >= 0.99 and report["top1"]["greedy_same"]
    worst, n = _logprob_diffs(out, variant_dirs[name])
    assert n > 100
    assert worst < tol, f"{name} {quant}: log-probabilities differ by up to {worst:.4f}"


def test_metadata_and_tensor_layout(variant_dirs, tmp_path):
    folder = variant_dirs["sp-gqa-untied"]
    out = gx.export_gguf(str(folder), tmp_path / "m.gguf", quant="q8_0", template="cutegpt", verify=False, progress=False)
    r = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF") and k not in (
        "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")}
    assert f["general.architecture"] == "llama" and f["llama.attention.head_count"] == 4
    assert f["llama.attention.head_count_kv"] == 2
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    assert f["tokenizer.ggml.unknown_token_id"] == 0
    assert "问：" in f["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["output.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert sum(1 for t in types.values() if t == "Q8_0") == 2 * 7 + 2

    tied = gx.export_gguf(str(variant_dirs["bpe-gqa-tied"]), tmp_path / "t.gguf", quant="q4_0", verify=False, progress=False)
    r = gguf.GGUFReader(tied)
    names = {t.name: t.tensor_type.name for t in r.tensors}
    assert "output.weight" not in names and names["token_embd.weight"] == "Q8_0"  # 4-bit files keep the embedding at 8 bits
    assert names["blk.1.ffn_down.weight"] == "Q4_0"
    # a row that is not a whole number of 32-value blocks falls back to F16, as in llama.cpp's converter
    assert gx._tensor_qtype("blk.0.ffn_down.weight", (8, 48), "q4_0") == gguf.GGMLQuantizationType.F16
    assert gx._tensor_qtype("blk.0.ffn_down.weight", (8, 48), "f32") == gguf.GGMLQuantizationType.F32


def test_unpermute_matches_llamacpp_reference():
    """LlamaModel.permute in convert_hf_to_gguf.py, written out: (n_head, 2, d/2) -> (n_head, d/2, 2)."""
    w = torch.arange(8 * 3).reshape(8, 3)
    got = gx._unpermute(w, 2)
    heads = w.reshape(2, 2, 2, 3)  # head, half, index-in-half, column
    want = heads.permute(0, 2, 1, 3).reshape(8, 3)
    assert torch.equal(got, want)
    assert got[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


def test_all_quant_types_load_in_llamacpp(variant_dirs, tmp_path):
    folder = variant_dirs["bpe-mha-untied"]
    for quant in gx.QUANTS:
        out = gx.export_gguf(str(folder), tmp_path / f"{quant}.gguf", quant=quant, verify=False, progress=False)
        with LlamaCpp(out) as cpp:
            assert len(cpp.greedy([5, 6, 7], 3)) >= 1
        assert gguf.GGUFReader(out).fields["general.file_type"].contents() == int(gx._file_type(quant))


def test_quantized_export_reports_agreement(variant_dirs, tmp_path):
    gx.export_gguf(str(variant_dirs["bpe-gqa-tied"]), tmp_path / "q.gguf", quant="q8_0", progress=False)
    top1 = gx.last_report["verification"]["top1"]
    assert 0.85 <= top1["agreement"] <= 1.0 and top1["threshold"] == 0.85


def test_template_renders_in_llamacpp_like_templates_py(bpe_dir, tmp_path):
    from cutegpt.templates import CuteGPTTemplate, Turn

    out = gx.export_gguf(str(bpe_dir), tmp_path / "t.gguf", quant="f16", template="cutegpt", verify=False, progress=False)
    qa = [("你好", "你好！有什么可以帮你？"), ("What is 2+2?", "4"), ("写一首诗", "床前明月光。")]
    with LlamaCpp(out) as cpp:
        for n_hist in range(4):
            for system in (None, "You are a helpful assistant.", "你是一个助手。\n"):
                turns = [Turn(q, output=a) for q, a in qa[:n_hist]] + [Turn("中国的首都是哪里？")]
                msgs = ([{"role": "system", "content": system}] if system is not None else [])
                for t in turns:
                    msgs.append({"role": "user", "content": t.instruction})
                    if t.output is not None:
                        msgs.append({"role": "assistant", "content": t.output})
                assert cpp.apply_template(msgs) == CuteGPTTemplate().prompt(turns, system)


def test_stop_marker_is_eot_when_one_token(tmp_path):
    from tests.tiny import build_tiny_llama, build_tokenizer

    from cutegpt.templates import add_stop_token

    folder = tmp_path / "m"
    tok = build_tokenizer(folder, chat_template=False)
    add_stop_token(tok)
    tok.save_pretrained(folder)
    build_tiny_llama(folder, vocab_size=len(tok))
    out = gx.export_gguf(str(folder), tmp_path / "m.gguf", quant="f32", template="cutegpt", progress=False)
    r = gguf.GGUFReader(out)
    eot = r.fields["tokenizer.ggml.eot_token_id"].contents()
    assert eot == tok.convert_tokens_to_ids("<end>")
    assert r.fields["tokenizer.ggml.token_type"].contents()[eot] == int(gguf.TokenType.CONTROL)


def test_lora_is_merged_first(tmp_path, bpe_dir):
    """A LoRA adapter is merged before export: llama.cpp's greedy tokens follow the merged model, not the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bpe_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    out = gx.export_gguf(str(bpe_dir), tmp_path / "merged.gguf", lora=str(adapter), quant="f32", progress=False)
    assert gx.last_report["verification"]["top1"]["greedy_same"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the merged temporary folder is gone
    base_out = gx.export_gguf(str(bpe_dir), tmp_path / "base.gguf", quant="f32", verify=False, progress=False)
    r_m = {t.name: t.data.copy() for t in gguf.GGUFReader(out).tensors}
    r_b = {t.name: t.data.copy() for t in gguf.GGUFReader(base_out).tensors}
    assert not (r_m["blk.0.attn_q.weight"] == r_b["blk.0.attn_q.weight"]).all()
    assert (r_m["blk.0.attn_k.weight"] == r_b["blk.0.attn_k.weight"]).all()


# ---------------------------------------------------------------------------------------------- bad input


def test_unknown_quant(bpe_dir, tmp_path):
    with pytest.raises(CuteGPTError, match="unknown --quant 'q3_k'"):
        gx.export_gguf(str(bpe_dir), tmp_path / "m.gguf", quant="q3_k")


def test_existing_output_needs_overwrite(bpe_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("old")
    with pytest.raises(CuteGPTError, match="already exists; pass --overwrite"):
        gx.export_gguf(str(bpe_dir), out, verify=False, progress=False)
    assert out.read_text() == "old"
    gx.export_gguf(str(bpe_dir), out, verify=False, progress=False, overwrite=True)
    assert out.stat().st_size > 1000


def test_output_must_be_a_gguf_file(bpe_dir, tmp_path):
    with pytest.raises(CuteGPTError, match="ending in .gguf"):
        gx.export_gguf(str(bpe_dir), tmp_path / "model", progress=False)


def test_non_llama_architecture_is_named(bpe_dir, tmp_path):
    other = tmp_path / "gpt2"
    shutil.copytree(bpe_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CuteGPTError, match="GPT2LMHeadModel, and GGUF export supports LlamaForCausalLM, "):
        gx.export_gguf(str(other), tmp_path / "m.gguf", progress=False)


def test_full_disk_leaves_nothing(bpe_dir, tmp_path, monkeypatch):
    real = gx.write_gguf

    def full(plan, path, progress=True):
        real(plan, path, progress)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gx, "write_gguf", full)
    with pytest.raises(CuteGPTError, match="disk is full"):
        gx.export_gguf(str(bpe_dir), tmp_path / "m.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unloadable_gguf_is_refused_and_removed(bpe_dir, tmp_path, monkeypatch):
    def broken(plan, path, progress=True):
        Path(path).write_bytes(b"GGUF" + b"\0" * 64)

    monkeypatch.setattr(gx, "write_gguf", broken)
    with pytest.raises(CuteGPTError, match="llama.cpp cannot load"):
        gx.export_gguf(str(bpe_dir), tmp_path / "m.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_tokenization_mismatch_is_refused(bpe_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gx, "pre_tokenizer_name", lambda tj, tok=None: "llama-bpe")  # a different split regex
    with pytest.raises(CuteGPTError, match=r"verification failed \(tokenization\)"):
        gx.export_gguf(str(bpe_dir), tmp_path / "m.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli(bpe_dir, tmp_path, capsys):
    from cutegpt.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(bpe_dir), "--out", str(out), "--quant", "f16", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "saved" in text and "tokenization identical" in text and "top-1 agreement" in text
    assert main(["export", "--format", "gguf", "--model", str(bpe_dir), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--format", "gguf", "--model", str(bpe_dir), "--out", str(out), "--quant", "q3_k"]) == 1
    assert "--quant must be one of" in capsys.readouterr().err


def test_probe_text_covers_the_hard_cases():
    assert any("\u4e00" <= c <= "\u9fff" for c in PROBE_TEXT) and "😀" in PROBE_TEXT and "def " in PROBE_TEXT


@pytest.mark.slow
def test_embedded_model_f16_greedy_in_llamacpp(tmp_path, embedded_dir):
    """The embedded SmolLM2 at f16: llama.cpp's greedy tokens are transformers' (128/128 with the reference converter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = gx.export_gguf(None, tmp_path / "smollm2.gguf", quant="f16", progress=False)
    top1 = gx.last_report["verification"]["top1"]
    assert top1["agreement"] >= 0.99 and top1["greedy_same"]
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt)["input_ids"]
    from cutegpt.export.verify import _hf_greedy

    want = _hf_greedy(model, ids, 32)
    with LlamaCpp(out) as cpp:
        got = cpp.greedy(ids, 32)
    assert got == want[: len(got)] and len(got) >= 8


def test_padded_embedding_rows(tmp_path):
    """Embedding rows past the vocabulary (vocab extend pads to a multiple of 64) become unused [PAD] tokens."""
    from tests.tiny import build_tiny_llama, build_tokenizer

    folder = tmp_path / "m"
    tok = build_tokenizer(folder, chat_template=False)
    rows = (len(tok) + 63) // 64 * 64 + 64
    build_tiny_llama(folder, vocab_size=rows)
    out = gx.export_gguf(str(folder), tmp_path / "m.gguf", quant="f16", progress=False)
    r = gguf.GGUFReader(out)
    assert r.fields["llama.vocab_size"].contents() == rows
    assert r.fields["tokenizer.ggml.tokens"].contents()[-1] == f"[PAD{rows - 1}]"
    assert r.fields["tokenizer.ggml.token_type"].contents()[-1] == int(gguf.TokenType.UNUSED)


def test_threads_reach_llamacpp_and_torch(bpe_dir, tmp_path, monkeypatch):
    """`export --threads 2`: the verification's llama.cpp runs on 2 threads and torch is set to 2."""
    from cutegpt.cli import main
    from cutegpt.export import verify

    seen = []
    real = verify.LlamaCpp.__init__

    def record(self, path, n_ctx=1024, threads=1):
        seen.append(threads)
        real(self, path, n_ctx, threads)

    monkeypatch.setattr(verify.LlamaCpp, "__init__", record)
    before = torch.get_num_threads()
    try:
        assert main(["export", "--format", "gguf", "--model", str(bpe_dir), "--out", str(tmp_path / "m.gguf"),
                     "--threads", "2", "--quiet"]) == 0
        assert seen == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _fields(path: Path, prefix: str) -> dict:
    return {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items() if k.startswith(prefix)}


def test_cutegpt_end_ends_generation_in_llamacpp_without_a_stop_string(tmp_path):
    """`<end>` (one token after training) is the file's end of generation: llama.cpp's own server ends the answer
    at it with no stop string in the request, as llama-cli and ollama (eos_token_ids) do; other tokens run on."""
    from tests.tiny import build_tiny_llama, build_tokenizer

    from cutegpt.templates import add_stop_token

    folder = tmp_path / "m"
    tok = build_tokenizer(folder, chat_template=False)
    add_stop_token(tok)
    tok.save_pretrained(folder)
    build_tiny_llama(folder, vocab_size=len(tok))
    out = gx.export_gguf(str(folder), tmp_path / "m.gguf", quant="f32", template="cutegpt", verify=False, progress=False)
    end = tok.convert_tokens_to_ids("<end>")
    assert end in _fields(out, "tokenizer.ggml.eos_token_ids")["tokenizer.ggml.eos_token_ids"]
    prompt = tok("问：hi\n答：\n", add_special_tokens=False)["input_ids"]
    with LlamaCpp(out) as cpp:
        for token, ends in ((end, True), (tok.convert_tokens_to_ids("hello"), False)):
            r = cpp._post("/completion", {"prompt": prompt, "n_predict": 4, "temperature": 0, "return_tokens": True,
                                          "logit_bias": [[token, 1000.0]]})
            assert r["tokens"] == ([token] if ends else [token] * 4), (token, r["tokens"])
            assert r["stop_type"] == ("eos" if ends else "limit")


def test_general_name_and_sampling_defaults(tmp_path, bpe_dir):
    """general.name is the run's (or --name); general.sampling.* are the settings chat resolves for the model, which
    every reader of the file (our llama.cpp backend, serve, ollama's Modelfile) gets back."""
    from cutegpt.generation import GenerationArgs, generation_config_defaults, resolve_generation
    from cutegpt.runtime.llamacpp import gguf_generation_defaults
    from cutegpt.templates import CUTEGPT_DEFAULTS

    run = tmp_path / "runs" / "zh-sft" / "final"
    shutil.copytree(bpe_dir, run)
    out = gx.export_gguf(str(run), tmp_path / "a.gguf", quant="f32", template="cutegpt", verify=False, progress=False)
    f = _fields(out, "general.")
    assert f["general.name"] == "zh-sft"
    assert f["general.sampling.temp"] == pytest.approx(CUTEGPT_DEFAULTS["temperature"])
    assert f["general.sampling.top_p"] == pytest.approx(CUTEGPT_DEFAULTS["top_p"])
    assert f["general.sampling.top_k"] == CUTEGPT_DEFAULTS["top_k"]
    assert f["general.sampling.penalty_repeat"] == pytest.approx(CUTEGPT_DEFAULTS["repetition_penalty"])
    assert f["general.sampling.sequence"] == "penalties;temperature;top_k;top_p" and f["general.sampling.min_p"] == 0.0
    assert f["general.sampling.penalty_last_n"] == -1  # the whole context, as transformers penalises
    want = {k: getattr(resolve_generation(GenerationArgs(), {}, "", "cutegpt")[0], k) for k in ("greedy", "temperature", "top_p", "top_k", "repetition_penalty")}
    assert {k: pytest.approx(v) for k, v in gguf_generation_defaults(out).items()} == want

    # the model's own generation_config.json wins over the template's defaults; greedy is temperature 0
    (run / "generation_config.json").write_text(json.dumps({"do_sample": False, "repetition_penalty": 1.3}))
    out = gx.export_gguf(str(run), tmp_path / "b.gguf", quant="f32", template="auto", verify=False, progress=False,
                         name="Tiny Chinese Chat")
    f = _fields(out, "general.")
    assert f["general.name"] == "Tiny Chinese Chat"
    assert f["general.sampling.temp"] == 0.0 and f["general.sampling.penalty_repeat"] == pytest.approx(1.3)
    resolved = resolve_generation(GenerationArgs(), generation_config_defaults(run), "", "auto")[0]
    assert gguf_generation_defaults(out) == {"greedy": True, "top_p": resolved.top_p, "top_k": resolved.top_k,
                                             "repetition_penalty": pytest.approx(resolved.repetition_penalty)}


def test_adapter_export_is_named_after_its_run(tmp_path, bpe_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(bpe_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    adapter = tmp_path / "runs" / "qa-lora" / "checkpoint-40"
    peft.save_pretrained(adapter)
    out = gx.export_gguf(str(bpe_dir), tmp_path / "m.gguf", lora=str(adapter), quant="f32", verify=False, progress=False)
    assert _fields(out, "general.name")["general.name"] == "qa-lora-checkpoint-40"  # not the merge's temporary folder


def test_name_flag_is_checked_before_anything_loads(tmp_path, capsys):
    from cutegpt.cli import main

    assert main(["export", "--lora", str(tmp_path / "x"), "--out", str(tmp_path / "y"), "--name", "n"]) == 1
    assert "--name applies to --format gguf only." in capsys.readouterr().err
    assert main(["export", "--format", "gguf", "--out", str(tmp_path / "y.gguf"), "--name", " "]) == 1
    assert "--name is empty" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_llamacpp_takes_the_sampling_defaults_from_the_file(tmp_path, bpe_dir):
    """llama.cpp's server (as llama-cli) starts from the file's general.sampling.*: the cutegpt template's settings and
    transformers' sampler order, instead of its own defaults (0.8 / 40 / 0.95, min_p 0.05, no penalty over 64 tokens)."""
    import urllib.request

    from cutegpt.templates import CUTEGPT_DEFAULTS

    out = gx.export_gguf(str(bpe_dir), tmp_path / "m.gguf", quant="f32", template="cutegpt", verify=False, progress=False)
    with LlamaCpp(out) as cpp:
        with urllib.request.urlopen(cpp.base + "/props", timeout=60) as r:
            params = json.loads(r.read())["default_generation_settings"]["params"]
    assert params["temperature"] == pytest.approx(CUTEGPT_DEFAULTS["temperature"])
    assert params["top_k"] == CUTEGPT_DEFAULTS["top_k"] and params["top_p"] == pytest.approx(CUTEGPT_DEFAULTS["top_p"])
    assert params["repeat_penalty"] == pytest.approx(CUTEGPT_DEFAULTS["repetition_penalty"]) and params["repeat_last_n"] == -1
    assert params["min_p"] == 0.0 and params["samplers"] == ["penalties", "temperature", "top_k", "top_p"]
