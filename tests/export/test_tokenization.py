"""SentencePiece LLaMA layouts (with and without <end>) and byte-level BPE: export verifies on the whole probe
corpus, and the torch backend, the GGUF's converted tokenizer (chat's llama.cpp backend) and llama.cpp itself
give the reference's ids for every probe text."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("xllamacpp")

from cutegpt.errors import CuteGPTError  # noqa: E402
from cutegpt.export import gguf as gx  # noqa: E402
from cutegpt.export.verify import LlamaCpp  # noqa: E402
from cutegpt.model.probes import probe_texts  # noqa: E402
from cutegpt.model.tokenizer import load_tokenizer  # noqa: E402
from tests.reference import SentencePieceReference  # noqa: E402
from tests.tiny import build_sp_layout, build_tiny_llama, build_tokenizer  # noqa: E402

KINDS = ["llama1", "llama1-end", "llama2", "llama2-end", "bpe"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """kind -> (HF folder, f16 GGUF exported with verification on)."""
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        if kind == "bpe":
            build_tokenizer(folder, chat_template=False)
        else:
            build_sp_layout(folder, kind.split("-")[0], end=kind.endswith("-end"))
        build_tiny_llama(folder, vocab_size=len(load_tokenizer(folder)), seed=3)
        gguf_file = gx.export_gguf(str(folder), folder.parent / f"{kind}.gguf", quant="f16", template="cutegpt", progress=False)
        assert gx.last_report["verification"]["tokenization"]["probe_texts"] >= 40
        out[kind] = (folder, Path(gguf_file))
    return out


def reference(kind: str, folder: Path):
    if kind == "bpe":
        from tokenizers import Tokenizer

        published = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return lambda text, add: published.encode(text, add_special_tokens=add).ids
    ref = SentencePieceReference(folder)
    return lambda text, add: ref.encode(text, add)


@pytest.mark.parametrize("kind", KINDS)
def test_every_backend_gives_the_reference_ids(exported, kind):
    from cutegpt.runtime.llamacpp import gguf_tokenizer

    folder, gguf_file = exported[kind]
    torch_tok = load_tokenizer(folder)
    from_gguf = gguf_tokenizer(gguf_file)  # what `chat --model file.gguf` encodes with
    want = reference(kind, folder)
    texts = probe_texts(torch_tok)
    with LlamaCpp(gguf_file) as cpp:
        for text in texts:
            for add in (False, True):
                ref = want(text, add)
                assert list(torch_tok(text, add_special_tokens=add)["input_ids"]) == ref, (text, add)
                assert list(from_gguf(text, add_special_tokens=add)["input_ids"]) == ref, (text, add)
                assert cpp.tokenize(text, add_special=add) == ref, (text, add)


def test_verification_catches_the_drifted_rule(tmp_path, monkeypatch):
    """Without the SentencePiece rule (transformers 5 as it loads), the probe corpus fails verification."""
    from cutegpt.model import tokenizer as tk

    folder = build_sp_layout(tmp_path / "sp", "llama1", end=True)
    build_tiny_llama(folder, vocab_size=len(load_tokenizer(folder)), seed=3)
    monkeypatch.setattr(tk, "match_reference", lambda tok, **kw: tok)
    with pytest.raises(CuteGPTError, match=r"verification failed \(tokenization\)"):
        gx.export_gguf(str(folder), tmp_path / "m.gguf", quant="f16", template="cutegpt", progress=False)
    assert not (tmp_path / "m.gguf").exists()
