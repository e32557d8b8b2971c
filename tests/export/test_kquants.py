"""K-quants through llama.cpp's own quantizer (ggml_quantize_chunk in the xllamacpp wheel).

References: gguf-py's numpy quantizer for the legacy types (the same bytes must come out of both, which
proves the C call), gguf-py's independent K-quant dequantizer for the K types, llama.cpp's mixture rules
computed by hand, and llama.cpp loading the exported file and agreeing with transformers (verification).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")
Q = gguf.GGMLQuantizationType


def test_llama_cpps_quantizer_gives_gguf_py_bytes_for_legacy_types_and_sane_k_blocks():
    from cutegpt.export.kquants import quantize

    x = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    for qtype in (Q.Q8_0, Q.Q5_0, Q.Q4_0):
        assert np.array_equal(quantize(x, qtype), gguf.quants.quantize(x, qtype))
    errors = {}
    for qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        blocks = quantize(x, qtype)
        assert blocks.shape == tuple(gguf.quant_shape_to_byte_shape(x.shape, qtype))
        back = gguf.quants.dequantize(blocks, qtype)
        errors[qtype] = float(np.sqrt(((back - x) ** 2).mean() / (x ** 2).mean()))
    # relative RMS error of 4, 5 and 6 bits on Gaussian values (a wrong layout gives ~1 or more)
    assert errors[Q.Q6_K] < errors[Q.Q5_K] < errors[Q.Q4_K] < 0.1 and errors[Q.Q6_K] < 0.03


def test_mixtures_follow_llama_cpps_rules():
    from cutegpt.export.kquants import tensor_type, use_more_bits

    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]  # i < n/8, i >= 7n/8, (i - n/8) % 3 == 2
    row = (4096, 4096)
    t = lambda name, quant, has_output=True, shape=row: tensor_type(name, shape, quant, 8, has_output)  # noqa: E731
    assert t("output.weight", "q4_k_m") == Q.Q6_K and t("token_embd.weight", "q4_k_m") == Q.Q4_K
    assert t("token_embd.weight", "q4_k_m", has_output=False) == Q.Q6_K  # tied: the embedding is the head
    assert [t(f"blk.{i}.attn_v.weight", "q4_k_m") for i in (0, 1, 3)] == [Q.Q6_K, Q.Q4_K, Q.Q6_K]
    assert [t(f"blk.{i}.ffn_down.weight", "q5_k_m") for i in (2, 7)] == [Q.Q5_K, Q.Q6_K]
    assert t("blk.0.attn_q.weight", "q4_k_m") == Q.Q4_K and t("blk.0.attn_v.weight", "q6_k") == Q.Q6_K
    # rows that are not whole super-blocks of 256: llama.cpp's fallbacks
    assert [t("blk.1.attn_q.weight", q, shape=(64, 96)) for q in ("q4_k_m", "q5_k_m", "q6_k")] == [Q.Q5_0, Q.Q5_1, Q.Q8_0]


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A LLaMA whose rows are whole K-quant super-blocks (hidden 256), 8 layers for the _M mixture."""
    from tests.tiny import build_tiny_model, build_tokenizer

    out = tmp_path_factory.mktemp("wide-llama")
    tok = build_tokenizer(out, chat_template=False)
    model = build_tiny_model(out, "llama", len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=8)
    import torch

    with torch.no_grad():  # small weights: a 256-wide random model stays in a range where 4 bits keep the top token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.06)
    model.save_pretrained(out)
    return out


@pytest.mark.slow  # a 256-wide, 8-layer model (the smallest with whole super-blocks and an _M layer pattern), two exports
def test_k_quant_exports_load_in_llama_cpp_with_llama_cpps_mixture(wide_llama, tmp_path):
    """q6_k passes the export's own check against transformers (top-1 >= 70%; measured 82% here, and q4_k_m 43% where
    the legacy q4_0 gets 42%: a random model quantizes badly); q4_k_m has llama.cpp's per-tensor types and loads."""
    from cutegpt.cli import main
    from cutegpt.export import gguf as gguf_export
    from cutegpt.runtime.llamacpp import LlamaCpp

    q6 = tmp_path / "m-q6_k.gguf"
    assert main(["export", "--format", "gguf", "--model", str(wide_llama), "--out", str(q6), "--quant", "q6_k",
                 "--quiet", "--threads", "1"]) == 0
    assert gguf_export.last_report["verification"]["top1"]["ok"]
    assert {Q(t.tensor_type) for t in gguf.GGUFReader(str(q6)).tensors} == {Q.Q6_K, Q.F32}

    out = tmp_path / "m-q4_k_m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(wide_llama), "--out", str(out), "--quant", "q4_k_m",
                 "--quiet", "--no-verify"]) == 0
    reader = gguf.GGUFReader(str(out))
    types = {t.name: Q(t.tensor_type) for t in reader.tensors}
    assert int(reader.fields["general.file_type"].contents()) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(8)] == [Q.Q6_K if i in (0, 3, 6, 7) else Q.Q4_K for i in range(8)]
    assert types["blk.2.attn_q.weight"] == Q.Q4_K and types["blk.2.attn_norm.weight"] == Q.F32
    with LlamaCpp(out, n_ctx=64) as cpp:
        assert len(cpp.greedy([5, 17, 42], 4)) >= 1
