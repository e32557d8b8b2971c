"""The `cutegpt` entry point: fast help, subcommand groups, one-sentence errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cutegpt.cli import COMMANDS, main


def test_help_and_argument_errors_import_no_torch():
    """`--help` and a bad flag answer without importing torch or transformers (seconds of start-up)."""
    script = (
        "import sys, io, contextlib\n"
        "from cutegpt.cli import main, COMMANDS\n"
        "codes = []\n"
        "for words in COMMANDS:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        codes.append(main([*words, '--help']))\n"
        "        codes.append(main([*words, '--threads', '-3']))\n"
        "print(codes)\n"
        "print([m for m in ('torch', 'transformers', 'peft', 'deepspeed', 'matplotlib') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    codes, heavy = done.stdout.strip().splitlines()
    assert set(json.loads(codes)) <= {0, 1}
    assert heavy == "[]", f"--help imported {heavy}"


@pytest.mark.parametrize("group", ["data", "train", "vocab"])
def test_group_help_lists_subcommands(group, capsys):
    assert main([group, "--help"]) == 0
    out = capsys.readouterr().out
    subs = [w[1] for w in COMMANDS if w[0] == group]
    assert subs and all(f"{group} {s}" in out for s in subs)
    assert main([group]) == 0


def test_unknown_command_and_subcommand(capsys):
    assert main(["chta"]) == 2
    assert "unknown command 'chta'" in capsys.readouterr().err
    assert main(["data", "convret"]) == 2
    assert "unknown subcommand 'data convret'" in capsys.readouterr().err


def test_bad_flag_is_one_line_exit_1(capsys):
    assert main(["eval", "foo"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: BENCHMARK must be one of") and "\n" not in err
    assert main(["generate", "x.jsonl", "--top-p", "2"]) == 1
    assert "--top-p must be at most 1, not 2" in capsys.readouterr().err


def test_data_show_without_index_parses():
    from cutegpt.config import parse_config
    from cutegpt.data.stats import ShowConfig

    cfg = parse_config(ShowConfig, ["some-dir"], "cutegpt data show")
    assert cfg.index == 0 and cfg.dataset == "some-dir"


def test_llama_factory_spellings_are_accepted():
    from cutegpt.config import parse_config
    from cutegpt.training.sft import SFTConfig

    cfg = parse_config(SFTConfig, ["--learning_rate", "1e-4", "--output_dir", "o", "--per_device_train_batch_size", "3",
                                   "--gradient_accumulation_steps", "2", "--num_train_epochs", "1", "--lora_rank", "4",
                                   "--num-threads", "1", "--cutoff_len", "64"], "cutegpt train sft")
    assert (cfg.lr, cfg.out, cfg.micro_batch, cfg.grad_accum, cfg.epochs, cfg.lora_r, cfg.threads, cfg.max_length) == \
        (1e-4, "o", 3, 2, 1.0, 4, 1, 64)


def test_deepspeed_launchers_local_rank_argument_is_dropped(capsys):
    """`deepspeed --module cutegpt ...` runs `cutegpt --local_rank=N ...`; the rank comes from LOCAL_RANK anyway."""
    assert main(["--local_rank=3", "--version"]) == 0
    assert capsys.readouterr().out.startswith("cutegpt ")
    assert main(["--local_rank", "--version"]) == 2  # only the launcher's exact form is dropped
