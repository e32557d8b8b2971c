"""Fixtures for training tests: packed datasets built here (no dependency on `data convert`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cutegpt.data.manifest import DATA_DIR, FORMAT, MANIFEST, VERSION, tokenizer_info
from cutegpt.data.packing import pack_bins
from cutegpt.io import write_json
from cutegpt.templates import Turn, encode_segments, get_template

QA = [
    ("中国的首都是哪里？", "北京。"),
    ("What is the capital of France?", "Paris."),
    ("请推荐一本名著。", "红楼梦。"),
    ("2 + 3 = ?", "5"),
    ("机器学习是什么？", "人工智能的一个分支。"),
    ("Name a colour.", "Blue."),
    ("今天天气怎么样？", "很好。"),
    ("def add(a, b):", "return a + b"),
    ("The quick brown fox?", "jumps over the lazy dog."),
    ("深度学习使用什么？", "多层神经网络。"),
    ("Say hello.", "Hello!"),
    ("一加一等于几？", "二。"),
]


def encode_samples(tokenizer: Any, template: str = "cutegpt", pairs=QA) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per single-turn sample, labels -100 off the answer and at the first token."""
    tpl = get_template(template, tokenizer)
    out = []
    for q, a in pairs:
        ids, train = encode_segments(tokenizer, tpl.segments([Turn(q, "", a)]))
        ids.append(tokenizer.eos_token_id)
        train.append(True)
        labels = [t if m else -100 for t, m in zip(ids, train)]
        labels[0] = -100
        out.append((ids, labels))
    return out


def write_dataset(folder: Path, tokenizer: Any, samples: list[tuple[list[int], list[int]]], max_length: int,
                  template: str = "cutegpt", pack: bool = True) -> Path:
    """A dataset folder in the `data convert` format (bins packing, or one sample per row)."""
    from datasets import Dataset

    lengths = [len(s[0]) for s in samples]
    bins = pack_bins(lengths, max_length) if pack else [[i] for i in range(len(samples))]
    rows: dict[str, list] = {"input_ids": [], "labels": [], "seq_lens": []}
    for b in bins:
        rows["input_ids"].append([t for i in b for t in samples[i][0]])
        rows["labels"].append([t for i in b for t in samples[i][1]])
        rows["seq_lens"].append([lengths[i] for i in b])
    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows).save_to_disk(str(folder / DATA_DIR))
    write_json(folder / MANIFEST, {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer_info(tokenizer),
                                   "template": template, "max_length": max_length, "packing": "bins" if pack else "pad",
                                   "rows": len(bins), "samples": len(samples)})
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin and run 10-30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sft_dataset(tmp_path_factory, tiny_tokenizer) -> Path:
    return write_dataset(tmp_path_factory.mktemp("sft-data"), tiny_tokenizer, encode_samples(tiny_tokenizer), 96)


@pytest.fixture(scope="session")
def sft_dataset_end(tmp_path_factory, tiny_model_dir) -> Path:
    """The same data tokenized with <end> as one special token (what --method full trains on)."""
    from transformers import AutoTokenizer

    from cutegpt.templates import add_stop_token

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    add_stop_token(tok)
    return write_dataset(tmp_path_factory.mktemp("sft-data-end"), tok, encode_samples(tok), 96)


def read_summary(out: Path) -> dict:
    import json

    return json.loads((out / "summary.json").read_text())
