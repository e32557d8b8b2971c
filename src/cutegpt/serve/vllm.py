"""`--engine vllm`: the `vllm serve` command for an HF folder, with our template and defaults."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

from cutegpt.errors import CuteGPTError
from cutegpt.serve.config import DEFAULT_CTX, ServeConfig


def template_file(jinja: str) -> Path:
    """Write the Jinja template under the cutegpt cache (content-addressed) and return its path."""
    from cutegpt.io import atomic_file
    from cutegpt.model.embedded import cache_dir

    path = cache_dir() / "templates" / f"chat-{hashlib.sha256(jinja.encode()).hexdigest()[:12]}.jinja"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            f.write(jinja)
    return path


def vllm_command(cfg: ServeConfig, *, model: Path, name: str, jinja: str | None, jinja_path: Path | None = None,
                 lora: Path | None = None) -> list[str]:
    """The argument list of `vllm serve` for these settings (no GPU needed to build it)."""
    from cutegpt.generation import generation_config_defaults

    d = cfg.request_defaults("cutegpt" if jinja is not None else "auto", generation_config_defaults(model))
    cmd = ["vllm", "serve", str(model), "--host", cfg.host, "--port", str(cfg.port),
           "--served-model-name", name,
           "--max-model-len", str(cfg.ctx or DEFAULT_CTX),
           "--max-num-seqs", str(cfg.parallel),
           "--tensor-parallel-size", str(cfg.tensor_parallel_size),
           "--pipeline-parallel-size", str(cfg.pipeline_parallel_size),
           "--generation-config", "vllm",
           "--override-generation-config", json.dumps({
               "temperature": d["temperature"], "top_p": d["top_p"], "top_k": d["top_k"],
               "repetition_penalty": d["repeat_penalty"], "max_new_tokens": d["max_tokens"]}, separators=(",", ":"))]
    if jinja is not None:
        cmd += ["--chat-template", str(jinja_path or template_file(jinja))]
    if lora is not None:
        cmd += ["--enable-lora", "--lora-modules", f"{name}={lora}"]
    if not cfg.prompt_cache:
        cmd += ["--no-enable-prefix-caching"]
    return cmd


def redacted(cmd: list[str]) -> str:
    return shlex.join(cmd)


def run_vllm(cfg: ServeConfig, key: str | None) -> int:
    """Build the command and replace this process with it (or print it with --plan)."""
    import os
    import shutil

    from cutegpt.serve.source import _is_adapter, _template_name

    if cfg.model is None or cfg.model.lower().endswith(".gguf") or not Path(cfg.model).is_dir():
        raise CuteGPTError("--engine vllm needs an HF model folder as --model (vLLM serves safetensors, not the embedded GGUF).")
    model = Path(cfg.model)
    lora = Path(cfg.lora) if cfg.lora else None
    if _is_adapter(model):
        base = json.loads((model / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise CuteGPTError(f"--model {model} is an adapter without base_model_name_or_path; pass the base as --model and the adapter as --lora.")
        model, lora = Path(base), model
    if not (model / "config.json").is_file():
        raise CuteGPTError(f"--model {model} has no config.json; --engine vllm needs an HF model folder.")
    template = _template_name(cfg.template, [lora, model]) or "auto"
    from cutegpt.serve.template import cutegpt_jinja

    jinja = cutegpt_jinja() if template == "cutegpt" else None
    name = (lora or model).name
    cmd = vllm_command(cfg, model=model, name=name, jinja=jinja, lora=lora)
    env_note = ""
    if key is not None:
        env_note = "VLLM_API_KEY=*** "  # vLLM reads its key from the environment; never on the command line
    if cfg.plan or shutil.which("vllm") is None:
        print(env_note + redacted(cmd))
        if template == "cutegpt":
            print("# clients should also pass stop=[\"<end>\"] unless <end> is an EOS id in generation_config.json "
                  "(vLLM takes no default stop strings).")
        if not cfg.plan:
            raise CuteGPTError("vLLM is not installed here (`pip install vllm` on a GPU machine); the command above is what would run.")
        return 0
    env = dict(os.environ)
    if key is not None:
        env["VLLM_API_KEY"] = key
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached
