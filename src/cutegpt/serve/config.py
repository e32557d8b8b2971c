"""Settings of `cutegpt serve` (flags and YAML keys) and the checks made before anything loads."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Literal

from cutegpt.config import arg
from cutegpt.errors import CuteGPTError

API_KEY_ENV = "CUTEGPT_API_KEY"

THREADS_HELP = (
    "llama.cpp compute threads; 0 = auto: the cores that are free when the server starts "
    "(cores minus the 1-minute load average, at least 1). llama.cpp's threads spin while they wait, so "
    "on a busy machine more threads than free cores collapse throughput: on a loaded 2-core box 2 threads "
    "gave 4-51 tok/s against 94-122 with the machine quiet (184-794 ms per token), so auto picks 1 there"
)


@dataclass
class ServeConfig:
    model: str | None = arg(None, "a .gguf file, an HF model folder, an adapter folder, or nothing for the embedded SmolLM2-135M-Instruct GGUF")
    lora: str | None = arg(None, "LoRA adapter folder merged into --model before the GGUF export")
    template: Literal["cutegpt", "auto"] | None = arg(
        None, "chat template: cutegpt (the training format, stop marker <end>) or auto (the model's own); "
        "default: what the model folder records, else the GGUF's own template, else cutegpt")
    host: str = arg("127.0.0.1", "address to listen on; anything but a loopback address needs --api-key")
    port: int = arg(8000, "TCP port to listen on")
    api_key: str | None = arg(None, f"key every API request must send as 'Authorization: Bearer KEY'; unset: ${API_KEY_ENV} if set; "
                                    "required for a non-loopback --host)")
    parallel: int = arg(4, "requests decoded together (llama.cpp slots, continuous batching); 1 = one at a time")
    ctx: int = arg(2048, "context window of each request in tokens (prompt + answer); llama.cpp allocates parallel x ctx")
    threads: int = arg(0, THREADS_HELP)
    engine: Literal["llamacpp", "vllm"] = arg("llamacpp", "llamacpp: llama.cpp in this process (CPU or GPU wheels); vllm: run `vllm serve` on the HF folder (GPUs)")
    quant: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] = arg(
        "q8_0", "weight type when an HF folder is exported to GGUF (once, then cached)")
    tensor_parallel_size: int = arg(1, "vllm only: GPUs to split the model over")
    max_new_tokens: int = arg(256, "answer length when a request gives no max_tokens")
    temperature: float = arg(1.0, "sampling temperature when a request gives none")
    top_p: float = arg(0.8, "top-p when a request gives none")
    top_k: int = arg(50, "top-k when a request gives none (0 = off)")
    repetition_penalty: float = arg(1.1, "repetition penalty when a request gives none (1.0 = off)")
    max_tokens_limit: int | None = arg(None, "largest max_tokens a request may ask for; unset: --ctx")
    max_body_bytes: int = arg(1_048_576, "largest request body accepted; larger ones get HTTP 413")
    prompt_cache: bool = arg(True, "reuse the KV cache of a slot's previous prompt (multi-turn chats prefill only the new turn)")
    ui: bool = arg(True, "serve llama.cpp's web chat page at /")
    plan: bool = arg(False, "print what would run (the vLLM command, or the llama.cpp settings) and exit")
    quiet: bool = arg(False, "print only the URL at start-up")

    def resolved_api_key(self) -> str | None:
        return self.api_key if self.api_key is not None else (os.environ.get(API_KEY_ENV) or None)

    def check(self) -> None:
        for name, low in (("port", 0), ("parallel", 1), ("ctx", 16), ("threads", 0), ("tensor_parallel_size", 1),
                          ("max_new_tokens", 1), ("max_body_bytes", 1024), ("top_k", 0)):
            value = getattr(self, name)
            if value < low:
                raise CuteGPTError(f"--{name.replace('_', '-')} must be at least {low}, not {value}.")
        if self.port > 65535:
            raise CuteGPTError(f"--port must be at most 65535, not {self.port}.")
        if not 0.0 < self.top_p <= 1.0:
            raise CuteGPTError(f"--top-p must be in (0, 1], not {self.top_p}.")
        if self.temperature < 0:
            raise CuteGPTError(f"--temperature must be at least 0, not {self.temperature}.")
        if self.repetition_penalty <= 0:
            raise CuteGPTError(f"--repetition-penalty must be positive, not {self.repetition_penalty}.")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise CuteGPTError(f"--max-tokens-limit must be at least 1, not {self.max_tokens_limit}.")
        key = self.resolved_api_key()
        if key is not None and (not key.strip() or any(c.isspace() for c in key)):
            raise CuteGPTError("--api-key must be non-empty text without spaces.")
        if not is_loopback(self.host) and key is None:
            raise CuteGPTError(
                f"--host {self.host} exposes the server beyond this machine; set --api-key KEY (or ${API_KEY_ENV}) "
                "so every request must carry it, or keep the default --host 127.0.0.1.")
        if self.engine == "llamacpp" and self.tensor_parallel_size != 1:
            raise CuteGPTError("--tensor-parallel-size needs --engine vllm (llama.cpp here runs in one process).")
        if self.max_new_tokens > self.token_limit:
            raise CuteGPTError(f"--max-new-tokens {self.max_new_tokens} exceeds the request limit {self.token_limit} (--max-tokens-limit or --ctx).")

    @property
    def token_limit(self) -> int:
        return self.max_tokens_limit if self.max_tokens_limit is not None else self.ctx


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
