"""Every tokenizer cutegpt loads gives its reference's ids on the probe corpus.

SentencePiece: `sentencepiece` itself (tests/reference.py); byte-level BPE: the published
`tokenizers` pipeline read straight from tokenizer.json.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cutegpt.model.probes import FINGERPRINT, PITFALLS, TURNS, probe_texts
from cutegpt.model.tokenizer import load_tokenizer, match_reference, portable_config
from tests.reference import SentencePieceReference
from tests.tiny import build_sp_layout, build_tokenizer

LAYOUTS = [("llama1", False), ("llama1", True), ("llama2", False), ("llama2", True)]


@pytest.fixture(scope="module", params=LAYOUTS, ids=[f"{layout}{'-end' if end else ''}" for layout, end in LAYOUTS])
def sp_folder(request, tmp_path_factory) -> Path:
    layout, end = request.param
    return build_sp_layout(tmp_path_factory.mktemp(f"sp-{layout}-{end}"), layout, end)


def mismatches(tok, reference, texts):
    bad = []
    for text in texts:
        for add in (False, True):
            got = list(tok(text, add_special_tokens=add)["input_ids"])
            want = reference(text, add)
            if got != want:
                bad.append((text, add, got, want))
    return bad


def test_sentencepiece_layouts_equal_sentencepiece(sp_folder):
    ref = SentencePieceReference(sp_folder)
    tok = load_tokenizer(sp_folder)
    assert "<end>" in tok.get_vocab() or not (sp_folder / "added_tokens.json").exists()
    assert mismatches(tok, ref.encode, probe_texts(tok)) == []


@pytest.mark.parametrize("options", [
    {"remove_extra_whitespaces": True},
    {"normalization_rule_name": "nmt_nfkc", "remove_extra_whitespaces": True},
    {"model_type": "unigram"},
    {"add_dummy_prefix": False},
], ids=["collapsed-spaces", "nfkc", "unigram", "no-dummy-prefix"])
def test_other_sentencepiece_settings_equal_sentencepiece(tmp_path, options):
    """SentencePiece models other than LLaMA's: the normalizer spec in tokenizer.model is followed, and a
    Unigram model stays Unigram (transformers 5's LlamaTokenizer converts every model to BPE)."""
    folder = build_sp_layout(tmp_path, "llama1", end=True, **options)
    tok = load_tokenizer(folder)
    texts = probe_texts(tok) + ["a\n b", "  x  ", " \n ", "全角ＡＢＣ１２３"]
    ref = SentencePieceReference(folder)
    bad = mismatches(tok, ref.encode, texts)
    if options.get("model_type") == "unigram":
        # Viterbi ties (equal-score segmentations, e.g. 'er'+'e' vs 'e'+'re'): the two libraries break them
        # differently; anything else is a real difference
        score = lambda ids: sum(ref.sp.get_score(i) for i in ids if i < ref.sp.get_piece_size())  # noqa: E731
        bad = [b for b in bad if abs(score(b[2]) - score(b[3])) > 1e-4 or tok.decode(b[2]) != tok.decode(b[3])]
    assert bad == []


def test_llama_folder_without_add_bos_token_adds_bos(tmp_path):
    """transformers 4 (and the original) add BOS for LlamaTokenizer unless the config says otherwise; transformers 5 does not."""
    folder = build_sp_layout(tmp_path, "llama1")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["add_bos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder)("hi")["input_ids"][0] == 1


def test_plain_transformers_drifts_from_sentencepiece(sp_folder):
    """The fixture reproduces the bug: transformers 5 alone disagrees (leading space, text after <s>/<end>)."""
    from transformers import AutoTokenizer

    bad = mismatches(AutoTokenizer.from_pretrained(sp_folder), SentencePieceReference(sp_folder).encode,
                     probe_texts(load_tokenizer(sp_folder)))
    assert {text for text, *_ in bad} >= {" leading space", "<s>问"}
    if (sp_folder / "added_tokens.json").exists():
        assert "<end>问" in {text for text, *_ in bad}


def test_added_stop_token_keeps_the_rule(tmp_path):
    """`--add-stop-token` adds <end> after loading: text after it still gets SentencePiece's dummy prefix."""
    from cutegpt.templates import add_stop_token

    folder = build_sp_layout(tmp_path / "sp", "llama1", end=False)
    tok = load_tokenizer(folder)
    assert add_stop_token(tok)
    ref = SentencePieceReference(folder, extra={"<end>": tok.convert_tokens_to_ids("<end>")})
    assert mismatches(tok, ref.encode, list(TURNS) + ["<end>问", "x <end> y"]) == []


def test_non_special_added_token_after_load_needs_match_again(tmp_path):
    folder = build_sp_layout(tmp_path / "sp", "llama1", end=False)
    tok = load_tokenizer(folder)
    tok.add_tokens(["<sep>"])  # normalized by default in tokenizers: matched after the ▁ rewrite otherwise
    match_reference(tok, sp_model=folder / "tokenizer.model")
    ref = SentencePieceReference(folder, extra={"<sep>": tok.convert_tokens_to_ids("<sep>")})
    assert mismatches(tok, ref.encode, ["<sep>问", "a <sep> b", "<sep>"]) == []


def test_byte_level_bpe_equals_its_published_pipeline(tmp_path):
    from tokenizers import Tokenizer

    build_tokenizer(tmp_path)
    published = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert mismatches(tok, lambda t, add: published.encode(t, add_special_tokens=add).ids, probe_texts(tok)) == []


def test_saved_folder_reloads_with_the_same_ids(sp_folder, tmp_path):
    from cutegpt.model.loading import save_tokenizer

    tok = load_tokenizer(sp_folder)
    save_tokenizer(tok, tmp_path, template="cutegpt")
    again = load_tokenizer(tmp_path)
    texts = probe_texts(tok)
    assert [again(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    assert (tmp_path / "tokenizer.model").is_file()


def test_saved_config_has_no_transformers5_only_fields(tmp_path):
    from cutegpt.model.loading import save_tokenizer

    build_tokenizer(tmp_path / "bpe")
    tok = load_tokenizer(tmp_path / "bpe")
    tok.add_tokens(["<end>"], special_tokens=True)
    save_tokenizer(tok, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4 has no TokenizersBackend
    assert not isinstance(config.get("extra_special_tokens"), list)  # transformers 4 reads it as a dict
    assert "is_local" not in config


def test_portable_config_rewrites_transformers5_fields(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "add_prefix_space": None,
        "extra_special_tokens": ["<s>", "<end>"], "is_local": True, "local_files_only": False, "legacy": False}))
    portable_config(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                      "additional_special_tokens": ["<end>"]}


@pytest.mark.parametrize("end", [False, True])
def test_plain_transformers5_reads_saved_sentencepiece_folders_right(tmp_path, end):
    """What cutegpt saves gives SentencePiece's ids even to plain AutoTokenizer (vLLM, scripts), not only to our loader."""
    from transformers import AutoTokenizer

    from cutegpt.model.loading import save_tokenizer

    src = build_sp_layout(tmp_path / "src", "llama2", end=end)
    tok = load_tokenizer(src)
    save_tokenizer(tok, tmp_path / "out", template="cutegpt")
    plain = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert mismatches(plain, SentencePieceReference(src).encode, probe_texts(tok)) == []
    assert plain.decode(plain("问：你好")["input_ids"], skip_special_tokens=True) == "问：你好"


def test_fingerprint_texts_are_frozen():
    """Dataset manifests record the ids of these texts: changing them would refuse every dataset."""
    import hashlib

    assert hashlib.sha256("\x00".join(FINGERPRINT).encode()).hexdigest()[:16] == "dcf79dd06ec07f76"
    assert FINGERPRINT[:3] == PITFALLS[:3]


# --- transformers 4 ------------------------------------------------------------------------------

TF4_PYTHON = os.environ.get("CUTEGPT_TRANSFORMERS4_PYTHON", "")
TF4_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], use_fast=sys.argv[2] == "fast")
texts = json.loads(sys.stdin.read())
print(json.dumps({"version": __import__("transformers").__version__,
                  "ids": [[tok(t, add_special_tokens=a)["input_ids"] for a in (False, True)] for t in texts]}))
"""


@pytest.mark.skipif(not os.path.isfile(TF4_PYTHON),
                    reason="set CUTEGPT_TRANSFORMERS4_PYTHON to a Python with transformers 4.5x (docs/tokenization.md)")
@pytest.mark.parametrize("kind", ["sp-fast", "sp-slow", "bpe-fast"])
def test_transformers4_reads_saved_folders_with_the_same_ids(kind, tmp_path):
    from cutegpt.model.loading import save_tokenizer
    from cutegpt.templates import add_stop_token

    if kind.startswith("sp"):
        src = build_sp_layout(tmp_path / "src", "llama2", end=False)
    else:
        build_tokenizer(tmp_path / "src")
        src = tmp_path / "src"
    tok = load_tokenizer(src)
    add_stop_token(tok)
    save_tokenizer(tok, tmp_path / "out", template="cutegpt")
    texts = probe_texts(tok)
    run = subprocess.run([TF4_PYTHON, "-c", TF4_SCRIPT, str(tmp_path / "out"), kind.split("-")[1]], input=json.dumps(texts),
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["version"].startswith("4.")
    want = [[list(tok(t, add_special_tokens=a)["input_ids"]) for a in (False, True)] for t in texts]
    assert result["ids"] == want
