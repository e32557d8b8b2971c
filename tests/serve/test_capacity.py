"""`serve --ctx` and `--parallel` are checked against the model and the machine before llama.cpp loads anything;
`--host` that names nothing says so (not that an API key is missing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.model.gguf_header import read_metadata
from cutegpt.serve.config import ServeConfig, check_capacity

SHAPE = dict(context_length=4096, block_count=30, head_count=9, head_count_kv=3, embedding_length=576)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    """A GGUF header written by gguf-py (the real writer), with a vocabulary array before nothing we need."""
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(SHAPE["context_length"])
    w.add_block_count(SHAPE["block_count"])
    w.add_head_count(SHAPE["head_count"])
    w.add_head_count_kv(SHAPE["head_count_kv"])
    w.add_embedding_length(SHAPE["embedding_length"])
    w.add_token_list([f"t{i}" for i in range(1000)])
    w.add_token_scores([0.0] * 1000)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_fields_match_gguf_py(small_gguf):
    import gguf

    reader = gguf.GGUFReader(small_gguf)
    wanted = (".context_length", ".block_count", ".attention.head_count_kv", ".attention.head_count", ".embedding_length")
    mine = read_metadata(small_gguf, lambda k: k.endswith(wanted))  # what check_capacity reads
    assert mine == {k: reader.fields[k].contents() for k in reader.fields if k.endswith(wanted)}
    assert len(mine) == 5


def _kv_bytes(parallel: int, ctx: int) -> int:
    head_dim = SHAPE["embedding_length"] // SHAPE["head_count"]
    return 2 * SHAPE["block_count"] * SHAPE["head_count_kv"] * head_dim * 2 * parallel * ctx


def test_ctx_beyond_the_models_context_is_refused(small_gguf):
    with pytest.raises(CuteGPTError, match=rf"--ctx 100000000 exceeds the model's context of 4096 tokens \({small_gguf}\)"):
        check_capacity(ServeConfig(ctx=100_000_000), str(small_gguf), available=2**40)
    check_capacity(ServeConfig(ctx=4096), str(small_gguf), available=2**40)


def test_slots_times_context_must_fit_memory(small_gguf):
    size = small_gguf.stat().st_size
    fits = _kv_bytes(4, 2048) + size  # the reference: K and V, f16, 30 layers x 3 KV heads x 64, every slot
    check_capacity(ServeConfig(parallel=4, ctx=2048), str(small_gguf), available=fits)
    with pytest.raises(CuteGPTError, match=r"--parallel 4 x --ctx 2048 needs about .* GiB .* lower --parallel or --ctx"):
        check_capacity(ServeConfig(parallel=4, ctx=2048), str(small_gguf), available=fits - 1)
    with pytest.raises(CuteGPTError, match=r"--parallel 100000"):
        check_capacity(ServeConfig(parallel=100_000, ctx=2048), str(small_gguf))  # this machine's real memory


def test_serve_command_refuses_before_loading(small_gguf, capsys, monkeypatch):
    import cutegpt.serve.engine as engine
    from cutegpt.cli import main

    monkeypatch.setattr(engine, "start_backend", lambda *a, **k: pytest.fail("llama.cpp was started"))
    assert main(["serve", "--model", str(small_gguf), "--parallel", "100000", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --parallel 100000 x --ctx 2048 needs about")


def test_unknown_host_is_named_before_the_api_key_rule():
    with pytest.raises(CuteGPTError, match=r"--host nosuchhost.invalid is not an address or name this machine can listen on"):
        ServeConfig(host="nosuchhost.invalid").check()
    with pytest.raises(CuteGPTError, match="--api-key"):
        ServeConfig(host="0.0.0.0").check()
