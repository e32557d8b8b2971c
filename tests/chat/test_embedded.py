"""Integration tests on the embedded SmolLM2-135M-Instruct (slow: a real 135M model on CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from cutegpt.chat.engine import GenerationArgs
from cutegpt.chat.session import ChatSession
from cutegpt.model.embedded import embedded_gguf
from cutegpt.model.loading import ModelArgs, load_model, weight_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(embedded_dir):
    return load_model(ModelArgs())


def test_answers_capital_of_france(smol):
    session = ChatSession(smol, GenerationArgs(greedy=True, max_new_tokens=24))
    result = session.ask("What is the capital of France?")
    assert "Paris" in result.text
    assert result.stop_reason == "stop" and "<|im_end|>" not in result.text


def test_cache_reuse_gives_identical_conversation(smol):
    gen = GenerationArgs(greedy=True, max_new_tokens=20)
    questions = ["What is the capital of France?", "And of Germany?", "Which one is bigger?"]
    with_reuse = ChatSession(smol, gen, memory_limit=3)
    without = ChatSession(smol, gen, memory_limit=3, reuse_cache=False)
    for q in questions:
        a, b = with_reuse.ask(q), without.ask(q)
        assert a.token_ids == b.token_ids
    assert a.reused_tokens > 0.8 * a.prompt_tokens and b.reused_tokens == 0


def test_gguf_file_loads_like_the_converted_folder(smol):
    direct = load_model(ModelArgs(model=str(embedded_gguf())))
    ids = torch.tensor([smol.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        a, b = smol.model(ids).logits, direct.model(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert direct.template.stop == smol.template.stop == "<|im_end|>"


def test_int8_memory_and_answer(smol):
    bf16 = load_model(ModelArgs(dtype="bfloat16"))
    q = load_model(ModelArgs(load_in_8bit=True))
    assert weight_bytes(q.model) <= 0.65 * weight_bytes(bf16.model)
    result = ChatSession(q, GenerationArgs(greedy=True, max_new_tokens=24)).ask("What is the capital of France?")
    assert "Paris" in result.text


def test_chat_command_from_stdin():
    """The quickstart command, fed from a pipe: answers come out as JSON Lines."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "cutegpt", "chat", "--greedy", "--max-new-tokens", "24"],
                          input="What is the capital of France?\n/clear\nWhat is 2+2?\n", capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 2
    assert "Paris" in records[0]["answer"]
    assert records[1]["turn"] == 1  # /clear emptied the history
