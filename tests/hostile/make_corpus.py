"""Write the hostile-input corpus (issue 11): nothing binary is committed, everything is made here at test time.

    python -m tests.hostile.make_corpus OUT_FOLDER      # writes the files and prints what it made

Families:
  pickles    every opcode family that can reach code or objects (GLOBAL, STACK_GLOBAL, REDUCE, INST, OBJ,
             NEWOBJ, NEWOBJ_EX, BUILD, EXT1/2/4, PERSID/BINPERSID) in protocols 0-5, each payload trying to
             create CANARY; disguised as .pkl, .json, .jsonl, .bin, .pt, .txt
  json       100k-deep nesting (arrays and objects), lone surrogates, >4300-digit integers, non-UTF-8 bytes,
             scalar first lines, JSON Lines named .json, an over-long record
  weights    model folders whose pytorch_model.bin / adapter_model.bin / optimizer.pt is a hostile pickle,
             a config.json with hidden_size "big", an adapter_config.json that is a list
A payload that ran would create CANARY; tests assert it never exists.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from pathlib import Path

DISGUISES = (".pkl", ".json", ".jsonl", ".bin", ".pt", ".txt")


def _str0(s: str) -> bytes:
    return b"S'" + s.replace("\\", "\\\\").replace("'", "\\'").encode() + b"'\n"


def _unicode(s: str, protocol: int) -> bytes:
    data = s.encode("utf-8")
    if protocol < 1:
        return b"V" + s.encode("raw_unicode_escape") + b"\n"
    return b"X" + struct.pack("<I", len(data)) + data


def _global(module: str, name: str, protocol: int) -> bytes:
    if protocol >= 4:
        return _unicode(module, protocol) + _unicode(name, protocol) + b"\x93"  # STACK_GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def _proto(protocol: int) -> bytes:
    return b"\x80" + bytes([protocol]) if protocol >= 2 else b""


def payloads(canary: Path) -> dict[str, dict[int, bytes]]:
    """name -> protocol -> pickle bytes; each would create `canary` if loaded by a plain unpickler."""
    cmd = f"touch {canary}"
    code = f"open({str(canary)!r}, 'w').write('ran')"
    out: dict[str, dict[int, bytes]] = {}
    for p in range(6):
        pr = _proto(p)
        s = (lambda t: _unicode(t, p)) if p >= 1 else _str0
        tup1 = b"\x85" if p >= 2 else b""  # TUPLE1 (protocol 2+), else MARK ... TUPLE
        mark_tuple = (lambda x: b"(" + x + b"t")
        args = (s(cmd) + tup1) if p >= 2 else mark_tuple(s(cmd))
        exec_args = (s(code) + tup1) if p >= 2 else mark_tuple(s(code))
        out.setdefault("global_reduce_os_system", {})[p] = pr + _global("os", "system", p) + args + b"R."
        out.setdefault("global_reduce_posix_system", {})[p] = pr + _global("posix", "system", p) + args + b"R."
        out.setdefault("global_reduce_exec", {})[p] = pr + _global("builtins", "exec", p) + exec_args + b"R."
        out.setdefault("global_reduce_eval_py2name", {})[p] = pr + _global("__builtin__", "eval", p) + exec_args + b"R."
        out.setdefault("inst", {})[p] = pr + b"(" + s(cmd) + b"ios\nsystem\n."  # INST: import + call
        out.setdefault("obj", {})[p] = pr + b"(" + _global("os", "system", p) + s(cmd) + b"o."  # OBJ
        out.setdefault("newobj", {})[p] = pr + _global("subprocess", "Popen", p) + b"(" + b"(" + s("touch") + s(str(canary)) + b"l" + b"t" + b"\x81."
        out.setdefault("newobj_ex", {})[p] = (pr + _global("subprocess", "Popen", p) + b"(" + b"(" + s("touch") + s(str(canary)) + b"l" + b"t"
                                              + b"}" + b"\x92.")
        # BUILD: a plain dict whose state names __setstate__ tricks; then a global whose state is set
        out.setdefault("build_on_global", {})[p] = pr + _global("builtins", "object", p) + b")R" + b"}" + s("x") + s(cmd) + b"sb."
        out.setdefault("build_on_list", {})[p] = pr + b"]" + b"}" + s("__class__") + s("os.system") + b"sb."
        out.setdefault("ext1", {})[p] = pr + b"\x82\x01."  # EXT1: the extension registry
        out.setdefault("ext2", {})[p] = pr + b"\x83\x01\x00."
        out.setdefault("ext4", {})[p] = pr + b"\x84\x01\x00\x00\x00."
        out.setdefault("persid", {})[p] = pr + b"P" + cmd.encode() + b"\n."
        out.setdefault("binpersid", {})[p] = pr + s(cmd) + b"Q."
        # the reduce hidden inside a valid-looking record list
        inner = _global("os", "system", p) + args + b"R"
        out.setdefault("reduce_inside_records", {})[p] = (pr + b"(" + b"(" + b"d" + s("instruction") + inner + s("output") + s("x") + b"s" + b"l" + b"l.")
        out.setdefault("memo_get_unset", {})[p] = pr + b"g7\n."
        out.setdefault("truncated", {})[p] = pr + _global("os", "system", p)[:5]
    return out


def write_pickles(folder: Path, canary: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name, by_proto in payloads(canary).items():
        for p, data in by_proto.items():
            for ext in DISGUISES:
                path = folder / f"{name}-p{p}{ext}"
                path.write_bytes(data)
                made.append(path)
    return made


GOOD = {"instruction": "中国的首都是哪里？", "output": "北京。"}


def json_cases() -> dict[str, bytes]:
    good = json.dumps(GOOD, ensure_ascii=False).encode()
    return {
        "deep_array.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n" + good + b"\n",
        "deep_object.jsonl": b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n" + good + b"\n",
        "deep_array.json": b"[" * 100_000 + b"]" * 100_000,
        "surrogate.jsonl": b'{"instruction": "\\ud800", "output": "x"}\n' + good + b"\n",
        "surrogate_text.jsonl": b'{"text": "\\ud800 \xe4\xb8\xad"}\n',
        "huge_int.jsonl": b'{"instruction": "q", "output": "a", "n": ' + b"9" * 5000 + b"}\n" + good + b"\n",
        "huge_int_text.jsonl": b'{"text": "x", "n": ' + b"9" * 5000 + b"}\n",
        "not_utf8.jsonl": b'{"instruction": "\xff\xfe", "output": "x"}\n' + good + b"\n",
        "scalar_first.json": b"42\n" + good + b"\n",
        "lines_named.json": good + b"\n" + good + b"\n",
        "long_record.jsonl": b'{"instruction": "' + b"x" * 300_000 + b'", "output": "y"}\n' + good + b"\n",
    }


def write_json_cases(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, data in json_cases().items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    return out


def write_weight_folders(folder: Path, model_dir: Path, canary: Path) -> dict[str, Path]:
    """Model/adapter folders carrying a hostile pickle where weights (or optimizer state) belong."""
    import shutil

    bad = payloads(canary)["global_reduce_os_system"][2]
    out: dict[str, Path] = {}
    m = folder / "model-bin"
    shutil.copytree(model_dir, m)
    for f in m.glob("*.safetensors*"):
        f.unlink()
    (m / "pytorch_model.bin").write_bytes(bad)
    out["model_bin"] = m
    a = folder / "adapter-bin"
    a.mkdir(parents=True)
    (a / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": str(model_dir)}))
    (a / "adapter_model.bin").write_bytes(bad)
    out["adapter_bin"] = a
    big = folder / "config-big"
    shutil.copytree(model_dir, big)
    cfg = json.loads((big / "config.json").read_text())
    cfg["hidden_size"] = "big"
    (big / "config.json").write_text(json.dumps(cfg))
    out["config_big"] = big
    lst = folder / "adapter-list"
    lst.mkdir()
    (lst / "adapter_config.json").write_text("[]")
    out["adapter_list"] = lst
    pt = folder / "optimizer.pt"
    pt.write_bytes(bad)
    out["optimizer_pt"] = pt
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    root = Path(argv[0])
    canary = root / "CANARY"
    n = len(write_pickles(root / "pickles", canary))
    j = write_json_cases(root / "json")
    print(f"{n} pickles, {len(j)} JSON cases in {root}; canary {canary} (must never exist)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
