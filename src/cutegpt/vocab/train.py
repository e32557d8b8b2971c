"""`cutegpt vocab train`: train a Chinese tokenizer whose pieces `cutegpt vocab extend` appends.

The kind follows the base model's tokenizer family, so the pieces can be merged into it:

    base tokenizer.model (LLaMA, SentencePiece BPE/unigram) -> SentencePiece of the same type,
                                                              with byte fallback
    base tokenizer.json (byte-level BPE: SmolLM2, LLaMA-3)  -> byte-level BPE (`tokenizers`) with
                                                              the base's pre-tokenizer, trained on
                                                              the CJK runs of the corpus only

Output folder:

    OUT/tokenizer.model | tokenizer.json    the Chinese tokenizer
    OUT/heldout.jsonl                       documents kept out of training ({"text": ...}); `extend`
                                            measures tokens per character on them
    OUT/vocab_train.json                    what was trained on, and how
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cutegpt.config import arg
from cutegpt.errors import CuteGPTError
from cutegpt.io import atomic_dir, atomic_file, write_json
from cutegpt.threads import THREADS_HELP, tokenizer_threads
from cutegpt.vocab.merge import JSON_FILE, SP_FILE, detect_family, load_sp_proto, load_tokenizer_json
from cutegpt.vocab.text import cjk_runs, count_han, read_corpus, split_held_out

MIN_HAN_CHARS = 300  # below this a "Chinese vocabulary" is mostly noise
HELD_OUT_FILE = "heldout.jsonl"
INFO_FILE = "vocab_train.json"
Kind = Literal["auto", "sp-bpe", "sp-unigram", "byte-bpe"]


@dataclass
class VocabTrainConfig:
    """Train a Chinese tokenizer on a corpus (.txt: one document per line; .jsonl: a text field)."""

    out: str = arg(help="output folder for the Chinese tokenizer", aliases=("--output", "--output-dir", "--output_dir"))
    corpus: list[str] = arg([], "corpus files (.txt or .jsonl)", positional=True)
    model: str | None = arg(None, "base model (or tokenizer) folder whose tokenizer family decides the kind", absent="the embedded SmolLM2")
    vocab_size: int = arg(8000, "size of the Chinese tokenizer (pieces the base already has are not appended later)", ge=100)
    kind: Kind = arg("auto", "tokenizer kind; auto = what the base model's tokenizer needs")
    text_field: str = arg("text", "field holding the text in .jsonl corpus files")
    held_out: float = arg(0.05, "fraction of documents kept out of training, for the before/after statistics", ge=0, lt=1)
    character_coverage: float = arg(0.9995, "SentencePiece: share of characters covered by pieces (the rest fall back to bytes)", gt=0, le=1)
    min_frequency: int = arg(2, "byte-level BPE: merges seen fewer times are not learned", ge=1)
    seed: int = arg(0, "seed for the held-out split")
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    overwrite: bool = arg(False, "replace an existing output folder")


def base_folder(model: str | None) -> Path:
    """The folder holding the base tokenizer (the embedded model's when none is given)."""
    if model is None:
        from cutegpt.model.embedded import embedded_model_dir

        return embedded_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise CuteGPTError(f"--model {path} does not exist.")
    if path.is_dir():
        return path  # even when it is called x.gguf
    if path.suffix == ".gguf":
        raise CuteGPTError(f"--model {path}: vocabulary work needs a Hugging Face model folder, not a GGUF file; convert it to a folder first.")
    raise CuteGPTError(f"--model {path} is a file; it must be a model folder.")


def check_corpus(corpus: list[str], flag: str) -> list[Path]:
    """The corpus paths, each checked to exist; folders count as inputs too."""
    from cutegpt.data.text import corpus_files
    from cutegpt.io import check_input

    paths = [check_input(Path(c).expanduser(), flag=flag) for c in corpus]
    if paths:
        corpus_files(paths)
    return paths


def resolve_kind(kind: Kind, base: Path) -> Kind:
    if kind != "auto":
        return kind
    if detect_family(base) == "byte-bpe":
        return "byte-bpe"
    return "sp-unigram" if load_sp_proto(base / SP_FILE).trainer_spec.model_type == 1 else "sp-bpe"


def run_vocab_train(cfg: VocabTrainConfig) -> int:
    from cutegpt.io import check_output

    out = Path(cfg.out).expanduser()
    if not cfg.corpus:
        raise CuteGPTError("CORPUS is required: one or more .txt or .jsonl files (or folders of them).")
    corpus = check_corpus(cfg.corpus, "CORPUS")
    base = base_folder(cfg.model)
    check_output(out, flag="--out", inputs=[*corpus, base], overwrite=cfg.overwrite, kind="folder")
    docs = read_corpus(cfg.corpus, cfg.text_field)
    names = ", ".join(map(str, cfg.corpus))
    if not docs:
        raise CuteGPTError(f"the corpus ({names}) is empty.")
    train, held = split_held_out(docs, cfg.held_out, cfg.seed)
    han = sum(map(count_han, train))
    if han == 0:
        raise CuteGPTError(f"the corpus ({names}) has no Chinese (CJK) text to learn a Chinese vocabulary from.")
    if han < MIN_HAN_CHARS:
        raise CuteGPTError(f"the corpus ({names}) is too small: {han} Chinese characters for training, at least {MIN_HAN_CHARS} are needed.")
    kind = resolve_kind(cfg.kind, base)
    print(f"Training a {kind} tokenizer of {cfg.vocab_size} entries on {len(train)} documents "
          f"({han:,} Chinese characters); {len(held)} held out.", flush=True)

    with atomic_dir(out, overwrite=cfg.overwrite) as tmp, tokenizer_threads(cfg.threads) as threads:
        if kind == "byte-bpe":  # trains on the tokenizers library's pool, sized by tokenizer_threads
            size = train_byte_bpe(train, base, cfg.vocab_size, cfg.min_frequency, tmp / JSON_FILE)
        else:
            size = train_sentencepiece(train, base, kind, cfg.vocab_size, cfg.character_coverage, tmp / SP_FILE, threads)
        with atomic_file(tmp / HELD_OUT_FILE) as f:
            for d in held:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        write_json(tmp / INFO_FILE, {
            "kind": kind, "vocab_size": size, "vocab_size_requested": cfg.vocab_size, "base": str(base),
            "corpus": [str(p) for p in cfg.corpus], "documents_train": len(train), "documents_held_out": len(held),
            "chinese_chars_train": han, "seed": cfg.seed,
        })
    print(f"Chinese tokenizer ({size:,} entries) -> {out}")
    return 0


# ---------------------------------------------------------------------------------------------


def train_sentencepiece(docs: list[str], base: Path, kind: Kind, vocab_size: int, coverage: float, dest: Path,
                        threads: int = 1) -> int:
    """A SentencePiece model with the base's normalisation settings (LLaMA: identity, byte fallback, split digits)."""
    import sentencepiece as spm

    spec: dict[str, Any] = {"byte_fallback": True, "split_digits": True, "add_dummy_prefix": True}
    if (base / SP_FILE).is_file():
        proto = load_sp_proto(base / SP_FILE)
        spec = {"byte_fallback": proto.trainer_spec.byte_fallback, "split_digits": proto.trainer_spec.split_digits,
                "add_dummy_prefix": proto.normalizer_spec.add_dummy_prefix}
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(docs), model_writer=buf, model_type="unigram" if kind == "sp-unigram" else "bpe",
            vocab_size=vocab_size, character_coverage=coverage, normalization_rule_name="identity",
            remove_extra_whitespaces=False, max_sentence_length=1 << 16, input_sentence_size=2_000_000,
            shuffle_input_sentence=True, num_threads=threads, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, **spec,
        )
    except RuntimeError as e:
        raise CuteGPTError(_sp_error(str(e), vocab_size)) from None
    dest.write_bytes(buf.getvalue())
    return len(load_sp_proto(dest).pieces)


def _sp_error(text: str, vocab_size: int) -> str:
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text):
        return (f"--vocab-size {vocab_size} is smaller than the {m.group(2)} pieces this corpus needs (its characters, "
                "byte pieces and special pieces); raise --vocab-size or lower --character-coverage.")
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text):
        return f"--vocab-size {vocab_size} is more than this corpus can fill; use at most {m.group(2)} (or a larger corpus)."
    return f"SentencePiece training failed: {text.strip().splitlines()[-1][:300]}"


def train_byte_bpe(docs: list[str], base: Path, vocab_size: int, min_frequency: int, dest: Path) -> int:
    """A byte-level BPE with the base's pre-tokenizer, learned from the CJK runs of each document only.

    Training on CJK runs alone keeps merges like 'GPT' + '模' from being learned: `extend` would
    drop them anyway, and they would take the place of useful Chinese merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 256:
        raise CuteGPTError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs the 256 byte symbols plus its merges.")
    if (base / JSON_FILE).is_file() and "ByteLevel" in json.dumps(load_tokenizer_json(base / JSON_FILE).get("pre_tokenizer")):
        data = load_tokenizer_json(base / JSON_FILE)
        data.update(added_tokens=[], post_processor=None, truncation=None, padding=None)
        data["model"] = {"type": "BPE", "vocab": {}, "merges": [], "dropout": None, "unk_token": None,
                         "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                         "byte_fallback": False, "ignore_merges": False}
        tok = Tokenizer.from_str(json.dumps(data))
    else:  # a SentencePiece base asked for byte-bpe explicitly: GPT-2's pipeline
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(("\n".join(cjk_runs(d)) for d in docs), trainer=trainer, length=len(docs))
    tok.save(str(dest))
    return tok.get_vocab_size()
