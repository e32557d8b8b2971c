"""Preference records: every form people have, rendered with the chat templates, validated with file/line/field."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from cutegpt.data.pairs import Lengths, PrefEncoder, check_kto_labels, encode_prefs, read_prefs
from cutegpt.errors import CuteGPTError
from cutegpt.templates import Turn, get_template


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


HISTORY_TURNS = (Turn("你好", "", "你好！"), Turn("中国的首都是哪里？", "", None))

FORMS = {
    "alpaca": {"instruction": "中国的首都是哪里？", "history": [["你好", "你好！"]], "chosen": "北京。", "rejected": "上海。"},
    "sharegpt": {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                                   {"from": "human", "value": "中国的首都是哪里？"}],
                 "chosen": {"from": "gpt", "value": "北京。"}, "rejected": {"from": "gpt", "value": "上海。"}},
    "messages": {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                              {"role": "user", "content": "中国的首都是哪里？"}],
                 "chosen": [{"role": "assistant", "content": "北京。"}], "rejected": "上海。"},
    "prompt-messages": {"prompt": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                                   {"role": "user", "content": "中国的首都是哪里？"}], "chosen": "北京。", "rejected": "上海。"},
}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("template", ["cutegpt", "auto"])
def test_every_form_renders_the_prompt_chat_sends(tmp_path, tiny_tokenizer, form, template):
    """The prompt tokens decode to `template.prompt(turns)` (what chat sends); the answers are answer + stop (+ EOS for cutegpt)."""
    records, _ = read_prefs([_write(tmp_path / "p.jsonl", [FORMS[form]])])
    rec = records[0]
    assert rec.turns == HISTORY_TURNS and (rec.chosen, rec.rejected) == ("北京。", "上海。")
    tpl = get_template(template, tiny_tokenizer)
    row = PrefEncoder(tiny_tokenizer, tpl, Lengths(256)).encode(rec, collections.Counter())
    assert tiny_tokenizer.decode(row["prompt_ids"]) == tpl.prompt(list(HISTORY_TURNS))
    stop = "<end>" if template == "cutegpt" else "<|im_end|>"
    # the cutegpt format ends an answer with <end> and EOS, as in SFT; a model's own template with its end-of-turn token
    end = stop + (tiny_tokenizer.eos_token if template == "cutegpt" else "")
    assert tiny_tokenizer.decode(row["chosen_ids"]) == "北京。" + end
    assert tiny_tokenizer.decode(row["rejected_ids"]) == "上海。" + end


def test_plain_prompt_and_kto_records(tmp_path, tiny_tokenizer):
    records, _ = read_prefs([_write(tmp_path / "p.json", [{"prompt": "Say hi.", "chosen": "Hi.", "rejected": "No."}])])
    assert records[0].turns == (Turn("Say hi.", "", None),)
    kto, _ = read_prefs([_write(tmp_path / "k.jsonl", [{"instruction": "Say hi.", "completion": "Hi.", "label": True},
                                                      {"prompt": "Say no.", "completion": "Yes.", "label": False}])])
    assert [(r.completion, r.label) for r in kto] == [("Hi.", True), ("Yes.", False)]
    with pytest.raises(CuteGPTError, match="every KTO record is desirable"):
        check_kto_labels([{"label": True}, {"label": True}], "k.jsonl")


@pytest.mark.parametrize("record,message", [
    ({"instruction": "Q", "chosen": "same", "rejected": " same "}, "line 2: fields 'chosen' and 'rejected' are the same answer"),
    ({"instruction": "Q", "chosen": "", "rejected": "no"}, "line 2: field 'chosen' is empty"),
    ({"instruction": "Q", "chosen": "yes"}, "line 2: field 'rejected' is missing"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "y", "rejected": "n"},
     "line 2: field 'messages' must end with a user message"),
    ({"instruction": "Q", "completion": "A", "label": "yes"}, "line 2: field 'label' is text, not true"),
    ({"question": "Q", "chosen": "y", "rejected": "n"}, "line 2: no prompt"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    path = _write(tmp_path / "bad.jsonl", [{"instruction": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(CuteGPTError) as e:
        read_prefs([path])
    assert str(path) in str(e.value) and message in str(e.value)
    records, stats = read_prefs([path], skip_invalid=True)
    assert len(records) == 1 and len(stats.skipped) == 1


def test_pairs_and_kto_records_are_not_mixed(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [{"instruction": "Q", "chosen": "a", "rejected": "b"},
                                             {"instruction": "Q", "completion": "a", "label": True}])
    with pytest.raises(CuteGPTError, match="line 2: paired .* are mixed"):
        read_prefs([path])


def test_truncation_rules(tmp_path, tiny_tokenizer):
    """Prompt over --max-prompt-length keeps its end; answers cut to --max-length lose stop and EOS; no room is refused."""
    tpl = get_template("cutegpt", tiny_tokenizer)
    long_q = "The quick brown fox jumps over the lazy dog. " * 6
    rec = read_prefs([_write(tmp_path / "p.jsonl", [{"instruction": long_q, "chosen": "Paris. " * 20, "rejected": "No."}])])[0][0]
    full = PrefEncoder(tiny_tokenizer, tpl, Lengths(10_000)).encode(rec, collections.Counter())
    counts: collections.Counter = collections.Counter()
    cut = PrefEncoder(tiny_tokenizer, tpl, Lengths(60, 40)).encode(rec, counts)
    assert cut["prompt_ids"] == full["prompt_ids"][-40:]  # the question (at the end) stays
    assert cut["chosen_ids"] == full["chosen_ids"][:20]  # 60 - 40 tokens of the answer, no stop marker, no EOS
    assert cut["rejected_ids"] == full["rejected_ids"]  # fits whole
    assert counts == {"truncated_prompts": 1, "truncated_answers": 1}
    stats = type("S", (), {"counts": collections.Counter(), "skipped": []})()
    with pytest.raises(CuteGPTError, match=r"line 1: the prompt is \d+ tokens, which leaves no room for an answer within --max-length 30"):
        encode_prefs([rec], PrefEncoder(tiny_tokenizer, tpl, Lengths(30)), stats, skip_invalid=False)
