"""`cutegpt generate`: batched answers equal one-at-a-time answers; records are parsed strictly."""

import json

import pytest

from cutegpt.chat.batch import generate_batch, record_to_turns
from cutegpt.chat.engine import Engine, GenerationArgs
from cutegpt.cli import main
from cutegpt.errors import CuteGPTError
from cutegpt.templates import Turn, encode_segments


def test_batched_greedy_equals_single(tiny_lm):
    gen = GenerationArgs(greedy=True, max_new_tokens=8, repetition_penalty=1.1)
    questions = ["你好", "What is the capital of France? Please answer briefly.", "1+1=?"]
    prompts = [encode_segments(tiny_lm.tokenizer, tiny_lm.template.segments([Turn(q)]))[0] for q in questions]
    batched = generate_batch(tiny_lm, prompts, gen)
    for p, (text, ids) in zip(prompts, batched):
        single = Engine(tiny_lm).generate(p, gen)
        assert ids == single.token_ids[: len(ids)]
        assert text == single.text


def test_messages_record():
    turns, system = record_to_turns({"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}, "f, line 1")
    assert system == "S" and turns == [Turn("a", output="b"), Turn("c")]


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "assistant", "content": "x"}]}, "without a user message before it"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "last message must be a non-empty user"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "messages[0] needs 'role'"),
    ({"prompt": ""}, "must be non-empty text"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_records(record, message):
    with pytest.raises(CuteGPTError, match=message.replace("[", r"\[").replace("]", r"\]")):
        record_to_turns(record, "f, line 3")


def test_generate_command_keeps_input_order(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    rows = [{"instruction": "a much longer question than the others, to be sorted last"}, {"prompt": "hi"}, {"instruction": "mid question"}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    code = main(["generate", str(src), "--model", str(tiny_model_dir), "--template", "cutegpt", "--greedy",
                 "--max-new-tokens", "4", "--batch-size", "2", "--output", str(out)])
    assert code == 0
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [ln.get("instruction", ln.get("prompt")) for ln in lines] == [r.get("instruction", r.get("prompt")) for r in rows]
    assert all("answer" in ln and ln["new_tokens"] <= 4 for ln in lines)


def test_generate_bad_json_leaves_no_output(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": \n', encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    code = main(["generate", str(src), "--model", str(tiny_model_dir), "--output", str(out)])
    assert code == 1
    assert f"{src}, line 2: not valid JSON" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_batched_stop_reasons_equal_the_engines(tiny_lm):
    """`generate` records per answer why it ended, as chat's engine decides it (the reference)."""
    from cutegpt.chat.batch import batch_stop_reason

    questions = ["你好", "What is the capital of France?", "1+1=?"]
    prompts = [encode_segments(tiny_lm.tokenizer, tiny_lm.template.segments([Turn(q)]))[0] for q in questions]
    for max_new in (1, 6):
        gen = GenerationArgs(greedy=True, max_new_tokens=max_new)
        for p, (_, ids) in zip(prompts, generate_batch(tiny_lm, prompts, gen)):
            assert batch_stop_reason(tiny_lm, ids, max_new) == Engine(tiny_lm).generate(p, gen).stop_reason


def test_a_marker_completed_on_the_last_allowed_token_is_a_stop(tiny_lm):
    from cutegpt.chat.batch import batch_stop_reason

    tok, stop = tiny_lm.tokenizer, tiny_lm.template.stop
    ended = tok("北京。" + stop, add_special_tokens=False)["input_ids"]
    assert len(tok(stop, add_special_tokens=False)["input_ids"]) > 1  # the marker is several ordinary tokens here
    assert batch_stop_reason(tiny_lm, ended, len(ended)) == "stop"
    assert batch_stop_reason(tiny_lm, ended[:-1], len(ended) - 1) == "length"  # half a marker: cut
    assert batch_stop_reason(tiny_lm, ended[:2], 5) == "stop"  # ended early: a stop token
