"""How each model family writes a tool call: one table entry per syntax.

A chat template that renders tools (transformers' `apply_chat_template(..., tools=...)`) writes the
assistant's calls in its family's syntax. The same entry reads that syntax back from a model's answer
and, for `tool_choice` "required" or a named function, says how serve opens the call in the prompt and
which JSON the rest must be (llama.cpp turns the schema into a grammar):

    syntax   a call as the template renders it                                  forced: prefill + schema
    hermes   <tool_call>\\n{"name": "f", "arguments": {..}}\\n</tool_call>        <tool_call>\\n + one object
    llama3   {"name": "f", "parameters": {..}}  (or after <|python_tag|>)        ""            + one object
    mistral  [TOOL_CALLS] [{"name": "f", "arguments": {..}, "id": "a1b2c3d4e"}]  [TOOL_CALLS]  + an array

`detect_syntax` finds the entry from what a template renders for a probe call; a new family costs an
entry and a test, not a branch in serve.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_CALLS = "[TOOL_CALLS]"
PROBE = "probe_call_xq"  # the function the probe call calls: not the described one, whose description may look like a call

Call = dict[str, Any]  # {"name": str, "arguments": dict}


def _call(obj: Any) -> Call | None:
    """A parsed call object, or None when it is not one (a string name, object arguments or parameters)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def _json_values(text: str) -> list[Any] | None:
    """JSON values one after another (white space or `;` between them, as Llama 3.2 separates calls); None if any is broken."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return out
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)


def _calls(values: Sequence[Any] | None) -> list[Call] | None:
    calls = [_call(v) for v in values or ()]
    return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


_HERMES_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)


def parse_hermes(text: str) -> tuple[str, list[Call]]:
    """`<tool_call>` blocks (the last may lack its close: generation stopped there)."""
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return text, []
    values = []
    for body in _HERMES_BLOCK.findall(text, start):
        one = _json_values(body)
        if one is None or len(one) != 1:
            return text, []
        values += one
    calls = _calls(values)
    return (text[:start].rstrip(), calls) if calls else (text, [])


def parse_llama3(text: str) -> tuple[str, list[Call]]:
    """JSON call objects making up the whole answer, or everything after `<|python_tag|>` (content may precede it)."""
    head, tag, body = text.partition(PYTHON_TAG)
    if not tag:
        if not text.lstrip().startswith("{"):
            return text, []
        head, body = "", text
    calls = _calls(_json_values(body))
    return (head.rstrip(), calls) if calls else (text, [])


def parse_mistral(text: str) -> tuple[str, list[Call]]:
    """`[TOOL_CALLS]` then a JSON array of calls (Mistral's v3 tokenizer form); content may precede it."""
    head, tag, body = text.partition(MISTRAL_CALLS)
    values = _json_values(body) if tag else None
    if not values or not all(isinstance(v, list) for v in values):
        return text, []
    calls = _calls([c for v in values for c in v])
    return (head.rstrip(), calls) if calls else (text, [])


def _same_id(call_id: str) -> str:
    return call_id


def nine_char_id(call_id: str) -> str:
    """Mistral's templates refuse ids that are not 9 letters or digits: an OpenAI id ("call_…") maps to a stable one."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


# a forced answer that is an array of calls holds at most this many: a weak model otherwise keeps adding calls
# until max_tokens (OpenAI sets no number; this is far above what one turn of real tool use asks for)
MAX_PARALLEL_CALLS = 16


@dataclass(frozen=True)
class ToolSyntax:
    name: str
    detect: str  # text the template renders for a call to PROBE without arguments (detection)
    opener: str  # text that starts a call anywhere in an answer
    prefill: str  # text the prompt ends with when a call is forced
    close: str  # text that completes a forced call after the grammar's JSON (for the parser)
    arguments_key: str  # the key a call's arguments go under
    array: bool  # a forced answer is a JSON array of calls (else one call object)
    parse: Callable[[str], tuple[str, list[Call]]]  # (content before the calls, calls), or (text, []) when malformed
    leading_json: bool = False  # a JSON object that begins the answer is a call (no opener)
    call_id: Callable[[str], str] = _same_id  # the id the template takes for an OpenAI call id

    def forced_schema(self, tools: Sequence[dict], names: Sequence[str], parallel: bool = True) -> dict:
        """JSON schema of the forced answer after `prefill`: a call to one of `names` (an array of them for `array`).

        Arguments get no parameters the function does not declare (unless its schema allows them explicitly): a
        small model otherwise keeps inventing keys until max_tokens cuts the call.
        """
        options = []
        for t in tools:
            fn = t["function"]
            if fn["name"] in names:
                params = dict(fn.get("parameters") or {"type": "object"})
                if params.get("type") == "object" and "properties" in params:
                    params.setdefault("additionalProperties", False)
                options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, self.arguments_key: params},
                                "required": ["name", self.arguments_key], "additionalProperties": False})
        one = options[0] if len(options) == 1 else {"anyOf": options}
        most = MAX_PARALLEL_CALLS if parallel else 1
        schema = {"type": "array", "items": one, "minItems": 1, "maxItems": most} if self.array else one
        # llama.cpp's grammar (llguidance) otherwise allows white space without end, where a weak model can stay until
        # max_tokens; fixed separators also write the call as the templates render it (", " and ": ")
        return {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}

    def content_end(self, text: str, sent: int) -> int:
        """How far a streamed answer is surely content (never before `sent`): a tail that is or may become the
        start of a call is held back, and so is white space (it belongs to no content when a call follows)."""
        if self.leading_json and sent == 0 and (not text.strip() or text.lstrip().startswith("{")):
            return 0
        at = text.find(self.opener)
        if at < 0:
            at = len(text)
            for k in range(min(len(self.opener) - 1, len(text)), 0, -1):
                if self.opener.startswith(text[-k:]):
                    at -= k
                    break
        while at > sent and text[at - 1].isspace():
            at -= 1
        return max(at, sent)


HERMES = ToolSyntax("hermes", detect=f'{TOOL_CALL_OPEN}\n{{"name": "{PROBE}"', opener=TOOL_CALL_OPEN,
                    prefill=TOOL_CALL_OPEN + "\n", close="\n" + TOOL_CALL_CLOSE, arguments_key="arguments", array=False,
                    parse=parse_hermes)
LLAMA3 = ToolSyntax("llama3", detect=f'{{"name": "{PROBE}", "parameters": ', opener=PYTHON_TAG, prefill="", close="",
                    arguments_key="parameters", array=False, parse=parse_llama3, leading_json=True)
MISTRAL = ToolSyntax("mistral", detect=f'{MISTRAL_CALLS} [{{"name": "{PROBE}"', opener=MISTRAL_CALLS,
                     prefill=MISTRAL_CALLS, close="", arguments_key="arguments", array=True, parse=parse_mistral,
                     call_id=nine_char_id)
SYNTAXES = (HERMES, LLAMA3, MISTRAL)


def probe_call() -> dict:
    """The assistant message detection renders (its id suits every family's checks)."""
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": "probe0001", "type": "function", "function": {"name": PROBE, "arguments": {}}}]}


def detect_syntax(rendered_call: str) -> ToolSyntax | None:
    """The syntax whose call appears in a template's rendering of `probe_call()`, else None."""
    return next((s for s in SYNTAXES if s.detect in rendered_call), None)

