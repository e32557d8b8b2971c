"""Generation settings: the user's flags, then the model's generation_config.json / GGUF metadata, then the template's."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cutegpt.generation import (CUTEGPT_DEFAULTS, GenerationArgs, describe_sources, generation_config_defaults,
                               resolve_generation)
from cutegpt.chat.backend import resolved_generation
from cutegpt.chat.cli import ChatConfig
from cutegpt.config import build_parser, parse_config


def _folder(tmp_path: Path, config: dict | None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    if config is not None:
        (folder / "generation_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_flags_win_then_model_then_template(tmp_path):
    folder = _folder(tmp_path, {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "bos_token_id": 1})
    user = GenerationArgs(top_p=0.5)
    gen, sources = resolve_generation(user, generation_config_defaults(folder), "generation_config.json", "cutegpt")
    assert gen.top_p == 0.5 and sources["top_p"] == "your flag"
    assert gen.temperature == 0.2 and sources["temperature"] == "generation_config.json"
    assert gen.greedy is False and sources["greedy"] == "generation_config.json"
    assert gen.repetition_penalty == CUTEGPT_DEFAULTS["repetition_penalty"] == 1.1
    assert sources["repetition_penalty"] == "template cutegpt"
    assert gen.top_k == 50 and gen.max_new_tokens == 256
    line = describe_sources(gen, sources)
    assert "top-p 0.5 (your flag)" in line and "temperature 0.2 (generation_config.json)" in line


def test_template_defaults_cutegpt_vs_auto(tmp_path):
    folder = _folder(tmp_path, {"bos_token_id": 1, "eos_token_id": 2})  # what a converted model records: nothing on sampling
    assert generation_config_defaults(folder) == {}
    cute, _ = resolve_generation(GenerationArgs(), {}, "x", "cutegpt")
    assert (cute.greedy, cute.top_p, cute.temperature, cute.repetition_penalty) == (False, 0.8, 1.0, 1.1)  # the original's
    auto, sources = resolve_generation(GenerationArgs(), {}, "x", "auto")
    assert auto.greedy is True and auto.repetition_penalty == 1.0 and sources["greedy"] == "template auto"


def test_do_sample_false_in_the_model_means_greedy(tmp_path):
    folder = _folder(tmp_path, {"do_sample": False, "max_new_tokens": 99, "top_k": 0, "temperature": "hot"})
    d = generation_config_defaults(folder)
    assert d == {"greedy": True, "max_new_tokens": 99, "top_k": 0}  # a non-number is ignored, not a crash


def test_broken_generation_config_is_ignored(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "generation_config.json").write_text("{not json", encoding="utf-8")
    assert generation_config_defaults(folder) == {}


def test_only_flags_given_on_the_command_line_count(tmp_path, capsys):
    folder = _folder(tmp_path, {"do_sample": True, "temperature": 0.3})
    cfg = parse_config(ChatConfig, ["--model", str(folder), "--temperature", "0.7", "--verbose"], prog="cutegpt chat")
    assert cfg.top_p is None and cfg.greedy is None and cfg.temperature == 0.7
    lm = SimpleNamespace(model_path=folder, template=SimpleNamespace(name="cutegpt"))
    gen = resolved_generation(cfg, lm, verbose=True)
    assert gen.temperature == 0.7 and gen.top_p == 0.8 and gen.greedy is False
    err = capsys.readouterr().err
    assert "temperature 0.7 (your flag)" in err and "greedy False (generation_config.json)" in err


def test_gguf_metadata_is_the_model_source(tmp_path):
    lm = SimpleNamespace(server=object(), generation_defaults={"temperature": 0.2}, model_path=tmp_path / "m.gguf",
                         template=SimpleNamespace(name="auto"))
    cfg = parse_config(ChatConfig, [], prog="cutegpt chat")
    gen = resolved_generation(cfg, lm)
    assert gen.temperature == 0.2 and gen.greedy is True


def test_help_says_what_happens_when_absent():
    text = build_parser(ChatConfig, "cutegpt chat").format_help()
    assert "(default: None)" not in text
    assert text.count("generation_config.json") >= 3
    for flag in ("--backend", "--quiet", "--verbose", "--threads", "--system"):
        assert flag in text


@pytest.mark.parametrize("argv,flag", [(["--top-p", "2"], "--top-p"), (["--temperature", "0"], "--temperature"),
                                       (["--max-new-tokens", "0"], "--max-new-tokens")])
def test_bad_values_name_the_flag(argv, flag):
    from cutegpt.errors import CuteGPTError

    with pytest.raises(CuteGPTError, match=flag):
        parse_config(ChatConfig, argv, prog="cutegpt chat")
