"""`--endpoint URL`: score a model behind an OpenAI-compatible server (llama.cpp's server, `cutegpt serve`, ...).

    multiple choice (logits, loglikelihood): the prompt as token ids from the server's own /tokenize, the
        same completion requests as on a local GGUF file (runtime.llamacpp.choice_logprobs) sent to
        POST /v1/completions; a server that gives no log-probabilities is one sentence (use --method generate)
    --method generate: POST /v1/chat/completions with the question as one user message (the server's template)

Errors a user can cause (server down, 4xx, no log-probabilities) are one sentence naming the URL; subjects
finished before the error stay in the cache, so `--resume` continues.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cutegpt.errors import CuteGPTError


class EndpointServer:
    """The calls evaluation makes on a llama.cpp server, over HTTP to `url` (duck-types xllamacpp's Server)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        base = url.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.url = url
        self.api_key = api_key
        self.timeout = timeout

    @property
    def listening_address(self) -> str:
        return self.base

    def post(self, path: str, body: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode("utf-8"), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:200].strip()
            hint = " (check --api-key)" if e.code in (401, 403) else ""
            raise CuteGPTError(f"--endpoint {self.url} answered HTTP {e.code} to {path}{hint}: {detail or e.reason}.") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CuteGPTError(f"--endpoint {self.url} cannot be reached ({reason}); is the server running?") from None
        except ValueError:
            raise CuteGPTError(f"--endpoint {self.url} answered {path} with something that is not JSON.") from None

    def handle_completions(self, body: dict[str, Any]) -> Any:
        r = self.post("/v1/completions", body)
        if (body.get("n_probs") or body.get("logprobs")) and not _has_logprobs(r):
            raise CuteGPTError(f"--endpoint {self.url} gives no log-probabilities in its completions; "
                               f"score it with --method generate.")
        return r

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        try:
            r = self.post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True})
            return [int(t) for t in r["tokens"]]
        except CuteGPTError as e:
            if "HTTP 404" in str(e):
                raise CuteGPTError(f"--endpoint {self.url} has no /tokenize (llama.cpp's server has one), so its letters "
                                   f"cannot be scored; use --method generate.") from None
            raise
        except (KeyError, TypeError, ValueError):
            raise CuteGPTError(f"--endpoint {self.url}: /tokenize answered without token ids.") from None

    def chat(self, text: str | list[dict[str, str]], max_tokens: int, sampling: dict[str, Any] | None = None) -> str:
        """The assistant's answer to one user turn (or a whole message list); greedy unless `sampling` says otherwise
        (OpenAI names: temperature, top_p, seed, plus llama.cpp's top_k and repeat_penalty)."""
        messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
        r = self.post("/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens,
                                               **(sampling if sampling is not None else {"temperature": 0.0, "top_k": 1}),
                                               "stream": False})
        try:
            return str(r["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise CuteGPTError(f"--endpoint {self.url}: a chat completion came back without a message.") from None

    def model_id(self) -> str | None:
        try:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            with urllib.request.urlopen(urllib.request.Request(self.base + "/v1/models", headers=headers), timeout=30) as r:
                data = json.loads(r.read()).get("data") or []
            return str(data[0]["id"]) if data else None
        except Exception:  # a server without /v1/models still scores
            return None


def _has_logprobs(r: Any) -> bool:
    try:
        return bool(r["choices"][0]["logprobs"]["content"])
    except (KeyError, IndexError, TypeError):
        return False


@dataclass
class EndpointModel:
    """What evaluation needs of a model, for one behind an endpoint."""

    server: EndpointServer
    tokenizer: Any
    name: str
    model_path: Path
    context_length: int = 1 << 30  # unknown here: the server refuses what does not fit, in one sentence
    threads: int = 0
    lora_path: Path | None = None
    device: str = "remote"
    int8: str | None = None
    template: Any = None
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.name} (endpoint {self.server.url})"


def load_endpoint(url: str, api_key: str | None, method: str) -> EndpointModel:
    from cutegpt.evaluation.llamacpp import ServerTokenizer

    if not url.startswith(("http://", "https://")):
        raise CuteGPTError(f"--endpoint {url} is not an http:// or https:// URL.")
    server = EndpointServer(url, api_key)
    name = server.model_id() or url
    if method != "generate":
        server.tokenize("A", add_special=False)  # fails now, in one sentence, if the server cannot tokenize
    return EndpointModel(server=server, tokenizer=ServerTokenizer(server, None), name=name,
                         model_path=Path(name.replace("/", "_")))
