"""Tool calling on /v1/chat/completions, rendered with the served template (`cutegpt.templates`).

llama.cpp's server renders a model's Jinja but neither parses its tool calls back
nor forces a call (this xllamacpp build). So a request that offers tools, or
carries tool turns, is rendered here by the same template object training used,
sent to llama.cpp's text completion endpoint, and its text is turned back into an
OpenAI answer with the template's call syntax (`cutegpt.tool_syntax`: Hermes
`<tool_call>`, Llama 3.1 JSON, Mistral `[TOOL_CALLS]`):

    messages + tools --Template.prompt--> prompt text --/v1/completions--> text
    text --ToolSyntax.parse--> {"content", "tool_calls"}, finish_reason "tool_calls"

`tool_choice` "required" or a named function ends the prompt with the syntax's
opening (`<tool_call>\\n`, `[TOOL_CALLS]`) and constrains the rest with a JSON
schema of a call to one of the allowed functions with that function's parameters,
which llama.cpp turns into a grammar, so even a random model returns a call that
validates.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cutegpt.templates import ConversationRefused, Template, ToolCall, ToolRound, Turn
from cutegpt.tool_syntax import ToolSyntax

# request fields llama.cpp's completion endpoint takes as they are
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty", "presence_penalty",
                   "frequency_penalty", "max_tokens", "stop", "cache_prompt")


class ToolRequestError(ValueError):
    """A request the template cannot render; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def is_tool_request(body: dict) -> bool:
    """Tools offered (and not switched off), or tool turns in the history."""
    offered = bool(body.get("tools")) and body.get("tool_choice") != "none"
    return offered or any(m.get("role") == "tool" or m.get("tool_calls") for m in body["messages"])


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content or ""


def conversation(messages: list[dict]) -> tuple[str | None, list[Turn]]:
    """(system text or None, turns ending with the open one) from checked OpenAI messages."""
    system: str | None = None
    turns: list[Turn] = []
    question: str | None = None
    rounds: list[ToolRound] = []
    got: dict[str, str] = {}  # results of the last round by call id
    for i, m in enumerate(messages):
        role, text = m["role"], _text(m.get("content"))
        if role in ("system", "developer"):
            if turns or question is not None:
                raise ToolRequestError(f"messages[{i}]", f"'messages[{i}]' is a {role} message after the conversation began; "
                                                         "with tools, system messages may only come first.")
            system = text if system is None else system + "\n" + text
        elif role == "user":
            if rounds:
                raise ToolRequestError(f"messages[{i}]", f"'messages[{i}]' is a user message before the assistant "
                                                         "answered the tool results.")
            question = text if question is None else question + "\n" + text
        elif role == "assistant" and m.get("tool_calls"):
            if question is None:
                raise ToolRequestError(f"messages[{i}]", f"'messages[{i}]' makes tool calls without a user message before it.")
            calls = []
            for j, c in enumerate(m["tool_calls"]):
                try:
                    args = json.loads(c["function"]["arguments"])
                except ValueError:
                    args = None
                if not isinstance(args, dict):
                    raise ToolRequestError(f"messages[{i}].tool_calls[{j}].function.arguments",
                                           f"'messages[{i}].tool_calls[{j}].function.arguments' must be the JSON text of an object.")
                calls.append(ToolCall(c["function"]["name"], json.dumps(args, ensure_ascii=False), c["id"]))
            rounds.append(ToolRound(tuple(calls), (), text))
            got = {}
        elif role == "tool":
            last = rounds[-1] if rounds else None  # the front already checked that an earlier call has this id
            if last is None or m["tool_call_id"] not in {c.id for c in last.calls}:
                raise ToolRequestError(f"messages[{i}].tool_call_id", f"'messages[{i}].tool_call_id' must answer a call "
                                                                      "of the assistant message just before the tool messages.")
            got[m["tool_call_id"]] = text
            # results follow the calls' order, whatever order the client sent them in
            ordered = tuple(got[c.id] for c in last.calls if c.id in got)
            rounds[-1] = ToolRound(last.calls, ordered, last.content)
        else:  # a plain assistant answer
            if question is None:
                raise ToolRequestError(f"messages[{i}]", f"'messages[{i}]' is an assistant message without a user message before it.")
            turns.append(Turn(question, "", text, tuple(rounds)))
            question, rounds = None, []
    if question is None:
        raise ToolRequestError("messages", "'messages' must end with a user or tool message when tools are used.")
    if rounds and len(rounds[-1].results) < len(rounds[-1].calls):
        raise ToolRequestError("messages", "'messages' ends with tool calls that have no tool message answering them.")
    turns.append(Turn(question, "", None, tuple(rounds)))
    return system, turns


def forced_names(body: dict) -> list[str] | None:
    """The functions a call must be made to (tool_choice required / named), else None."""
    choice = body.get("tool_choice")
    names = [t["function"]["name"] for t in body.get("tools") or []]
    if choice == "required":
        return names
    if isinstance(choice, dict):
        return [choice["function"]["name"]]
    return None


@dataclass
class ToolPlan:
    """What one tool request sends to llama.cpp and how its text is read back."""

    upstream: dict[str, Any]  # the /v1/completions body
    prefill: str  # text the prompt already opened the answer with (the call opening when forced)
    forced: bool
    model: str
    syntax: ToolSyntax
    parallel: bool = True  # False: only the first call is returned (`parallel_tool_calls: false`)
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


def plan(body: dict, template: Template, stop: list[str]) -> ToolPlan:
    """The upstream request for a checked chat body (raises ToolRequestError, or CuteGPTError from the template)."""
    system, turns = conversation(body["messages"])
    offered = body.get("tools") if body.get("tool_choice") != "none" else None
    try:
        prompt = template.prompt(turns, system, offered)
    except ConversationRefused as e:
        raise ToolRequestError("messages", f"'messages': {e}") from None
    syntax = template.tool_syntax
    assert syntax is not None  # a template without tools refused the prompt above
    names = forced_names(body) if offered else None
    parallel = body.get("parallel_tool_calls") is not False
    up: dict[str, Any] = {k: body[k] for k in SAMPLING_FIELDS if k in body}
    up["stop"] = list(dict.fromkeys((body.get("stop") or []) + stop + ([template.stop] if template.stop else [])))
    prefill = ""
    if names:
        prefill = syntax.prefill
        up["json_schema"] = syntax.forced_schema(offered, names, parallel)
    else:
        fmt = body.get("response_format") or {}
        if fmt.get("type") == "json_schema":
            up["json_schema"] = fmt["json_schema"]["schema"]
        elif fmt.get("type") == "json_object":
            up["json_schema"] = {"type": "object"}
    up["prompt"] = prompt + prefill
    up["stream"] = bool(body.get("stream"))
    if up["stream"] and (body.get("stream_options") or {}).get("include_usage"):
        up["stream_options"] = {"include_usage": True}
    return ToolPlan(up, prefill, bool(names), body["model"], syntax, parallel)


def _calls_out(calls: list[dict]) -> list[dict]:
    return [{"id": "call_" + secrets.token_hex(12), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}} for c in calls]


def read_answer(p: ToolPlan, text: str, finish: str | None) -> tuple[str | None, list[dict], str]:
    """(content, OpenAI tool_calls, finish_reason) from the generated text."""
    full = p.prefill + text
    if p.forced and finish != "length":
        full += p.syntax.close  # the grammar ends with the call's JSON
    content, calls = p.syntax.parse(full)
    if not p.parallel:
        calls = calls[:1]
    if calls:
        return (content or None), _calls_out(calls), "tool_calls"
    return full, [], finish or "stop"


def chat_response(p: ToolPlan, upstream: dict) -> dict:
    """A chat.completion from llama.cpp's text_completion answer."""
    choice = (upstream.get("choices") or [{}])[0]
    content, calls, finish = read_answer(p, choice.get("text") or "", choice.get("finish_reason"))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    out = {"id": p.id, "object": "chat.completion", "created": p.created, "model": p.model,
           "choices": [{"index": 0, "message": message, "finish_reason": finish}]}
    if "usage" in upstream:
        out["usage"] = upstream["usage"]
    return out


class StreamReader:
    """llama.cpp's text_completion SSE events in, chat.completion.chunk events out.

    Text is passed on as content until a call may be starting: a tail that could
    be the beginning of the syntax's opening (and white space before it) is held
    back; from an opening on, everything is held, and at the end the calls go out as
    `tool_calls` deltas (one per call, its arguments whole) with finish_reason
    "tool_calls". A forced call holds everything from the start.
    """

    def __init__(self, p: ToolPlan):
        self.p = p
        self.text = ""
        self.sent = 0  # characters of self.text already sent as content
        self.finish: str | None = None
        self.usage: dict | None = None
        self.started = False

    def _chunk(self, delta: dict, finish: str | None = None) -> bytes:
        ev = {"id": self.p.id, "object": "chat.completion.chunk", "created": self.p.created, "model": self.p.model,
              "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(ev, ensure_ascii=False).encode() + b"\n\n"

    def _safe_end(self) -> int:
        """How far the text may be sent as content now."""
        return 0 if self.p.forced else self.p.syntax.content_end(self.text, self.sent)

    def feed(self, event: dict) -> list[bytes]:
        out = []
        if not self.started:
            self.started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            self.text += choice.get("text") or ""
            self.finish = choice.get("finish_reason") or self.finish
        end = self._safe_end()
        if end > self.sent:
            out.append(self._chunk({"content": self.text[self.sent:end]}))
            self.sent = end
        return out

    def close(self) -> list[bytes]:
        out = [] if self.started else [self._chunk({"role": "assistant", "content": ""})]
        content, calls, finish = read_answer(self.p, self.text, self.finish)
        if calls:
            for k, call in enumerate(calls):
                out.append(self._chunk({"tool_calls": [{"index": k, **call}]}))
        else:
            rest = (content or "")[len(self.p.prefill) + self.sent:] if content is not None else ""
            if rest:
                out.append(self._chunk({"content": rest}))
        out.append(self._chunk({}, finish))
        if self.usage is not None:
            ev = {"id": self.p.id, "object": "chat.completion.chunk", "created": self.p.created, "model": self.p.model,
                  "choices": [], "usage": self.usage}
            out.append(b"data: " + json.dumps(ev).encode() + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        return out
