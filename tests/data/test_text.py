"""Raw-text corpora: one reader for pre-training and vocabulary training."""

import json

import pytest

from cutegpt.data.text import read_documents
from cutegpt.errors import CuteGPTError


def test_txt_whole_file_or_per_line_and_folders(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("第一段。\n\n第二段。\n", encoding="utf-8")
    (tmp_path / "corpus" / "b.jsonl").write_text(json.dumps({"text": "doc b"}) + "\n" + json.dumps({"text": "  "}) + "\n",
                                                  encoding="utf-8")
    (tmp_path / "corpus" / "skip.csv").write_text("x,y\n", encoding="utf-8")
    assert list(read_documents([tmp_path / "corpus"])) == ["第一段。\n\n第二段。\n", "doc b"]
    assert list(read_documents([tmp_path / "corpus"], txt_per_line=True)) == ["第一段。", "第二段。", "doc b"]


@pytest.mark.parametrize("content,message", [
    ("not json\n", "c.jsonl, line 1 is not valid JSON"),
    ('{"body": "x"}\n', "c.jsonl, line 1 has no 'text' field"),
    ('{"text": 3}\n', "c.jsonl, line 1: field 'text' is not a string"),
])
def test_bad_json_lines(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(CuteGPTError, match=message):
        list(read_documents([tmp_path / "c.jsonl"]))


def test_missing_empty_and_binary(tmp_path):
    with pytest.raises(CuteGPTError, match="does not exist"):
        list(read_documents([tmp_path / "nope.txt"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CuteGPTError, match="no .txt or .jsonl files"):
        list(read_documents([tmp_path / "empty"]))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CuteGPTError, match="bin.txt: not UTF-8 text"):
        list(read_documents([tmp_path / "bin.txt"]))
