"""`cutegpt generate`: output checked before loading, answers written as they come, --resume, context rule."""

from __future__ import annotations

import json

import pytest

import cutegpt.chat.batch as batch
from cutegpt.chat.batch import GenerateConfig, run_generate
from cutegpt.config import parse_config
from cutegpt.errors import CuteGPTError

QUESTIONS = ["中国的首都是哪里？", "What is the capital of France?", "请推荐五本名著。", "hello", "机器学习是什么？"]


def _prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"instruction": q}, ensure_ascii=False) for q in QUESTIONS[:4]]
    lines.append(json.dumps({"messages": [{"role": "user", "content": QUESTIONS[4]}]}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cfg(tiny_model_dir, prompts, out, *extra):
    return parse_config(GenerateConfig, [str(prompts), "--model", str(tiny_model_dir), "--template", "cutegpt", "--out", str(out),
                                         "--greedy", "--max-new-tokens", "6", "--batch-size", "2", "--threads", "1",
                                         "--backend", "torch", *extra], prog="cutegpt generate")


def test_output_checked_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import cutegpt.chat.backend as backend

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(backend, "load_chat_model", no_load)
    prompts = _prompts(tmp_path)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    with pytest.raises(CuteGPTError, match="--out"):
        run_generate(_cfg(tiny_model_dir, prompts, folder))
    existing = tmp_path / "done.jsonl"
    existing.write_text("old\n", encoding="utf-8")
    with pytest.raises(CuteGPTError, match="--out"):
        run_generate(_cfg(tiny_model_dir, prompts, existing))
    assert existing.read_text(encoding="utf-8") == "old\n"
    with pytest.raises(CuteGPTError, match="--out"):
        run_generate(_cfg(tiny_model_dir, prompts, prompts, "--overwrite"))  # the output is the input


def test_resume_after_interruption_gives_the_uninterrupted_file(tiny_model_dir, tmp_path, monkeypatch):
    prompts = _prompts(tmp_path)
    full = tmp_path / "full.jsonl"
    assert run_generate(_cfg(tiny_model_dir, prompts, full)) == 0
    expected = full.read_text(encoding="utf-8")
    assert len(expected.splitlines()) == 5 and not (tmp_path / "full.jsonl.partial").exists()

    out = tmp_path / "out.jsonl"
    _interrupted_after_first_batch(monkeypatch, tiny_model_dir, prompts, out)
    partial = tmp_path / "out.jsonl.partial"
    assert not out.exists()
    kept = partial.read_text(encoding="utf-8")
    assert kept == "".join(expected.splitlines(keepends=True)[:2])  # the first batch survived, flushed
    with partial.open("a", encoding="utf-8") as f:
        f.write('{"instruction": "中国')  # a line torn by a crash: generated again

    with pytest.raises(CuteGPTError, match="--resume"):
        run_generate(_cfg(tiny_model_dir, prompts, out))  # a partial run is never silently overwritten
    assert run_generate(_cfg(tiny_model_dir, prompts, out, "--resume")) == 0
    assert out.read_text(encoding="utf-8") == expected
    assert not partial.exists()


def test_resume_refuses_a_partial_file_of_another_input(tiny_model_dir, tmp_path):
    prompts = _prompts(tmp_path)
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_text(json.dumps({"instruction": "other", "answer": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(CuteGPTError, match="another input"):
        run_generate(_cfg(tiny_model_dir, prompts, out, "--resume"))


def test_prompt_longer_than_the_context_is_refused_naming_the_line(tiny_model_dir, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text('{"instruction": "hi"}\n' + json.dumps({"instruction": "长" * 600}, ensure_ascii=False) + "\n",
                       encoding="utf-8")
    out = tmp_path / "o.jsonl"
    with pytest.raises(CuteGPTError, match=r"long\.jsonl, line 2: the prompt is \d+ tokens; .* context of 512 tokens"):
        run_generate(_cfg(tiny_model_dir, prompts, out))
    assert not out.exists() and not (tmp_path / "o.jsonl.partial").exists()


def test_resume_and_overwrite_together_refused(tiny_model_dir, tmp_path):
    with pytest.raises(CuteGPTError, match="--resume"):
        _cfg(tiny_model_dir, _prompts(tmp_path), tmp_path / "o.jsonl", "--resume", "--overwrite")


def _interrupted_after_first_batch(monkeypatch, tiny_model_dir, prompts, out):
    real = batch.generate_batch
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(batch, "generate_batch", interrupted)
    assert run_generate(_cfg(tiny_model_dir, prompts, out)) == 130
    monkeypatch.setattr(batch, "generate_batch", real)


def test_resume_refuses_other_generation_settings_naming_them(tiny_model_dir, tmp_path, monkeypatch):
    prompts, out = _prompts(tmp_path), tmp_path / "out.jsonl"
    _interrupted_after_first_batch(monkeypatch, tiny_model_dir, prompts, out)
    partial = tmp_path / "out.jsonl.partial"
    kept = partial.read_bytes()
    with pytest.raises(CuteGPTError, match=r"other settings \(--max-new-tokens 6 -> 9\); restore them, or start again with --overwrite"):
        run_generate(_cfg(tiny_model_dir, prompts, out, "--max-new-tokens", "9", "--resume"))
    with pytest.raises(CuteGPTError, match=r"--system None -> be brief"):
        run_generate(_cfg(tiny_model_dir, prompts, out, "--system", "be brief", "--resume"))
    assert partial.read_bytes() == kept and not out.exists()  # nothing lost
    assert run_generate(_cfg(tiny_model_dir, prompts, out, "--resume")) == 0
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 5 and all(x["stop_reason"] in ("stop", "length") for x in lines)
    assert all(x["stop_reason"] == "length" for x in lines if x["new_tokens"] == 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.jsonl"]  # the settings record is gone too


def test_resume_reports_a_bad_partial_line_and_keeps_everything(tiny_model_dir, tmp_path, monkeypatch):
    prompts, out = _prompts(tmp_path), tmp_path / "out.jsonl"
    _interrupted_after_first_batch(monkeypatch, tiny_model_dir, prompts, out)
    partial = tmp_path / "out.jsonl.partial"
    good = partial.read_text(encoding="utf-8").splitlines(keepends=True)
    partial.write_text(good[0] + "{not json\n" + good[1], encoding="utf-8")
    before = partial.read_bytes()
    with pytest.raises(CuteGPTError, match=r"out\.jsonl\.partial, line 2: not valid JSON .*fix or remove that line"):
        run_generate(_cfg(tiny_model_dir, prompts, out, "--resume"))
    assert partial.read_bytes() == before


def test_resume_of_a_finished_run_has_nothing_to_do(tiny_model_dir, tmp_path, capsys, monkeypatch):
    prompts, out = _prompts(tmp_path), tmp_path / "out.jsonl"
    out.write_text("done\n", encoding="utf-8")
    import cutegpt.chat.backend as backend

    monkeypatch.setattr(backend, "load_chat_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert run_generate(_cfg(tiny_model_dir, prompts, out, "--resume")) == 0
    assert "nothing to do" in capsys.readouterr().err and out.read_text(encoding="utf-8") == "done\n"
