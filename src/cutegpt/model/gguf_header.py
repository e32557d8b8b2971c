"""The header of a GGUF file (key/values with their types, tensor names, shapes, types and offsets), read fast.

gguf.GGUFReader makes a numpy view of every element of every array (150,000 for SmolLM2's tokens, types
and merges): 4-13 s here. This reader needs a fraction of a second, and nothing but the standard library.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cutegpt.errors import CuteGPTError


@dataclass
class Header:
    """What a GGUF file holds besides its tensor bytes: key/values with their types, and where each tensor lies."""

    fields: list[tuple[str, int, int | None, Any]]     # key, value type, element type of an array, value
    tensors: list[tuple[str, tuple[int, ...], int, int]]  # name, shape (outermost first), ggml type, byte offset
    data_start: int


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_header(src: Path, arrays: bool = True) -> Header:
    """Parse the header of `src` in a fraction of a second (`arrays=False`: arrays are skipped and read as None).

    gguf.GGUFReader makes a numpy view of every element of every array (150,000 for SmolLM2's
    tokens, types and merges): 4-13 s here, longer than the rest of the conversion.
    """
    try:
        with open(src, "rb") as f:
            def read(fmt: str) -> Any:
                size = struct.calcsize(fmt)
                data = f.read(size)
                if len(data) != size:
                    raise ValueError("the header is truncated")
                return struct.unpack(fmt, data)[0]

            def string() -> str:
                return f.read(read("<Q")).decode("utf-8")

            def value(vtype: int) -> Any:
                if vtype in _SCALARS:
                    return read(_SCALARS[vtype])
                if vtype == _STRING:
                    return string()
                if vtype == _ARRAY:
                    item, n = read("<I"), read("<Q")
                    if not arrays and item in _SCALARS:
                        f.seek(n * struct.calcsize(_SCALARS[item]), 1)
                        return None
                    if not arrays and item == _STRING:  # skipped, not decoded: a 49k-token vocabulary
                        for _ in range(n):
                            f.seek(read("<Q"), 1)
                        return None
                    if not arrays:
                        for _ in range(n):
                            value(item)
                        return None
                    if item in _SCALARS:  # one read for the whole array
                        fmt = _SCALARS[item]
                        return list(struct.unpack(f"<{n}{fmt[1]}", f.read(n * struct.calcsize(fmt))))
                    return [value(item) for _ in range(n)]
                raise ValueError(f"unknown value type {vtype}")

            if f.read(4) != b"GGUF":
                raise CuteGPTError(f"{src} is not a GGUF file (it does not start with the GGUF magic bytes).")
            version = read("<I")
            if version < 2:
                raise CuteGPTError(f"{src}: GGUF version {version} is too old for llama.cpp; export it again.")
            n_tensors, n_kv = read("<Q"), read("<Q")
            fields: list[tuple[str, int, int | None, Any]] = []
            for _ in range(n_kv):
                key, vtype = string(), read("<I")
                pos = f.tell()
                sub = read("<I") if vtype == _ARRAY else None
                f.seek(pos)
                fields.append((key, vtype, sub, value(vtype)))
            tensors = []
            for _ in range(n_tensors):
                name = string()
                dims = [read("<Q") for _ in range(read("<I"))]
                tensors.append((name, tuple(reversed(dims)), read("<I"), read("<Q")))  # GGUF lists dims innermost first
            align = next((v for k, _t, _s, v in fields if k == "general.alignment"), 32)
            data_start = -(-f.tell() // align) * align
    except (ValueError, UnicodeDecodeError, struct.error, OverflowError, MemoryError) as e:
        raise CuteGPTError(f"{src}: cannot read this GGUF file ({e}).") from None
    except OSError as e:
        from cutegpt.io import describe_os_error

        raise CuteGPTError(describe_os_error(e, src, "reading")) from None
    return Header(fields, tensors, data_start)


def read_metadata(path: Path, wanted: Callable[[str], bool] = lambda k: True) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF header whose key `wanted` accepts (arrays are skipped)."""
    return {k: v for k, _t, _s, v in read_header(path, arrays=False).fields if v is not None and wanted(k)}


def header_value(path: Path, key: str) -> Any:
    """One scalar or string value of a GGUF header (None when absent); CuteGPTError for an unreadable file."""
    return next((v for k, _t, _s, v in read_header(path, arrays=False).fields if k == key), None)
