"""The whole recipe on every base architecture (tiny random Llama-3, Mistral, Qwen2, Qwen3, Gemma 2 models, each
with a tokenizer of its own family and its own chat template):

    data convert --template auto   masks checked token by token against a hand-rendered conversation
    train sft (full, fp32)         the loss falls; the model learns three answers
    export --format gguf           verified by llama.cpp
    generate, torch and llama.cpp  the learnt answers, stopped at the template's end-of-turn (never printed)
    serve                          the same answers over the OpenAI API, finish_reason "stop"
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cutegpt.cli import main
from tests.export.archs import ARCH_VARIANTS, build_arch_variant

QA = [("中国的首都是哪里？", "北京。"), ("What is 2+2?", "4"), ("请推荐一本名著。", "红楼梦。")]


def _reference(name: str, qa: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The conversation as each family's documented format writes it, as (text, trained) pieces."""
    out: list[tuple[str, bool]] = []
    for i, (q, a) in enumerate(qa):
        if name.startswith("qwen"):
            out += [(("\n" if i else "") + f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", False), (a + "<|im_end|>", True)]
        elif name.startswith("llama3"):
            out += [(("" if i else "<|begin_of_text|>") + f"<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n", False), (a + "<|eot_id|>", True)]
        elif name.startswith("gemma"):
            out += [(("\n" if i else "<bos>") + f"<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n", False),
                    (a + "<end_of_turn>", True)]
        else:  # mistral
            out += [(("" if i else "<s>") + f"[INST] {q} [/INST]", False), (a + "</s>", True)]
    if name.startswith(("qwen", "gemma")):
        out.append(("\n", False))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return {name: build_arch_variant(tmp_path_factory.mktemp(name), name) for name in ARCH_VARIANTS}


@pytest.mark.parametrize("name", list(ARCH_VARIANTS))
def test_auto_template_masks_match_the_hand_rendered_format(models, tmp_path, name):
    from cutegpt.data.manifest import load_dataset
    from cutegpt.model.tokenizer import load_tokenizer

    folder = models[name]
    data = tmp_path / "chat.jsonl"
    msgs = [m for q, a in QA[:2] for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    data.write_text(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "ds"
    assert main(["data", "convert", str(data), "--out", str(out), "--model", str(folder), "--template", "auto",
                 "--packing", "pad", "--max-length", "256"]) == 0
    row = load_dataset(out)[0][0]
    n = row["seq_lens"][0]
    ids, labels = row["input_ids"][:n], row["labels"][:n]
    tok = load_tokenizer(folder)  # SentencePiece's own ids (tests/model/test_tokenizer.py), not transformers 5's drift
    want_ids, want_train = [], []
    for text, trained in _reference(name, QA[:2]):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        want_ids += piece
        want_train += [trained] * len(piece)
    assert ids == want_ids, (tok.decode(ids), tok.decode(want_ids))
    assert [lab != -100 for lab in labels] == want_train
    assert all(lab == t for lab, t in zip(labels, ids) if lab != -100)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCH_VARIANTS))
def test_train_export_and_answer_on_both_backends(models, tmp_path, name):
    folder = models[name]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}, ensure_ascii=False) + "\n" for q, a in QA * 4),
                    encoding="utf-8")
    ds, run = tmp_path / "ds", tmp_path / "run"
    assert main(["data", "convert", str(data), "--out", str(ds), "--model", str(folder), "--template", "auto",
                 "--max-length", "128", "--packing", "pad"]) == 0
    assert main(["train", "sft", "--model", str(folder), "--data", str(ds), "--out", str(run), "--method", "full",
                 "--precision", "fp32", "--lr", "3e-3", "--max-steps", "40", "--micro-batch", "4", "--warmup-steps", "0",
                 "--threads", "1"]) == 0
    curve = [loss for _, loss in json.loads((run / "summary.json").read_text())["loss_curve"]]
    assert curve[-1] < curve[0] / 4, curve

    gguf_file = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(run / "final"), "--out", str(gguf_file), "--quant", "f16",
                 "--quiet"]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": q}, ensure_ascii=False) + "\n" for q, _ in QA), encoding="utf-8")
    answers = {}
    for backend, model in (("torch", run / "final"), ("llamacpp", gguf_file)):
        out = tmp_path / f"{backend}.jsonl"
        assert main(["generate", str(prompts), "--model", str(model), "--out", str(out), "--greedy", "--max-new-tokens", "16",
                     "--threads", "1", "--backend", backend]) == 0
        answers[backend] = [json.loads(line)["answer"] for line in out.read_text(encoding="utf-8").splitlines()]
    # serve: the trained folder, exported once into the cache, answers over the OpenAI API and stops at the marker
    from tests.serve.conftest import request, running_server

    with running_server("--model", str(run / "final"), "--quiet", env={"CUTEGPT_CACHE": str(tmp_path / "cache")}) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        answers["serve"] = []
        for q, _ in QA:
            status, body = request(port, "POST", "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 16})
            assert status == 200 and body["choices"][0]["finish_reason"] == "stop", body
            answers["serve"].append(body["choices"][0]["message"]["content"])
    # SentencePiece answers start with a word-boundary piece ("▁北京"): llama.cpp's text keeps its space, transformers'
    # drops it, and so do the llama.cpp backend and serve (runtime.llamacpp.drops_first_space)
    assert answers["llamacpp"] == answers["torch"] == [a for _, a in QA]
    assert answers["serve"] == answers["torch"]
