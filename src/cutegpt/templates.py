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

Tool calling follows Qwen2.5's / Hermes' convention in every template: tools are
described as JSON lines inside `<tools></tools>` in the system part, a call is
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` in the answer
(trained), results come back inside `<tool_response></tool_response>` (not
trained). For `cutegpt` (tool block in Chinese, results after `工具：`):

    {system line}{tool block}
    问：{instruction}\n答：\n                                       <- not trained
    <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call><end>  <- trained
    工具：\n<tool_response>\n{result}\n</tool_response>\n答：\n       <- not trained
    {output}<end>                                                 <- trained

`auto` uses the model's own Jinja when it renders tools in a syntax of
`cutegpt.tool_syntax` (Qwen2.5/Hermes `<tool_call>`, Llama 3.1 JSON, Mistral
`[TOOL_CALLS]`); for a chat template without tools (SmolLM2's ChatML) the
tools go into the system message with Qwen2.5's words, calls into the assistant
message and results into one user message, which is byte for byte what
Qwen2.5's template renders for the same system text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cutegpt.errors import CuteGPTError
from cutegpt.tool_syntax import (HERMES, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolSyntax, detect_syntax,  # noqa: F401
                                 parse_hermes as parse_tool_calls, probe_call)  # parse_tool_calls: the name callers know

CUTEGPT_SYSTEM = "你是复旦大学知识工场实验室训练出来的语言模型CuteGPT。给定任务描述，请给出对应请求的回答。\n"
CUTEGPT_STOP = "<end>"
# CuteGPT's original inference settings (its published chat script), used with the `cutegpt` template.
CUTEGPT_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "greedy": False, "temperature": 1.0, "top_p": 0.8,
                                    "top_k": 50, "repetition_penalty": 1.1}
# Other templates: what transformers does for a model that recommends nothing (greedy, no penalty).
PLAIN_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "greedy": True, "temperature": 1.0, "top_p": 1.0,
                                  "top_k": 50, "repetition_penalty": 1.0}
MODEL_CARD = "cutegpt.json"  # written into every model/adapter folder we save; records the template name


class ConversationRefused(CuteGPTError):
    """A model's own chat template raised on a conversation (e.g. Llama 3.1: one tool call per message)."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str = "{}"  # JSON text of an object, as OpenAI sends it
    id: str = ""


@dataclass(frozen=True)
class ToolRound:
    """The assistant calls tools (after optional text), then the tools answer, in the calls' order."""

    calls: tuple[ToolCall, ...]
    results: tuple[str, ...] = ()
    content: str = ""


@dataclass(frozen=True)
class Turn:
    """One exchange. `output is None` marks the open turn the model must answer.

    `rounds` are the assistant's tool rounds before its final `output`. A turn
    whose last round has no results yet ends at those calls (output None, not open).
    """

    instruction: str
    input: str = ""
    output: str | None = None
    rounds: tuple[ToolRound, ...] = ()

    @property
    def is_open(self) -> bool:
        return self.output is None and not (self.rounds and not self.rounds[-1].results)


# ----------------------------------------------------------------------------- the tool format

# Qwen2.5's own words (its chat template), also used for chat templates that have no tool section
HERMES_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
HERMES_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                     "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                     "<args-json-object>}\n</tool_call>")
CUTEGPT_TOOLS_HEAD = "你可以调用以下工具，<tools></tools> 中每行描述一个：\n<tools>"
CUTEGPT_TOOLS_TAIL = ("\n</tools>\n调用工具时，每个调用回答一个 <tool_call></tool_call> 块：\n<tool_call>\n"
                      "{\"name\": <工具名>, \"arguments\": <参数 JSON 对象>}\n</tool_call>\n")
CUTEGPT_TOOL_RESULT = "工具：\n"


def tojson(value: Any) -> str:
    """JSON as transformers' and llama.cpp's Jinja `tojson` writes it (", " and ": ", non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


def tools_block(tools: Sequence[dict], head: str = HERMES_TOOLS_HEAD, tail: str = HERMES_TOOLS_TAIL) -> str:
    return head + "".join("\n" + tojson(t) for t in tools) + tail


def call_text(call: ToolCall) -> str:
    """One call as Qwen2.5's template writes it."""
    return f'{TOOL_CALL_OPEN}\n{{"name": "{call.name}", "arguments": {tojson(json.loads(call.arguments))}}}\n{TOOL_CALL_CLOSE}'


def round_text(r: ToolRound) -> str:
    """The assistant's text for a round: its content, then one block per call, a newline between each."""
    return "\n".join(([r.content] if r.content else []) + [call_text(c) for c in r.calls])


def responses_text(results: Sequence[str]) -> str:
    return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool  # True for answer text and its stop marker


class Template:
    """Base class: subclasses implement `segments`."""

    name: str = ""
    stop: str | None = None  # text that ends an answer; generation stops there and never prints it
    eos_after_conversation: bool = True  # training appends the tokenizer's EOS (trained) after the last answer
    tool_syntax: ToolSyntax | None = HERMES  # how calls are written in answers (`cutegpt.tool_syntax`); None: no tools

    def segments(self, turns: Sequence[Turn], system: str | None = None, tools: Sequence[dict] | None = None) -> list[Segment]:
        raise NotImplementedError

    def prompt(self, turns: Sequence[Turn], system: str | None = None, tools: Sequence[dict] | None = None) -> str:
        """The text the model continues: history with answers, then the open turn."""
        if not turns or not turns[-1].is_open:
            raise ValueError("the last turn of a prompt must be open (output=None)")
        return "".join(s.text for s in self.segments(turns, system, tools))

    def text(self, turns: Sequence[Turn], system: str | None = None, tools: Sequence[dict] | None = None) -> str:
        return "".join(s.text for s in self.segments(turns, system, tools))


class CuteGPTTemplate(Template):
    name = "cutegpt"
    stop = CUTEGPT_STOP

    def segments(self, turns: Sequence[Turn], system: str | None = None, tools: Sequence[dict] | None = None) -> list[Segment]:
        system = CUTEGPT_SYSTEM if system is None else system
        if system and not system.endswith("\n"):
            system += "\n"
        if tools:
            system += tools_block(tools, CUTEGPT_TOOLS_HEAD, CUTEGPT_TOOLS_TAIL)
        out = [Segment(system, False)] if system else []
        for i, turn in enumerate(turns):
            if turn.input:
                out.append(Segment(f"问：{turn.instruction}\n{turn.input}\n答：\n", False))
            else:
                out.append(Segment(f"问：{turn.instruction}\n答：\n", False))
            for r in turn.rounds:
                out.append(Segment(round_text(r) + CUTEGPT_STOP, True))
                if r.results:
                    out.append(Segment(CUTEGPT_TOOL_RESULT + responses_text(r.results) + "\n答：\n", False))
            if turn.output is None:
                if i != len(turns) - 1 and turn.is_open:
                    raise ValueError("only the last turn may be open")
                continue
            out.append(Segment(turn.output + CUTEGPT_STOP, True))
        return out


class RawTemplate(Template):
    """No template: the instruction (and input) is the prompt; for base models and pre-training text."""

    name = "raw"
    stop = None
    tool_syntax = None

    def segments(self, turns: Sequence[Turn], system: str | None = None, tools: Sequence[dict] | None = None) -> list[Segment]:
        if tools or any(t.rounds for t in turns):
            raise CuteGPTError("template 'raw' has no tool format; use --template cutegpt or auto for conversations with tools.")
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

    def _render(self, messages: list[dict[str, Any]], open_turn: bool, tools: Sequence[dict] | None = None) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tools=list(tools) if tools else None, tokenize=False,
                                                      add_generation_prompt=open_turn)
        except TemplateError as e:  # e.g. Llama 3.1's "only supports single tool-calls at once"
            raise ConversationRefused(f"the chat template of {self.tokenizer.name_or_path} refuses this conversation: {e}") from None

    def _find_stop(self) -> str | None:
        probe = "PROBE_ANSWER"
        msgs = [{"role": "user", "content": "hi"}]
        before = self._render(msgs, True)
        after = self._render(msgs + [{"role": "assistant", "content": probe}], False)
        tail = after[len(before):].split(probe, 1)[-1].strip() if after.startswith(before) else ""
        return tail or getattr(self.tokenizer, "eos_token", None)

    @property
    def tool_style(self) -> str:
        """"native" (the template renders tools and calls in a syntax of `cutegpt.tool_syntax`), "none" (it ignores
        tools: ours are written into the messages in the Hermes syntax) or "other" (a call syntax cutegpt cannot parse)."""
        if not hasattr(self, "_tool_style"):
            probe = {"type": "function", "function": {"name": "probe_tool_xq", "parameters": {"type": "object", "properties": {}}}}
            user = [{"role": "user", "content": "hi"}]
            try:
                described = "probe_tool_xq" in self._render(user, True, [probe])
                called = self._render(user + [probe_call()], False, [probe])
            except Exception:  # a template that raises on tool messages has no usable tool section
                described, called = False, ""
            self._syntax = detect_syntax(called) if described else None
            self._tool_style = "none" if not described else "native" if self._syntax else "other"
        return self._tool_style

    @property
    def tool_syntax(self) -> ToolSyntax:  # type: ignore[override]
        if self.tool_style == "other":
            raise CuteGPTError(f"the chat template of {self.tokenizer.name_or_path} writes tool calls in a syntax cutegpt "
                               "cannot parse (it reads Hermes/Qwen2.5 <tool_call>, Llama 3.1 JSON and Mistral [TOOL_CALLS]); "
                               "use --template cutegpt for tools.")
        return self._syntax or HERMES

    def _messages(self, turns: Sequence[Turn], system: str | None, tools: Sequence[dict] | None) -> list[dict[str, Any]]:
        has_tools = bool(tools) or any(t.rounds for t in turns)
        syntax = self.tool_syntax if has_tools else HERMES  # refuses a call syntax cutegpt cannot parse
        native = self.tool_style == "native" if has_tools else True
        if tools and not native:
            system = (system + "\n\n" if system else "") + tools_block(tools)
        msgs: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        n = 0  # calls so far: an id for calls that come without one (training data)
        for t in turns:
            msgs.append({"role": "user", "content": t.instruction + (("\n" + t.input) if t.input else "")})
            for r in t.rounds:
                if native:
                    ids = [syntax.call_id(c.id or f"call{n + k}") for k, c in enumerate(r.calls)]
                    n += len(r.calls)
                    msgs.append({"role": "assistant", "content": r.content, "tool_calls": [
                        {"id": i, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                        for i, c in zip(ids, r.calls)]})
                    msgs += [{"role": "tool", "tool_call_id": i, "content": res} for i, res in zip(ids, r.results)]
                else:
                    msgs.append({"role": "assistant", "content": round_text(r)})
                    if r.results:
                        msgs.append({"role": "user", "content": responses_text(r.results)})
            if t.output is not None:
                msgs.append({"role": "assistant", "content": t.output})
        return msgs

    def prompt(self, turns: Sequence[Turn], system: str | None = None, tools: Sequence[dict] | None = None) -> str:
        """One rendering of the whole conversation, as transformers and llama.cpp give it: templates that move text
        between turns (Mistral's puts the tools and the system text at the last question) are served as they are."""
        if not turns or not turns[-1].is_open:
            raise ValueError("the last turn of a prompt must be open (output=None)")
        native = tools if tools and self.tool_style == "native" else None
        return self._render(self._messages(turns, system, tools), True, native)

    def segments(self, turns: Sequence[Turn], system: str | None = None, tools: Sequence[dict] | None = None) -> list[Segment]:
        msgs = self._messages(turns, system, tools)
        native_tools = tools if tools and self.tool_style == "native" else None
        out: list[Segment] = []
        done = ""  # text covered so far
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._render(msgs[:i], True, native_tools)
            full = self._render(msgs[: i + 1], False, native_tools)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise CuteGPTError(
                    f"the chat template of {self.tokenizer.name_or_path} re-renders earlier turns differently, "
                    "so training text cannot match inference text; use --template cutegpt."
                )
            out.append(Segment(prompt[len(done):], False))
            answer = full[len(prompt):]
            cut = answer.find(self.stop, len(m["content"] or "")) if self.stop else -1
            if cut >= 0:
                cut += len(self.stop)
                out.append(Segment(answer[:cut], True))
                if answer[cut:]:
                    out.append(Segment(answer[cut:], False))
            else:
                out.append(Segment(answer, True))
            done = full
        if turns and turns[-1].is_open:
            prompt = self._render(msgs, True, native_tools)
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
    `tools`, assistant `tool_calls` and `tool` messages render the tool format
    (arguments given as JSON text are written as they are: byte for byte when
    they are `json.dumps` of an object, as templates.py writes them).
    `system` sets the default system line (None = the CuteGPT one, "" = none).
    """
    if template_name in ("auto", "raw"):
        return None
    if template_name != "cutegpt":
        raise CuteGPTError(f"unknown template '{template_name}'; choose one of: {', '.join(TEMPLATES)}.")
    default = CUTEGPT_SYSTEM if system is None else system
    return (
        "{%- set ns = namespace(system=" + _jinja_string(default) + ", start=0, prev='') -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = messages[0]['content'] -%}{%- set ns.start = 1 -%}"
        "{%- endif -%}"
        "{%- if ns.system -%}{{ ns.system }}{%- if not ns.system.endswith('\\n') -%}{{ '\\n' }}{%- endif -%}{%- endif -%}"
        "{%- if tools -%}{{ " + _jinja_string(CUTEGPT_TOOLS_HEAD) + " }}"
        "{%- for tool in tools -%}{{ '\\n' }}{{ tool | tojson }}{%- endfor -%}"
        "{{ " + _jinja_string(CUTEGPT_TOOLS_TAIL) + " }}{%- endif -%}"
        "{%- for message in messages[ns.start:] -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '问：' + message['content'] }}"
        "{%- if message['input'] is defined and message['input'] -%}{{ '\\n' + message['input'] }}{%- endif -%}"
        "{{ '\\n' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ '答：\\n' }}"
        "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
        "{%- if message['content'] -%}{{ message['content'] + '\\n' }}{%- endif -%}"
        "{%- for call in message['tool_calls'] -%}"
        "{%- set fn = call['function'] if call['function'] is defined else call -%}"
        "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
        "{{ '<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
        "{%- if fn['arguments'] is string -%}{{ fn['arguments'] }}{%- else -%}{{ fn['arguments'] | tojson }}{%- endif -%}"
        "{{ '}\\n</tool_call>' }}"
        "{%- endfor -%}"
        "{{ '" + CUTEGPT_STOP + "' }}"
        "{%- else -%}"
        "{{ message['content'] + '" + CUTEGPT_STOP + "' }}"
        "{%- endif -%}"
        "{%- elif message['role'] == 'tool' -%}"
        "{%- if ns.prev != 'tool' -%}{{ " + _jinja_string(CUTEGPT_TOOL_RESULT) + " }}{%- endif -%}"
        "{{ '<tool_response>\\n' + message['content'] + '\\n</tool_response>\\n' }}"
        "{%- endif -%}"
        "{%- set ns.prev = message['role'] -%}"
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
