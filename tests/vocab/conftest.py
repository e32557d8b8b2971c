"""Fixtures for the vocabulary tests: a bilingual corpus and two tiny base models, one per tokenizer family.

    sp_base   tiny untied LLaMA + SentencePiece BPE tokenizer.model with byte fallback (like LLaMA's),
              trained on mostly English text so most Chinese characters fall back to bytes
    bpe_base  tiny tied LLaMA + byte-level BPE tokenizer.json (like SmolLM2's)
"""

from __future__ import annotations

import io
import json
from importlib import resources
from pathlib import Path

import pytest

from tests.tiny import CORPUS, build_tiny_llama, build_tokenizer


def recipe_corpus() -> list[str]:
    data = json.loads(resources.files("cutegpt").joinpath("resources/recipe_data.json").read_text(encoding="utf-8"))
    return data["corpus"]


@pytest.fixture(scope="session")
def corpus_txt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(recipe_corpus()) + "\n", encoding="utf-8")
    return path


def build_sp_base(out: Path) -> Path:
    import sentencepiece as spm

    english = [line for line in recipe_corpus() if not any("\u4e00" <= ch <= "\u9fff" for ch in line)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(english * 3 + CORPUS), model_writer=buf, model_type="bpe", vocab_size=700,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", split_digits=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}), encoding="utf-8")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    build_tiny_llama(out, vocab_size=len(tok), tie=False)
    return out


@pytest.fixture(scope="session")
def sp_base(tmp_path_factory) -> Path:
    return build_sp_base(tmp_path_factory.mktemp("sp-base"))


@pytest.fixture(scope="session")
def bpe_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe-base")
    tok = build_tokenizer(out)
    build_tiny_llama(out, vocab_size=len(tok), tie=True, seed=1)
    return out


def train_pieces(corpus: Path, base: Path, out: Path, vocab_size: int) -> Path:
    from cutegpt.vocab.train import VocabTrainConfig, run_vocab_train

    assert run_vocab_train(VocabTrainConfig(out=str(out), corpus=[str(corpus)], model=str(base), vocab_size=vocab_size)) == 0
    return out


def extend(base: Path, pieces: Path, out: Path, **kw) -> Path:
    from cutegpt.vocab.extend import VocabExtendConfig, run_vocab_extend

    assert run_vocab_extend(VocabExtendConfig(model=str(base), pieces=str(pieces), out=str(out), **kw)) == 0
    return out


@pytest.fixture(scope="session")
def sp_pieces(sp_base, corpus_txt, tmp_path_factory) -> Path:
    return train_pieces(corpus_txt, sp_base, tmp_path_factory.mktemp("sp-pieces") / "zh", 1500)


@pytest.fixture(scope="session")
def bpe_pieces(bpe_base, corpus_txt, tmp_path_factory) -> Path:
    return train_pieces(corpus_txt, bpe_base, tmp_path_factory.mktemp("bpe-pieces") / "zh", 1500)


@pytest.fixture(scope="session")
def sp_extended(sp_base, sp_pieces, tmp_path_factory) -> Path:
    return extend(sp_base, sp_pieces, tmp_path_factory.mktemp("sp-ext") / "model")


@pytest.fixture(scope="session")
def bpe_extended(bpe_base, bpe_pieces, tmp_path_factory) -> Path:
    return extend(bpe_base, bpe_pieces, tmp_path_factory.mktemp("bpe-ext") / "model")


@pytest.fixture(params=["sp", "bpe"])
def family_case(request, sp_base, sp_pieces, sp_extended, bpe_base, bpe_pieces, bpe_extended):
    """(base folder, pieces folder, extended folder) for each tokenizer family."""
    if request.param == "sp":
        return request.param, sp_base, sp_pieces, sp_extended
    return request.param, bpe_base, bpe_pieces, bpe_extended
