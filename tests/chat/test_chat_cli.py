"""Chat as a terminal program: /save and /load, /system, the footer, readline — and no library warnings."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest

from cutegpt.generation import GenerationArgs
from cutegpt.chat.batch import read_records, record_to_turns
from cutegpt.chat.cli import _command, load_conversation, save_conversation
from cutegpt.chat.session import ChatSession
from cutegpt.errors import CuteGPTError

REPO = Path(__file__).resolve().parents[2]


def _session(lm, **kw):
    return ChatSession(lm, GenerationArgs(greedy=True, max_new_tokens=5), memory_limit=3, **kw)


def test_save_then_load_round_trip(tiny_lm, tmp_path):
    a = _session(tiny_lm, system="你是一个助手。")
    a.ask("中国的首都是哪里？")
    a.ask("hello", input="extra line")
    path = tmp_path / "conv.json"
    save_conversation(a, path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert data["messages"][3]["input"] == "extra line"

    b = _session(tiny_lm)
    assert load_conversation(b, path) is None
    assert b.history == a.history and b.system == a.system
    assert b.prompt_ids("next") == a.prompt_ids("next")  # the same conversation, token for token
    assert (os.stat(path).st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_saved_conversation_feeds_generate(tiny_lm, tmp_path):
    a = _session(tiny_lm)
    a.ask("中国的首都是哪里？")
    path = tmp_path / "conv.json"
    save_conversation(a, path)
    msgs = json.loads(path.read_text(encoding="utf-8"))["messages"] + [{"role": "user", "content": "再说一遍"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n", encoding="utf-8")
    (lineno, rec), = read_records(prompts)
    turns, system = record_to_turns(rec, "x")
    assert turns[:-1] == a.history and turns[-1].instruction == "再说一遍"


def test_load_answers_a_trailing_question_and_refuses_bad_files(tiny_lm, tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                             {"role": "user", "content": "again"}]}), encoding="utf-8")
    s = _session(tiny_lm)
    assert load_conversation(s, path) == "again" and len(s.history) == 1
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(CuteGPTError, match="messages"):
        load_conversation(s, bad)
    with pytest.raises(CuteGPTError, match="does not exist"):
        load_conversation(s, tmp_path / "missing.json")


def test_slash_commands(tiny_lm, tmp_path, capsys):
    s = _session(tiny_lm)
    assert _command(s, "/help", quiet=False)
    assert "/save FILE" in capsys.readouterr().out
    assert _command(s, "/system 你是一只猫。", quiet=False)
    assert s.system == "你是一只猫。"
    assert "你是一只猫。" in tiny_lm.tokenizer.decode(s.prompt_ids("hi"))
    assert _command(s, "/system default", quiet=False) and s.system is None
    assert _command(s, f"/load {tmp_path / 'nothing.json'}", quiet=False)
    assert "error:" in capsys.readouterr().out
    assert not _command(s, "/unknown", quiet=False)


def test_own_calls_raise_no_deprecation_or_future_warning(tiny_lm, tmp_path):
    """transformers 5.24 deprecates `past_key_values` in forward (removed in 5.40): our calls must use `cache`."""
    from cutegpt.chat.batch import generate_batch
    from cutegpt.chat.engine import Engine
    from cutegpt.model.kv import cache_kwarg

    if "cache" in __import__("inspect").signature(tiny_lm.model.forward).parameters:
        assert cache_kwarg(tiny_lm.model) == "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        s = _session(tiny_lm)
        s.ask("中国的首都是哪里？")
        s.ask("hello")  # the second turn goes through the reused cache
        Engine(tiny_lm).generate([5, 6, 7], GenerationArgs(max_new_tokens=4, seed=1))
        generate_batch(tiny_lm, [[5, 6, 7], [8, 9]], GenerationArgs(greedy=True, max_new_tokens=3))


@pytest.mark.slow
def test_interactive_chat_in_a_pseudo_terminal(tiny_model_dir, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "CUTEGPT_CHAT_HISTORY": str(tmp_path / "hist"),
           "PYTHONIOENCODING": "utf-8", "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-m", "cutegpt", "chat", "--model", str(tiny_model_dir), "--template", "cutegpt",
                                           "--greedy", "--max-new-tokens", "5", "--threads", "1"],
                          env=env, encoding="utf-8", timeout=180, cwd=str(tmp_path))
    child.expect(r"CuteGPT chat — (\S+), torch")
    assert child.match.group(1) == Path(tiny_model_dir).name  # the model's name, not a path or hash
    child.expect(">>> ")
    child.sendline("/help")
    child.expect("/load FILE")
    child.expect(">>> ")
    child.sendline("hello")
    child.expect(r"\[(\d+) tokens, cut at --max-new-tokens, [\d.]+ tokens/s, first token after [\d.]+ s\]")
    child.expect(">>> ")
    child.send("\x1b[A")  # arrow up: readline recalls "hello"
    child.sendline("")
    child.expect(r"tokens/s")
    child.expect(">>> ")
    child.sendline("/save conv.json")
    child.expect(r"saved 2 turns")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert "^[[A" not in child.before
    data = json.loads((tmp_path / "conv.json").read_text(encoding="utf-8"))
    assert [m["content"] for m in data["messages"] if m["role"] == "user"] == ["hello", "hello"]


@pytest.mark.slow
def test_quiet_hides_the_footer(tiny_model_dir, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "CUTEGPT_CHAT_HISTORY": str(tmp_path / "hist")}
    child = pexpect.spawn(sys.executable, ["-m", "cutegpt", "chat", "--model", str(tiny_model_dir), "--template", "cutegpt",
                                           "--greedy", "--max-new-tokens", "5", "--quiet", "--threads", "1"],
                          env=env, encoding="utf-8", timeout=180)
    child.expect(">>> ")
    child.sendline("hello")
    child.expect(">>> ")
    assert "tokens/s" not in child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_chinese_on_the_embedded_model_prints_one_hint_on_stderr(tiny_lm, tmp_path, capsys):
    import io

    from cutegpt.chat.cli import EMBEDDED_HINT, run_batch_turns

    turns = tmp_path / "t.txt"
    turns.write_text("hello\n中国的首都是哪里？\n请推荐一本书。\n", encoding="utf-8")
    s = _session(tiny_lm)
    s.embedded = True
    out = io.StringIO()
    run_batch_turns(s, str(turns), out)
    err = capsys.readouterr().err
    assert err.count(EMBEDDED_HINT) == 1 and len(out.getvalue().splitlines()) == 3  # stdout stays JSON Lines only
    assert all(json.loads(line) for line in out.getvalue().splitlines())
    other = _session(tiny_lm)  # a model given with --model: no hint
    run_batch_turns(other, str(turns), io.StringIO())
    assert EMBEDDED_HINT not in capsys.readouterr().err


def test_footer_marks_an_answer_cut_at_max_new_tokens(tiny_lm):
    s = ChatSession(tiny_lm, GenerationArgs(greedy=True, max_new_tokens=3, ignore_eos=True), memory_limit=3)
    r = s.ask("hello")
    assert r.stop_reason == "length" and r.new_tokens == 3
    assert r.footer().startswith("[3 tokens, cut at --max-new-tokens, ")
    r.stop_reason = "stop"
    assert "cut at" not in r.footer()
