"""--endpoint: multiple choice and generative answers from llama.cpp's HTTP server equal the local GGUF mode."""

from __future__ import annotations

import json
import socket

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.evaluation.cli import EvalConfig, run_eval

pytest.importorskip("xllamacpp")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """The tiny model's f32 GGUF and llama.cpp's HTTP server on it (with an API key)."""
    from cutegpt.export.gguf import export_gguf
    from cutegpt.runtime.llamacpp import LlamaCpp

    gguf = export_gguf(str(tiny_model_dir), tmp_path_factory.mktemp("ep") / "tiny.gguf", quant="f32", verify=False,
                       progress=False, template="cutegpt")
    lc = LlamaCpp(gguf, n_ctx=1024)
    lc.close()  # only keeps the server alive for good: xllamacpp's destructor can deadlock (runtime.llamacpp.keep_alive)
    return gguf, lc.base


def _preds(out):
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("method", ["logits", "generate"])
def test_endpoint_equals_the_gguf_mode(method, served, ceval_dir, tmp_path):
    gguf, url = served
    extra = {"max_new_tokens": 6} if method == "generate" else {}
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert run_eval(EvalConfig(benchmark="ceval", model=str(gguf), data=str(ceval_dir), out=str(local), shots=2,
                               method=method, threads=1, **extra)) == 0
    assert run_eval(EvalConfig(benchmark="ceval", endpoint=url + "/v1", data=str(ceval_dir), out=str(remote), shots=2,
                               method=method, **extra)) == 0
    a, b = _preds(local), _preds(remote)
    assert [r["pred"] for r in a] == [r["pred"] for r in b]
    if method == "generate":  # llama.cpp renders the file's CuteGPT template itself: the same answers
        # a random model emits stray byte tokens: transformers and llama.cpp render broken UTF-8 differently
        def whole(r):
            return r["answer"].replace("\ufffd", "")

        assert [whole(r) for r in a] == [whole(r) for r in b] and all(whole(r) for r in a)
    if method == "logits":
        for x, y in zip(a, b):
            assert x["scores"] == pytest.approx(y["scores"], abs=0.02)  # f16 KV cache, prompts split differently
    res = json.loads((remote / "results.json").read_text(encoding="utf-8"))
    assert res["backend"] == "endpoint" and res["endpoint"] == url + "/v1"


def test_a_down_endpoint_is_one_sentence(ceval_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "o"
    with pytest.raises(CuteGPTError, match=rf"--endpoint http://127.0.0.1:{port} cannot be reached .*is the server running\?"):
        run_eval(EvalConfig(benchmark="ceval", endpoint=f"http://127.0.0.1:{port}", data=str(ceval_dir), out=str(out)))
    assert not out.exists()
    with pytest.raises(CuteGPTError, match="give --endpoint or --model/--lora, not both"):
        run_eval(EvalConfig(benchmark="ceval", endpoint="http://x", model="m.gguf", data=str(ceval_dir), out=str(out)))


@pytest.mark.slow
def test_endpoint_against_cutegpt_serve_equals_the_gguf_mode(served, ceval_dir, tmp_path):
    """cutegpt serve's front passes the scoring requests (token-id prompts, logit_bias, n_probs, /tokenize) to llama.cpp
    unchanged: the letters and log-probabilities equal those of the file scored in-process."""
    from tests.serve.conftest import running_server

    gguf, _ = served
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert run_eval(EvalConfig(benchmark="ceval", model=str(gguf), data=str(ceval_dir), out=str(local), shots=2, threads=1)) == 0
    with running_server("--model", str(gguf), "--ctx", "512", "--api-key", "k3y", "--quiet") as (url, _):
        with pytest.raises(CuteGPTError, match="answered HTTP 401 .*check --api-key"):
            run_eval(EvalConfig(benchmark="ceval", endpoint=url + "/v1", data=str(ceval_dir), out=str(remote), shots=2))
        assert run_eval(EvalConfig(benchmark="ceval", endpoint=url + "/v1", api_key="k3y", data=str(ceval_dir),
                                   out=str(remote), shots=2)) == 0
    a, b = _preds(local), _preds(remote)
    assert [r["pred"] for r in a] == [r["pred"] for r in b] and len(a) == 5
    for x, y in zip(a, b):
        assert x["scores"] == pytest.approx(y["scores"], abs=0.02)
    res = json.loads((remote / "results.json").read_text(encoding="utf-8"))
    assert res["backend"] == "endpoint" and res["model"] == "tiny"
