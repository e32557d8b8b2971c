"""The llama.cpp backend (xllamacpp): same prompt, same stop rule, streaming, prompt cache, Ctrl-C.

A tiny random LLaMA is trained for a few seconds to answer "hi" with "Hello there<end>" in the
CuteGPT template (`<end>` is three tokens in its vocabulary), exported to GGUF with the cutegpt
template, and run on both backends.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cutegpt.generation import GenerationArgs
from cutegpt.chat.backend import EMBEDDED_BACKEND, choose_backend
from cutegpt.chat.session import ChatSession
from cutegpt.errors import CuteGPTError
from tests.tiny import build_tiny_llama, build_tokenizer

pytest.importorskip("xllamacpp")
ANSWER = "Hello there"


def memorise(model, seqs: list[list[int]]) -> None:
    """60 Adam steps on the sequences: enough for a tiny model to answer them word for word."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = sum(model(torch.tensor([s]), labels=torch.tensor([s])).loss for s in seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _train_parrot(folder: Path) -> None:
    """A tiny LLaMA that answers 问：hi with `Hello there<end>` (and 中国的首都是哪里？ with 北京<end>)."""
    from cutegpt.templates import CuteGPTTemplate, Turn, encode_segments, write_model_card

    tok = build_tokenizer(folder)
    model = build_tiny_llama(folder, vocab_size=len(tok))
    seqs = [encode_segments(tok, CuteGPTTemplate().segments([Turn(q, output=a)]))[0]
            for q, a in (("hi", ANSWER), ("中国的首都是哪里？", "北京"))]
    assert tok.convert_ids_to_tokens(seqs[0])[-3:] == ["<", "end", ">"]  # the marker is several tokens here
    memorise(model, seqs)
    model.save_pretrained(folder)
    write_model_card(folder, "cutegpt")


@pytest.fixture(scope="module")
def parrot(tmp_path_factory) -> SimpleNamespace:
    gguf_mod = pytest.importorskip("cutegpt.export.gguf", reason="export_gguf has not landed on this branch")
    folder = tmp_path_factory.mktemp("parrot")
    _train_parrot(folder)
    path = gguf_mod.export_gguf(str(folder), folder.parent / "parrot.gguf", template="cutegpt", quant="f32",
                                verify=False, overwrite=True, progress=False)
    return SimpleNamespace(folder=folder, gguf=path)


@pytest.fixture(scope="module")
def parrot_lm(parrot):
    from cutegpt.runtime.llamacpp import load_llamacpp

    return load_llamacpp(parrot.gguf, threads=1)


def _session(lm, **gen):
    from cutegpt.chat.llamacpp import LlamaCppEngine

    args = GenerationArgs(greedy=True, max_new_tokens=20, **gen)
    return ChatSession(lm, args, engine=LlamaCppEngine(lm))


def test_stops_at_multi_token_end_marker_and_never_prints_it(parrot_lm):
    assert parrot_lm.template.name == "cutegpt"  # recognised from the Jinja template the GGUF carries
    chunks: list[str] = []
    r = _session(parrot_lm).ask("hi", on_text=chunks.append)
    assert r.text == ANSWER and r.stop_reason == "stop"
    assert "".join(chunks) == ANSWER and not any("<" in c for c in chunks)
    assert r.new_tokens >= 3 and r.time_to_first_token > 0


def test_same_answer_as_the_torch_engine(parrot, parrot_lm):
    from cutegpt.model.loading import ModelArgs, load_model

    lm = load_model(ModelArgs(model=str(parrot.folder)))
    assert lm.template.name == "cutegpt"
    gen = GenerationArgs(greedy=True, max_new_tokens=20)
    torch_answer = ChatSession(lm, gen).ask("hi")
    session = _session(parrot_lm)
    assert session.prompt_ids("hi") == ChatSession(lm, gen).prompt_ids("hi")  # the same prompt ids
    assert session.ask("hi").text == torch_answer.text == ANSWER


def test_second_turn_reuses_the_prompt_cache(parrot_lm):
    session = _session(parrot_lm)
    first = session.ask("hi")
    second = session.ask("hi")
    assert first.text == ANSWER
    assert second.reused_tokens > 0.7 * second.prompt_tokens


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(parrot_lm):
    session = _session(parrot_lm, ignore_eos=True)
    session.gen = GenerationArgs(greedy=True, max_new_tokens=200, ignore_eos=True, temperature=1.0, top_p=1.0,
                                 top_k=0, repetition_penalty=1.0)
    seen: list[str] = []

    def press_ctrl_c(text: str) -> None:
        seen.append(text)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    r = session.ask("hi", on_text=press_ctrl_c)
    assert r.stop_reason == "interrupted"
    assert r.new_tokens < 200
    assert len(session.history) == 1  # the partial answer is kept, the conversation goes on
    session.gen = GenerationArgs(greedy=True, max_new_tokens=20, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    assert session.ask("hi").stop_reason in ("stop", "length")


def test_generate_command_on_llamacpp(parrot, tmp_path):
    from cutegpt.chat.batch import GenerateConfig, run_generate
    from cutegpt.config import parse_config

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "hi"}\n{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    out = tmp_path / "a.jsonl"
    cfg = parse_config(GenerateConfig, [str(prompts), "--model", str(parrot.gguf), "--out", str(out), "--greedy",
                                        "--max-new-tokens", "20", "--threads", "1"], prog="cutegpt generate")
    assert choose_backend(cfg) == "llamacpp"
    assert run_generate(cfg) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["answer"] for r in rows] == [ANSWER, ANSWER]
    assert "<end>" not in out.read_text(encoding="utf-8")


def test_hf_folder_on_llamacpp_is_exported_once(parrot, tmp_path, monkeypatch):
    from cutegpt.chat.backend import load_chat_model

    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    cfg = SimpleNamespace(model=str(parrot.folder), lora=None, template=None)
    lm = load_chat_model(cfg, "llamacpp", 1)
    assert lm.template.name == "cutegpt" and lm.model_path.suffix == ".gguf"
    assert _session(lm).ask("hi").text == ANSWER
    files = list((tmp_path / "cache" / "gguf").glob("*.gguf"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    load_chat_model(cfg, "llamacpp", 1)
    assert files[0].stat().st_mtime_ns == stamp  # not exported again


@pytest.mark.parametrize("kw,expected", [
    ({}, EMBEDDED_BACKEND),
    ({"model": "m.gguf"}, "llamacpp"),
    ({"model": "some/folder"}, "torch"),
    ({"model": "m.gguf", "load_in_8bit": True}, "torch"),
    ({"lora": "adapter"}, "torch"),
    ({"model": "m.gguf", "backend": "torch"}, "torch"),
    ({"model": "some/folder", "backend": "llamacpp"}, "llamacpp"),
])
def test_backend_choice(kw, expected):
    cfg = SimpleNamespace(**{"backend": "auto", "model": None, "lora": None, "load_in_8bit": False, "dtype": "auto",
                             "device": "auto", **kw})
    assert choose_backend(cfg) == expected


def test_llamacpp_refuses_torch_only_flags():
    cfg = SimpleNamespace(backend="llamacpp", model="m.gguf", lora=None, load_in_8bit=True, dtype="auto", device="auto")
    with pytest.raises(CuteGPTError, match="--load-in-8bit works only with --backend torch"):
        choose_backend(cfg)


LORA_ANSWER = "北京"


@pytest.fixture(scope="module")
def parrot_lora(parrot, tmp_path_factory) -> Path:
    """A LoRA adapter on the parrot that answers `hi` with 北京 (the base says Hello there); records its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cutegpt.templates import CuteGPTTemplate, Turn, encode_segments

    tok = AutoTokenizer.from_pretrained(parrot.folder)
    seq = encode_segments(tok, CuteGPTTemplate().segments([Turn("hi", output=LORA_ANSWER)]))[0]
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(parrot.folder),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(60):
        loss = model(torch.tensor([seq]), labels=torch.tensor([seq])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("parrot-lora")
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == str(parrot.folder)
    return out


def test_lora_alone_on_llamacpp_is_applied_as_on_torch(parrot, parrot_lora, tmp_path, monkeypatch):
    """`chat --backend llamacpp --lora X` with no --model runs the adapter on its recorded base (it ran the embedded model)."""
    from cutegpt.chat.backend import load_chat_model
    from cutegpt.model.loading import ModelArgs, load_model

    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    gen = GenerationArgs(greedy=True, max_new_tokens=20)
    torch_answer = ChatSession(load_model(ModelArgs(lora=str(parrot_lora))), gen).ask("hi").text
    assert torch_answer == LORA_ANSWER  # the adapter changed the base's answer (Hello there)
    cfg = SimpleNamespace(model=None, lora=str(parrot_lora), template=None, backend="llamacpp", load_in_8bit=False,
                          dtype="auto", device="auto")
    assert choose_backend(cfg) == "llamacpp"
    lm = load_chat_model(cfg, "llamacpp", 1)
    assert lm.template.name == "cutegpt"
    assert _session(lm).ask("hi").text == torch_answer


def test_lora_not_an_adapter_on_llamacpp(tmp_path):
    from cutegpt.chat.backend import load_chat_model

    cfg = SimpleNamespace(model=None, lora=str(tmp_path), template=None)
    with pytest.raises(CuteGPTError, match="has no adapter_config.json"):
        load_chat_model(cfg, "llamacpp", 1)


# --- SentencePiece: the answer's first word piece ("▁北京") ------------------------------------------------------

SP_QA = [("中国的首都是哪里？", "北京。"), ("hi", "Hello there")]


@pytest.fixture(scope="module")
def sp_parrot(tmp_path_factory) -> SimpleNamespace:
    """A tiny LLaMA with a SentencePiece vocabulary (dummy prefix, `<end>` one token) taught SP_QA, and its GGUF."""
    from cutegpt.export.gguf import export_gguf
    from cutegpt.model.tokenizer import load_tokenizer
    from cutegpt.templates import CuteGPTTemplate, Turn, encode_segments, write_model_card
    from tests.tiny import build_sp_layout

    folder = tmp_path_factory.mktemp("sp-parrot")
    build_sp_layout(folder, "llama1", end=True)
    tok = load_tokenizer(folder)
    model = build_tiny_llama(folder, vocab_size=len(tok))
    seqs = [encode_segments(tok, CuteGPTTemplate().segments([Turn(q, output=a)]))[0] for q, a in SP_QA]
    answer_ids = tok(SP_QA[0][1], add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(answer_ids)[0].startswith("▁")  # the case under test: a word-boundary piece first
    memorise(model, seqs)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_model_card(folder, "cutegpt")
    path = export_gguf(str(folder), folder.parent / "sp-parrot.gguf", template="cutegpt", quant="f32", verify=False,
                       overwrite=True, progress=False)
    return SimpleNamespace(folder=folder, gguf=path)


def test_sentencepiece_answer_is_the_torch_text_on_llamacpp(sp_parrot):
    """llama.cpp's pieces give " 北京。"; transformers decodes "北京。": the llama.cpp backend answers like torch."""
    from cutegpt.model.loading import ModelArgs, load_model
    from cutegpt.runtime.llamacpp import drops_first_space, load_llamacpp

    assert drops_first_space(sp_parrot.gguf)
    lm_torch = load_model(ModelArgs(model=str(sp_parrot.folder)))
    lm_cpp = load_llamacpp(sp_parrot.gguf, threads=1)
    gen = GenerationArgs(greedy=True, max_new_tokens=20)
    for q, a in SP_QA:
        torch_answer = ChatSession(lm_torch, gen).ask(q)
        chunks: list[str] = []
        cpp_answer = _session(lm_cpp).ask(q, on_text=chunks.append)
        assert torch_answer.text == a and torch_answer.stop_reason == "stop"
        assert cpp_answer.text == "".join(chunks) == a and cpp_answer.stop_reason == "stop"
    # without the rule the text would keep llama.cpp's space (the test above would fail)
    raw = load_llamacpp(sp_parrot.gguf, threads=1)
    raw.drops_first_space = False
    assert _session(raw).ask(SP_QA[0][0]).text == " " + SP_QA[0][1]


def test_byte_level_bpe_keeps_its_first_space(parrot):
    from cutegpt.runtime.llamacpp import drops_first_space

    assert not drops_first_space(parrot.gguf)  # GPT-2 style pieces carry their own space ("Ġ"): nothing to drop


@pytest.mark.slow
def test_sentencepiece_answer_is_the_torch_text_on_serve(sp_parrot, tmp_path):
    """serve relays llama.cpp's answer with the first space dropped, streamed or not, as chat and generate give it."""
    from tests.serve.conftest import request, running_server

    q, a = SP_QA[0]
    with running_server("--model", str(sp_parrot.gguf), "--quiet", env={"CUTEGPT_CACHE": str(tmp_path / "cache")}) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        status, body = request(port, "POST", "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 16})
        assert status == 200 and body["choices"][0]["message"]["content"] == a, body
        status, body = request(port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": q}],
                                                                       "temperature": 0, "max_tokens": 16, "stream": True})
        events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
        assert status == 200 and "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == a
