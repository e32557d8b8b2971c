"""Start-up checks, the GGUF cache, the template, threads and the vLLM command (fast)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.serve import source
from cutegpt.serve.config import ServeConfig
from cutegpt.serve.run import bind


def test_other_hosts_need_an_api_key(monkeypatch):
    monkeypatch.delenv("CUTEGPT_API_KEY", raising=False)
    ServeConfig().check()
    ServeConfig(host="::1").check()
    with pytest.raises(CuteGPTError, match="--api-key"):
        ServeConfig(host="0.0.0.0").check()
    ServeConfig(host="0.0.0.0", api_key="k").check()
    monkeypatch.setenv("CUTEGPT_API_KEY", "from-env")
    cfg = ServeConfig(host="0.0.0.0")
    cfg.check()
    assert cfg.resolved_api_key() == "from-env"


@pytest.mark.parametrize("kw,flag", [({"parallel": 0}, "--parallel"), ({"port": 70000}, "--port"), ({"ctx": 8}, "--ctx"),
                                     ({"top_p": 0}, "--top-p"), ({"tensor_parallel_size": 2}, "--tensor-parallel-size"),
                                     ({"pipeline_parallel_size": 2}, "--pipeline-parallel-size"),
                                     ({"max_new_tokens": 4096}, "--max-new-tokens"), ({"api_key": "a b"}, "--api-key")])
def test_bad_settings_name_the_flag(kw, flag):
    with pytest.raises(CuteGPTError, match=flag):
        ServeConfig(**kw).check()


def test_port_in_use_is_one_sentence():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(CuteGPTError, match=f"port {port} on 127.0.0.1 is already in use"):
            bind("127.0.0.1", port)
    finally:
        taken.close()
    bind("127.0.0.1", port).close()  # free again


def test_cli_refuses_public_host_without_key(capsys, monkeypatch):
    from cutegpt.cli import main

    monkeypatch.delenv("CUTEGPT_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0 exposes the server") and err.count("\n") == 1


def test_auto_threads_leave_busy_cores_alone(monkeypatch):
    from cutegpt import threads
    from cutegpt.serve import engine

    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda window=0.2: 1.9)
    assert engine.resolve_threads(0) == 1
    monkeypatch.setattr(threads, "busy_cores", lambda window=0.2: 0.1)
    assert engine.resolve_threads(0) == 2
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setattr(threads, "busy_cores", lambda window=0.2: 2.2)
    assert engine.resolve_threads(0) == 6
    assert engine.resolve_threads(3) == 3


def test_cutegpt_jinja_renders_like_templates_py():
    jinja2 = pytest.importorskip("jinja2")
    from cutegpt.serve.template import cutegpt_jinja
    from cutegpt.templates import CuteGPTTemplate, Turn

    tpl = jinja2.Environment().from_string(cutegpt_jinja())
    convs = [
        ([], None),
        ([("你好", "你好！")], None),
        ([("Hi", "Hello."), ("2+2?", "4"), ("中国的首都是哪里？", "北京")], "Be brief."),
    ]
    for history, system in convs:
        for question in ("What is the capital of France?", "写一首诗"):
            turns = [Turn(q, output=a) for q, a in history] + [Turn(question)]
            messages = ([{"role": "system", "content": system}] if system else [])
            for q, a in history:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": question})
            assert tpl.render(messages=messages, add_generation_prompt=True) == CuteGPTTemplate().prompt(turns, system)


# ----------------------------------------------------------------------------- model sources and the GGUF cache


def _hf_folder(path: Path, template: str | None = "cutegpt") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (path / "model.safetensors").write_bytes(b"weights-v1")
    if template:
        (path / "cutegpt.json").write_text(json.dumps({"template": template}))
    return path


@pytest.fixture()
def fake_exporter(monkeypatch, tmp_path):
    calls = []

    def export_gguf(model, out, *, lora=None, quant="f16", template=None, verify=True, overwrite=False, progress=True):
        calls.append((model, lora, quant, template))
        Path(out).write_bytes(b"GGUF-not-really")
        return Path(out)

    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(source, "_exporter", lambda: export_gguf)
    monkeypatch.setattr(source, "gguf_chat_template", lambda path: None)
    return calls


def test_hf_folder_is_exported_once_and_reused(tmp_path, fake_exporter):
    model = _hf_folder(tmp_path / "m")
    first = source.resolve_model(str(model), None, None, "q8_0", progress=False)
    second = source.resolve_model(str(model), None, None, "q8_0", progress=False)
    assert len(fake_exporter) == 1 and first.gguf == second.gguf and first.gguf.is_file()
    assert first.gguf.parent == tmp_path / "cache" / "gguf"
    assert first.template == "cutegpt" and first.stop == ["<end>"] and "问：" in first.jinja
    assert fake_exporter[0] == (str(model), None, "q8_0", "cutegpt")
    (model / "model.safetensors").write_bytes(b"weights-v2")  # new content -> new export
    third = source.resolve_model(str(model), None, None, "q8_0", progress=False)
    assert len(fake_exporter) == 2 and third.gguf != first.gguf
    source.resolve_model(str(model), None, None, "f16", progress=False)  # another quant -> another file
    assert len(fake_exporter) == 3


def test_adapter_is_part_of_the_key(tmp_path, fake_exporter):
    model = _hf_folder(tmp_path / "m")
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    plain = source.resolve_model(str(model), None, None, "q8_0", progress=False)
    merged = source.resolve_model(str(model), str(adapter), None, "q8_0", progress=False)
    assert plain.gguf != merged.gguf and fake_exporter[-1][1] == str(adapter)
    assert merged.name == "a"


def test_missing_exporter_is_one_clear_sentence(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_exporter(name, *args, **kw):
        if name == "cutegpt.export.gguf":
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_exporter)
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CuteGPTError, match="needs the GGUF exporter"):
        source.resolve_model(str(_hf_folder(tmp_path / "m")), None, None, "q8_0", progress=False)


def test_adapter_folder_as_model_uses_its_recorded_base(tmp_path, fake_exporter):
    base = _hf_folder(tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    served = source.resolve_model(str(adapter), None, None, "q8_0", progress=False)
    assert fake_exporter[-1][:2] == (str(base), str(adapter)) and served.template == "cutegpt"
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/not-here"}))
    with pytest.raises(CuteGPTError, match="is not a local folder"):
        source.resolve_model(str(adapter), None, None, "q8_0", progress=False)


def test_lora_alone_is_served_on_the_base_it_records(tmp_path, fake_exporter):
    from cutegpt.model.adapter_base import EMBEDDED_BASE

    base = _hf_folder(tmp_path / "base")
    adapter = tmp_path / "copied-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    source.resolve_model(None, str(adapter), None, "q8_0", progress=False)
    assert fake_exporter[-1][:2] == (str(base), str(adapter))
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": EMBEDDED_BASE}))
    source.resolve_model(None, str(adapter), None, "q8_0", progress=False)
    assert fake_exporter[-1][:2] == (None, str(adapter))  # the embedded model, as before bases were recorded


@pytest.mark.parametrize("model,lora,match", [
    ("missing.gguf", None, "does not exist"),
    ("nowhere", None, "neither a .gguf file nor a folder"),
    (".", None, "no config.json or adapter_config.json"),
])
def test_bad_model_paths(tmp_path, monkeypatch, model, lora, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CuteGPTError, match=match):
        source.resolve_model(model, lora, None, "q8_0", progress=False)


def test_gguf_with_lora_is_refused(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    with pytest.raises(CuteGPTError, match="--lora needs an HF model folder"):
        source.resolve_model(str(f), str(tmp_path), None, "q8_0", progress=False)


def test_not_a_gguf_file_is_one_sentence(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"not a gguf at all")
    with pytest.raises(CuteGPTError, match="not a readable GGUF file"):
        source.resolve_model(str(f), None, None, "q8_0", progress=False)


# ----------------------------------------------------------------------------- vLLM


def test_vllm_command_has_template_defaults_and_tensor_parallel(tmp_path, monkeypatch):
    from cutegpt.serve.vllm import vllm_command

    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    cfg = ServeConfig(engine="vllm", tensor_parallel_size=4, parallel=64, ctx=4096, port=9000)
    cmd = vllm_command(cfg, model=tmp_path / "m", name="m", jinja="{{ messages }}")
    assert cmd[:3] == ["vllm", "serve", str(tmp_path / "m")]
    opts = dict(zip(cmd[3::], cmd[4::]))
    assert opts["--tensor-parallel-size"] == "4" and opts["--max-num-seqs"] == "64" and opts["--max-model-len"] == "4096"
    assert opts["--host"] == "127.0.0.1" and opts["--port"] == "9000" and opts["--generation-config"] == "vllm"
    assert json.loads(opts["--override-generation-config"]) == {"temperature": 1.0, "top_p": 0.8, "top_k": 50,
                                                                "repetition_penalty": 1.1, "max_new_tokens": 256}
    assert Path(opts["--chat-template"]).read_text() == "{{ messages }}"
    assert "--api-key" not in cmd


def test_vllm_command_for_two_nodes_of_eight_gpus(tmp_path, monkeypatch):
    """Tensor parallel inside a node, pipeline parallel across nodes: each flag once, with the value given."""
    from cutegpt.serve.vllm import vllm_command

    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    cfg = ServeConfig(engine="vllm", tensor_parallel_size=8, pipeline_parallel_size=2, host="0.0.0.0", api_key="k")
    cfg.check()
    cmd = vllm_command(cfg, model=tmp_path / "m", name="m", jinja=None)
    assert cmd.count("--tensor-parallel-size") == 1 and cmd.count("--pipeline-parallel-size") == 1
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "8" and cmd[cmd.index("--pipeline-parallel-size") + 1] == "2"
    assert "--chat-template" not in cmd and "k" not in cmd
    assert vllm_command(ServeConfig(engine="vllm"), model=tmp_path / "m", name="m", jinja=None)[
        cmd.index("--pipeline-parallel-size") + 1] == "1"


def test_vllm_plan_from_the_cli(tmp_path, monkeypatch, capsys):
    from cutegpt.cli import main

    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    model = _hf_folder(tmp_path / "m")
    assert main(["serve", "--engine", "vllm", "--model", str(model), "--tensor-parallel-size", "2", "--pipeline-parallel-size", "3", "--plan",
                 "--api-key", "k", "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("VLLM_API_KEY=*** vllm serve ") and "--tensor-parallel-size 2" in out and "--chat-template" in out
    assert "--pipeline-parallel-size 3" in out
    assert " k " not in out  # the key never appears on the command line
    assert main(["serve", "--engine", "vllm", "--plan"]) == 1
    assert "needs an HF model folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- defaults and names, as chat has them


def test_request_defaults_resolve_like_chat(tmp_path):
    from cutegpt.generation import GenerationArgs, resolve_generation

    plain = ServeConfig().request_defaults("auto", {})
    assert plain == {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 50, "repeat_penalty": 1.0}  # greedy
    original = ServeConfig().request_defaults("cutegpt", {})
    assert original == {"max_tokens": 256, "temperature": 1.0, "top_p": 0.8, "top_k": 50, "repeat_penalty": 1.1}
    # the model's recommendation (generation_config.json / GGUF metadata) comes before the template's
    model = {"greedy": False, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 100}
    gen, _ = resolve_generation(GenerationArgs(), model, "model", "auto")
    assert ServeConfig().request_defaults("auto", model) == {
        "max_tokens": gen.max_new_tokens, "temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k,
        "repeat_penalty": gen.repetition_penalty} == {"max_tokens": 100, "temperature": 0.7, "top_p": 0.9, "top_k": 50,
                                                       "repeat_penalty": 1.0}
    # flags first; --temperature 0 means greedy, --no-greedy samples
    assert ServeConfig(temperature=0).request_defaults("cutegpt", model)["temperature"] == 0.0
    assert ServeConfig(greedy=False).request_defaults("auto", {})["temperature"] == 1.0
    assert ServeConfig(top_k=7, max_new_tokens=9).request_defaults("auto", model)["top_k"] == 7
    assert ServeConfig(ctx=64).request_defaults("auto", {"max_new_tokens": 4096})["max_tokens"] == 64  # within the context


def test_cli_greedy_flags_parse():
    from cutegpt.config import parse_config

    assert parse_config(ServeConfig, ["--no-greedy"], prog="cutegpt serve").greedy is False
    assert parse_config(ServeConfig, [], prog="cutegpt serve").greedy is None


@pytest.mark.parametrize("path,name", [("runs/sft/final", "sft"), ("runs/sft/checkpoint-40", "sft-checkpoint-40"),
                                       ("adapters/zh-chat", "zh-chat"), ("runs/pt/best", "pt")])
def test_a_run_folder_is_served_under_the_runs_name(tmp_path, path, name):
    folder = tmp_path / path
    folder.mkdir(parents=True)
    assert source.run_name(folder) == name


def test_generation_config_of_a_folder_reaches_the_served_defaults(tmp_path, fake_exporter):
    model = _hf_folder(tmp_path / "runs" / "sft" / "final")
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    served = source.resolve_model(str(model), None, None, "q8_0", progress=False)
    assert served.name == "sft" and served.model_defaults == {"greedy": False, "temperature": 0.6, "top_p": 0.95}
    d = ServeConfig().request_defaults(served.template, served.model_defaults)
    assert (d["temperature"], d["top_p"], d["repeat_penalty"]) == (0.6, 0.95, 1.1)  # the rest: cutegpt's


def _header_only_gguf(path: Path, general_type: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(general_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def test_lora_gguf_on_a_gguf_model_reaches_llama_cpps_parameters(tmp_path, monkeypatch):
    from cutegpt.serve.engine import backend_params

    monkeypatch.setattr(source, "gguf_chat_template", lambda path: None)
    monkeypatch.setattr("cutegpt.runtime.llamacpp.gguf_generation_defaults", lambda path: {})
    model = _header_only_gguf(tmp_path / "base.gguf", "model")
    lora = _header_only_gguf(tmp_path / "sft-lora.gguf", "adapter")
    served = source.resolve_model(str(model), str(lora), None, "f16", progress=False)
    assert served.lora == lora and served.name == "sft-lora" and served.gguf == model
    params = backend_params(ServeConfig(ctx=64), served, 1, "key")
    assert [(a.path, a.scale) for a in params.lora_adapters] == [(str(lora), 1.0)]
    assert source.resolve_model(str(model), None, None, "f16", progress=False).lora is None
    with pytest.raises(CuteGPTError, match="not a LoRA GGUF \\(its general.type"):
        source.resolve_model(str(model), str(model), None, "f16", progress=False)
    with pytest.raises(CuteGPTError, match="export --format gguf-lora --lora"):
        source.resolve_model(str(model), str(tmp_path), None, "f16", progress=False)
