"""Settings of `cutegpt serve` (flags and YAML keys) and the checks made before anything loads."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cutegpt.config import arg
from cutegpt.errors import CuteGPTError

API_KEY_ENV = "CUTEGPT_API_KEY"

_RESOLVED = "the model's generation_config.json or GGUF metadata, else the template's, as in chat"
THREADS_HELP = (
    "llama.cpp compute threads; 0 = auto: the cores other processes leave free when the server starts "
    "(cores minus the 1-minute load average, at least 1). llama.cpp's threads spin while they wait, so "
    "on a busy machine more threads than free cores collapse throughput: on a loaded 2-core box 2 threads "
    "gave 4-51 tok/s against 94-122 with the machine quiet (184-794 ms per token), so auto picks 1 there"
)


DEFAULT_CTX = 2048  # tokens per request when --ctx is not given (or the model's context, when shorter)

@dataclass
class ServeConfig:
    model: str | None = arg(None, "a .gguf file, an HF model folder, an adapter folder, or nothing for the embedded SmolLM2-135M-Instruct GGUF")
    lora: str | None = arg(None, "LoRA adapter folder merged into --model before the GGUF export, or a LoRA GGUF "
                                  "(export --format gguf-lora) that llama.cpp applies on a .gguf --model")
    template: Literal["cutegpt", "auto"] | None = arg(
        None, "chat template: cutegpt (the training format, stop marker <end>) or auto (the model's own); "
        "default: what the model folder records, else the GGUF's own template, else cutegpt")
    host: str = arg("127.0.0.1", "address to listen on; anything but a loopback address needs --api-key")
    port: int = arg(8000, "TCP port to listen on", ge=0, le=65535)
    api_key: str | None = arg(None, "key every API request must send as 'Authorization: Bearer KEY'; "
                                    "required for a non-loopback --host", absent=f"${API_KEY_ENV}, else no key")
    parallel: int = arg(4, "requests decoded together (llama.cpp slots, continuous batching); 1 = one at a time", ge=1)
    ctx: int | None = arg(None, "context window of each request in tokens (prompt + answer); llama.cpp allocates parallel x ctx",
                          ge=16, absent=f"{DEFAULT_CTX}, or the model's own context when shorter")
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    engine: Literal["llamacpp", "vllm"] = arg("llamacpp", "llamacpp: llama.cpp in this process (CPU or GPU wheels); vllm: run `vllm serve` on the HF folder (GPUs)")
    quant: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k_m", "q4_k_m"] = arg(
        "f16", "weight type when an HF folder is exported to GGUF (once, then cached); f16, as chat and generate "
        "run a folder on llama.cpp, gives the same answers as they do")
    tensor_parallel_size: int = arg(1, "vllm only: GPUs that split each layer (usually the GPUs of one node)", ge=1)
    pipeline_parallel_size: int = arg(1, "vllm only: groups of layers in sequence (usually the nodes; "
                                         "GPUs used = tensor x pipeline)", ge=1)
    # None = not given: resolved as chat and generate resolve them (cutegpt.generation.resolve_generation), so
    # the same model gives the same answer everywhere
    max_new_tokens: int | None = arg(None, "answer length when a request gives no max_tokens", ge=1, absent=_RESOLVED + " (256)")
    greedy: bool | None = arg(None, "requests that give no temperature decode greedily (temperature 0); --no-greedy samples",
                              absent=_RESOLVED + " (greedy for the model's own template, sampling for cutegpt)")
    temperature: float | None = arg(None, "sampling temperature when a request gives none (0 = greedy)", ge=0,
                                    absent=_RESOLVED + " (1.0)")
    top_p: float | None = arg(None, "top-p when a request gives none", gt=0, le=1, absent=_RESOLVED + " (0.8 for cutegpt, 1.0 otherwise)")
    top_k: int | None = arg(None, "top-k when a request gives none (0 = off)", ge=0, absent=_RESOLVED + " (50)")
    repetition_penalty: float | None = arg(None, "repetition penalty when a request gives none (1.0 = off)", gt=0,
                                           absent=_RESOLVED + " (1.1 for cutegpt, 1.0 otherwise)")
    max_tokens_limit: int | None = arg(None, "largest max_tokens a request may ask for", ge=1, absent="--ctx")
    max_body_bytes: int = arg(1_048_576, "largest request body accepted; larger ones get HTTP 413", ge=1024)
    prompt_cache: bool = arg(True, "reuse the KV cache of a slot's previous prompt (multi-turn chats prefill only the new turn)")
    ui: bool = arg(True, "serve llama.cpp's web chat page at /")
    plan: bool = arg(False, "print what would run (the vLLM command, or the llama.cpp settings) and exit")
    quiet: bool = arg(False, "print only the URL at start-up")

    def resolved_api_key(self) -> str | None:
        return self.api_key if self.api_key is not None else (os.environ.get(API_KEY_ENV) or None)

    def check(self) -> None:
        """Cross-field checks (bounds of single flags are checked by `cutegpt.config` before this)."""
        from cutegpt.config import check_values

        check_values(type(self), {f: getattr(self, f) for f in self.__dataclass_fields__})  # also for configs built in Python
        key = self.resolved_api_key()
        if key is not None and (not key.strip() or any(c.isspace() for c in key)):
            raise CuteGPTError("--api-key must be non-empty text without spaces.")
        if not is_loopback(self.host):
            resolve_host(self.host)
        if not is_loopback(self.host) and key is None:
            raise CuteGPTError(
                f"--host {self.host} exposes the server beyond this machine; set --api-key KEY (or ${API_KEY_ENV}) "
                "so every request must carry it, or keep the default --host 127.0.0.1.")
        for flag, value in (("--tensor-parallel-size", self.tensor_parallel_size), ("--pipeline-parallel-size", self.pipeline_parallel_size)):
            if self.engine == "llamacpp" and value != 1:
                raise CuteGPTError(f"{flag} needs --engine vllm (llama.cpp here runs in one process).")
        if self.max_new_tokens is not None and self.max_new_tokens > self.token_limit:
            raise CuteGPTError(f"--max-new-tokens {self.max_new_tokens} exceeds the request limit {self.token_limit} (--max-tokens-limit or --ctx).")

    def request_defaults(self, template: str, model_defaults: dict[str, Any]) -> dict[str, Any]:
        """What a request that leaves a field out gets, in llama.cpp's names: the flags, then the model's
        recommendation, then the template's defaults (`resolve_generation`, as chat and generate)."""
        from cutegpt.generation import GenerationArgs, resolve_generation

        given = GenerationArgs(max_new_tokens=self.max_new_tokens, greedy=self.greedy, temperature=self.temperature or None,
                               top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty)
        if self.temperature == 0:  # --temperature 0 is llama.cpp's way of saying greedy
            given.greedy = True
        gen, _ = resolve_generation(given, model_defaults, "model", template)
        return {"max_tokens": min(gen.max_new_tokens, self.token_limit), "temperature": 0.0 if gen.greedy else gen.temperature,
                "top_p": gen.top_p, "top_k": gen.top_k, "repeat_penalty": gen.repetition_penalty}

    @property
    def token_limit(self) -> int:
        return self.max_tokens_limit if self.max_tokens_limit is not None else (self.ctx or DEFAULT_CTX)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_host(host: str) -> None:
    """A --host that names nothing is that, not a missing API key (checked before the key rule)."""
    import socket

    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        raise CuteGPTError(f"--host {host} is not an address or name this machine can listen on.") from None


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_capacity(cfg: "ServeConfig", gguf: str, available: int | None = None) -> None:
    """--ctx against the model's trained context, and --parallel x --ctx (llama.cpp's KV cache) against memory.

    Checked before llama.cpp loads: a context of 100M tokens grew to 9 GB without getting ready, and 100,000
    slots aborted llama.cpp with a C++ exception.
    """
    wanted = (".context_length", ".block_count", ".attention.head_count_kv", ".attention.head_count", ".embedding_length")
    given = cfg.ctx is not None
    cfg.ctx = cfg.ctx or DEFAULT_CTX
    from cutegpt.model.gguf_header import read_metadata

    try:  # the header only (gguf.GGUFReader parses the whole file first: 30 s on a busy machine)
        fields = read_metadata(Path(gguf), lambda k: k.endswith(wanted))
    except CuteGPTError:
        return  # an unreadable file is llama.cpp's to report, with its own words
    get = {suffix: next((v for k, v in fields.items() if k.endswith(suffix)), None) for suffix in wanted}
    trained = get[".context_length"]
    if isinstance(trained, int) and not given:
        cfg.ctx = min(DEFAULT_CTX, trained)  # no --ctx: never more than the model was trained for
    if isinstance(trained, int) and cfg.ctx > trained:
        raise CuteGPTError(f"--ctx {cfg.ctx} exceeds the model's context of {trained} tokens ({gguf}); lower --ctx.")
    layers, kv_heads, heads, width = (get[s] for s in wanted[1:])
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, heads, width)):
        return
    kv_bytes = 2 * layers * kv_heads * (width // heads) * 2 * cfg.parallel * cfg.ctx  # K and V, f16, every slot
    need = kv_bytes + os.path.getsize(gguf)
    available = _available_memory() if available is None else available
    if available is not None and need > available:
        raise CuteGPTError(
            f"--parallel {cfg.parallel} x --ctx {cfg.ctx} needs about {need / 2**30:.1f} GiB (a KV cache of "
            f"{kv_bytes / 2**30:.1f} GiB plus the weights) and {available / 2**30:.1f} GiB of memory is available; "
            "lower --parallel or --ctx.")
