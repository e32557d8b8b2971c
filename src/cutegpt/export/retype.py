"""A GGUF file rewritten at another tensor type, straight from GGUF to GGUF (no HF folder, no torch).

    retype_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), Path("smollm2.f16.gguf"), quant="f16")

The embedded model ships as Q4_1; chat runs it as F16 (it agrees with the float
model on more top-1 tokens). The route through transformers (dequantize into a
float32 HF folder, then export that folder) cost a 517 MB folder and most of a
minute; here the `gguf` package dequantizes each tensor and casts it, one tensor
in memory at a time. The tensors stay in llama.cpp's layout, so no q/k permutation
is undone and redone; every key/value is copied as it is (tokenizer, merges, chat
template, pre-tokenizer name), only `general.file_type` changes. The tensor bytes
equal what `export_gguf` writes from the transformers-converted folder
(tests/export/test_retype.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from cutegpt.errors import CuteGPTError
from cutegpt.model.gguf_header import Header, read_header

# keys the writer sets itself (the tensor layout is its own) or that describe the old tensor types
_REWRITTEN = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def retype_gguf(src: Path, out: Path, quant: str = "f16", verify: bool = True) -> Path:
    """Write the GGUF file `src` at `quant` to `out` (atomically: a temporary file renamed when complete).

    `verify`: before the rename, llama.cpp must tokenize the probe corpus id for id as the HF tokenizer
    converted from the new file does, and render its chat template as transformers does (export's
    checks (a) and (c)); that tokenizer is then cached for the file, so the first chat does not convert it again.
    """
    from cutegpt.export.gguf import QUANTS, _file_type, _tensor_qtype, published
    from cutegpt.io import clean_leftovers, os_errors

    if quant not in QUANTS:
        raise CuteGPTError(f"unknown quant '{quant}'; choose one of: {', '.join(QUANTS)}.")
    header = read_header(src)
    with os_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out.parent)
    with published(out) as tmp:
        _write(src, header, tmp, quant, _file_type(quant), _tensor_qtype)
        tokenizer = _verified_tokenizer(tmp) if verify else None
    if tokenizer is not None:
        from cutegpt.runtime.llamacpp import remember_gguf_tokenizer

        remember_gguf_tokenizer(out, tokenizer)  # os.replace kept the file's mtime, part of the cache key
    return out


def _verified_tokenizer(path: Path) -> Any:
    from cutegpt.export.verify import verify_tokenizer
    from cutegpt.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    verify_tokenizer(path, tokenizer, "auto")
    return tokenizer


def _write(src: Path, header: Header, path: Path, quant: str, file_type: Any, tensor_qtype: Any) -> None:
    import gguf

    arch = next(v for k, _t, _s, v in header.fields if k == "general.architecture")
    writer = gguf.GGUFWriter(str(path), arch)
    for key, vtype, sub, value in header.fields:
        if key not in _REWRITTEN:
            writer.add_key_value(key, value, gguf.GGUFValueType(vtype),
                                 sub_type=gguf.GGUFValueType(sub) if sub is not None else None)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    plan = []
    for name, shape, src_type, offset in header.tensors:
        qtype = tensor_qtype(name, shape, quant)
        plan.append((shape, gguf.GGMLQuantizationType(src_type), header.data_start + offset, qtype))
        writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    mapped = np.memmap(src, mode="r", dtype=np.uint8)
    if any(start + _nbytes(shape, t) > len(mapped) for shape, t, start, _q in plan):
        raise CuteGPTError(f"{src}: the file is truncated (its tensors end past its last byte).")
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for shape, src_type, start, qtype in plan:
            raw = mapped[start:start + _nbytes(shape, src_type)]
            writer.write_tensor_data(_cast(raw, shape, src_type, qtype))
        writer.close()
    finally:
        with contextlib.suppress(Exception):
            for f in writer.fout or []:
                f.close()


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype), dtype=np.int64))


def _cast(raw: np.ndarray, shape: tuple[int, ...], src_type: Any, qtype: Any) -> np.ndarray:
    """One tensor, dequantized to float32 by gguf (as transformers does) and cast or quantized to `qtype`."""
    import gguf

    if src_type == qtype:
        return np.array(raw).reshape(gguf.quant_shape_to_byte_shape(shape, qtype))
    raw = raw.reshape(gguf.quant_shape_to_byte_shape(shape, src_type))
    if src_type == gguf.GGMLQuantizationType.F32:
        values = raw.view(np.float32)
    elif src_type == gguf.GGMLQuantizationType.F16:
        values = raw.view(np.float16).astype(np.float32)
    else:
        values = gguf.quants.dequantize(raw, src_type)
    values = values.reshape(shape)
    if qtype == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32, copy=False)
    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)  # round-to-nearest-even, as torch's cast in export_gguf
    return gguf.quants.quantize(values.astype(np.float32, copy=False), qtype)

