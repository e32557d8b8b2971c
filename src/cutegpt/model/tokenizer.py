"""One tokenizer loader for every command; it tokenizes as the model's own reference does.

    family               reference (what the model saw in pre-training;   how the loaded tokenizer matches it
                         llama.cpp and transformers 4 agree with it)
    SentencePiece        `sentencepiece` on tokenizer.model; added tokens   the fast tokenizer's normalizer does what
    (LLaMA, CuteGPT-13B) are split out first and every stretch of text     SentencePiece does (dummy prefix on every
                         between them is encoded alone, dummy prefix        stretch, spaces as ▁), no pre-tokenizer,
                         included (the original LLaMA tokenizer's rule)     added tokens matched on the raw text
    byte-level BPE       the `tokenizers` pipeline the model was            kept as published; a tokenizer rebuilt from
    (SmolLM2, Qwen, ...) published with (SmolLM2: digits one by one, then   a GGUF file gets back the pre-tokenizer its
                         the GPT-2 regex)                                   `tokenizer.ggml.pre` names (PRE_TOKENIZERS)

transformers 5 rebuilds LLaMA tokenizers with a `Metaspace(prepend_scheme="first")` pre-tokenizer,
which drops the dummy prefix after `<s>`, `<end>` and before leading white space: the same text then
gives other ids than SentencePiece, llama.cpp and transformers 4 (docs/tokenization.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from cutegpt.errors import CuteGPTError

SP_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
# Bumped whenever the loader changes the ids it gives; cached conversions and dataset manifests carry it.
RULE_VERSION = 2


def _smollm() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


def _gpt2() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


# llama.cpp's pre-tokenizer name (GGUF `tokenizer.ggml.pre`) -> the published `tokenizers` pre-tokenizer
PRE_TOKENIZERS: dict[str, Callable[[], Any]] = {
    "smollm": _smollm,
    "gpt-2": _gpt2,
}


def load_tokenizer(path: Path, trust_remote_code: bool = False, gguf_file: str | None = None) -> Any:
    """The tokenizer of a model folder (or of `gguf_file` inside `path`), matched to its reference."""
    from transformers import AutoTokenizer

    try:
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        loader: Any = AutoTokenizer
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
            loader = _gguf_tokenizer_class(Path(path), gguf_file) or AutoTokenizer
        tok = loader.from_pretrained(str(path), **kwargs)
    except Exception as e:
        where = Path(path) / gguf_file if gguf_file else path
        raise CuteGPTError(f"{where}: cannot load the tokenizer ({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}).") from None
    if gguf_file:
        match_reference(tok, gguf=Path(path) / gguf_file)
    else:
        match_reference(tok, sp_model=Path(path) / SP_FILE)
        _bos_eos_as_configured(tok, Path(path) / CONFIG_FILE)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


# GGUF architectures whose tokenizer AutoTokenizer builds as the generic TokenizersBackend (no class of its
# own: LLaMA, whose files carry SentencePiece or byte-level vocabularies alike); tests/model/test_tokenizer_gguf.py
# checks AutoTokenizer still does
GENERIC_GGUF_ARCHS = ("llama",)


def _gguf_tokenizer_class(folder: Path, gguf_file: str) -> Any:
    """TokenizersBackend for a GGUF file whose tokenizer AutoTokenizer would build as one; else None (AutoTokenizer).

    AutoTokenizer finds the class from the model type, and for LLaMA gets that by parsing the whole file
    with gguf.GGUFReader: 2-35 s on SmolLM2's 49k-token vocabulary, against 0.2-2 s for the tokenizer
    itself. A file beside a tokenizer_config.json (which may name a class) still goes through AutoTokenizer.
    """
    from transformers import TokenizersBackend

    from cutegpt.model.gguf_header import header_value

    if (folder / CONFIG_FILE).exists():
        return None
    try:
        arch = header_value(folder / gguf_file, "general.architecture")
    except CuteGPTError:
        return None  # transformers' own reading gives the message
    return TokenizersBackend if arch in GENERIC_GGUF_ARCHS else None


def match_reference(tok: Any, sp_model: Path | None = None, gguf: Path | None = None) -> Any:
    """Configure `tok`'s backend so it gives the reference's ids (see the table above); returns `tok`.

    Call it again after adding non-special tokens: `tokenizers` matches those after normalization.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: it is its own reference
        return tok
    if is_sentencepiece(backend):
        has_model = sp_model is not None and sp_model.is_file()
        settings = _sp_settings(sp_model) if has_model else _gguf_sp_settings(backend, gguf)
        if has_model:
            _unigram_as_unigram(backend, sp_model)
        _sentencepiece_rule(backend, **settings)
    elif gguf is not None:
        pre = gguf_pre_name(gguf)
        if pre in PRE_TOKENIZERS:
            backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    return tok


def _bos_eos_as_configured(tok: Any, config_file: Path) -> None:
    """A LLaMA folder's `add_bos_token`/`add_eos_token`, which transformers 5 ignores when tokenizer.json lacks a
    post-processor that adds them (transformers 4 and llama.cpp's converter follow the config)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not is_sentencepiece(backend) or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers itself read the file; a second reading failing changes nothing
    llama = config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast")
    for key, default in (("add_bos_token", True), ("add_eos_token", False)):
        # transformers 4's LlamaTokenizer adds BOS unless told otherwise; transformers 5 adds it only when told
        want = config.get(key, default if llama else None)
        if isinstance(want, bool) and getattr(tok, key, None) is not None and getattr(tok, key) != want:
            setattr(tok, key, want)


def is_sentencepiece(backend: Any) -> bool:
    """A SentencePiece vocabulary converted to `tokenizers`: spaces spelled ▁, no byte-level alphabet."""
    kind = type(backend.model).__name__
    if kind not in ("BPE", "Unigram") or (kind == "BPE" and not getattr(backend.model, "byte_fallback", False)):
        return False
    text = _pipeline_text(backend)  # the small parts only: serializing the vocabulary costs 0.1 s on 32k tokens
    return "ByteLevel" not in text and ("Metaspace" in text or "\\u2581" in text or "▁" in text)


def _pipeline_text(backend: Any) -> str:
    """normalizer, pre-tokenizer and decoder as JSON text ('null' for a missing part)."""
    parts = (backend.normalizer, backend.pre_tokenizer, backend.decoder)
    return " ".join("null" if p is None else p.__getstate__().decode() if isinstance(p.__getstate__(), bytes)
                    else str(p.__getstate__()) for p in parts)


def _sp_settings(sp_model: Path) -> dict[str, Any]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(sp_model.read_bytes())
    except Exception:
        raise CuteGPTError(f"{sp_model}: not a SentencePiece model file.") from None
    spec = proto.normalizer_spec
    return {"dummy_prefix": bool(spec.add_dummy_prefix), "collapse_spaces": bool(spec.remove_extra_whitespaces),
            "charsmap": bytes(spec.precompiled_charsmap)}


def _gguf_sp_settings(backend: Any, gguf: Path | None) -> dict[str, Any]:
    """Without tokenizer.model: the dummy prefix as the GGUF file or the converted tokenizer records it."""
    if gguf is not None:
        value = read_gguf_field(gguf, "tokenizer.ggml.add_space_prefix")
        if value is not None:
            return {"dummy_prefix": bool(value)}
    text = _pipeline_text(backend)
    return {"dummy_prefix": '"never"' not in text and ("Prepend" in text or "Metaspace" in text)}


def _unigram_as_unigram(backend: Any, sp_model: Path) -> None:
    """transformers 5's LlamaTokenizer turns every tokenizer.model into BPE; a Unigram model must stay Unigram."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import models

    proto = pb.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    if proto.trainer_spec.model_type != pb.TrainerSpec.UNIGRAM or type(backend.model).__name__ == "Unigram":
        return
    vocab = [(p.piece, float(p.score)) for p in proto.pieces]
    if [backend.id_to_token(i) for i in range(len(vocab))] != [p for p, _s in vocab]:
        return  # ids laid out otherwise than in tokenizer.model: leave the converted model alone
    backend.model = models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=proto.trainer_spec.byte_fallback)


def _sentencepiece_rule(backend: Any, dummy_prefix: bool, collapse_spaces: bool = False, charsmap: bytes = b"") -> None:
    """SentencePiece's normalization as `tokenizers` normalizers, applied to each stretch between added tokens."""
    from tokenizers import AddedToken, Regex, normalizers

    steps: list[Any] = []
    if charsmap:
        steps.append(normalizers.Precompiled(charsmap))
    if collapse_spaces:  # SentencePiece's remove_extra_whitespaces: spaces only (Strip would take tabs and newlines too)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None  # SentencePiece's BPE sees the whole stretch; pieces never cross ▁ by construction
    # added tokens such as <end> are found in the raw text, as the original LLaMA tokenizer split them out
    renormalized = [AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip, normalized=False,
                               special=t.special)
                    for _i, t in sorted(backend.get_added_tokens_decoder().items()) if t.normalized]
    if renormalized:
        backend.add_tokens(renormalized)


def read_gguf_field(path: Path, key: str) -> Any:
    """One scalar or string metadata value of a GGUF file (None when absent or unreadable)."""
    from cutegpt.model.gguf_header import header_value

    try:  # the header reader skips the token arrays: milliseconds, where gguf.GGUFReader takes 4-13 s on 49k tokens
        return header_value(path, key)
    except Exception:
        return None


def gguf_pre_name(path: Path) -> str | None:
    value = read_gguf_field(path, "tokenizer.ggml.pre")
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------------------------ saving

def portable_config(folder: Path) -> None:
    """Rewrite the saved tokenizer_config.json in the form transformers 4.5x and 5.x both read.

    transformers 5 writes `tokenizer_class: TokenizersBackend` (a class 4.x lacks) and
    `extra_special_tokens` as a list (4.x iterates it as a dict); llama.cpp's converter, vLLM
    and older scripts run transformers 4. The tokenizer.json beside it already reads in both.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        named = {config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        extra_tokens = [t for t in extra if (t.get("content") if isinstance(t, dict) else t) not in named]
        del config["extra_special_tokens"]
        if extra_tokens:
            config["additional_special_tokens"] = extra_tokens
    for key in ("is_local", "local_files_only"):  # how this process loaded it, not a property of the tokenizer
        config.pop(key, None)
    if config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast") and (Path(folder) / "tokenizer.json").is_file():
        # tokenizer.json carries the SentencePiece rule (normalizer, BOS post-processor): read as a plain fast
        # tokenizer, transformers 4 and 5 both use it as written, where as LlamaTokenizer transformers 5 rebuilds
        # the drifted pre-tokenizer and transformers 4's slow one needs legacy=True
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("legacy", "add_prefix_space", "use_default_system_prompt", "add_bos_token", "add_eos_token"):
            config.pop(key, None)  # LlamaTokenizer's settings; tokenizer.json's post-processor adds BOS/EOS
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tokenizer_files(tokenizer: Any, folder: Path) -> None:
    """`save_pretrained` in the form transformers 4 and 5 both read (tokenizer.model kept when the source had one)."""
    import shutil

    tokenizer.save_pretrained(str(folder))
    portable_config(Path(folder))
    source = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / SP_FILE
    target = Path(folder) / SP_FILE
    if source.is_file() and not target.exists():
        shutil.copyfile(source, target)


def ids_fingerprint(tokenizer: Any) -> str:
    """A hash of the ids `tokenizer` gives on the probe corpus: equal vocabularies that tokenize differently differ here."""
    import hashlib

    from cutegpt.model.probes import FINGERPRINT

    h = hashlib.sha256()
    for text in FINGERPRINT:
        h.update((str(list(tokenizer(text, add_special_tokens=False)["input_ids"])) + "\n").encode())
    return h.hexdigest()[:16]


# Token texts llama.cpp ends generation at wherever they are in a vocabulary, besides the file's eos/eot/eom ids
# (llama-vocab.cpp, the special_eog_ids it builds when loading a model). The torch engine stops at the same
# tokens, so both backends end an answer alike (a Llama-3 model emitting <|end_of_text|>, a Qwen base <|endoftext|>).
LLAMACPP_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
                      "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
                      "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
                      "<｜end▁of▁sentence｜>", "[e~[")


def end_of_generation_ids(tokenizer: Any, stop: str | None = None) -> list[int]:
    """The ids that end an answer in llama.cpp: EOS, the template's stop marker when it is one token, and every
    token whose text llama.cpp treats as an end of generation (LLAMACPP_EOG_TEXTS)."""
    ids: set[int] = set()
    if isinstance(getattr(tokenizer, "eos_token_id", None), int):
        ids.add(int(tokenizer.eos_token_id))
    if stop:
        enc = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(enc) == 1 and tokenizer.convert_ids_to_tokens(enc[0]) == stop:
            ids.add(int(enc[0]))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in LLAMACPP_EOG_TEXTS if t in vocab)
    return sorted(ids)
