import json
import os
import pickle

import pytest

from cutegpt.data.readers import Conversation, Source, parse_record
from cutegpt.errors import CuteGPTError
from cutegpt.templates import Turn

CONVS = [
    [{"instruction": "中国的首都是哪里？", "input": "", "output": "北京。"}],
    [{"instruction": "Translate to English.", "input": "今天天气很好", "output": "The weather is nice today."},
     {"instruction": "And to French?", "input": "", "output": "Il fait beau aujourd'hui."}],
]
EXPECTED = [
    Conversation((Turn("中国的首都是哪里？", "", "北京。"),)),
    Conversation((Turn("Translate to English.", "今天天气很好", "The weather is nice today."),
                  Turn("And to French?", "", "Il fait beau aujourd'hui."))),
]


def _all(src):
    return [src[i] for i in range(len(src))]


def test_original_pickle(tmp_path):
    p = tmp_path / "ift_data.pkl"
    p.write_bytes(pickle.dumps(CONVS))
    src = Source(p)
    assert src.container == "pickle" and _all(src) == EXPECTED and src.read == 2


@pytest.mark.parametrize("name", ["data.json", "data.txt"])
def test_json_array(tmp_path, name):
    p = tmp_path / name
    p.write_text(json.dumps(CONVS, ensure_ascii=False, indent=1), encoding="utf-8")
    src = Source(p)
    assert src.container == "json" and _all(src) == EXPECTED


@pytest.mark.parametrize("name", ["data.jsonl", "data.txt"])
def test_jsonl_is_streamed(tmp_path, name):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in CONVS) + "\n\n", encoding="utf-8")
    src = Source(p)
    assert src.container == "jsonl" and _all(src) == EXPECTED
    assert src._items is None  # only offsets are kept
    assert src.label(1) == "line 2"


def test_alpaca_sharegpt_messages(tmp_path):
    records = [
        {"instruction": "翻译成英文", "input": "你好", "output": "Hello", "system": "你是翻译。"},
        {"instruction": "second", "output": "answer two", "history": [["first", "answer one"]]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "你好"},
                           {"from": "gpt", "value": "你好！"}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    got = _all(Source(p))
    assert got == [
        Conversation((Turn("翻译成英文", "你好", "Hello"),), "你是翻译。"),
        Conversation((Turn("first", "", "answer one"), Turn("second", "", "answer two"))),
        Conversation((Turn("你好", "", "你好！"), Turn("Bye", "", "Bye!")), "Be brief."),
        Conversation((Turn("Q", "", "A"),), "S"),
        Conversation((Turn("Q2", "", "A2"),)),
    ]


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/cutegpt-pickle-ran"


def test_pickle_with_object_is_refused_and_code_does_not_run(tmp_path):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps([[{"instruction": "x", "input": "", "output": Evil()}]]))
    with pytest.raises(CuteGPTError, match=r"evil\.pkl: the pickle carries a Python object \((posix|os)\.system\)"):
        Source(p)
    assert not os.path.exists(MARKER)


def test_truncated_and_non_pickle(tmp_path):
    p = tmp_path / "cut.pkl"
    p.write_bytes(pickle.dumps(CONVS)[:-10])
    with pytest.raises(CuteGPTError, match=r"cut\.pkl: (truncated or corrupt|not a valid) pickle"):
        Source(p)
    q = tmp_path / "notes.pkl"
    q.write_text("hello world", encoding="utf-8")
    with pytest.raises(CuteGPTError, match=r"notes\.pkl"):
        Source(q)
    e = tmp_path / "empty.jsonl"
    e.write_text("", encoding="utf-8")
    with pytest.raises(CuteGPTError, match="empty"):
        Source(e)


@pytest.mark.parametrize("record, message", [
    ([[{"instruction": "a", "input": "", "output": "b"}]], r"record \[0\]: turn \[0\] is a list, not a mapping"),
    ("just text", r"record \[0\]: a record must be a list of turns or a mapping, not text"),
    ([{"instruction": "a", "input": ""}], r"record \[0\]: turn \[0\]: field 'output' is missing"),
    ([{"instruction": "a", "input": "", "output": "  "}], r"record \[0\]: turn \[0\]: field 'output' is empty"),
    ([{"instruction": ["a"], "input": "", "output": "b"}], r"record \[0\]: turn \[0\]: field 'instruction' is a list, not text"),
    ([], r"record \[0\]: the conversation is empty"),
    ({"conversations": "hello"}, r"record \[0\]: field 'conversations' is text, not a list"),
    ({"conversations": [{"from": "human", "value": "q"}]}, r"record \[0\]: conversations \[0\]: the last user message has no answer"),
    ({"messages": [{"role": "robot", "content": "q"}]}, r"record \[0\]: messages \[0\]: field 'role' is 'robot'"),
])
def test_bad_records_name_file_record_and_field(tmp_path, record, message):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([record]), encoding="utf-8")
    with pytest.raises(CuteGPTError, match=r"bad\.json: " + message):
        Source(p)


def test_bad_jsonl_lines(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "a", \n')
    with pytest.raises(CuteGPTError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        Source(p)
    q = tmp_path / "latin.jsonl"
    q.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(CuteGPTError, match=r"latin\.jsonl: line 2 is not UTF-8"):
        Source(q)


def test_skip_invalid_counts(tmp_path):
    p = tmp_path / "some.jsonl"
    lines = [{"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": "c", "output": "d"}, 5]
    p.write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    with pytest.raises(CuteGPTError, match="line 2.*--skip-invalid"):
        Source(p)
    src = Source(p, skip_invalid=True)
    assert len(src) == 2 and src.read == 4 and len(src.skipped) == 2
    assert "line 2: record: field 'output' is missing" in src.skipped[0]
    assert [src.label(i) for i in range(2)] == ["line 1", "line 3"]


def test_forced_format(tmp_path):
    with pytest.raises(Exception, match="field 'messages' is missing"):
        parse_record({"instruction": "a", "output": "b"}, "messages")


@pytest.mark.parametrize("weight", ["1e300", "1e9", "1e6", "101"])
def test_data_weights_are_bounded(tmp_path, weight):
    from cutegpt.data.readers import parse_spec

    f = tmp_path / "a.jsonl"
    f.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    with pytest.raises(CuteGPTError, match=rf"INPUT {f}:{weight}: the weight after ':' must be at most 100 .*not {weight}\."):
        parse_spec(f"{f}:{weight}")
    assert parse_spec(f"{f}:100") == (f, 100.0) and parse_spec(f"{f}:0.5") == (f, 0.5)


def test_max_record_bytes_is_bounded(tmp_path, capsys):
    from cutegpt.cli import main

    f = tmp_path / "in.jsonl"
    f.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    assert main(["data", "convert", str(f), "--out", str(tmp_path / "o"), "--max-record-bytes", str(100 << 20)]) == 1
    err = capsys.readouterr().err.strip()
    assert "--max-record-bytes" in err and "at most 67108864" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
