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
    "llama.cpp compute threads; 0 = auto: the cores other processes leave free when the server starts "
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
    port: int = arg(8000, "TCP port to listen on", ge=0, le=65535)
    api_key: str | None = arg(None, "key every API request must send as 'Authorization: Bearer KEY'; "
                                    "required for a non-loopback --host", absent=f"${API_KEY_ENV}, else no key")
    parallel: int = arg(4, "requests decoded together (llama.cpp slots, continuous batching); 1 = one at a time", ge=1)
    ctx: int = arg(2048, "context window of each request in tokens (prompt + answer); llama.cpp allocates parallel x ctx", ge=16)
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    engine: Literal["llamacpp", "vllm"] = arg("llamacpp", "llamacpp: llama.cpp in this process (CPU or GPU wheels); vllm: run `vllm serve` on the HF folder (GPUs)")
    quant: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] = arg(
        "q8_0", "weight type when an HF folder is exported to GGUF (once, then cached)")
    tensor_parallel_size: int = arg(1, "vllm only: GPUs that split each layer (usually the GPUs of one node)", ge=1)
    pipeline_parallel_size: int = arg(1, "vllm only: groups of layers in sequence (usually the nodes; "
                                         "GPUs used = tensor x pipeline)", ge=1)
    max_new_tokens: int = arg(256, "answer length when a request gives no max_tokens", ge=1)
    temperature: float = arg(1.0, "sampling temperature when a request gives none (0 = greedy)", ge=0)
    top_p: float = arg(0.8, "top-p when a request gives none", gt=0, le=1)
    top_k: int = arg(50, "top-k when a request gives none (0 = off)", ge=0)
    repetition_penalty: float = arg(1.1, "repetition penalty when a request gives none (1.0 = off)", gt=0)
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
        if not is_loopback(self.host) and key is None:
            raise CuteGPTError(
                f"--host {self.host} exposes the server beyond this machine; set --api-key KEY (or ${API_KEY_ENV}) "
                "so every request must carry it, or keep the default --host 127.0.0.1.")
        for flag, value in (("--tensor-parallel-size", self.tensor_parallel_size), ("--pipeline-parallel-size", self.pipeline_parallel_size)):
            if self.engine == "llamacpp" and value != 1:
                raise CuteGPTError(f"{flag} needs --engine vllm (llama.cpp here runs in one process).")
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
