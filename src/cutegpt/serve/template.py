"""The Jinja chat template the server gives llama.cpp (and vLLM) for CuteGPT-format models.

`cutegpt.templates.chat_template_jinja` (the GGUF work) is the one source of
truth; until it is merged, `_FALLBACK` renders the same text as
`templates.CuteGPTTemplate` for OpenAI-style messages (delete it after the merge).
"""

from __future__ import annotations

from cutegpt.templates import CUTEGPT_STOP, CUTEGPT_SYSTEM

_FALLBACK = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}"
    "{%- else -%}"
    "{%- set system = " + repr(CUTEGPT_SYSTEM) + " -%}"
    "{%- endif -%}"
    "{%- if system -%}{{ system }}{%- if not system.endswith('\\n') -%}{{ '\\n' }}{%- endif -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '问：' + message['content'] + '\\n答：\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + '" + CUTEGPT_STOP + "' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def cutegpt_jinja() -> str:
    """Jinja text rendering the `cutegpt` training format; the open answer follows the last question."""
    try:
        from cutegpt.templates import chat_template_jinja  # type: ignore[attr-defined]
    except ImportError:
        return _FALLBACK
    text = chat_template_jinja("cutegpt")
    return text or _FALLBACK
