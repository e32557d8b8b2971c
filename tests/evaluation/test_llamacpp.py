"""Multiple choice on a GGUF file through llama.cpp (issue 22): the torch path's letters and log-probabilities."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cutegpt.errors import CuteGPTError
from cutegpt.evaluation.cli import EvalConfig, evaluate, load_llamacpp_for, run_eval
from cutegpt.evaluation.data import load_benchmark

pytest.importorskip("xllamacpp")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    from cutegpt.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    return export_gguf(str(tiny_model_dir), out, quant="f32", verify=False, progress=False)


def _reference(model, ids, conts) -> list[float]:
    """Plain transformers, one prompt at a time: the summed log-probability of each continuation."""
    out = []
    for cont in conts:
        seq = list(ids) + list(cont)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
        out.append(sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(cont)))
    return out


@pytest.mark.parametrize("method", ["logits", "loglikelihood"])
def test_gguf_letters_and_logprobs_equal_transformers(method, tiny_model_dir, tiny_gguf, ceval_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from cutegpt.evaluation.cli import item_for, subject_prompts, continuations, letter_token_ids, style_of

    bench = load_benchmark("ceval", ceval_dir, "val", None)
    cfg = EvalConfig(benchmark="ceval", model=str(tiny_gguf), shots=5, method=method, parallel=2)
    lm = load_llamacpp_for(cfg, bench, 1, tmp_path)
    run = evaluate(lm, bench, cfg, None, show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    delim = style_of("ceval", cfg).target_delimiter
    conts = continuations(lm.tokenizer, method, "ceval", letter_token_ids(lm.tokenizer, delim)[0], delim)
    n = 0
    for name, sub in bench.subjects.items():
        for (q, text), rec in zip(subject_prompts(bench, sub, cfg), run["records"][name]):
            item = item_for(lm, text, cfg, conts, delim)
            ref = _reference(model, item.ids, item.continuations)
            assert rec["scores"] == pytest.approx(ref, abs=0.02)  # llama.cpp keeps its KV cache in f16
            best = max(range(4), key=lambda i: ref[i])
            assert rec["pred"] == "ABCD"[best]
            z = sum(math.exp(x) for x in ref)
            assert [rec["probs"][L] for L in "ABCD"] == pytest.approx([math.exp(x) / z for x in ref], abs=0.005)
            n += 1
    assert n == 5


def test_prefix_reuse_and_parallel_slots_give_the_letters_of_whole_prompts(tiny_gguf, ceval_dir, tmp_path):
    bench = load_benchmark("ceval", ceval_dir, "val", None)
    cfg = EvalConfig(benchmark="ceval", model=str(tiny_gguf), shots=5, parallel=3)
    lm = load_llamacpp_for(cfg, bench, 1, tmp_path)
    shared = evaluate(lm, bench, cfg, None, show_progress=False)
    whole = evaluate(lm, bench, cfg, None, show_progress=False, use_prefix_cache=False)
    for name in bench.subjects:
        a, b = shared["records"][name], whole["records"][name]
        assert [r["pred"] for r in a] == [r["pred"] for r in b]
        for x, y in zip(a, b):
            assert x["scores"] == pytest.approx(y["scores"], abs=0.02)


def _next_token_logprobs(model_dir) -> tuple[list[int], torch.Tensor, list[int]]:
    """A prompt's ids, plain transformers' next-token log-probabilities, and the vocabulary from likeliest to least."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok("以下是中国关于计算机网络考试的单项选择题\n答案：")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    return ids, logp, torch.argsort(logp, descending=True).tolist()


def test_choice_logprobs_are_exact_for_tokens_outside_the_top(tiny_model_dir, tiny_gguf):
    """The least likely token of the vocabulary among the choices: n_probs alone would never report it."""
    from cutegpt.runtime.llamacpp import LlamaCpp, choice_logprobs

    ids, logp, order = _next_token_logprobs(tiny_model_dir)
    tokens = [order[0], order[-1], order[len(order) // 2], order[5]]
    with LlamaCpp(tiny_gguf, n_ctx=256) as lc:
        got = choice_logprobs(lc.server, ids, tokens)
    assert got == pytest.approx([float(logp[t]) for t in tokens], abs=0.02)



class _Counting:
    """The server, counting completion requests."""

    def __init__(self, server):
        self.server, self.requests = server, 0

    def handle_completions(self, body):
        self.requests += 1
        return self.server.handle_completions(body)


@pytest.mark.parametrize("picks, requests", [((0, 1, 2, 3), 1),  # all in the unbiased top-20: request 0 alone
                                             ((0, 1, 30, 60), 2),  # two outside: the biased request, anchored by 0
                                             ((-1, -2, -3, -4), 2)])  # none in the top: anchored by 0's forced choice
def test_choice_logprobs_take_one_request_when_the_choices_are_in_the_top(picks, requests, tiny_model_dir, tiny_gguf):
    from cutegpt.runtime.llamacpp import LlamaCpp, choice_logprobs

    ids, logp, order = _next_token_logprobs(tiny_model_dir)
    tokens = [order[k] for k in picks]
    with LlamaCpp(tiny_gguf, n_ctx=256) as lc:
        counting = _Counting(lc.server)
        got = choice_logprobs(counting, ids, tokens)
        before = choice_logprobs(lc.server, ids, tokens, top_n=0)  # the two biased requests alone
    assert counting.requests == requests
    assert got == pytest.approx([float(logp[t]) for t in tokens], abs=0.02)
    assert got == pytest.approx(before, abs=1e-4)


def test_slot_files_stay_inside_the_slot_folder(tiny_gguf, ceval_dir, tmp_path):
    """llama.cpp appends the file name to slot_save_path as a string: the folder needs its separator."""
    bench = load_benchmark("ceval", ceval_dir, "val", None)
    slots = tmp_path / "work" / "slots"
    slots.mkdir(parents=True)
    cfg = EvalConfig(benchmark="ceval", model=str(tiny_gguf), shots=5, parallel=2)
    evaluate(load_llamacpp_for(cfg, bench, 1, slots), bench, cfg, None, show_progress=False)
    assert [p.name for p in slots.parent.iterdir()] == ["slots"]
    assert [p.suffix for p in slots.iterdir()] == [".bin"] * len(bench.subjects)


@pytest.mark.parametrize("extra", [[], ["--chat-template"]])
def test_cli_scores_a_gguf_file_on_llamacpp(extra, tiny_gguf, ceval_dir, tmp_path):
    from cutegpt.cli import main

    out = tmp_path / "out"
    assert main(["eval", "ceval", "--model", str(tiny_gguf), "--data", str(ceval_dir), "--out", str(out),
                 "--threads", "1", "--parallel", "2", *extra]) == 0
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["backend"] == "llamacpp" and res["weights"] == "gguf F32" and res["timing"]["parallel"] == 2
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(preds) == 5 and all(abs(sum(p["probs"].values()) - 1) < 1e-4 for p in preds)


def test_bad_backend_choices_are_one_sentence(tiny_model_dir, ceval_dir, tmp_path):
    from cutegpt.evaluation.cli import choose_backend

    with pytest.raises(CuteGPTError, match=r"--backend llamacpp scores a \.gguf file"):
        run_eval(EvalConfig(benchmark="ceval", model=str(tiny_model_dir), data=str(ceval_dir), out=str(tmp_path / "o"),
                            backend="llamacpp"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(CuteGPTError, match="--load-in-8bit works only with --backend torch"):
        choose_backend(EvalConfig(benchmark="ceval", model="x.gguf", backend="llamacpp", load_in_8bit=True))
    assert choose_backend(EvalConfig(benchmark="ceval", model="x.gguf")) == "llamacpp"
    assert choose_backend(EvalConfig(benchmark="ceval", model="x.gguf", load_in_8bit=True)) == "torch"
    assert choose_backend(EvalConfig(benchmark="ceval", model=None)) == "torch"


def test_a_chat_prompt_llamacpp_reads_differently_is_refused(tiny_gguf, ceval_dir, tmp_path, monkeypatch):
    import cutegpt.runtime.llamacpp as rt

    monkeypatch.setattr(rt, "server_tokenize", lambda server, text, add_special=True: [7, 7, 7])
    out = tmp_path / "o"
    with pytest.raises(CuteGPTError, match=r"llama\.cpp tokenizes the '.*' prompt differently .* use --backend torch"):
        run_eval(EvalConfig(benchmark="ceval", model=str(tiny_gguf), data=str(ceval_dir), out=str(out), threads=1,
                            chat_template=True))
    assert not out.exists()


@pytest.mark.slow  # three exports and three evaluations
def test_base_gguf_plus_lora_gguf_scores_as_the_merged_file(tiny_model_dir, tiny_gguf, ceval_dir, tmp_path):
    """`eval --model base.gguf --lora adapter.gguf` (export --format gguf-lora) gives the merged file's probabilities."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cutegpt.cli import main
    from cutegpt.evaluation.cli import choose_backend
    from cutegpt.export.gguf import export_gguf
    from cutegpt.export.gguf_lora import export_gguf_lora

    torch.manual_seed(5)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    merged = export_gguf(str(tiny_model_dir), tmp_path / "merged.gguf", lora=str(adapter), quant="f32", verify=False, progress=False)
    lora = export_gguf_lora(None, adapter, tmp_path / "lora.gguf", quant="f32")
    assert choose_backend(EvalConfig(benchmark="ceval", model=str(tiny_gguf), lora=str(lora))) == "llamacpp"
    with pytest.raises(CuteGPTError, match="is a LoRA GGUF: give the base model's GGUF"):
        choose_backend(EvalConfig(benchmark="ceval", model=str(tiny_model_dir), lora=str(lora)))
    probs = {}
    for name, extra in (("merged", ["--model", str(merged)]), ("lora", ["--model", str(tiny_gguf), "--lora", str(lora)]),
                        ("base", ["--model", str(tiny_gguf)])):
        out = tmp_path / name
        assert main(["eval", "ceval", *extra, "--data", str(ceval_dir), "--out", str(out), "--threads", "1"]) == 0
        probs[name] = [json.loads(x)["probs"] for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    flat = {k: [row[c] for row in v for c in sorted(row)] for k, v in probs.items()}
    assert max(abs(a - b) for a, b in zip(flat["lora"], flat["merged"])) < 1e-3
    assert max(abs(a - b) for a, b in zip(flat["base"], flat["merged"])) > 1e-2  # the adapter changes the scores
