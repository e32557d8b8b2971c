"""One model, one answer: chat, generate and serve run the same file of the embedded model with the same
defaults, so with no sampling flags at all they give the same (greedy) answers (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.serve.conftest import REPO, request, running_server

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Name three colours.", "中国的首都是哪里？"]


def _cli(*args: str, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cutegpt", *args, "--threads", "1"], input=stdin, cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_chat_generate_and_serve_give_the_same_answer(tmp_path):
    # --memory-limit 0: every line is answered alone, as generate and a one-message request answer it
    chat = _cli("chat", "--quiet", "--memory-limit", "0", stdin="\n".join(QUESTIONS) + "\n", cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr[-2000:]
    chat_answers = [json.loads(line)["answer"] for line in chat.stdout.splitlines() if line.startswith("{")]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": q}, ensure_ascii=False) + "\n" for q in QUESTIONS), encoding="utf-8")
    gen = _cli("generate", str(prompts), "--out", str(tmp_path / "answers.jsonl"), cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-2000:]
    generate_answers = [json.loads(line)["answer"] for line in (tmp_path / "answers.jsonl").read_text(encoding="utf-8").splitlines()]

    with running_server("--quiet") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        served = []
        for q in QUESTIONS:
            status, body = request(port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": q}]})
            assert status == 200, body
            served.append(body["choices"][0]["message"]["content"])

    assert "Paris" in chat_answers[0]
    assert chat_answers == generate_answers == served
