"""K-quants (Q4_K_M, Q5_K_M, Q6_K) with llama.cpp's own quantizer, the one inside the xllamacpp wheel.

The `gguf` package quantizes only the legacy types in numpy (it raises NotImplementedError for K-quants),
and xllamacpp has no Python quantize call; but its extension module carries all of ggml and exports
ggml's C entry point `ggml_quantize_chunk` (the function `llama-quantize` calls per tensor). We call it
through ctypes, so the blocks are llama.cpp's bit for bit, and pick each tensor's type with
llama.cpp's rules for these mixtures (llama_tensor_get_type in llama-quant.cpp):

    q4_k_m   Q4_K; Q6_K for the output head (the embedding when it is tied) and for attn_v / ffn_down
             of the layers `use_more_bits` picks (first and last eighth, every third between)
    q5_k_m   the same with Q5_K
    q6_k     Q6_K everywhere
    rows that are not a multiple of 256 values fall back as llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0; 1-D tensors stay F32 (export/gguf.py)

Without xllamacpp the command says so in one sentence; docs/export.md gives the `llama-quantize` line.
"""

from __future__ import annotations

import ctypes
import re
from functools import lru_cache
from typing import Any

import numpy as np

from cutegpt.errors import CuteGPTError

K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
QK_K = 256  # values per K-quant super-block
_LAYER = re.compile(r"^blk\.(\d+)\.")


def _types() -> dict[str, Any]:
    import gguf

    Q = gguf.GGMLQuantizationType
    return {"q4_k_m": Q.Q4_K, "q5_k_m": Q.Q5_K, "q6_k": Q.Q6_K}


def file_type(quant: str) -> Any:
    import gguf

    return {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
            "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K}[quant]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that keep more bits in the _M mixtures."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layer: int, has_output: bool) -> Any:
    """The GGML type of one 2-D tensor in the `quant` mixture."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = _types()[quant]
    layer = _LAYER.match(name)
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        qtype = Q.Q6_K
    elif quant != "q6_k" and layer and (".attn_v." in name or ".ffn_down." in name) and use_more_bits(int(layer.group(1)), n_layer):
        qtype = Q.Q6_K
    if shape[-1] % QK_K:
        qtype = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}[qtype]
    return qtype


@lru_cache(maxsize=1)
def _ggml() -> Any:
    """ggml's quantizer from the xllamacpp extension module (a C symbol it exports)."""
    import importlib

    from cutegpt.runtime.native import import_xllamacpp

    try:
        import_xllamacpp()  # the native build when there is one (its quantizer is the same code)
        ext = importlib.import_module("xllamacpp.xllamacpp")
    except ImportError:
        raise CuteGPTError("--quant q4_k_m, q5_k_m and q6_k use llama.cpp's quantizer from the xllamacpp package: run "
                           "`pip install xllamacpp`, or export f16 and run llama.cpp's llama-quantize (docs/export.md).") from None
    try:
        fn = ctypes.CDLL(ext.__file__).ggml_quantize_chunk
    except (OSError, AttributeError):
        raise CuteGPTError("this xllamacpp build does not export llama.cpp's quantizer (ggml_quantize_chunk); export f16 "
                           "and run llama.cpp's llama-quantize (docs/export.md).") from None
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return fn


def available() -> None:
    """Raise the one-sentence error now (before any model loads) when the quantizer is missing."""
    _ggml()


def quantize(rows: np.ndarray, qtype: Any) -> np.ndarray:
    """float32 rows (n, k) -> GGUF bytes (n, bytes per row), by ggml_quantize_chunk (no importance matrix)."""
    import gguf

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, k = rows.shape
    out = np.empty(gguf.quant_shape_to_byte_shape((n, k), qtype), dtype=np.uint8)
    written = _ggml()(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n, k, None)
    if written != out.nbytes:
        raise CuteGPTError(f"llama.cpp's quantizer wrote {written} bytes for a {n}x{k} {qtype.name} tensor, not {out.nbytes}.")
    return out
