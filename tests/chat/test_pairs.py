"""`cutegpt data pairs`: chosen = the file's answer, rejected = what `cutegpt generate` answers to the same prompt."""

from __future__ import annotations

import json

from cutegpt.cli import main
from cutegpt.data.pairs import read_prefs


def test_pairs_are_the_files_answers_against_generate(tiny_model_dir, tmp_path, capsys):
    records = [{"instruction": "中国的首都是哪里？", "output": "北京。"},
               {"instruction": "Translate", "input": "猫", "output": "cat"},
               {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                  {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]}]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    gen = ["--model", str(tiny_model_dir), "--template", "cutegpt", "--greedy", "--max-new-tokens", "6", "--backend", "torch",
           "--threads", "1"]
    assert main(["data", "pairs", str(sft), "--out", str(tmp_path / "pairs.jsonl"), *gen]) == 0
    assert "wrote 3 pairs" in capsys.readouterr().out
    # the same prompts through `cutegpt generate` itself
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"instruction": "中国的首都是哪里？"}, {"instruction": "Translate", "input": "猫"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Name a colour."}]}]), encoding="utf-8")
    assert main(["generate", str(prompts), "--out", str(tmp_path / "answers.jsonl"), *gen]) == 0
    answers = [json.loads(line)["answer"] for line in (tmp_path / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs, _ = read_prefs([tmp_path / "pairs.jsonl"])
    assert [p.chosen for p in pairs] == ["北京。", "cat", "Blue."]
    assert [p.rejected for p in pairs] == answers
    assert pairs[1].turns[-1].instruction == "Translate\n猫"  # renders as instruction + input (templates.py)
    assert [t.output for t in pairs[2].turns] == ["Hello!", None]
    assert not list(tmp_path.glob(".pairs-*"))
