"""llama.cpp's server, in this process, through xllamacpp.

It listens on a private loopback port with a random API key; only the front
(`cutegpt.serve.front`) talks to it, so every request passes our checks.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from cutegpt.errors import CuteGPTError
from cutegpt.serve.config import ServeConfig
from cutegpt.serve.source import ServedModel
from cutegpt.threads import resolve_threads


@dataclass
class Backend:
    server: Any  # xllamacpp.Server
    url: str  # http://127.0.0.1:PORT
    key: str
    threads: int

    def vocab_size(self) -> int | None:
        """The model's vocabulary size as llama.cpp reports it (None if it does not say)."""
        import json
        import urllib.request

        request = urllib.request.Request(self.url + "/v1/models", headers={"Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                n = json.loads(r.read())["data"][0]["meta"]["n_vocab"]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None
        return n if isinstance(n, int) and n > 0 else None

    def close(self) -> None:
        server, self.server = self.server, None
        del server  # the destructor stops llama.cpp's loop and releases its port


def backend_params(cfg: ServeConfig, served: ServedModel, threads: int, key: str) -> Any:
    from cutegpt.runtime.llamacpp import server_params, xllamacpp_module

    xllamacpp = xllamacpp_module("`cutegpt serve`")

    # llama.cpp splits n_ctx evenly between the slots; the loopback port is free and only the front connects
    p = server_params(xllamacpp, served.gguf, cfg.ctx * cfg.parallel, threads, cfg.parallel, lora=served.lora)
    p.model_alias = {served.name}
    p.api_keys = [key]
    # one HTTP thread per connection the front may hold: every slot busy plus as many waiting, so queued
    # requests reach llama.cpp's task queue (and their disconnects are seen) instead of waiting in accept()
    p.n_threads_http = 2 * cfg.parallel + 4
    p.endpoint_metrics = True
    p.ui = cfg.ui
    p.cache_prompt = cfg.prompt_cache
    if served.jinja is not None:
        p.use_jinja = True
        p.chat_template = served.jinja
    # server-side defaults too (the front also writes them into each request that omits them)
    defaults = cfg.request_defaults(served.template, served.model_defaults)
    p.sampling.top_p = defaults["top_p"]
    p.sampling.top_k = defaults["top_k"]
    p.sampling.temp = defaults["temperature"]
    p.sampling.penalty_repeat = defaults["repeat_penalty"]
    return p


def start_backend(cfg: ServeConfig, served: ServedModel) -> Backend:
    from cutegpt.runtime.llamacpp import xllamacpp_module

    xllamacpp = xllamacpp_module("`cutegpt serve`")
    # llama.cpp's workers spin while they wait for each other: more of them than free cores collapses
    # throughput (2 threads on a loaded 2-core machine: 4-51 tok/s instead of 94-122), hence auto
    threads = resolve_threads(cfg.threads)
    key = secrets.token_urlsafe(24)
    params = backend_params(cfg, served, threads, key)
    try:
        server = xllamacpp.Server(params)
    except RuntimeError as e:
        raise CuteGPTError(f"llama.cpp could not load {served.gguf} with --ctx {cfg.ctx} x --parallel {cfg.parallel} ({e}).") from None
    url = server.listening_address
    if not url:
        del server
        raise CuteGPTError("llama.cpp's server did not start listening on a loopback port.")
    return Backend(server, str(url).rstrip("/"), key, threads)
