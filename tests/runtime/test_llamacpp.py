"""The llama.cpp runtime room: GGUF metadata, request mapping, token-level calls, start errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cutegpt.errors import CuteGPTError
from tests.tiny import build_tiny_llama, build_tokenizer

pytest.importorskip("xllamacpp")


@pytest.fixture(scope="module")
def parrot_gguf(tmp_path_factory):
    """A tiny random LLaMA (byte-level BPE) and its f32 GGUF."""
    from cutegpt.export.gguf import export_gguf

    folder = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(folder, chat_template=False)
    build_tiny_llama(folder, vocab_size=len(tok))
    path = export_gguf(str(folder), folder.parent / "tiny.gguf", quant="f32", verify=False, overwrite=True, progress=False)
    return folder, path


def test_gguf_metadata_reader_and_sampling_defaults(tmp_path):
    gguf = pytest.importorskip("gguf")
    from cutegpt.model.gguf_header import read_metadata
    from cutegpt.runtime.llamacpp import gguf_generation_defaults

    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("Tiny Parrot")
    w.add_context_length(512)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_float32("general.sampling.temp", 0.2)
    w.add_float32("general.sampling.top_p", 0.9)
    w.add_int32("general.sampling.top_k", 20)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = read_metadata(path)
    assert meta["general.name"] == "Tiny Parrot" and meta["llama.context_length"] == 512
    assert "tokenizer.ggml.tokens" not in meta  # arrays are skipped
    d = gguf_generation_defaults(path)
    assert d == {"temperature": pytest.approx(0.2), "top_p": pytest.approx(0.9), "top_k": 20, "greedy": False}
    w = gguf.GGUFWriter(str(tmp_path / "greedy.gguf"), "llama")
    w.add_float32("general.sampling.temp", 0.0)  # llama.cpp's greedy
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_generation_defaults(tmp_path / "greedy.gguf") == {"greedy": True}
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(CuteGPTError, match="not a GGUF file"):
        read_metadata(bad)


def _sampling(**kw):
    base = dict(max_new_tokens=8, greedy=False, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1,
                seed=5, ignore_eos=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_request_samples_in_transformers_order_and_greedy_is_top1():
    from cutegpt.runtime.llamacpp import request_for

    req = request_for([1, 2, 3], _sampling(), "<end>", n_ctx=512)
    assert req["prompt"] == [1, 2, 3] and req["max_tokens"] == 8 and req["stop"] == ["<end>"]
    assert req["samplers"] == ["penalties", "temperature", "top_k", "top_p"]
    assert (req["temperature"], req["top_k"], req["top_p"], req["seed"]) == (0.7, 40, 0.9, 5)
    assert req["repeat_last_n"] == 512 and req["min_p"] == 0.0
    greedy = request_for([1], _sampling(greedy=True, ignore_eos=True), "<end>", n_ctx=64)
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"]) == (0.0, 1, 1.0)
    assert "stop" not in greedy and greedy["ignore_eos"] is True  # benchmarks generate past every stop


def test_a_file_llamacpp_refuses_is_one_sentence_naming_it(tmp_path):
    from cutegpt.runtime.llamacpp import LlamaCpp

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(CuteGPTError, match=r"llama.cpp cannot load broken.gguf \("):
        LlamaCpp(bad)


def test_token_level_calls_agree_with_transformers(parrot_gguf):
    """tokenize, next-token log-probabilities and greedy continuation of a tiny f32 GGUF against transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cutegpt.runtime.llamacpp import LlamaCpp

    folder, gguf_path = parrot_gguf
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = "hello world, the quick brown fox 你好"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    checked = 0
    with LlamaCpp(gguf_path, n_ctx=256) as cpp:
        assert cpp.tokenize(text) == ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for n in range(1, len(ids) + 1):
            top = cpp.next_logprobs(ids[:n], k=3)
            if top is None:  # llama.cpp withholds a token that is an incomplete UTF-8 character
                continue
            checked += 1
            assert top[0][0] == int(logp[n - 1].argmax())
            for tid, lp in top:
                assert lp == pytest.approx(float(logp[n - 1, tid]), abs=1e-2)  # llama.cpp keeps the KV cache in f16
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
        got = cpp.greedy(ids, 4)
        assert got and got == ref[: len(got)]
    assert checked >= len(ids) // 2
