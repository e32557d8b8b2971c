"""Prompt templates: one object renders training text and inference prompts alike.

A conversation is a list of `Turn`s. A template turns it into `Segment`s: text
pieces flagged as trained-on (answers and their stop marker) or not (system
line, questions). Training tokenizes the segments one by one and masks the
untrained ones; chat and evaluation join the same segments, ending with an
open answer, so what the model sees at inference is byte-for-byte what it saw
in training.

The `cutegpt` template is the original training format (MISSION.md section 2):

    你是复旦大学知识工场实验室训练出来的语言模型CuteGPT。给定任务描述，请给出对应请求的回答。\\n   <- system (not trained)
    问：{instruction}\\n答：\\n                                       <- turn prompt (not trained)
    {output}<end>                                                 <- answer (trained)
    问：{instruction}\\n{input}\\n答：\\n                               <- next turn, with an input
    ...

Note there is no newline between `<end>` and the next `问：`: that is how the
original `convert_data.py` joined turns, and the published inference snippets
that add one (or drop the newline after `答：`) feed the model text it never saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cutegpt.errors import CuteGPTError

CUTEGPT_SYSTEM = "你是复旦大学知识工场实验室训练出来的语言模型CuteGPT。给定任务描述，请给出对应请求的回答。\n"
CUTEGPT_STOP = "<end>"
# CuteGPT's original inference settings (its published chat script), used with the `cutegpt` template.
CUTEGPT_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "greedy": False, "temperature": 1.0, "top_p": 0.8,
                                    "top_k": 50, "repetition_penalty": 1.1}
# Other templates: what transformers does for a model that recommends nothing (greedy, no penalty).
PLAIN_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "greedy": True, "temperature": 1.0, "top_p": 1.0,
                                  "top_k": 50, "repetition_penalty": 1.0}
MODEL_CARD = "cutegpt.json"  # written into every model/adapter folder we save; records the template name


@dataclass(frozen=True)
class Turn:
    """One exchange. `output is None` marks the open turn the model must answer."""

    instruction: str
    input: str = ""
    output: str | None = None


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool  # True for answer text and its stop marker


class Template:
    """Base class: subclasses implement `segments`."""

    name: str = ""
    stop: str | None = None  # text that ends an answer; generation stops there and never prints it
    eos_after_conversation: bool = True  # training appends the tokenizer's EOS (trained) after the last answer

    def segments(self, turns: Sequence[Turn], system: str | None = None) -> list[Segment]:
        raise NotImplementedError

    def prompt(self, turns: Sequence[Turn], system: str | None = None) -> str:
        """The text the model continues: history with answers, then the open turn."""
        if not turns or turns[-1].output is not None:
            raise ValueError("the last turn of a prompt must be open (output=None)")
        return "".join(s.text for s in self.segments(turns, system))

    def text(self, turns: Sequence[Turn], system: str | None = None) -> str:
        return "".join(s.text for s in self.segments(turns, system))


class CuteGPTTemplate(Template):
    name = "cutegpt"
    stop = CUTEGPT_STOP

    def segments(self, turns: Sequence[Turn], system: str | None = None) -> list[Segment]:
        system = CUTEGPT_SYSTEM if system is None else system
        if system and not system.endswith("\n"):
            system += "\n"
        out = [Segment(system, False)] if system else []
        for i, turn in enumerate(turns):
            if turn.input:
                out.append(Segment(f"问：{turn.instruction}\n{turn.input}\n答：\n", False))
            else:
                out.append(Segment(f"问：{turn.instruction}\n答：\n", False))
            if turn.output is None:
                if i != len(turns) - 1:
                    raise ValueError("only the last turn may be open")
                break
            out.append(Segment(turn.output + CUTEGPT_STOP, True))
        return out


class RawTemplate(Template):
    """No template: the instruction (and input) is the prompt; for base models and pre-training text."""

    name = "raw"
    stop = None

    def segments(self, turns: Sequence[Turn], system: str | None = None) -> list[Segment]:
        out = [Segment(system, False)] if system else []
        for turn in turns:
            out.append(Segment(turn.instruction + (("\n" + turn.input) if turn.input else ""), False))
            if turn.output is not None:
                out.append(Segment(turn.output, True))
        return out


class ChatTemplate(Template):
    """The tokenizer's own Jinja chat template (`auto`), so any chat model works.

    Segments are found by rendering growing prefixes of the conversation: the
    text a new assistant message adds is its answer; everything up to and
    including the stop marker (e.g. `<|im_end|>`) is trained on, the newline
    after it is not.
    """

    name = "auto"
    eos_after_conversation = False  # the template's own end-of-turn marker is the trained stop; an EOS after it never occurs at inference

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise CuteGPTError(
                f"template 'auto' needs a tokenizer with a chat template, and {getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none; "
                "use --template cutegpt (or raw)."
            )
        self.tokenizer = tokenizer
        self.stop = self._find_stop()

    def _render(self, messages: list[dict[str, str]], open_turn: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)

    def _find_stop(self) -> str | None:
        probe = "PROBE_ANSWER"
        msgs = [{"role": "user", "content": "hi"}]
        before = self._render(msgs, True)
        after = self._render(msgs + [{"role": "assistant", "content": probe}], False)
        tail = after[len(before):].split(probe, 1)[-1].strip() if after.startswith(before) else ""
        return tail or getattr(self.tokenizer, "eos_token", None)

    @staticmethod
    def _messages(turns: Sequence[Turn], system: str | None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": system}] if system else []
        for t in turns:
            msgs.append({"role": "user", "content": t.instruction + (("\n" + t.input) if t.input else "")})
            if t.output is not None:
                msgs.append({"role": "assistant", "content": t.output})
        return msgs

    def segments(self, turns: Sequence[Turn], system: str | None = None) -> list[Segment]:
        msgs = self._messages(turns, system)
        out: list[Segment] = []
        done = ""  # text covered so far
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._render(msgs[:i], True)
            full = self._render(msgs[: i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise CuteGPTError(
                    f"the chat template of {self.tokenizer.name_or_path} re-renders earlier turns differently, "
                    "so training text cannot match inference text; use --template cutegpt."
                )
            out.append(Segment(prompt[len(done):], False))
            answer = full[len(prompt):]
            cut = answer.find(self.stop, len(m["content"])) if self.stop else -1
            if cut >= 0:
                cut += len(self.stop)
                out.append(Segment(answer[:cut], True))
                if answer[cut:]:
                    out.append(Segment(answer[cut:], False))
            else:
                out.append(Segment(answer, True))
            done = full
        if turns and turns[-1].output is None:
            prompt = self._render(msgs, True)
            if not prompt.startswith(done):
                raise CuteGPTError(f"the chat template of {self.tokenizer.name_or_path} is not prefix-stable; use --template cutegpt.")
            out.append(Segment(prompt[len(done):], False))
        return [s for s in out if s.text]


TEMPLATES = ("cutegpt", "auto", "raw")


def template_defaults(template_name: str) -> dict[str, Any]:
    """The generation settings a template implies when neither the user nor the model gives any."""
    return dict(CUTEGPT_DEFAULTS if template_name == "cutegpt" else PLAIN_DEFAULTS)


def chat_template_jinja(template_name: str, system: str | None = None) -> str | None:
    """The Jinja chat template that renders `template_name` exactly as this module does; None for `auto`/`raw`.

    Messages are OpenAI-style dicts. A leading `system` message replaces the
    default system line (an empty one drops it); a user message may carry an
    `input` field, rendered on its own line as `Turn.input` is. Each assistant
    message renders as `答：\n{answer}<end>` and `add_generation_prompt` opens
    the answer with `答：\n`, so a conversation ending with a user message and
    add_generation_prompt=True gives `CuteGPTTemplate.prompt` byte for byte.
    `system` sets the default system line (None = the CuteGPT one, "" = none).
    """
    if template_name in ("auto", "raw"):
        return None
    if template_name != "cutegpt":
        raise CuteGPTError(f"unknown template '{template_name}'; choose one of: {', '.join(TEMPLATES)}.")
    default = CUTEGPT_SYSTEM if system is None else system
    return (
        "{%- set ns = namespace(system=" + _jinja_string(default) + ", start=0) -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = messages[0]['content'] -%}{%- set ns.start = 1 -%}"
        "{%- endif -%}"
        "{%- if ns.system -%}{{ ns.system }}{%- if not ns.system.endswith('\\n') -%}{{ '\\n' }}{%- endif -%}{%- endif -%}"
        "{%- for message in messages[ns.start:] -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '问：' + message['content'] }}"
        "{%- if message['input'] is defined and message['input'] -%}{{ '\\n' + message['input'] }}{%- endif -%}"
        "{{ '\\n' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ '答：\\n' + message['content'] + '" + CUTEGPT_STOP + "' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '答：\\n' }}{%- endif -%}"
    )


def _jinja_string(text: str) -> str:
    """`text` as a single-quoted Jinja string literal (backslash escapes work in jinja2 and llama.cpp's engine)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def get_template(name: str, tokenizer: Any = None) -> Template:
    """Look up a template by name; `auto` needs the tokenizer."""
    if name == "cutegpt":
        return CuteGPTTemplate()
    if name == "raw":
        return RawTemplate()
    if name == "auto":
        return ChatTemplate(tokenizer)
    raise CuteGPTError(f"unknown template '{name}'; choose one of: {', '.join(TEMPLATES)}.")


def default_template_name(tokenizer: Any) -> str:
    """`auto` when the tokenizer brings a chat template, else the CuteGPT format."""
    return "auto" if getattr(tokenizer, "chat_template", None) else "cutegpt"


def resolve_template_name(explicit: str | None, folders: Sequence[str | Path | None], tokenizer: Any) -> str:
    """The template to use: the one asked for, else the first recorded in a folder's model card, else the tokenizer's default."""
    if explicit:
        return explicit
    for folder in folders:
        if folder is not None and Path(folder).is_dir():
            recorded = read_model_card(folder).get("template")
            if recorded:
                return str(recorded)
    return default_template_name(tokenizer)


def read_model_card(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MODEL_CARD
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CuteGPTError(f"{path}: not valid JSON; fix or delete it.") from None


def write_model_card(folder: str | Path, template: str, **extra: Any) -> None:
    from cutegpt.io import write_json

    write_json(Path(folder) / MODEL_CARD, {"template": template, **extra})


def add_stop_token(tokenizer: Any, stop: str = CUTEGPT_STOP) -> bool:
    """Make the stop marker one special token, as the original full fine-tuning did; True if added."""
    if len(tokenizer(stop, add_special_tokens=False)["input_ids"]) == 1:
        return False
    tokenizer.add_tokens([stop], special_tokens=True)
    return True


def encode_segments(tokenizer: Any, segments: Sequence[Segment]) -> tuple[list[int], list[bool]]:
    """Token ids of the segments, each tokenized alone (as the original did), and a train flag per token.

    Tokenizing segment by segment keeps the prompt's tokens identical at
    training and inference time: an answer never merges with the prompt text
    before it.
    """
    ids: list[int] = []
    train: list[bool] = []
    if not segments:
        return ids, train
    encoded = tokenizer([s.text for s in segments], add_special_tokens=False)["input_ids"]
    for seg, seg_ids in zip(segments, encoded):
        ids.extend(seg_ids)
        train.extend([seg.train] * len(seg_ids))
    return ids, train
