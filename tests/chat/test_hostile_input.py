"""Input a user can get wrong or craft (deep nesting, lone surrogates, huge integers, huge files, bad .partial lines,
other settings on --resume) is one sentence naming the file and line; nothing is lost, the chat keeps running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cutegpt.chat.backend as backend
import cutegpt.chat.cli as chat_cli
from cutegpt.generation import GenerationArgs
from cutegpt.chat.batch import GenerateConfig, run_generate
from cutegpt.chat.session import ChatSession
from cutegpt.config import parse_config
from cutegpt.errors import CuteGPTError
from cutegpt.io import load_json_text

# (JSON text, what the message must say); each is a line Python's json module reads or chokes on unhelpfully
HOSTILE = {
    "deep": ('{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than 100 levels deep"),
    "deep-but-parsable": ('{"instruction": "x", "extra": ' + "[" * 500 + "]" * 500 + "}", "nested more than 100 levels deep"),
    "surrogate": ('{"instruction": "hi \\ud800 there"}', "lone UTF-16 surrogate"),
    "surrogate-key": ('{"instruction": "hi", "\\udfff": 1}', "lone UTF-16 surrogate"),
    "huge-int": ('{"instruction": "hi", "n": ' + "9" * 5000 + "}", "5,000-digit number"),
}


def test_reference_json_module_fails_on_each_case():
    """The reference: plain json.loads crashes (RecursionError, ValueError) or returns text that cannot be encoded;
    only the 500-level nesting parses, which is why a depth bound is checked on top."""
    for case, (text, _) in HOSTILE.items():
        try:
            data = json.loads(text)
        except (RecursionError, ValueError):
            assert case in ("deep", "huge-int")
            continue
        if case == "deep-but-parsable":
            continue
        with pytest.raises(UnicodeEncodeError):
            json.dumps(data, ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_load_json_text_names_the_place(case):
    text, said = HOSTILE[case]
    with pytest.raises(CuteGPTError) as e:
        load_json_text(text, "f.jsonl, line 3")
    assert str(e.value).startswith("f.jsonl, line 3: ") and said in str(e.value) and "\n" not in str(e.value)


def test_ordinary_json_is_untouched():
    text = json.dumps({"a": [1, -2, 3.5, {"b": "中文 \U0001F600"}], "n": 10 ** 99, "s": "x"}, ensure_ascii=False)
    assert load_json_text(text, "x") == json.loads(text)


def _no_load(monkeypatch):
    monkeypatch.setattr(backend, "load_chat_model", lambda *a, **k: pytest.fail("the model was loaded"))


def _gen_cfg(model, prompts, out, *extra):
    return parse_config(GenerateConfig, [str(prompts), "--model", str(model), "--template", "cutegpt", "--out", str(out),
                                         "--greedy", "--max-new-tokens", "6", "--batch-size", "2", "--threads", "1",
                                         "--backend", "torch", *extra], prog="cutegpt generate")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_generate_refuses_a_hostile_line_before_loading(case, tiny_model_dir, tmp_path, monkeypatch):
    _no_load(monkeypatch)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "fine"}\n' + HOSTILE[case][0] + "\n", encoding="utf-8")
    with pytest.raises(CuteGPTError, match=rf"p\.jsonl, line 2: .*{HOSTILE[case][1]}"):
        run_generate(_gen_cfg(tiny_model_dir, prompts, tmp_path / "o.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_chat_input_refuses_a_hostile_line(case, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('plain question\n' + HOSTILE[case][0] + "\n", encoding="utf-8")
    turns = chat_cli._read_turns(str(prompts))
    assert next(turns) == (1, "plain question", "")
    with pytest.raises(CuteGPTError, match=rf"p\.jsonl, line 2: .*{HOSTILE[case][1]}"):
        next(turns)


def test_chat_command_line_exit_code_and_message(tmp_path, capsys):
    from cutegpt.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(HOSTILE["surrogate"][0] + "\n", encoding="utf-8")
    assert main(["generate", str(prompts), "--out", str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {prompts}, line 1: holds a lone UTF-16 surrogate escape (such as \\ud800), which is not text."


def test_generate_out_in_a_missing_folder_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    _no_load(monkeypatch)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "hi"}\n', encoding="utf-8")
    with pytest.raises(CuteGPTError, match=r"the folder .*no/such does not exist; create it first"):
        run_generate(_gen_cfg(tiny_model_dir, prompts, tmp_path / "no" / "such" / "o.jsonl"))
    assert not (tmp_path / "no").exists()


# ------------------------------------------------------------------------------------------------ /load in a chat


def _session(lm):
    return ChatSession(lm, GenerationArgs(greedy=True, max_new_tokens=4), memory_limit=3)


def test_load_errors_leave_the_chat_running_and_the_conversation_intact(tiny_lm, tmp_path, monkeypatch, capsys):
    files = {}
    for case, (text, said) in HOSTILE.items():
        body = text.replace('{"instruction": ', '{"messages": ', 1)
        files[case] = (tmp_path / f"{case}.json", said)
        files[case][0].write_text(body, encoding="utf-8")
    big = tmp_path / "big.json"
    with big.open("w", encoding="utf-8") as f:  # 9 MiB of valid conversation, sparse: cheap to write
        f.write('{"messages": [{"role": "user", "content": "' + "a" * (9 * 2**20) + '"}]}')
    files["big"] = (big, "a conversation file may be at most 8 MiB")
    files["folder"] = (tmp_path, "is a folder")

    s = _session(tiny_lm)
    s.ask("hello")
    before = list(s.history)
    lines = iter([f"/load {p}" for p, _ in files.values()] + ["/save " + str(tmp_path / "missing" / "tree" / "c.json"), "/exit"])
    monkeypatch.setattr(chat_cli, "_read_message", lambda prompt=">>> ": next(lines))
    monkeypatch.setattr(chat_cli, "_setup_readline", lambda: None)
    chat_cli.interactive(s, "tiny", quiet=True)  # returns at /exit: nothing ended the chat
    out = capsys.readouterr().out
    for path, said in files.values():
        assert said in out, (path, out[-2000:])
    assert "missing/tree does not exist; create it first" in out and not (tmp_path / "missing").exists()
    assert s.history == before
    assert out.count("error: ") == len(files) + 1


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_numbers_json_does_not_have_are_named(literal):
    """Python's json module takes NaN, Infinity and 1e400 (as inf); JSON has none of them, and json.dumps would write
    them back as text no other parser reads."""
    text = '{"instruction": "hi", "t": [1, ' + literal + "]}"
    assert json.dumps(json.loads(text)).endswith(("NaN]}", "Infinity]}"))  # the reference: written back as non-JSON
    with pytest.raises(CuteGPTError, match=r"^f, line 1: holds .*, which is not a finite JSON number\.$"):
        load_json_text(text, "f, line 1")
    assert load_json_text('{"t": [1e300, -0.5, 2E-5]}', "x") == {"t": [1e300, -0.5, 2e-5]}
