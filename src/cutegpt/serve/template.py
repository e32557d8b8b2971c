"""The Jinja chat template the server gives llama.cpp (and vLLM) for CuteGPT-format models."""

from __future__ import annotations


def cutegpt_jinja() -> str:
    """Jinja text rendering the `cutegpt` training format (`cutegpt.templates.chat_template_jinja`)."""
    from cutegpt.templates import chat_template_jinja

    text = chat_template_jinja("cutegpt")
    assert text is not None
    return text
