"""Issue 11 for the vocabulary commands: bad values and paths are one sentence, before anything loads or is written."""

import hashlib

import pytest

from cutegpt.cli import main


def _tree(folder):
    return {str(p): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.rglob("*"))}


def _refused(argv, capsys, folder, *words):
    before = _tree(folder)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "unexpected" not in err, err
    for w in words:
        assert w in err, err
    assert _tree(folder) == before
    return err


def test_max_pieces_zero_is_refused_by_its_bound(tmp_path, bpe_base, bpe_pieces, capsys):
    _refused(["vocab", "extend", "--model", str(bpe_base), "--pieces", str(bpe_pieces), "--out", str(tmp_path / "x"),
              "--max-pieces", "0"], capsys, tmp_path, "--max-pieces must be at least 1")


def test_folder_named_gguf_is_called_a_folder(tmp_path, corpus_txt, capsys):
    fake = tmp_path / "x.gguf"
    fake.mkdir()
    err = _refused(["vocab", "train", str(corpus_txt), "--out", str(tmp_path / "zh"), "--model", str(fake)], capsys, tmp_path)
    assert "does not exist" not in err and "GGUF file" not in err and "x.gguf" in err


@pytest.mark.parametrize("where", ["pieces", "model"])
def test_out_inside_an_input_is_refused(tmp_path, bpe_base, bpe_pieces, capsys, where):
    import shutil

    src = {"pieces": bpe_pieces, "model": bpe_base}[where]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    args = {"pieces": str(bpe_pieces), "model": str(bpe_base), where: str(copy)}
    _refused(["vocab", "extend", "--model", args["model"], "--pieces", args["pieces"], "--out", str(copy / "sub"), "--overwrite"],
             capsys, tmp_path, "--out", "inside the input")


def test_vocab_train_out_is_the_corpus(tmp_path, corpus_txt, bpe_base, capsys):
    import shutil

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy2(corpus_txt, corpus / "a.txt")
    _refused(["vocab", "train", str(corpus), "--out", str(corpus), "--overwrite", "--model", str(bpe_base)], capsys, tmp_path,
             "--out", "is the input")


def test_missing_corpus_names_it(tmp_path, bpe_base, capsys):
    _refused(["vocab", "train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "zh"), "--model", str(bpe_base)], capsys,
             tmp_path, "CORPUS", "nope.txt")
