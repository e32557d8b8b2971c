"""GGUF -> GGUF at another type (export/retype.py) against the route it replaces for the embedded model:
transformers dequantizes the GGUF into an HF folder, `export_gguf` writes that folder at f16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xllamacpp")
gguf = pytest.importorskip("gguf")

from cutegpt.errors import CuteGPTError  # noqa: E402
from cutegpt.export import gguf as gx  # noqa: E402
from cutegpt.export.retype import retype_gguf  # noqa: E402
from cutegpt.model.gguf_header import header_value, read_header  # noqa: E402
from cutegpt.export.verify import PROBE_CORPUS, LlamaCpp  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.padding_token_id", "tokenizer.chat_template")


def _smollm_like_tokenizer(out: Path) -> int:
    """A tiny byte-level BPE with SmolLM2's special tokens and roles (<|endoftext|> first: transformers' GGUF
    converter adds it to a GPT-2 vocabulary that lacks it) and its ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny import CHATML, CORPUS

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return len(fast)


@pytest.fixture(scope="module")
def shipped_like(tmp_path_factory) -> Path:
    """A tiny model shipped as the embedded one is: LLaMA, tied, GQA, Q4_1 with a Q8_0 embedding, ChatML."""
    from tests.tiny import build_tiny_llama

    folder = tmp_path_factory.mktemp("smollm-like")
    build_tiny_llama(folder, vocab_size=_smollm_like_tokenizer(folder), tie=True, heads=4, kv_heads=2)
    return gx.export_gguf(str(folder), folder.parent / "tiny.q4_1.gguf", quant="q4_1", template="auto", verify=False,
                          progress=False)


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def _fields(path: Path) -> dict[str, object]:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


def test_f16_equals_the_transformers_route_byte_for_byte(shipped_like, tmp_path):
    from cutegpt.model.gguf import convert_gguf

    folder = convert_gguf(shipped_like, tmp_path / "hf")  # the old route: float32 HF folder, then export at f16
    old = gx.export_gguf(str(folder), tmp_path / "old.gguf", quant="f16", template="auto", verify=False, progress=False)
    new = retype_gguf(shipped_like, tmp_path / "new.gguf", quant="f16")
    old_t, new_t = _tensors(old), _tensors(new)
    assert set(old_t) == set(new_t) and len(new_t) > 10
    assert {n for n in new_t if new_t[n] != old_t[n]} == set()
    assert {t for t, _ in new_t.values()} == {"F16", "F32"}
    old_f, new_f, src_f = _fields(old), _fields(new), _fields(shipped_like)
    assert all(new_f[k] == old_f[k] == src_f[k] for k in TOKENIZER_KEYS if k in src_f)
    assert new_f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16) and src_f["general.file_type"] != new_f["general.file_type"]
    # and llama.cpp computes the same: top-5 log-probabilities at every position and a greedy continuation
    with LlamaCpp(old) as a, LlamaCpp(new) as b:
        for text in PROBE_CORPUS[:2]:
            toks = a.tokenize(text, add_special=False)
            assert toks == b.tokenize(text, add_special=False)
            for k in range(1, len(toks), 7):
                assert a.next_logprobs(toks[:k], 5) == b.next_logprobs(toks[:k], 5)
            assert a.greedy(toks[:4], 12) == b.greedy(toks[:4], 12)


def test_other_types_and_the_header_reader(shipped_like, tmp_path):
    header = read_header(shipped_like)
    reference = gguf.GGUFReader(str(shipped_like))
    assert [k for k, *_ in header.fields] == [k for k in reference.fields if not k.startswith("GGUF.")]
    assert [(n, s) for n, s, _t, _o in header.tensors] == [(t.name, tuple(reversed(t.shape.tolist()))) for t in reference.tensors]
    assert header.data_start == reference.data_offset
    assert read_header(shipped_like, arrays=False).tensors == header.tensors
    assert header_value(shipped_like, "general.architecture") == "llama"
    assert header_value(shipped_like, "tokenizer.ggml.pre") == reference.fields["tokenizer.ggml.pre"].contents()
    assert header_value(shipped_like, "tokenizer.ggml.tokens") is None  # arrays are skipped by header_value
    q8 = retype_gguf(shipped_like, tmp_path / "q8.gguf", quant="q8_0", verify=False)
    assert {t for t, _ in _tensors(q8).values()} == {"Q8_0", "F32"}
    f32 = retype_gguf(q8, tmp_path / "f32.gguf", quant="f32", verify=False)
    back = retype_gguf(f32, tmp_path / "q8-again.gguf", quant="q8_0", verify=False)
    assert _tensors(back) == _tensors(q8)  # Q8_0 -> f32 -> Q8_0 is exact


def test_damaged_files_are_one_sentence_and_leave_nothing(shipped_like, tmp_path):
    data = shipped_like.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    with pytest.raises(CuteGPTError, match="truncated"):
        retype_gguf(cut, out_dir / "x.gguf")
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:200])
    with pytest.raises(CuteGPTError, match="cannot read this GGUF file"):
        retype_gguf(head, out_dir / "x.gguf")
    text = tmp_path / "text.gguf"
    text.write_text("hello")
    with pytest.raises(CuteGPTError, match="is not a GGUF file"):
        retype_gguf(text, out_dir / "x.gguf")
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_the_checked_tokenizer_is_cached_for_the_file(shipped_like, tmp_path, monkeypatch):
    from cutegpt.runtime import llamacpp as rl

    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    out = retype_gguf(shipped_like, tmp_path / "new.gguf", quant="f16")
    assert (rl._tokenizer_cache(out) / "tokenizer.json").is_file()
    tok = rl.gguf_tokenizer(out)
    with LlamaCpp(out) as cpp:
        for text in PROBE_CORPUS:
            assert tok(text)["input_ids"] == cpp.tokenize(text, add_special=True)


def test_gguf_tokenizer_without_autotokenizer_is_what_autotokenizer_gives(shipped_like):
    """LLaMA GGUF tokenizers skip AutoTokenizer's full parse of the file: same class, same ids."""
    from transformers import AutoTokenizer

    from cutegpt.model.tokenizer import GENERIC_GGUF_ARCHS, ids_fingerprint, load_tokenizer, match_reference

    assert "llama" in GENERIC_GGUF_ARCHS
    auto = match_reference(AutoTokenizer.from_pretrained(str(shipped_like.parent), gguf_file=shipped_like.name), gguf=shipped_like)
    fast = load_tokenizer(shipped_like.parent, gguf_file=shipped_like.name)
    assert type(fast) is type(auto)
    assert ids_fingerprint(fast) == ids_fingerprint(auto)
    assert fast.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    assert (fast.bos_token, fast.eos_token, fast.chat_template) == (auto.bos_token, auto.eos_token, auto.chat_template)


@pytest.mark.slow
def test_embedded_f16_equals_its_old_export(embedded_dir, tmp_path):
    """On the real embedded model: the direct f16 file has the tensors of `export_gguf` on the converted folder."""
    from cutegpt.model.embedded import embedded_gguf

    old = gx.export_gguf(str(embedded_dir), tmp_path / "old.gguf", quant="f16", template="auto", verify=False, progress=False)
    new = retype_gguf(embedded_gguf(), tmp_path / "new.gguf", quant="f16", verify=False)
    old_t, new_t = _tensors(old), _tensors(new)
    assert set(old_t) == set(new_t) and all(new_t[n] == old_t[n] for n in new_t)


@pytest.mark.slow
def test_first_chat_from_an_empty_cache(tmp_path):
    """A piped chat from an empty cache: JSON Lines only on stdout, the one-time status on stderr, no HF folder made."""
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CUTEGPT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    for run in range(2):
        proc = subprocess.run([sys.executable, "-m", "cutegpt", "chat", "--greedy", "--max-new-tokens", "12", "--threads", "1"],
                              input="What is the capital of France?\n", capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is JSON
        assert len(rows) == 1 and "Paris" in rows[0]["answer"]
        assert ("Preparing the embedded model" in proc.stderr) == (run == 0)
    assert not (cache / "models").exists()  # the float32 HF folder is made only for torch commands
    assert [p.name.endswith(".f16.gguf") for p in (cache / "gguf").iterdir()] == [True]
