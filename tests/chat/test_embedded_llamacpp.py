"""The embedded SmolLM2 on the llama.cpp backend (slow: a real 135M model, subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cutegpt.generation import GenerationArgs
from cutegpt.chat.session import ChatSession
from cutegpt.templates import Turn

pytestmark = pytest.mark.slow
pytest.importorskip("xllamacpp")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shipped_cutegpt():
    """The shipped Q4_1 file, prompted with the CuteGPT template (which SmolLM2 was never trained on)."""
    from cutegpt.runtime.llamacpp import load_llamacpp
    from cutegpt.model.embedded import embedded_gguf

    return load_llamacpp(embedded_gguf(), template="cutegpt", threads=1)


def test_multi_token_end_marker_stops_the_embedded_model(shipped_cutegpt):
    from cutegpt.chat.llamacpp import LlamaCppEngine

    lm = shipped_cutegpt
    assert len(lm.tokenizer("<end>", add_special_tokens=False)["input_ids"]) > 1
    session = ChatSession(lm, GenerationArgs(greedy=True, max_new_tokens=40), memory_limit=4,
                          system="Repeat the word you are asked to say, then stop.", engine=LlamaCppEngine(lm))
    session.history = [Turn("Say apple", output="apple"), Turn("Say banana", output="banana"), Turn("Say grape", output="grape")]
    chunks: list[str] = []
    r = session.ask("Say cherry", on_text=chunks.append)
    assert r.stop_reason == "stop", r
    assert "<" not in "".join(chunks) and "end>" not in r.text
    assert "cherry" in r.text.lower()


def _run(args, stdin):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "cutegpt", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=900)


def test_bare_chat_runs_on_the_default_backend():
    from cutegpt.chat.backend import EMBEDDED_BACKEND

    proc = _run(["chat", "--max-new-tokens", "24", "--threads", "1", "--verbose"],
                "What is the capital of France?\nAnd of Germany?\n")
    assert proc.returncode == 0, proc.stderr
    assert f"backend: {EMBEDDED_BACKEND}" in proc.stderr
    assert "greedy True (template auto)" in proc.stderr  # SmolLM2 recommends nothing: greedy, not CuteGPT's sampling
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and "Paris" in rows[0]["answer"]
    assert all("<|im_end|>" not in r["answer"] for r in rows)
    assert rows[1]["reused_tokens"] > 0  # the prompt cache served the first turn


def test_generate_on_the_embedded_gguf_with_the_cutegpt_template(tmp_path):
    from cutegpt.model.embedded import embedded_gguf

    prompts = tmp_path / "p.jsonl"
    msgs = [{"role": "system", "content": "Repeat the word you are asked to say, then stop."}]
    for w in ("apple", "banana", "grape"):
        msgs += [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]
    msgs.append({"role": "user", "content": "Say cherry"})
    prompts.write_text(json.dumps({"messages": msgs}) + "\n", encoding="utf-8")
    out = tmp_path / "a.jsonl"
    proc = _run(["generate", str(prompts), "--model", str(embedded_gguf()), "--template", "cutegpt", "--greedy",
                 "--max-new-tokens", "40", "--out", str(out), "--threads", "1"], "")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text(encoding="utf-8"))
    assert "cherry" in row["answer"].lower() and "<end" not in row["answer"] and "<" not in row["answer"]


def test_interactive_banner_names_the_model(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1",
           "CUTEGPT_CHAT_HISTORY": str(tmp_path / "hist")}
    child = pexpect.spawn(sys.executable, ["-m", "cutegpt", "chat", "--max-new-tokens", "12", "--threads", "1"],
                          env=env, encoding="utf-8", timeout=600)
    child.expect(r"CuteGPT chat — SmolLM2-135M-Instruct \(embedded\)")
    child.expect(">>> ")
    child.sendline("What is the capital of France?")
    child.expect(r"tokens/s, first token after")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
