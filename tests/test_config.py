"""Config dataclasses as CLI and YAML: declared bounds, aliases, one spelling per flag, truthful defaults."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import pytest

from cutegpt.cli import COMMANDS
from cutegpt.config import arg, build_parser, parse_config, visible_fields
from cutegpt.errors import CuteGPTError


@dataclasses.dataclass
class Demo:
    bench: Literal["ceval", "cmmlu"] = arg("ceval", "which benchmark", positional=True)
    out: str | None = arg(None, "results folder", aliases=("--output",), absent="a new folder per run")
    micro_batch: int | None = arg(None, "rows per step", ge=1, aliases=("--per_device_train_batch_size",))
    top_p: float = arg(0.8, "nucleus", gt=0, le=1)
    greedy: bool = arg(False, "argmax")
    betas: list[float] = arg([0.9, 0.99], "betas", ge=0, lt=1)

    def check(self) -> None:
        if len(self.betas) != 2:
            raise CuteGPTError("--betas takes two numbers.")


def _error(argv: list[str]) -> str:
    with pytest.raises(CuteGPTError) as e:
        parse_config(Demo, argv, "demo")
    return str(e.value)


def test_values_aliases_and_negation():
    cfg = parse_config(Demo, ["cmmlu", "--output", "o", "--per_device_train_batch_size", "3", "--greedy", "--top_p", "0.5"], "demo")
    assert (cfg.bench, cfg.out, cfg.micro_batch, cfg.greedy, cfg.top_p) == ("cmmlu", "o", 3, True, 0.5)
    assert parse_config(Demo, ["--no-greedy"], "demo").greedy is False


@pytest.mark.parametrize("argv, words", [
    (["--top-p", "2"], "--top-p must be at most 1, not 2"),
    (["--top-p", "0"], "--top-p must be greater than 0"),
    (["--top-p", "nan"], "--top-p must be a finite number"),
    (["--micro-batch", "0"], "--micro-batch must be at least 1, not 0"),
    (["--micro-batch", "-1"], "--micro-batch must be at least 1, not -1"),
    (["--micro-batch", "64.7"], "--micro-batch must be an integer, not '64.7'"),
    (["--micro-batch", "many"], "--micro-batch must be an integer"),
    (["--betas", "0.9"], "--betas takes two numbers"),
    (["--betas", "0.9", "1.5"], "--betas must be less than 1, not 1.5"),
    (["mmlu"], "BENCH must be one of ceval, cmmlu, not 'mmlu'"),
    (["--nonsense"], "unrecognized arguments: --nonsense"),
])
def test_bad_values_are_one_sentence_naming_the_flag(argv, words):
    assert words in _error(argv)


def test_yaml_is_checked_like_flags(tmp_path):
    bad = {"micro_batch: 64.7": "micro_batch must be an integer", "top_p: 3": "top_p must be at most 1",
           "top_p: null": "top_p must have a value", "unknown: 1": "unknown setting 'unknown'",
           "micro_batch: true": "micro_batch must be an integer", "- a list": "must be a mapping"}
    for text, words in bad.items():
        path = tmp_path / "run.yaml"
        path.write_text(text + "\n")
        message = _error(["--config", str(path)])
        assert words in message and str(path) in message, message
    assert "must be a YAML file, not a folder" in _error(["--config", str(tmp_path)])
    assert "does not exist" in _error(["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "ok.yaml").write_text("micro_batch: 4\nout: x\n")
    cfg = parse_config(Demo, ["--config", str(tmp_path / "ok.yaml"), "--out", "y"], "demo")
    assert (cfg.micro_batch, cfg.out) == (4, "y")  # flags win over the file


def _help(cls: type, prog: str) -> str:
    return build_parser(cls, prog).format_help()


def _command_classes():
    import importlib

    for words, (module, cls_name, _fn, _summary) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        yield " ".join(words), getattr(mod, cls_name)


@pytest.mark.parametrize("name, cls", list(_command_classes()), ids=lambda v: v if isinstance(v, str) else "")
def test_help_shows_each_flag_once_with_truthful_defaults(name, cls):
    text = _help(cls, "cutegpt " + name)
    options = re.findall(r"^\s{2}(-[^\s,]+(?:, --[^\s,]+)*)", text, flags=re.M)
    spellings = [o for entry in options for o in re.findall(r"--?[\w-]+", entry)]
    assert len(spellings) == len(set(spellings)), f"{name}: a flag is listed twice"
    assert not [s for s in spellings if "_" in s], f"{name}: underscore spellings are shown"
    assert "--no-no-" not in text
    assert "(default: None)" not in text and "(default: )" not in text and "%%" not in text
    for entry in re.split(r"\n  -", text):
        assert entry.count("(default:") <= 1, f"{name}: two defaults in one entry: {entry[:120]}"


def test_commands_show_only_flags_they_honour():
    classes = dict(_command_classes())
    def flags(name: str) -> set[str]:
        return {f.name for f in visible_fields(classes[name])}
    assert not {"lora", "load_in_8bit", "template"} & flags("vocab extend") - {"template"}
    assert "load_in_8bit" not in flags("export") and "load_in_8bit" not in flags("train sft")
    assert "load_in_8bit" in flags("chat")


def test_same_concept_same_flag_everywhere():
    """Outputs are --out and threads are --threads in every command that has them."""
    for name, cls in _command_classes():
        names = {f.name for f in visible_fields(cls)}
        assert "output" not in names and "num_threads" not in names, name
