"""llama.cpp in-process, through the PyPI package `xllamacpp`: the one room every command that runs
a GGUF file goes through (chat, generate, serve, export's verification, evaluation).

    runtime/llamacpp.py   server settings, start and lifetime, GGUF metadata, the GGUF's tokenizer and
                          template, completion requests that sample like transformers, token probabilities
        ^ chat/llamacpp.py (streaming engine)   serve/engine.py (HTTP backend)   export/verify.py

Nothing here imports chat or serve. The server always listens on a free loopback port too (its HTTP
side answers /tokenize and /apply-template); `keep_alive` documents why a server is never destroyed
in a command that must exit cleanly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from cutegpt.errors import CuteGPTError
from cutegpt.model.gguf_header import read_metadata
from cutegpt.templates import Template

# llama.cpp's GGUF keys for a model's recommended sampling (written by its converter from generation_config.json)
GGUF_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                      "general.sampling.top_k": "top_k", "general.sampling.penalty_repeat": "repetition_penalty"}


def xllamacpp_module(what: str = "--backend llamacpp") -> Any:
    """The xllamacpp package (this CPU's native build when `cutegpt llamacpp build` made one, see runtime/native.py),
    or one sentence saying `what` needs it."""
    from cutegpt.runtime.native import import_xllamacpp

    try:
        return import_xllamacpp()
    except ImportError:
        raise CuteGPTError(f"{what} needs the xllamacpp package: run `pip install xllamacpp`.") from None


def server_params(xl: Any, path: Path, n_ctx: int, threads: int, parallel: int = 1, lora: Path | None = None) -> Any:
    """The llama.cpp server settings chat, serve and export's verification all start from: the file, the context
    (split between `parallel` slots), the same thread count for prompt and generation, quiet, and listening only
    on a free loopback port (the in-process server always serves HTTP too). `lora`: a LoRA GGUF
    (`export --format gguf-lora`) applied at full scale on top of the model."""
    p = xl.CommonParams()
    p.model.path = str(path)
    if lora is not None:
        adapter = xl.CommonAdapterLoraInfo()
        adapter.path = str(lora)
        adapter.scale = 1.0
        p.lora_adapters = [adapter]
    p.n_ctx = n_ctx
    p.n_parallel = parallel
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.verbosity = -1  # llama.cpp's own log lines are not the user's business
    p.hostnames = ["127.0.0.1"]
    p.port = 0
    return p




def start_server(params: Any, path: Path) -> Any:
    """Start llama.cpp on `params` (the model file is `path`), its loading chatter kept off the terminal; a file
    llama.cpp refuses is one sentence with llama.cpp's own reason."""
    xl = xllamacpp_module()
    log: list[str] = []
    try:
        with captured_stderr(log):
            return xl.Server(params)
    except Exception as e:
        reason = next((line.split("error loading model:", 1)[1].strip() for line in reversed(log) if "error loading model:" in line),
                      str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        raise CuteGPTError(f"llama.cpp cannot load {path.name} ({reason}).") from None


# --- GGUF metadata without loading tensors (model/gguf_header.py reads the header) ----------------


def gguf_generation_defaults(path: Path) -> dict[str, Any]:
    """The sampling settings a GGUF file recommends (`general.sampling.*`), as GenerationArgs fields.

    As in llama.cpp, a temperature of 0 means greedy decoding and a positive one sampling."""
    meta = read_metadata(path, lambda k: k in GGUF_SAMPLING_KEYS)
    out: dict[str, Any] = {}
    for key, name in GGUF_SAMPLING_KEYS.items():
        if key in meta:
            out[name] = int(meta[key]) if name == "top_k" else float(meta[key])
    if "temperature" in out:
        out["greedy"] = out["temperature"] <= 0
        if out["greedy"]:
            del out["temperature"]
    return out


def drops_first_space(path: Path) -> bool:
    """Whether an answer's first space is not part of its text for this file's vocabulary.

    A SentencePiece vocabulary with a dummy prefix starts an answer with a word-boundary piece ("▁北京"):
    llama.cpp's text for it keeps the space (" 北京"), transformers' decoding drops it, as SentencePiece
    does at the start of a text. The torch backend's answer is the reference; the llama.cpp backend and
    serve drop that one space too."""
    meta = read_metadata(path, lambda k: k in ("tokenizer.ggml.model", "tokenizer.ggml.add_space_prefix"))
    return meta.get("tokenizer.ggml.model") == "llama" and bool(meta.get("tokenizer.ggml.add_space_prefix", True))


def gguf_model_name(path: Path) -> str:
    meta = read_metadata(path, lambda k: k in ("general.name", "general.basename", "general.finetune", "general.size_label"))
    return str(meta.get("general.name") or path.stem)


# --- tokenizer: the GGUF's, converted by transformers once and cached as a folder ---------------

def _tokenizer_cache(path: Path) -> Path:
    from cutegpt.model.embedded import cache_dir
    from cutegpt.model.tokenizer import RULE_VERSION

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{RULE_VERSION}".encode()).hexdigest()[:12]
    return cache_dir() / "tokenizers" / f"{path.stem}-{key}"


def gguf_tokenizer(path: Path) -> Any:
    """The HF tokenizer stored in a GGUF file (converting takes seconds, so the result is cached)."""
    from cutegpt.model.tokenizer import load_tokenizer, match_reference

    folder = _tokenizer_cache(path)
    if (folder / "tokenizer_config.json").is_file():
        try:
            return match_reference(load_tokenizer(folder), gguf=path)
        except Exception:
            pass  # a damaged cache entry: convert again
    tok = load_tokenizer(path.parent, gguf_file=path.name)
    remember_gguf_tokenizer(path, tok)
    return tok


def remember_gguf_tokenizer(path: Path, tok: Any) -> None:
    """Cache `tok` as the tokenizer of the GGUF file `path` (one converted from the same file before it was renamed)."""
    from cutegpt.model.tokenizer import save_tokenizer_files

    try:
        from cutegpt.io import atomic_dir

        with atomic_dir(_tokenizer_cache(path), overwrite=True) as tmp:
            save_tokenizer_files(tok, tmp)
    except (OSError, CuteGPTError):
        pass  # an unwritable cache only costs the conversion next time


def template_for(name: str | None, tokenizer: Any) -> Template:
    """The template for a GGUF model: the one asked for, else `cutegpt` when the file carries CuteGPT's Jinja, else auto."""
    from cutegpt.templates import default_template_name, get_template

    if not name:
        name = default_template_name(tokenizer)
        if name == "auto":
            try:
                from cutegpt.templates import chat_template_jinja

                if tokenizer.chat_template == chat_template_jinja("cutegpt"):
                    name = "cutegpt"
            except ImportError:
                pass
    return get_template(name, tokenizer)


# --- the model ----------------------------------------------------------------------------------

@dataclass
class LlamaCppModel:
    """A GGUF file loaded in llama.cpp, with our tokenizer and template (duck-types `LoadedModel` for chat)."""

    server: Any
    tokenizer: Any
    template: Template
    model_path: Path
    context_length: int
    threads: int
    name: str
    lora_path: Path | None = None
    device: str = "cpu"
    int8: str | None = None
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    drops_first_space: bool = False  # see drops_first_space()

    def describe(self) -> str:
        return f"{self.name} (llama.cpp, {self.threads} thread{'s' if self.threads != 1 else ''}, template {self.template.name})"


def load_llamacpp(path: Path, *, template: str | None = None, threads: int = 1, n_ctx: int = 0,
                  tokenizer: Any = None, name: str | None = None, parallel: int = 1,
                  slot_save_path: Path | None = None, lora: Path | None = None) -> LlamaCppModel:
    """Load a GGUF file in llama.cpp (`parallel` slots sharing `n_ctx`, prompt cache on) with its tokenizer and template.

    `slot_save_path`: a folder where slots may save and restore their KV cache (`share_prefix`).
    `lora`: a LoRA GGUF applied on top (its architecture must be the model's; llama.cpp checks)."""
    xl = xllamacpp_module()
    if not path.is_file():
        raise CuteGPTError(f"GGUF file {path} does not exist." if not path.exists() else f"{path} is a folder, not a .gguf file.")
    meta = read_metadata(path, lambda k: k.endswith(".context_length") or k == "general.architecture")
    arch = meta.get("general.architecture", "llama")
    train_ctx = int(meta.get(f"{arch}.context_length") or 2048)
    if tokenizer is None:
        tokenizer = gguf_tokenizer(path)
    tmpl = template_for(template, tokenizer)
    if lora is not None and not lora.is_file():
        raise CuteGPTError(f"--lora {lora} does not exist.")
    params = server_params(xl, path, n_ctx or train_ctx, threads, parallel, lora=lora)
    params.warmup = False
    if slot_save_path is not None:
        params.endpoint_slots = True
        # llama.cpp joins this and the file name without a separator: without the trailing one, the slot files
        # would land beside the folder (and outlive its removal)
        params.slot_save_path = os.path.join(str(slot_save_path), "")
    try:
        server = xl.Server(params)
    except Exception as e:
        what = f"{path} with the LoRA {lora}" if lora is not None else f"{path}"
        raise CuteGPTError(f"{what}: llama.cpp cannot load this GGUF file ({str(e).splitlines()[0][:200]}).") from None
    keep_alive(server)
    return LlamaCppModel(server=server, tokenizer=tokenizer, template=tmpl, model_path=path,
                         context_length=params.n_ctx // parallel, threads=threads, name=name or gguf_model_name(path),
                         generation_defaults=gguf_generation_defaults(path), lora_path=lora,
                         drops_first_space=drops_first_space(path))


def keep_alive(server: Any) -> None:
    """Keep an xllamacpp `Server` alive until the process ends (call it on every server a command will not reuse).

    xllamacpp's `Server` destructor can deadlock: it asks the llama.cpp loop thread to stop and joins
    it, and the loop sometimes misses the request (seen in the tests: the process hung in
    `~Server` -> `thread::join` for good). A server is never freed, so the destructor never runs;
    the operating system reclaims it at exit.
    """
    import ctypes

    ctypes.pythonapi.Py_IncRef(ctypes.py_object(server))


# --- log-probabilities of chosen tokens ----------------------------------------------------------------
#
# llama.cpp reports only the top-n next tokens (`n_probs`), and a choice letter may not be among them.
#   0. the top-TOP_N log-probabilities before sampling (unbiased), the first choice forced: on a real
#      multiple-choice prompt the letters are nearly always among them, and then this one request is the
#      answer. Otherwise, each re-evaluating one token (the prompt is in the slot's cache):
#   1. the choices' logits raised by CHOICE_BIAS (`logit_bias`), top-k = number of choices, temperature 1,
#      probabilities after sampling: the softmax over the choices alone (the bias cancels out);
#   2. the anchor: a choice known from 0 (its top-n, the forced one), else the best choice forced by the bias,
#      probabilities before sampling (llama.cpp reports the sampled token's log-probability under the
#      unbiased logits).
# 1 gives the differences between the choices' log-probabilities, 2 anchors them.

# far above any logit gap seen, small enough that float32 keeps ~1e-5 of the logit; sent in OpenAI's object form
# ({"token id": bias}, the range -100..100), which llama.cpp's server, cutegpt serve and other endpoints all take
CHOICE_BIAS = 100.0
# the unbiased top-n asked first: the vocabulary is sorted whatever n is, so a longer list costs only its JSON
TOP_N = 20


def _forced(server: Any, ids: list[int], token: int, slot: int, reuse: bool, n_probs: int, what: str) -> dict[str, Any]:
    """One greedy step with `token` forced by the bias, unbiased log-probabilities (it and the top `n_probs`)."""
    r = server.handle_completions({"prompt": list(ids), "n_predict": 1, "n_probs": n_probs, "temperature": 0.0,
                                   "logit_bias": {str(token): CHOICE_BIAS}, "post_sampling_probs": False,
                                   "cache_prompt": reuse, "ignore_eos": True, "id_slot": slot})
    return _first_logprobs(r, what)


def _sampled_logprob(server: Any, ids: list[int], token: int, slot: int, reuse: bool = True) -> float:
    got = _forced(server, ids, token, slot, reuse, 1, "the forced token's probability")
    if int(got["id"]) != token:
        raise CuteGPTError(f"llama.cpp did not take the forced token {token} (it sampled {got['id']}).")
    return float(got["logprob"])


def _first_logprobs(r: Any, what: str) -> dict[str, Any]:
    if isinstance(r, dict) and "error" in r:
        raise CuteGPTError(f"llama.cpp refused a scoring request ({str(r['error'])[:200]}).")
    try:
        return r["choices"][0]["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError):
        raise CuteGPTError(f"llama.cpp's answer has no {what}.") from None


def token_logprob(server: Any, ids: list[int], token: int, slot: int = -1, reuse: bool = True) -> float:
    """log P(token | ids) under the model (no BOS is added to `ids`); reuse=False recomputes the whole prompt."""
    return _sampled_logprob(server, ids, token, slot, reuse)


def choice_logprobs(server: Any, ids: list[int], tokens: list[int], slot: int = -1, reuse: bool = True,
                    top_n: int = TOP_N) -> list[float]:
    """log P(t | ids) over the whole vocabulary for each of the distinct `tokens` (see the comment above);
    top_n=0 skips request 0 (the two biased requests alone, as before it existed)."""
    first: dict[int, float] = {}
    if top_n:
        # the first choice forced: llama.cpp withholds the log-probabilities of a token that is not whole UTF-8
        # (a byte token the model might pick), and the forced one's own log-probability is one more anchor
        got = _forced(server, ids, tokens[0], slot, reuse, max(top_n, len(tokens)), "top log-probabilities")
        first = {int(t["id"]): float(t["logprob"]) for t in got.get("top_logprobs", [])}
        if int(got["id"]) == tokens[0]:
            first[tokens[0]] = float(got["logprob"])
        if all(t in first for t in tokens):
            return [first[t] for t in tokens]
    r = server.handle_completions({"prompt": list(ids), "n_predict": 1, "n_probs": len(tokens), "temperature": 1.0,
                                   "samplers": ["top_k"], "top_k": len(tokens), "seed": 0,
                                   "logit_bias": {str(t): CHOICE_BIAS for t in tokens}, "post_sampling_probs": True,
                                   "cache_prompt": reuse, "ignore_eos": True, "id_slot": slot})
    top = {int(t["id"]): float(t["prob"]) for t in _first_logprobs(r, "choice probabilities").get("top_probs", [])}
    known = {t: top[t] for t in tokens if top.get(t, 0.0) > 0.0}
    if not known:
        return [_sampled_logprob(server, ids, t, slot, reuse) for t in tokens]
    both = [t for t in known if t in first]
    if both:  # anchored by request 0: no third request
        best = max(both, key=lambda t: known[t])
        anchor = first[best] - math.log(known[best])
    else:
        best = max(known, key=lambda t: known[t])
        anchor = _sampled_logprob(server, ids, best, slot, reuse) - math.log(known[best])
    # a choice whose share underflowed float32 (or that another token pushed out): asked for on its own
    return [anchor + math.log(known[t]) if t in known else _sampled_logprob(server, ids, t, slot, reuse) for t in tokens]


def share_prefix(lm: LlamaCppModel, ids: list[int], filename: str, slots: int) -> None:
    """Evaluate `ids` once in slot 0 and copy its KV cache into slots 1..slots-1 (slot save/restore), so every
    slot starts from the shared prefix instead of computing it again. Needs `slot_save_path` at load."""
    r = lm.server.handle_completions({"prompt": list(ids), "n_predict": 0, "cache_prompt": True, "id_slot": 0})
    if isinstance(r, dict) and "error" in r:
        raise CuteGPTError(f"llama.cpp refused the shared prefix ({str(r['error'])[:200]}).")
    if slots < 2:
        return
    base = str(lm.server.listening_address)
    base = base if base.startswith("http") else "http://" + base
    _post_json(base + "/slots/0?action=save", {"filename": filename})
    for k in range(1, slots):
        _post_json(base + f"/slots/{k}?action=restore", {"filename": filename})


def server_tokenize(server: Any, text: str, add_special: bool = True) -> list[int]:
    """llama.cpp's own token ids for `text` (its /tokenize), special tokens in the text parsed."""
    base = str(server.listening_address)
    base = base if base.startswith("http") else "http://" + base
    r = _post_json(base + "/tokenize", {"content": text, "add_special": add_special, "parse_special": True})
    return [int(t) for t in r["tokens"]]


def _post_json(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


# --- completion requests -----------------------------------------------------------------------------------

class Sampling(Protocol):
    """The sampling fields a request needs (chat's GenerationArgs has them; the runtime does not import chat)."""

    max_new_tokens: int | None
    greedy: bool | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    seed: int | None
    ignore_eos: bool


def request_for(prompt_ids: list[int], gen: Sampling, stop: str | None, n_ctx: int, cache_prompt: bool = True) -> dict[str, Any]:
    """The /v1/completions request that samples like our torch engine."""
    req: dict[str, Any] = {
        "prompt": list(prompt_ids),
        "max_tokens": gen.max_new_tokens,
        "stream": True,
        "cache_prompt": cache_prompt,
        "stream_options": {"include_usage": True},
        "repeat_penalty": gen.repetition_penalty,
        "repeat_last_n": n_ctx,  # transformers penalises every token of prompt and answer
        "min_p": 0.0,
        "typical_p": 1.0,
        "ignore_eos": bool(gen.ignore_eos),
        "samplers": ["penalties", "temperature", "top_k", "top_p"],  # transformers' order
        "seed": gen.seed if gen.seed is not None else random.randrange(2**31),
    }
    if gen.greedy:
        req.update(temperature=0.0, top_k=1, top_p=1.0)
    else:
        req.update(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
    if stop and not gen.ignore_eos:
        req["stop"] = [stop]
    return req


# --- token-level calls -------------------------------------------------------------------------

class LlamaCpp:
    """A GGUF file loaded in llama.cpp, quiet, with token-level calls: tokenize, render a template, the next
    token's log-probabilities, a greedy continuation (export's verification; scoring)."""

    def __init__(self, path: Path, n_ctx: int = 1024, threads: int = 1, lora: Path | None = None):
        p = server_params(xllamacpp_module(), path, n_ctx, threads, lora=lora)
        p.warmup = False
        p.use_jinja = True
        self.server = start_server(p, path)
        address = str(self.server.listening_address)
        self.base = address if address.startswith("http") else "http://" + address

    def close(self) -> None:
        # xllamacpp's Server destructor can deadlock (it hung a test run in `close` here, as it did in chat)
        if self.server is not None:
            keep_alive(self.server)
        self.server = None

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self._post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True})["tokens"])

    def apply_template(self, messages: list[dict[str, str]]) -> str:
        return str(self._post("/apply-template", {"messages": messages})["prompt"])

    def next_logprobs(self, ids: list[int], k: int = 1) -> list[tuple[int, float]] | None:
        """The k most likely next tokens after `ids` (token ids, no BOS added) with their log-probabilities.

        None when llama.cpp holds the token back as an incomplete UTF-8 character (it then reports no probabilities).
        """
        r = self.server.handle_completions({"prompt": list(ids), "n_predict": 1, "n_probs": k, "temperature": 0,
                                            "cache_prompt": True, "ignore_eos": True, "post_sampling_probs": False})
        logprobs = r.get("choices", [{}])[0].get("logprobs")
        if not logprobs:
            return None
        return [(int(t["id"]), float(t["logprob"])) for t in logprobs["content"][0]["top_logprobs"]]

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """Up to `n` greedy token ids after `ids` (n=1: the top-1 next token); ends early with an end-of-generation token, included."""
        r = self._post("/completion", {"prompt": list(ids), "n_predict": n, "temperature": 0, "return_tokens": True,
                                       "cache_prompt": True})
        return [int(t) for t in r["tokens"]]


@contextlib.contextmanager
def captured_stderr(lines: list[str]) -> Iterator[None]:
    """Keep llama.cpp's C-level loading chatter off the terminal; its lines land in `lines` for error messages."""
    import tempfile

    if os.environ.get("CUTEGPT_DEBUG") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())
