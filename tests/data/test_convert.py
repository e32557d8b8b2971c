import collections
import pickle
import re
import random

import pytest

from cutegpt.cli import main
from cutegpt.data.convert import ConvertConfig, convert, plan_units
from cutegpt.data.manifest import check_tokenizer, load_dataset, read_manifest
from cutegpt.errors import CuteGPTError
from cutegpt.templates import CUTEGPT_SYSTEM
from tests.data.conftest import CONVERSATIONS


def _convert(tmp_path, src, name="out", **kw):
    cfg = ConvertConfig(input=str(src), out=str(tmp_path / name), **kw)
    return convert(cfg)


def _samples(ds):
    """(ids, labels) of every sample in every row."""
    out = []
    for row in ds:
        start = 0
        for n in row["seq_lens"]:
            out.append((row["input_ids"][start:start + n], row["labels"][start:start + n]))
            start += n
    return out


def _spans(ids, labels):
    """Runs of trained token ids."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize("packing", ["pad", "bins"])
def test_labels_cover_exactly_answers_stop_and_eos(tmp_path, ift_pkl, tiny_model_dir, tiny_tokenizer, packing):
    out = _convert(tmp_path, ift_pkl, model=str(tiny_model_dir), packing=packing, max_length=256)
    ds, m = load_dataset(out, tiny_tokenizer)
    tok = tiny_tokenizer
    samples = _samples(ds)
    assert len(samples) == len(CONVERSATIONS) and m["counts"]["samples"] == len(CONVERSATIONS)
    eos = tok.eos_token
    want = collections.Counter()
    for conv in CONVERSATIONS:
        answers = [t["output"] + "<end>" for t in conv]
        answers[-1] += eos  # the EOS after a conversation is trained (its own run once tokenized apart)
        want[tuple(answers)] += 1
    got = collections.Counter()
    for ids, labels in samples:
        assert labels[0] == -100  # no loss on a sample's first token
        text = tok.decode(ids)
        assert text.startswith(CUTEGPT_SYSTEM)
        runs = [tok.decode(r) for r in _spans(ids, labels)]
        joined = []  # answer + <end> and the EOS are adjacent: one run
        for r in runs:
            joined.append(r)
        got[tuple(joined)] += 1
        # every untrained token is system line or a prompt: decoding it never contains answer text
        untrained = tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
        assert "<end>" not in untrained
    assert got == want


def test_bins_never_split_and_boundaries_exact(tmp_path, ift_pkl, tiny_model_dir, tiny_tokenizer):
    pad = _convert(tmp_path, ift_pkl, "pad", model=str(tiny_model_dir), packing="pad", max_length=200)
    bins = _convert(tmp_path, ift_pkl, "bins", model=str(tiny_model_dir), packing="bins", max_length=200)
    ds_pad, _ = load_dataset(pad)
    ds_bins, m = load_dataset(bins)
    for row in ds_bins:
        assert sum(row["seq_lens"]) == len(row["input_ids"]) == len(row["labels"]) <= 200
    as_key = lambda s: (tuple(s[0]), tuple(s[1]))  # noqa: E731
    # the same samples, whole, in both layouts (bins only regroups them)
    assert collections.Counter(map(as_key, _samples(ds_bins))) == collections.Counter(map(as_key, _samples(ds_pad)))
    assert len(ds_bins) < len(ds_pad)
    tokens = sum(len(r["input_ids"]) for r in ds_bins)
    assert m["packing_efficiency"] == pytest.approx(tokens / (len(ds_bins) * 200), abs=1e-6)


def _original_stream(tok, conversations, L):
    """The original GPT2Dataset_onlyres._preprocess on already-rendered conversations (brute force)."""
    meta = tok(CUTEGPT_SYSTEM, add_special_tokens=False)["input_ids"][-L // 3:]
    ids, labels = [], []
    for conv in conversations:
        s_ids, s_lab = list(meta), [-100] * len(meta)
        for t in conv:
            prompt = f"问：{t['instruction']}\n{t['input']}\n答：\n" if t["input"] else f"问：{t['instruction']}\n答：\n"
            p = tok(prompt, add_special_tokens=False)["input_ids"][:L // 3]
            o = tok(t["output"] + "<end>", add_special_tokens=False)["input_ids"][:2 * (L // 3) - 1]
            s_ids += p + o
            s_lab += [-100] * len(p) + o
        ids += s_ids + [tok.eos_token_id]
        labels += s_lab + [tok.eos_token_id]
    return ids, labels


def test_concat_reproduces_the_original_layout(tmp_path, ift_pkl, tiny_model_dir, tiny_tokenizer):
    L = 48  # small: prompts (L//3 = 16) and answers (31) are truncated, blocks cut conversations
    out = _convert(tmp_path, ift_pkl, model=str(tiny_model_dir), packing="concat", max_length=L, seed=7, export_pkl=True)
    ds, m = load_dataset(out)
    order = [u[0] for u in plan_units([len(c) for c in CONVERSATIONS], 7, False)]
    assert order == _shuffled(7)  # the conversation order is random.Random(seed).shuffle, like the original's
    ids, labels = _original_stream(tiny_tokenizer, [CONVERSATIONS[i] for i in order], L)
    n_blocks = len(ids) // L  # the original's __len__: the last partial block is never used
    assert len(ds) == n_blocks
    for b, row in enumerate(ds):
        assert row["input_ids"] == ids[b * L:(b + 1) * L]
        assert row["labels"] == labels[b * L:(b + 1) * L]
        assert row["seq_lens"] == [L]
    assert m["counts"]["dropped_tail_tokens"] == len(ids) - n_blocks * L
    exported = pickle.loads((out / "ift_data_ids.pkl").read_bytes())
    assert exported == {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def _shuffled(seed):
    order = list(range(len(CONVERSATIONS)))
    random.Random(seed).shuffle(order)
    return order


def test_concat_hand_checked_small_case(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Two one-turn conversations, no system line, L = 21 (nothing truncated: prompts of 7 tokens = L//3): the stream and its cut, by hand."""
    import json

    src = tmp_path / "two.jsonl"
    src.write_text('{"instruction": "q", "output": "a", "system": ""}\n{"instruction": "r", "output": "b", "system": ""}\n', encoding="utf-8")
    out = _convert(tmp_path, src, model=str(tiny_model_dir), packing="concat", max_length=21, seed=0)
    tok = tiny_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    first, second = [0, 1] if _order2(0) == [0, 1] else [1, 0]
    convs = [("q", "a"), ("r", "b")]
    stream, labs = [], []
    for k in (first, second):
        q, a = convs[k]
        p, o = enc(f"问：{q}\n答：\n"), enc(f"{a}<end>")
        stream += p + o + [tok.eos_token_id]
        labs += [-100] * len(p) + o + [tok.eos_token_id]
    assert 21 < len(stream) < 42  # one full block; the tail goes, as in the original
    ds, m = load_dataset(out)
    assert [r["input_ids"] for r in ds] == [stream[:21]]
    assert [r["labels"] for r in ds] == [labs[:21]]
    assert m["counts"]["dropped_tail_tokens"] == len(stream) - 21
    assert json.loads((out / "manifest.json").read_text())["packing"] == "concat"


def _order2(seed):
    o = [0, 1]
    random.Random(seed).shuffle(o)
    return o


def test_manifest_refuses_another_tokenizer(tmp_path, ift_pkl, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoTokenizer

    out = _convert(tmp_path, ift_pkl, model=str(tiny_model_dir), max_length=128)
    m = read_manifest(out)
    check_tokenizer(m, tiny_tokenizer, out)  # the same vocabulary passes
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_tokens(["<end>"])  # what full fine-tuning of the original did: a different vocabulary
    with pytest.raises(CuteGPTError, match="was tokenized with .* not with this model's tokenizer"):
        load_dataset(out, other)


def test_template_pool_is_seeded_and_bug_free(tmp_path, ift_jsonl, tiny_model_dir, tiny_tokenizer):
    a = _convert(tmp_path, ift_jsonl, "a", model=str(tiny_model_dir), template_pool=True, seed=3, max_length=256)
    b = _convert(tmp_path, ift_jsonl, "b", model=str(tiny_model_dir), template_pool=True, seed=3, max_length=256)
    c = _convert(tmp_path, ift_jsonl, "c", model=str(tiny_model_dir), template_pool=True, seed=4, max_length=256)
    rows = lambda out: [dict(r) for r in load_dataset(out)[0]]  # noqa: E731
    assert rows(a) == rows(b)
    assert rows(a) != rows(c)
    text = "".join(tiny_tokenizer.decode(r["input_ids"]) for r in rows(a))
    assert "\\Response" not in text
    assert read_manifest(a)["template_pool"] is True


def test_group_single_turns_plan():
    n_turns = [1] * 200 + [3] * 20
    units = plan_units(n_turns, seed=1, group_single_turns=True)
    flat = sorted(i for u in units for i in u)
    assert flat == list(range(220))
    for u in units:
        if any(n_turns[i] != 1 for i in u):
            assert len(u) == 1  # native multi-turn conversations stay whole
        else:
            assert 1 <= len(u) <= 10
    assert max(len(u) for u in units) > 1
    assert units == plan_units(n_turns, seed=1, group_single_turns=True)


def test_group_single_turns_makes_pseudo_dialogues(tmp_path, ift_pkl, tiny_model_dir, tiny_tokenizer):
    out = _convert(tmp_path, ift_pkl, model=str(tiny_model_dir), group_single_turns=True, seed=5, max_length=512)
    ds, m = load_dataset(out)
    assert m["counts"]["conversations"] == len(CONVERSATIONS)
    samples = _samples(ds)
    assert len(samples) == m["counts"]["samples"] < len(CONVERSATIONS)
    for ids, _ in samples:  # one system line per pseudo-dialogue
        assert tiny_tokenizer.decode(ids).count(CUTEGPT_SYSTEM) == 1


@pytest.mark.parametrize("split_long", [True, False])
def test_long_conversation_cut_after_a_whole_turn(tmp_path, tiny_model_dir, tiny_tokenizer, split_long):
    import json

    long_turns = [{"instruction": f"问题{i}", "input": "", "output": "机器学习是人工智能的一个分支。" * 2} for i in range(12)]
    src = tmp_path / "long.json"
    src.write_text(json.dumps([long_turns]), encoding="utf-8")
    L = 120
    out = _convert(tmp_path, src, model=str(tiny_model_dir), packing="pad", max_length=L, split_long=split_long)
    ds, m = load_dataset(out)
    c = m["counts"]
    assert c["truncated_conversations"] == 1
    texts = [tiny_tokenizer.decode(r["input_ids"]) for r in ds]
    for row, text in zip(ds, texts):
        assert len(row["input_ids"]) <= L
        assert text.startswith(CUTEGPT_SYSTEM[-5:]) or CUTEGPT_SYSTEM[-10:] in text  # the (truncated) system line first
        assert text.endswith("<end>" + tiny_tokenizer.eos_token)  # cut after a stop marker, then EOS
    kept = sum(t.count("<end>") for t in texts)
    if split_long:  # every turn is kept, in order, over several samples
        assert len(ds) > 1 and kept == 12 and c["dropped_turns"] == 0 and c["continued_samples"] == len(ds) - 1
        questions = [q for t in texts for q in re.findall(r"问题(\d+)", t)]
        assert sorted(map(int, questions)) == list(range(12))
    else:
        assert len(ds) == 1 and 0 < kept < 12 and c["dropped_turns"] == 12 - kept


def test_train_on_prompt(tmp_path, ift_pkl, tiny_model_dir):
    out = _convert(tmp_path, ift_pkl, model=str(tiny_model_dir), packing="pad", train_on_prompt=True, max_length=256)
    for row in load_dataset(out)[0]:
        assert row["labels"][0] == -100 and row["labels"][1:] == row["input_ids"][1:]


def test_cli_bad_input_leaves_nothing(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps([[{"instruction": "a", "input": ""}]]))
    out = tmp_path / "out"
    code = main(["data", "convert", str(bad), "--out", str(out), "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert code == 1
    assert "bad.pkl: record [0]: turn [0]: field 'output' is missing" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_convert_stats_show(tmp_path, ift_jsonl, tiny_model_dir, capsys):
    out = tmp_path / "ds"
    assert main(["data", "convert", str(ift_jsonl), "--out", str(out), "--model", str(tiny_model_dir), "--max-length", "128"]) == 0
    assert "packing efficiency" in capsys.readouterr().out
    assert main(["data", "convert", str(ift_jsonl), "--out", str(out), "--model", str(tiny_model_dir)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "stats", str(out)]) == 0
    assert (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert "packing efficiency" in capsys.readouterr().out
    assert main(["data", "show", str(out), "0", "--model", str(tiny_model_dir), "--no-color"]) == 0
    shown = capsys.readouterr().out
    assert "[[" in shown and "<end>" in shown
    assert main(["data", "show", str(out), "99", "--model", str(tiny_model_dir)]) == 1


def test_batched_encoding_equals_template_encode_segments(tiny_model_dir, tiny_tokenizer):
    """Training text and ids are what templates.encode_segments (the chat's path) gives."""
    from cutegpt.data.convert import EncodeSettings, Encoder
    from cutegpt.data.readers import parse_record
    from cutegpt.templates import encode_segments, get_template

    enc = Encoder(EncodeSettings(str(tiny_model_dir), "cutegpt", False, False, 4096, "fit", 0), tiny_tokenizer)
    assert enc._backend is not None  # the Rust fast path agrees with the HF call on the probes
    template = get_template("cutegpt")
    convs = [parse_record(c) for c in CONVERSATIONS]
    chunk = enc.encode_chunk(list(enumerate(convs)))
    start = 0
    for conv, n in zip(convs, chunk.lengths):
        ids, train = encode_segments(tiny_tokenizer, template.segments(conv.turns, conv.system))
        assert chunk.ids[start:start + n].tolist() == ids + [tiny_tokenizer.eos_token_id]
        labels = [t if tr else -100 for t, tr in zip(ids, train)] + [tiny_tokenizer.eos_token_id]
        assert chunk.labels[start:start + n].tolist() == labels
        start += n


def test_auto_template_with_chat_template(tmp_path, ift_jsonl, tiny_model_dir, tiny_tokenizer):
    out = _convert(tmp_path, ift_jsonl, model=str(tiny_model_dir), template="auto", packing="pad", max_length=256)
    for ids, labels in _samples(load_dataset(out)[0]):
        runs = [tiny_tokenizer.decode(r) for r in _spans(ids, labels)]
        assert runs and all(r.endswith("<|im_end|>") for r in runs)  # answers and their end-of-turn only: no EOS after "\n"
        assert "<|im_start|>assistant" in tiny_tokenizer.decode(ids)


@pytest.mark.slow
def test_workers_give_identical_output(tmp_path, ift_jsonl, tiny_model_dir):
    import json

    big = tmp_path / "big.jsonl"
    lines = ift_jsonl.read_text(encoding="utf-8").splitlines() * 200  # > CHUNK_UNITS, so several tasks
    big.write_text("\n".join(lines), encoding="utf-8")
    a = _convert(tmp_path, big, "w1", model=str(tiny_model_dir), template_pool=True, group_single_turns=True, max_length=512)
    b = _convert(tmp_path, big, "w2", model=str(tiny_model_dir), template_pool=True, group_single_turns=True, max_length=512, workers=2)
    assert [dict(r) for r in load_dataset(a)[0]] == [dict(r) for r in load_dataset(b)[0]]
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["counts"] == mb["counts"]


@pytest.mark.slow
def test_original_sample_with_embedded_tokenizer(tmp_path, embedded_dir):
    """The real 40-conversation sample, if present, with SmolLM2's tokenizer: counts add up, labels are answers."""
    from pathlib import Path

    from cutegpt.model.loading import load_tokenizer

    import os

    shared = Path(os.environ.get("CUTEGPT_SHARED") or Path(__file__).resolve().parents[2].parent / "shared")
    sample = shared / "data" / "cutegpt_ift_sample.pkl"
    if not sample.is_file():
        pytest.skip(f"the shared sample data {sample} is absent (set $CUTEGPT_SHARED to the folder holding data/)")
    out = convert(ConvertConfig(input=str(sample), out=str(tmp_path / "ds"), model=str(embedded_dir), max_length=1024))
    tok = load_tokenizer(embedded_dir)
    ds, m = load_dataset(out, tok)
    c = m["counts"]
    assert c["records_read"] == 40 and c["conversations"] == 40 and c["turns"] == 147
    assert c["units"] == 40 and sum(len(r["seq_lens"]) for r in ds) == c["samples"] >= 40
    assert c["dropped_turns"] == 0  # long conversations continue in new samples
    assert all(len(r["input_ids"]) <= 1024 for r in ds)
    assert m["packing_efficiency"] > 0.85
    for ids, labels in _samples(ds):
        for run in _spans(ids, labels):
            text = tok.decode(run)
            assert text.endswith("<end>") or text.endswith("<end>" + tok.eos_token) or "<end>" not in text


@pytest.mark.parametrize("L", [48, 90])
def test_cut_answer_keeps_no_partial_stop_marker_and_no_eos(tmp_path, tiny_model_dir, tiny_tokenizer, L):
    import json

    src = tmp_path / "long-answer.json"
    src.write_text(json.dumps([[{"instruction": "问题", "input": "", "output": "机器学习是人工智能的一个分支。" * 20}]], ensure_ascii=False), encoding="utf-8")
    out = _convert(tmp_path, src, model=str(tiny_model_dir), packing="pad", max_length=L)
    ds, m = load_dataset(out)
    ((ids, labels),) = _samples(ds)
    assert len(ids) <= L and m["counts"]["truncated_answers"] == 1
    assert ids[-1] != tiny_tokenizer.eos_token_id
    (run,) = _spans(ids, labels)
    answer = tiny_tokenizer.decode(run)
    assert "机器学习" in answer and not any(answer.endswith("<end>"[:k]) for k in range(1, 6))


def test_template_none_follows_the_model_card(tmp_path, ift_jsonl, tiny_model_dir):
    import shutil

    from cutegpt.templates import write_model_card

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert read_manifest(_convert(tmp_path, ift_jsonl, "a", model=str(model), template=None, max_length=256))["template"] == "cutegpt"
    write_model_card(model, "auto")
    assert read_manifest(_convert(tmp_path, ift_jsonl, "b", model=str(model), template=None, max_length=256))["template"] == "auto"
