"""llama.cpp as a backend for `chat` and `generate`, through the PyPI package `xllamacpp`.

llama.cpp only completes text, so everything that makes an answer ours stays
in Python and is shared with the torch engine:

- the prompt: templates.py renders it and our tokenizer (the GGUF's, converted
  once by transformers and kept in the cache) turns it into ids, which llama.cpp
  receives as a token list, so both backends see the same ids;
- the stop rules: the template's marker (e.g. `<end>`, several tokens for most
  vocabularies) is passed to llama.cpp as a stop string *and* checked on the
  streamed text with the same hold-back rule as the torch engine, EOS stops too,
  and neither is ever printed;
- the sampling settings: mapped onto llama.cpp's samplers in transformers' order
  (repetition penalty over the whole context, temperature, top-k, top-p; min-p off).

History is reused through llama.cpp's prompt cache (`cache_prompt`, one slot):
a new turn that extends the previous prompt + answer only prefills the new
tokens. Ctrl-C sets a flag the streaming callback sees at the next token; the
callback then tells llama.cpp to stop, and the conversation is kept.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cutegpt.chat.args import GenerationArgs
from cutegpt.chat.stream import GenerationResult, complete, cut_at_stop, held_back
from cutegpt.errors import CuteGPTError
from cutegpt.templates import Template

# llama.cpp's GGUF keys for a model's recommended sampling (written by its converter from generation_config.json)
GGUF_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                      "general.sampling.top_k": "top_k", "general.sampling.penalty_repeat": "repetition_penalty"}


def xllamacpp_module() -> Any:
    try:
        import xllamacpp
    except ImportError:
        raise CuteGPTError("--backend llamacpp needs the xllamacpp package: run `pip install xllamacpp`.") from None
    return xllamacpp


def server_params(xl: Any, path: Path, n_ctx: int, threads: int, parallel: int = 1) -> Any:
    """The llama.cpp server settings chat, serve and export's verification all start from: the file, the context
    (split between `parallel` slots), the same thread count for prompt and generation, quiet, and listening only
    on a free loopback port (the in-process server always serves HTTP too)."""
    p = xl.CommonParams()
    p.model.path = str(path)
    p.n_ctx = n_ctx
    p.n_parallel = parallel
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.verbosity = -1  # llama.cpp's own log lines are not the user's business
    p.hostnames = ["127.0.0.1"]
    p.port = 0
    return p


# --- GGUF metadata without loading tensors -------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path: Path, wanted: Callable[[str], bool] = lambda k: True) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF header whose key `wanted` accepts (arrays are skipped).

    Reads only the header (the token list is skipped, not decoded), in milliseconds,
    where `gguf.GGUFReader` takes seconds on a 49k-token vocabulary.
    """
    out: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CuteGPTError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")
            version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
            if version < 2:
                raise CuteGPTError(f"{path}: GGUF version {version} is too old for llama.cpp; export it again.")

            def read_str() -> str:
                (n,) = struct.unpack("<Q", f.read(8))
                return f.read(n).decode("utf-8", errors="replace")

            def skip(vtype: int) -> Any:
                if vtype in _SCALARS:
                    fmt = _SCALARS[vtype]
                    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
                if vtype == 8:
                    return read_str()
                if vtype == 9:
                    itype, count = struct.unpack("<IQ", f.read(12))
                    if itype in _SCALARS:
                        f.seek(count * struct.calcsize(_SCALARS[itype]), 1)
                    else:
                        for _ in range(count):
                            skip(itype)
                    return None
                raise CuteGPTError(f"{path}: unknown GGUF value type {vtype}; the file is corrupt.")

            for _ in range(n_kv):
                key = read_str()
                (vtype,) = struct.unpack("<I", f.read(4))
                value = skip(vtype)
                if value is not None and wanted(key):
                    out[key] = value
    except struct.error:
        raise CuteGPTError(f"{path}: the GGUF header is truncated.") from None
    except OSError as e:
        from cutegpt.io import describe_os_error

        raise CuteGPTError(describe_os_error(e, path, "reading")) from None
    return out


def gguf_generation_defaults(path: Path) -> dict[str, Any]:
    """The sampling settings a GGUF file recommends (`general.sampling.*`), as GenerationArgs fields."""
    meta = read_gguf_metadata(path, lambda k: k in GGUF_SAMPLING_KEYS)
    out: dict[str, Any] = {}
    for key, name in GGUF_SAMPLING_KEYS.items():
        if key in meta:
            out[name] = int(meta[key]) if name == "top_k" else float(meta[key])
    return out


def gguf_model_name(path: Path) -> str:
    meta = read_gguf_metadata(path, lambda k: k in ("general.name", "general.basename", "general.finetune", "general.size_label"))
    return str(meta.get("general.name") or path.stem)


# --- tokenizer: the GGUF's, converted by transformers once and cached as a folder ---------------

def gguf_tokenizer(path: Path) -> Any:
    """The HF tokenizer stored in a GGUF file (converting takes seconds, so the result is cached)."""
    from cutegpt.model.embedded import cache_dir
    from cutegpt.model.tokenizer import RULE_VERSION, load_tokenizer, match_reference, save_tokenizer_files

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{RULE_VERSION}".encode()).hexdigest()[:12]
    folder = cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if (folder / "tokenizer_config.json").is_file():
        try:
            return match_reference(load_tokenizer(folder), gguf=path)
        except Exception:
            pass  # a damaged cache entry: convert again
    tok = load_tokenizer(path.parent, gguf_file=path.name)
    try:
        from cutegpt.io import atomic_dir

        with atomic_dir(folder, overwrite=True) as tmp:
            save_tokenizer_files(tok, tmp)
    except (OSError, CuteGPTError):
        pass  # an unwritable cache only costs the conversion next time
    return tok


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

    def describe(self) -> str:
        return f"{self.name} (llama.cpp, {self.threads} thread{'s' if self.threads != 1 else ''}, template {self.template.name})"


def load_llamacpp(path: Path, *, template: str | None = None, threads: int = 1, n_ctx: int = 0,
                  tokenizer: Any = None, name: str | None = None) -> LlamaCppModel:
    """Load a GGUF file in llama.cpp (one slot, prompt cache on) with its tokenizer and template."""
    xl = xllamacpp_module()
    if not path.is_file():
        raise CuteGPTError(f"GGUF file {path} does not exist." if not path.exists() else f"{path} is a folder, not a .gguf file.")
    meta = read_gguf_metadata(path, lambda k: k.endswith(".context_length") or k == "general.architecture")
    arch = meta.get("general.architecture", "llama")
    train_ctx = int(meta.get(f"{arch}.context_length") or 2048)
    if tokenizer is None:
        tokenizer = gguf_tokenizer(path)
    tmpl = template_for(template, tokenizer)
    params = server_params(xl, path, n_ctx or train_ctx, threads)
    params.warmup = False
    try:
        server = xl.Server(params)
    except Exception as e:
        raise CuteGPTError(f"{path}: llama.cpp cannot load this GGUF file ({str(e).splitlines()[0][:200]}).") from None
    _never_destroy(server)
    return LlamaCppModel(server=server, tokenizer=tokenizer, template=tmpl, model_path=path,
                         context_length=params.n_ctx, threads=threads, name=name or gguf_model_name(path),
                         generation_defaults=gguf_generation_defaults(path))


def _never_destroy(server: Any) -> None:
    """Keep the server alive until the process ends.

    xllamacpp's `Server` destructor can deadlock: it asks the llama.cpp loop thread to stop and joins
    it, and the loop sometimes misses the request (seen in the tests: the process hung in
    `~Server` -> `thread::join` for good). A server is never freed, so the destructor never runs;
    the operating system reclaims it at exit.
    """
    import ctypes

    ctypes.pythonapi.Py_IncRef(ctypes.py_object(server))


# --- generation -----------------------------------------------------------------------------------

def request_for(prompt_ids: list[int], gen: GenerationArgs, stop: str | None, n_ctx: int, cache_prompt: bool = True) -> dict[str, Any]:
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


class _SigintFlag:
    """While active (main thread only), Ctrl-C sets a flag instead of raising: llama.cpp is stopped from its callback."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> "_SigintFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.hit = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class LlamaCppEngine:
    """Same interface as the torch `Engine`: generate(prompt_ids, gen, on_text) -> GenerationResult."""

    def __init__(self, lm: LlamaCppModel, reuse_cache: bool = True):
        self.lm = lm
        self.reuse_cache = reuse_cache
        self._last_ids: list[int] = []  # prompt + answer of the previous call (what llama.cpp's slot holds)

    def reset(self) -> None:
        self._last_ids = []  # llama.cpp re-uses only a common prefix, so nothing else to drop

    def generate(self, prompt_ids: list[int], gen: GenerationArgs,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        gen = complete(gen, self.lm.template.name)
        stop = self.lm.template.stop
        req = request_for(prompt_ids, gen, stop, self.lm.context_length, self.reuse_cache)
        state: dict[str, Any] = {"text": "", "emitted": 0, "first": None, "reason": "length", "final": None,
                                 "error": None, "stopped_by_us": False}
        t0 = time.perf_counter()

        with _SigintFlag() as sigint:
            def on_chunk(chunk: Any) -> bool:
                if isinstance(chunk, str):
                    chunk = json.loads(chunk)
                if "error" in chunk:
                    state["error"] = chunk["error"]
                    return True
                if sigint.hit:
                    state["reason"] = "interrupted"
                    return True
                choice = (chunk.get("choices") or [{}])[0]
                piece = choice.get("text") or ""
                if state["first"] is None and (piece or choice.get("finish_reason")):
                    state["first"] = time.perf_counter()
                if chunk.get("usage") or chunk.get("timings"):
                    state["final"] = chunk
                if choice.get("finish_reason"):
                    state["reason"] = "stop" if choice["finish_reason"] == "stop" else "length"
                if piece:
                    text = state["text"] + piece
                    start = max(0, state["emitted"] - len(stop)) if stop else 0
                    if stop and not gen.ignore_eos and stop in text[start:]:
                        state["text"] = text[: text.index(stop, start)]
                        state["reason"], state["stopped_by_us"] = "stop", True
                        return True
                    state["text"] = text
                    safe = len(text) - held_back(text, stop)
                    if on_text is not None and safe > state["emitted"]:
                        on_text(text[state["emitted"]:safe])
                        state["emitted"] = safe
                return False

            self.lm.server.handle_completions(req, on_chunk)
        if state["error"] is not None:
            err = state["error"]
            message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            raise CuteGPTError(f"llama.cpp refused the request: {message}")
        text = cut_at_stop(state["text"], stop) if state["reason"] != "stop" else state["text"]
        if on_text is not None and len(text) > state["emitted"]:
            on_text(text[state["emitted"]:])
        t_end = time.perf_counter()
        final = state["final"] or {}
        usage = final.get("usage") or {}
        timings = final.get("timings") or {}
        n_new = usage.get("completion_tokens")
        if n_new is None:  # stopped before llama.cpp reported usage (our stop check, Ctrl-C): count the text
            n_new = len(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]) + (1 if state["reason"] == "stop" else 0)
        reused = int(timings.get("cache_n", usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)) or 0)
        if not timings:  # no final report: estimate the reuse from what the slot held
            reused = _common_prefix(self._last_ids, prompt_ids) if self.reuse_cache else 0
        if state["reason"] == "interrupted":
            self._last_ids = []
        else:
            self._last_ids = list(prompt_ids)
        first = state["first"] or t_end
        return GenerationResult(
            text=text, token_ids=[], stop_reason=state["reason"], prompt_tokens=len(prompt_ids), reused_tokens=reused,
            time_to_first_token=first - t0, decode_seconds=t_end - first, n_generated=int(n_new),
            timings={k: float(v) for k, v in timings.items() if isinstance(v, (int, float))},
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
