"""Issue 11 for the data commands: nothing typed destroys data, every bad record is one sentence (or skipped and counted)."""

import errno
import hashlib
import json
import os
import pickle
import tracemalloc
from pathlib import Path

import pytest

from cutegpt.cli import main
from cutegpt.data.convert import ConvertConfig, convert
from cutegpt.data.manifest import check_tokenizer, read_manifest
from cutegpt.data.readers import Source, Sources, parse_record, sniff_container, source_files
from cutegpt.errors import CuteGPTError
from tests.data.conftest import CONVERSATIONS

GOOD = {"instruction": "中国的首都是哪里？", "output": "北京。"}


def tree(folder: Path) -> dict[str, str]:
    """Path -> sha256 of every file (and folder) under `folder`, hidden ones included."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def lines(path: Path, records, raw: bytes = b"") -> Path:
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records) + raw)
    return path


def run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def one_sentence(err: str) -> None:
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err and "unexpected" not in err, err


# ---------------------------------------------------------------- several sources, weights (item 7)


def test_several_files_and_folders_with_weights_recorded(tmp_path, tiny_model_dir):
    a = tmp_path / "a.pkl"
    a.write_bytes(pickle.dumps(CONVERSATIONS[:4]))
    folder = tmp_path / "more"
    folder.mkdir()
    lines(folder / "b.jsonl", CONVERSATIONS[4:])
    lines(folder / "c.json", [GOOD, GOOD])  # JSON Lines although named .json
    (folder / "notes.txt").write_text("not data")  # ignored: not a data suffix
    out = convert(ConvertConfig(input=[f"{a}:2", str(folder)], out=str(tmp_path / "ds"), model=str(tiny_model_dir), max_length=64))
    m = read_manifest(out)
    by_name = {Path(s["path"]).name: s for s in m["sources"]}
    assert set(by_name) == {"a.pkl", "b.jsonl", "c.json"}
    assert by_name["a.pkl"]["weight"] == 2 and by_name["a.pkl"]["used"] == 8 and by_name["a.pkl"]["conversations"] == 4
    assert by_name["b.jsonl"]["used"] == len(CONVERSATIONS) - 4 and by_name["c.json"]["container"] == "jsonl"
    assert m["counts"]["conversations"] == len(CONVERSATIONS) + 2
    assert m["counts"]["conversations_used"] == 8 + len(CONVERSATIONS) - 4 + 2


def test_fractional_weight_takes_a_seeded_share(tmp_path):
    p = lines(tmp_path / "x.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)])
    a, b = Sources([f"{p}:0.5"], seed=3), Sources([f"{p}:0.5"], seed=3)
    assert len(a) == 5 and [a[i] for i in range(5)] == [b[i] for i in range(5)]
    with pytest.raises(CuteGPTError, match="weight after ':' must be a positive number"):
        Sources([f"{p}:0"])
    with pytest.raises(CuteGPTError, match="does not exist"):
        Sources([str(tmp_path / "missing.jsonl:2")])


def test_dataset_folders_and_empty_folders_are_named(tmp_path):
    ds = tmp_path / "dir1"
    ds.mkdir()
    (ds / "manifest.json").write_text("{}")
    empty = tmp_path / "dir2"
    empty.mkdir()
    with pytest.raises(CuteGPTError, match=r"--data .*dir1 is a converted dataset folder"):
        source_files([str(ds), str(empty)], flag="--data")
    with pytest.raises(CuteGPTError, match=r"--data .*dir2 is a folder without \.pkl"):
        source_files([str(empty)], flag="--data")


def test_cli_several_inputs_need_out(tmp_path, ift_jsonl, ift_pkl, tiny_model_dir, capsys):
    before = tree(tmp_path)
    code, err = run(["data", "convert", str(ift_jsonl), str(ift_pkl), "--model", str(tiny_model_dir)], capsys)
    assert code == 1 and "--out is required" in err
    one_sentence(err)
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- outputs never touch inputs (item 1)


@pytest.mark.parametrize("where", ["is", "contains", "inside"])
def test_out_never_destroys_an_input(tmp_path, tiny_model_dir, capsys, where):
    data = tmp_path / "in"
    data.mkdir()
    src = lines(data / "in.jsonl", CONVERSATIONS)
    (data / "sibling.txt").write_text("keep me")
    out = {"is": src, "contains": data, "inside": data / "sub"}[where]
    given = str(data) if where == "inside" else str(src)
    before = tree(tmp_path)
    code, err = run(["data", "convert", given, "--out", str(out), "--overwrite", "--model", str(tiny_model_dir)], capsys)
    assert code == 1 and "--out" in err, err
    one_sentence(err)
    assert tree(tmp_path) == before


def test_out_cannot_be_the_model_folder(tmp_path, ift_jsonl, tiny_model_dir, capsys):
    before = tree(tiny_model_dir)
    code, err = run(["data", "convert", str(ift_jsonl), "--out", str(tiny_model_dir), "--overwrite", "--model", str(tiny_model_dir)], capsys)
    assert code == 1 and "--out" in err
    assert tree(tiny_model_dir) == before


def test_overwrite_replaces_only_when_complete(tmp_path, ift_jsonl, tiny_model_dir, capsys, monkeypatch):
    out = tmp_path / "ds"
    assert main(["data", "convert", str(ift_jsonl), "--out", str(out), "--model", str(tiny_model_dir), "--max-length", "64"]) == 0
    before = tree(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cutegpt.data.convert._save_dataset", full)
    code, err = run(["data", "convert", str(ift_jsonl), "--out", str(out), "--overwrite", "--model", str(tiny_model_dir)], capsys)
    assert code == 1 and "disk is full" in err and str(out) in err
    one_sentence(err)
    assert tree(tmp_path) == before  # old dataset intact, no temporary leftovers


def test_read_only_output_is_one_sentence(tmp_path, ift_jsonl, tiny_model_dir, capsys, monkeypatch):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("cutegpt.data.convert.write_rows", read_only)
    before = tree(tmp_path)
    code, err = run(["data", "convert", str(ift_jsonl), "--out", str(tmp_path / "ds"), "--model", str(tiny_model_dir)], capsys)
    assert code == 1 and "read-only" in err
    one_sentence(err)
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- records that escape (items 8, 12, 13)


def test_a_long_line_is_never_read_whole(tmp_path):
    limit = 100_000
    p = tmp_path / "big.jsonl"
    with open(p, "wb") as f:
        f.write(json.dumps(GOOD).encode() + b"\n")
        f.write(b'{"instruction": "' + b"x" * (30 * limit) + b'", "output": "y"}\n')
        f.write(json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(CuteGPTError, match=r"line 2 is 3,000,0\d\d bytes, more than --max-record-bytes"):
        Source(p, max_record_bytes=limit)
    tracemalloc.start()
    src = Source(p, skip_invalid=True, max_record_bytes=limit)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * limit, peak  # the 3 MB line was skipped in pieces, never held
    assert len(src) == 2 and src.read == 3 and len(src.skipped) == 1
    assert src.label(1) == "line 3" and src[1].turns[0].output == "北京。"


def test_over_limit_record_in_an_array_is_refused(tmp_path):
    p = tmp_path / "big.json"
    p.write_text(json.dumps([GOOD, {"instruction": "q", "output": "x" * 5000}]))
    with pytest.raises(CuteGPTError, match=r"record \[1\]: its text is 5,001 bytes, more than --max-record-bytes"):
        Source(p, max_record_bytes=1000)


HOSTILE_LINES = {
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep_dict": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "surrogate": b'{"instruction": "\\ud800", "output": "x"}',
    "surrogate_answer": b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\\udfff"}]}',
    "huge_int": b'{"instruction": "q", "output": "a", "n": ' + b"9" * 5000 + b"}",
    "not_utf8": b'{"instruction": "\xff\xfe", "output": "x"}',
    "not_json": b"{instruction: q}",
    "scalar": b"42",
    "string": b'"hello"',
    "null": b"null",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_LINES))
def test_bad_line_stops_with_its_line_or_is_skipped_and_counted(tmp_path, kind):
    p = tmp_path / "data.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + HOSTILE_LINES[kind] + b"\n" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(CuteGPTError) as e:
        Source(p)
    msg = str(e.value)
    assert "line 2" in msg and str(p) in msg and "--skip-invalid" in msg and "\n" not in msg
    src = Source(p, skip_invalid=True)
    assert len(src) == 2 and src.read == 3 and len(src.skipped) == 1


def test_scalar_first_line_says_what_is_wrong(tmp_path):
    p = tmp_path / "data.json"
    p.write_bytes(b"42\n" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(CuteGPTError, match="line 1: a record must be a list of turns or a mapping, not a number"):
        Source(p)
    assert sniff_container(p) == "jsonl"


@pytest.mark.parametrize("name", ["data.json", "data.txt", "data"])
def test_json_lines_under_any_name(tmp_path, name):
    p = lines(tmp_path / name, [GOOD, [GOOD], GOOD])
    src = Source(p)
    assert src.container == "jsonl" and len(src) == 3


def test_pretty_printed_json_array_still_json(tmp_path):
    p = tmp_path / "data.json"
    p.write_text(json.dumps([GOOD, GOOD], indent=2))
    assert sniff_container(p) == "json" and len(Source(p)) == 2


def test_deep_json_array_file(tmp_path):
    p = tmp_path / "deep.json"
    p.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CuteGPTError, match="nested too deeply"):
        Source(p)


@pytest.mark.parametrize("rec", [
    {"instruction": "", "output": "a"},
    {"instruction": " ", "input": "", "output": "a"},
    {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]},
    {"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "a"}]},
    {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
    [{"instruction": "", "input": "", "output": "a"}],
])
def test_empty_user_turn_refused_in_every_format(rec):
    from cutegpt.data.readers import RecordError

    with pytest.raises(RecordError, match="empty"):
        parse_record(rec)


def test_convert_skips_and_counts_bad_lines_end_to_end(tmp_path, tiny_model_dir):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"\n".join([json.dumps(GOOD).encode(), HOSTILE_LINES["deep"], HOSTILE_LINES["surrogate"],
                              HOSTILE_LINES["not_utf8"], HOSTILE_LINES["huge_int"], json.dumps(GOOD).encode()]) + b"\n")
    out = convert(ConvertConfig(input=[str(p)], out=str(tmp_path / "ds"), model=str(tiny_model_dir), max_length=64, skip_invalid=True))
    c = read_manifest(out)["counts"]
    assert c["records_read"] == 6 and c["records_skipped"] == 4 and c["conversations"] == 2


# ---------------------------------------------------------------- the manifest contract (items 6, 11)


def test_manifest_checks_special_ids(tmp_path, ift_jsonl, tiny_model_dir, tiny_tokenizer):
    out = convert(ConvertConfig(input=[str(ift_jsonl)], out=str(tmp_path / "ds"), model=str(tiny_model_dir), max_length=64))
    m = read_manifest(out)
    assert m["tokenizer"]["eos_token_id"] == tiny_tokenizer.eos_token_id and m["stop"]["text"] == "<end>"
    check_tokenizer(m, tiny_tokenizer, out)  # the same tokenizer passes
    for key, name in (("eos_token_id", "EOS"), ("bos_token_id", "BOS"), ("pad_token_id", "PAD")):
        bad = json.loads(json.dumps(m))
        bad["tokenizer"][key] = 4
        with pytest.raises(CuteGPTError, match=f"converted with {name} id 4 .* this model's tokenizer has {name} id"):
            check_tokenizer(bad, tiny_tokenizer, out)
    bad = json.loads(json.dumps(m))
    bad["stop"]["ids"] = [3]
    with pytest.raises(CuteGPTError, match="stop marker '<end>' as ids \\[3\\]"):
        check_tokenizer(bad, tiny_tokenizer, out)


def test_same_vocabulary_other_eos_is_refused_by_show(tmp_path, ift_jsonl, tiny_model_dir, capsys):
    import shutil

    other = tmp_path / "other-eos"
    shutil.copytree(tiny_model_dir, other)
    cfg_path = other / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = "<|im_end|>"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "ds"
    assert main(["data", "convert", str(ift_jsonl), "--out", str(out), "--model", str(tiny_model_dir), "--max-length", "64"]) == 0
    capsys.readouterr()
    code, err = run(["data", "show", str(out), "--model", str(other)], capsys)
    assert code == 1 and "EOS id" in err and "<|im_end|>" in err
    one_sentence(err)


@pytest.mark.parametrize("damage", ["tokenizer", "max_length", "packing", "list", "vocab_hash", "type"])
def test_manifest_missing_keys_named(tmp_path, ift_jsonl, tiny_model_dir, capsys, damage):
    out = tmp_path / "ds"
    assert main(["data", "convert", str(ift_jsonl), "--out", str(out), "--model", str(tiny_model_dir), "--max-length", "64"]) == 0
    capsys.readouterr()
    path = out / "manifest.json"
    m = json.loads(path.read_text())
    if damage == "list":
        m = [m]
    elif damage == "vocab_hash":
        del m["tokenizer"]["vocab_hash"]
    elif damage == "type":
        m["max_length"] = "big"
    else:
        del m[damage]
    path.write_text(json.dumps(m))
    for argv in (["data", "stats", str(out)], ["data", "show", str(out), "--model", str(tiny_model_dir)]):
        code, err = run(argv, capsys)
        assert code == 1 and "manifest" in err, err
        one_sentence(err)
