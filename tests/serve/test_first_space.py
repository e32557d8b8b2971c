"""The front drops a SentencePiece answer's first space (llama.cpp's " 北京" -> transformers' "北京"), once per choice."""

from __future__ import annotations

import json

from cutegpt.serve.front import FirstSpace, drop_first_space


def _event(index: int, content: str | None, chat: bool = True) -> bytes:
    choice = {"index": index, "delta": {"content": content}} if chat else {"index": index, "text": content}
    return b"data: " + json.dumps({"choices": [choice]}, ensure_ascii=False).encode() + b"\n\n"


def _texts(stream: bytes) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in stream.decode().split("\n\n"):
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                piece = c["delta"].get("content") if "delta" in c else c.get("text")
                out[c["index"]] = out.get(c["index"], "") + (piece or "")
    return out


def test_stream_split_anywhere_loses_one_space_per_choice():
    stream = (_event(0, None) + _event(0, " 北") + _event(1, "  two") + _event(0, " 京。") + _event(1, " x")
              + b"data: [DONE]\n\n")
    for cut in range(1, len(stream)):  # every split of the stream into two network pieces
        f = FirstSpace(2)
        out = f.feed(stream[:cut]) + f.feed(stream[cut:]) + f.flush()
        assert _texts(out) == {0: "北 京。", 1: " two x"}
        assert out.endswith(b"data: [DONE]\n\n")


def test_after_the_first_text_the_stream_passes_untouched():
    f = FirstSpace(1)
    assert _texts(f.feed(_event(0, " a", chat=False))) == {0: "a"}
    later = _event(0, " b", chat=False)
    assert f.feed(later) is later


def test_whole_answers():
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": " 北京。"}},
                        {"index": 1, "text": "  x"}], "usage": {"completion_tokens": 3}}
    out = json.loads(drop_first_space(json.dumps(body).encode()))
    assert out["choices"][0]["message"]["content"] == "北京。" and out["choices"][1]["text"] == " x"
    assert out["usage"] == body["usage"]
    assert drop_first_space(b"not json") == b"not json"
