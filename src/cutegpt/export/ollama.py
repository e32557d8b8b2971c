"""An Ollama `Modelfile` for an exported GGUF file: FROM, TEMPLATE, SYSTEM, PARAMETER stop and sampling.

For a LoRA GGUF (`--format gguf-lora --ollama --base-gguf BASE`) it is `FROM <base gguf>` and `ADAPTER ./<lora gguf>`
(ollama's documented pair), with the template and sampling read from the base file.

The TEMPLATE is written in ollama's Go-template syntax and renders what
templates.py renders, byte for byte. Ollama gives the template the
conversation as `.Messages` (consecutive messages of one role merged, system
messages included) and all system messages joined as `.System`; when the user
sends no system message, the Modelfile's SYSTEM is prepended as one. A last
`assistant` message is an answer to continue, so it gets no stop marker.

Go templates have no string functions, so a system line cannot be tested for a
trailing newline: the SYSTEM line is written without it and the template adds
one, as templates.py does for a system line that lacks it. A system message that
already ends with a newline gets one more in ollama.

A template counts as having a Go equivalent when it is one of ours (`cutegpt`,
`raw`) or when the model's own Jinja template renders probe conversations
exactly like an entry of GO_TEMPLATES (ChatML so far); anything else is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from cutegpt.errors import CuteGPTError
from cutegpt.templates import CUTEGPT_STOP, CUTEGPT_SYSTEM, template_defaults

MODELFILE = "Modelfile"

# `$last` is true on the final message: ollama's documented idiom (docs/template.md)
_LAST = "{{ $last := eq (len (slice $.Messages $i)) 1 }}"

CUTEGPT_GO = (
    "{{ if .System }}{{ .System }}\n{{ end }}"
    "{{ range $i, $m := .Messages }}" + _LAST +
    "{{ if eq $m.Role \"user\" }}问：{{ $m.Content }}\n答：\n"
    "{{ else if eq $m.Role \"assistant\" }}{{ $m.Content }}{{ if not $last }}" + CUTEGPT_STOP + "{{ end }}"
    "{{ end }}{{ end }}"
)

RAW_GO = (
    "{{ if .System }}{{ .System }}{{ end }}"
    "{{ range $i, $m := .Messages }}{{ if ne $m.Role \"system\" }}{{ $m.Content }}{{ end }}{{ end }}"
)

CHATML_GO = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ range $i, $m := .Messages }}" + _LAST +
    "{{ if eq $m.Role \"user\" }}<|im_start|>user\n{{ $m.Content }}<|im_end|>\n{{ if $last }}<|im_start|>assistant\n{{ end }}"
    "{{ else if eq $m.Role \"assistant\" }}<|im_start|>assistant\n{{ $m.Content }}{{ if not $last }}<|im_end|>\n{{ end }}"
    "{{ end }}{{ end }}"
)


def _chatml(messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    """ChatML as its Jinja template renders it (the reference a model's own template is compared with)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@dataclass(frozen=True)
class GoTemplate:
    """A Go template for ollama and the stop strings that end an answer in it."""

    name: str
    go: str
    stops: tuple[str, ...]
    system_default: str | None = None  # the system line the template uses when given none


# Jinja families recognised by behaviour: name -> (Python reference renderer, Go template, stop strings)
GO_TEMPLATES: dict[str, tuple[Callable[[Sequence[dict[str, str]], bool], str], str, tuple[str, ...]]] = {
    "chatml": (_chatml, CHATML_GO, ("<|im_end|>", "<|im_start|>")),
}

_PROBE_SYSTEM = "PROBE SYSTEM"
_PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "PROBE ONE"}],
    [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "PROBE ONE"},
     {"role": "assistant", "content": "ANSWER ONE"}, {"role": "user", "content": "PROBE TWO"}],
)


def go_template(template_name: str, chat_template: str | None = None, system: str | None = None) -> GoTemplate:
    """The Go template for `template_name` (`auto`: the model's Jinja `chat_template`), or one sentence why there is none."""
    if template_name == "cutegpt":
        return GoTemplate("cutegpt", CUTEGPT_GO, (CUTEGPT_STOP,), CUTEGPT_SYSTEM)
    if template_name == "raw":
        return GoTemplate("raw", RAW_GO, ())
    if template_name != "auto":
        raise CuteGPTError(f"unknown template '{template_name}' for the Modelfile; choose cutegpt, auto or raw.")
    if not chat_template:
        raise CuteGPTError("--ollama: the model has no chat template, so there is nothing to write as the Modelfile's TEMPLATE; "
                           "export with --template cutegpt.")
    from jinja2 import TemplateError

    try:
        render = _jinja_renderer(chat_template)
    except TemplateError as e:
        raise CuteGPTError(f"--ollama: the model's chat template is not valid Jinja ({e}).") from None
    for name, (reference, go, stops) in GO_TEMPLATES.items():
        try:
            if all(render(p, True) == reference(p, True) for p in _PROBES):
                return GoTemplate(name, go, stops, _default_system(render, reference))
        except (TemplateError, ValueError, TypeError, LookupError, AttributeError):
            pass  # a template that fails on a probe is simply not this family
    raise CuteGPTError("--ollama: the model's chat template has no known Go-template equivalent for ollama "
                       f"(known: {', '.join(GO_TEMPLATES)}); export with --template cutegpt or write the TEMPLATE by hand.")


def _jinja_renderer(chat_template: str) -> Callable[[Sequence[dict[str, str]], bool], str]:
    """Render a chat template the way transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(chat_template)
    return lambda messages, gen: compiled.render(messages=list(messages), add_generation_prompt=gen,
                                                 bos_token="", eos_token="")


def _default_system(render: Callable[..., str], reference: Callable[..., str]) -> str | None:
    """The system line a Jinja template inserts when given none (SmolLM2's does), found by rendering without one."""
    user = [{"role": "user", "content": "PROBE ONE"}]
    bare = render(user, True)
    if bare == reference(user, True):
        return None
    tail = reference(user, True)
    if not bare.endswith(tail):
        return None
    for system in _system_candidates(bare[: -len(tail)]):
        if reference([{"role": "system", "content": system}] + user, True) == bare:
            return system
    return None


def _system_candidates(head: str) -> list[str]:
    # ChatML: `<|im_start|>system\n{system}<|im_end|>\n`
    prefix, suffix = "<|im_start|>system\n", "<|im_end|>\n"
    if head.startswith(prefix) and head.endswith(suffix):
        return [head[len(prefix): -len(suffix)]]
    return []


def modelfile_text(gguf_name: str, template: GoTemplate, *, system: str | None, sampling: dict[str, Any],
                   eos: str | None, adapter: str | None = None) -> str:
    """The Modelfile; `sampling` holds GenerationArgs fields (greedy, temperature, top_p, top_k, repetition_penalty).

    `adapter`: a LoRA GGUF beside the Modelfile, applied to `gguf_name`, the base (ollama's `ADAPTER` line)."""
    if system is None:
        system = template.system_default
    if template.name == "cutegpt" and system:
        system = system.removesuffix("\n")  # the Go template adds the newline (see the module docstring)
    lines = [f"FROM {_from_path(gguf_name)}", *([f"ADAPTER ./{adapter}"] if adapter else []), "",
             f"TEMPLATE {_quote(template.go, 'the template')}"]
    if system:
        lines.append(f"SYSTEM {_quote(system, '--system')}")
    lines.append("")
    for stop in dict.fromkeys([*template.stops, *([eos] if eos else [])]):
        lines.append(f"PARAMETER stop {_quote_line(stop)}")
    temperature = 0.0 if sampling.get("greedy") else float(sampling["temperature"])
    lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER top_p {float(sampling['top_p']):g}",
              f"PARAMETER top_k {int(sampling['top_k'])}",
              f"PARAMETER repeat_penalty {float(sampling['repetition_penalty']):g}"]
    return "\n".join(lines) + "\n"


def _from_path(path: str) -> str:
    # ollama reads a path relative to the Modelfile when it starts with ./ (else a model name); quoted if it has spaces
    path = path if Path(path).is_absolute() or path.startswith(".") else "./" + path
    return _quote_line(path) if any(c.isspace() for c in path) else path


def _quote(text: str, what: str) -> str:
    # ollama's Modelfile parser reads """…""" verbatim, so the only thing it cannot hold is `"""` itself
    if '"""' in text:
        raise CuteGPTError(f"--ollama: {what} contains three double quotes in a row, which a Modelfile cannot hold.")
    return f'"""{text}"""'


def _quote_line(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)


def modelfile_path(gguf: str | Path) -> Path:
    return Path(gguf).with_name(MODELFILE)


def gguf_chat_facts(path: Path) -> tuple[str | None, str | None]:
    """The chat template and the EOS token text stored in a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    eos_id, tokens = field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.tokens")
    eos = tokens[eos_id] if isinstance(eos_id, int) and isinstance(tokens, list) and 0 <= eos_id < len(tokens) else None
    return field("tokenizer.chat_template"), eos


def check_modelfile(gguf: str | Path, template_name: str | None, system: str | None, *, overwrite: bool = False) -> Path:
    """Refuse, before anything is exported, a Modelfile that exists (without --overwrite) or could not be written."""
    from cutegpt.io import check_output

    out = modelfile_path(gguf)
    if out.exists() and not overwrite:
        raise CuteGPTError(f"--ollama: {out} already exists; pass --overwrite to replace it or export to another folder.")
    if template_name is not None and template_name not in ("cutegpt", "auto", "raw"):
        raise CuteGPTError(f"unknown --template '{template_name}'; choose cutegpt, auto or raw.")
    if system is not None:
        _quote(system, "--system")
    return check_output(out, flag="--ollama", kind="file", overwrite=True)


def check_base_gguf(base: str | Path) -> Path:
    """The base GGUF of a LoRA's Modelfile exists and is a GGUF file (checked before the adapter is converted)."""
    from cutegpt.model.gguf_header import read_header

    path = Path(base).expanduser()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise CuteGPTError(f"--base-gguf {base} is not a .gguf file; export the base with "
                           "`cutegpt export --format gguf --model BASE --out base.gguf`.")
    try:
        read_header(path, arrays=False)
    except CuteGPTError as e:
        raise CuteGPTError(f"--base-gguf: {e}") from None
    return path


def write_modelfile(gguf: str | Path, template_name: str, *, system: str | None = None, overwrite: bool = False,
                    base: Path | None = None) -> Path:
    """Write `Modelfile` beside `gguf` (atomically); with `base`, `gguf` is a LoRA adapter applied to that base GGUF.

    Sampling follows chat's order minus the flags: the (base) file's `general.sampling.*`, else the template's defaults.
    """
    from cutegpt.io import atomic_file
    from cutegpt.runtime.llamacpp import gguf_generation_defaults

    gguf = Path(gguf)
    out = check_modelfile(gguf, template_name, system, overwrite=overwrite)
    model = check_base_gguf(base) if base is not None else gguf  # the file holding the weights, template and sampling
    chat_template, eos = gguf_chat_facts(model)
    template = go_template(template_name, chat_template)
    sampling = {**template_defaults(template_name), **gguf_generation_defaults(model)}
    same_folder = model.resolve().parent == out.resolve().parent
    text = modelfile_text(model.name if same_folder else str(model.resolve()), template, system=system, sampling=sampling,
                          eos=eos, adapter=gguf.name if base is not None else None)
    with atomic_file(out) as f:
        f.write(text)
    return out
