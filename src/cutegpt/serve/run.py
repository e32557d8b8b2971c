"""`cutegpt serve`: bind the port, load the model into llama.cpp, run the front until Ctrl-C / SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import sys

from cutegpt.errors import CuteGPTError
from cutegpt.serve.config import API_KEY_ENV, ServeConfig, check_capacity


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a busy port fails in a second."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise CuteGPTError(f"--host {host} is not an address or name this machine can listen on.") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(512)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CuteGPTError(f"port {port} on {host} is already in use; stop the other server or pick another --port.") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise CuteGPTError(f"no permission to listen on port {port} of {host}; use a port above 1023.") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise CuteGPTError(f"--host {host} is not an address of this machine.") from None
        raise CuteGPTError(f"cannot listen on {host}:{port} ({e.strerror}).") from None
    sock.setblocking(False)
    return sock


def describe_defaults(d: dict) -> str:
    sampling = "greedy" if d["temperature"] == 0 else f"temperature {d['temperature']}, top-p {d['top_p']}, top-k {d['top_k']}"
    return f"{sampling}, repetition penalty {d['repeat_penalty']}, {d['max_tokens']} new tokens"


def banner(url: str, model: str, served, threads: int, cfg: ServeConfig, key: bool) -> str:
    auth = ' -H "Authorization: Bearer $' + API_KEY_ENV + '"' if key else ""
    api_key = f'os.environ["{API_KEY_ENV}"]' if key else '"none"'
    template = "cutegpt (training format, stops at <end>)" if served.template == "cutegpt" else "the model's own chat template"
    return "\n".join([
        f"CuteGPT server on {url}  (web chat: {url}/{'' if cfg.ui else ' disabled'})",
        f"  model     {model}  <- {served.source}",
        f"  GGUF      {served.gguf}",
        f"  template  {template}",
        f"  defaults  {describe_defaults(cfg.request_defaults(served.template, served.model_defaults))} (a request's own fields win)",
        f"  engine    llama.cpp, {cfg.parallel} parallel slot(s) x {cfg.ctx} tokens, {threads} thread(s)"
        + (", API key required" if key else ""),
        "",
        "try it:",
        f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\",
        f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]}}'",
        "",
        "  python -c 'import os; from openai import OpenAI; "
        f"c = OpenAI(base_url=\"{url}/v1\", api_key={api_key}); "
        f"print(c.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}]).choices[0].message.content)'",
        "",
        "Ctrl-C stops the server.",
    ])


def run_serve(cfg: ServeConfig) -> int:
    cfg.check()
    key = cfg.resolved_api_key()
    if cfg.engine == "vllm":
        from cutegpt.serve.vllm import run_vllm

        return run_vllm(cfg, key)
    from cutegpt.serve.source import resolve_model

    served = resolve_model(cfg.model, cfg.lora, cfg.template, cfg.quant, progress=not cfg.quiet)
    check_capacity(cfg, str(served.gguf))
    if cfg.plan:
        from cutegpt.serve.engine import resolve_threads

        print(f"llama.cpp would serve {served.gguf} as '{served.name}' with template {served.template}, "
              f"{cfg.parallel} slots x {cfg.ctx} tokens, {resolve_threads(cfg.threads)} threads, on {cfg.host}:{cfg.port}.")
        return 0
    sock = bind(cfg.host, cfg.port)
    try:
        from cutegpt.serve.engine import start_backend

        backend = start_backend(cfg, served)
    except BaseException:
        sock.close()
        raise
    try:
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        port = sock.getsockname()[1]
        url = f"http://{host}:{port}"
        print(banner(url, served.name, served, backend.threads, cfg, key is not None) if not cfg.quiet else url, flush=True)
        asyncio.run(_serve(cfg, served, backend, sock, key))
    finally:
        sock.close()
        backend.close()
    print("server stopped.", file=sys.stderr, flush=True)
    return 0


def served_template(served) -> object:
    """The template tool requests are rendered with: cutegpt's at once, the GGUF's own (its tokenizer read from the file,
    which takes seconds) on the first tool request."""
    from cutegpt.templates import ChatTemplate, get_template

    if served.template == "cutegpt":
        return get_template("cutegpt")

    def from_gguf():
        from cutegpt.runtime.llamacpp import gguf_tokenizer

        return ChatTemplate(gguf_tokenizer(served.gguf))

    return from_gguf


async def _serve(cfg: ServeConfig, served, backend, sock: socket.socket, key: str | None) -> None:
    from cutegpt.runtime.llamacpp import drops_first_space
    from cutegpt.serve.front import Front, Policy

    policy = Policy(
        model_id=served.name, stop=served.stop, api_key=key, max_body_bytes=cfg.max_body_bytes,
        max_tokens_limit=cfg.token_limit, ctx=cfg.ctx, ui=cfg.ui, tools=True, template=served_template(served),
        defaults=cfg.request_defaults(served.template, served.model_defaults),
        vocab_size=await asyncio.to_thread(backend.vocab_size),
        drop_first_space=drops_first_space(served.gguf),  # answers as chat and generate give them
    )
    front = Front(policy, backend.url, backend.key)
    await front.start(sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await stop.wait()
    print("\nstopping: finishing answers in progress (up to 10 s)...", file=sys.stderr, flush=True)
    await front.close(grace=10.0)
