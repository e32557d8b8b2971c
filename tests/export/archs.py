"""Tiny random models of every architecture GGUF export supports, each with a tokenizer of its own family.

    llama3-bpe-gqa     Llama-3.x: byte-level BPE with Llama-3's split rule (ignore_merges, BOS added), llama3 rope scaling
    mistral-sp-gqa     Mistral: SentencePiece tokenizer.model (byte fallback), sliding window below the context
    qwen2-bpe-tied     Qwen2/2.5: byte-level BPE with Qwen2's split rule, attention biases, tied embeddings
    qwen3-bpe-mha      Qwen3: q/k norms, head_dim 16 != hidden / heads, multi-head attention, untied
    gemma2-sp-tied     Gemma 2: SentencePiece without dummy prefix, norm offset, soft-capping, alternating sliding window
"""

from __future__ import annotations

from pathlib import Path

from tests.tiny import (
    CHATML, LLAMA3_SPLIT, LLAMA3_TEMPLATE, MISTRAL_TEMPLATE, QWEN2_SPLIT, build_bpe_tokenizer, build_gemma_tokenizer,
    build_sp_tokenizer, build_tiny_model,
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _qwen_tokenizer(out: Path):
    return build_bpe_tokenizer(out, QWEN2_SPLIT, QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                               chat_template=CHATML)


def _llama3_tokenizer(out: Path):
    return build_bpe_tokenizer(out, LLAMA3_SPLIT, LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>",
                               pad="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE, add_bos=True, ignore_merges=True)


def _mistral_tokenizer(out: Path):
    tok = build_sp_tokenizer(out)
    tok.chat_template = MISTRAL_TEMPLATE
    tok.save_pretrained(out)
    return tok


ARCH_VARIANTS = {
    "llama3-bpe-gqa": dict(arch="llama", tokenizer=_llama3_tokenizer, heads=4, kv_heads=2, tie=False,
                           rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 64, "rope_theta": 500000.0}),
    "mistral-sp-gqa": dict(arch="mistral", tokenizer=_mistral_tokenizer, heads=4, kv_heads=2, tie=False, sliding_window=256),
    "qwen2-bpe-tied": dict(arch="qwen2", tokenizer=_qwen_tokenizer, heads=4, kv_heads=2, tie=True),
    "qwen3-bpe-mha": dict(arch="qwen3", tokenizer=_qwen_tokenizer, heads=4, kv_heads=4, tie=False, head_dim=16),
    "gemma2-sp-tied": dict(arch="gemma2", tokenizer=build_gemma_tokenizer, heads=4, kv_heads=2, tie=True, head_dim=8,
                           query_pre_attn_scalar=8),
}


def build_arch_variant(out: Path, name: str) -> Path:
    spec = dict(ARCH_VARIANTS[name])
    tok = spec.pop("tokenizer")(out)
    build_tiny_model(out, vocab_size=len(tok), seed=len(name), **spec)
    return out
