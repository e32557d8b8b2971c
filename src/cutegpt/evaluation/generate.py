"""`--method generate`: the model answers each question as a chat turn; the letter is read from its text.

    user turn:  header + shots + question + options, the answer cue replaced by an instruction
                (请直接给出正确答案的选项。 / "Answer with the letter of the correct option.";
                 --cot asks for step-by-step reasoning ending with 答案是X / "The answer is X")
    answer:     greedy, up to --max-new-tokens, cut at the template's stop marker and EOS
    letter:     extract.extract_choice (documented rules); None = an extraction failure, counted and wrong

Works on torch (`model.generate`) and on llama.cpp (a greedy completion request).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from cutegpt.evaluation.data import LETTERS, Question, Subject
from cutegpt.evaluation.extract import extract_choice

INSTRUCTIONS = {
    ("zh", False): "请直接给出正确答案的选项。",
    ("zh", True): "请逐步思考，最后以“答案是X”的形式给出正确答案的选项。",
    ("en", False): "Answer with the letter of the correct option.",
    ("en", True): "Think step by step, then finish with \"The answer is X\" where X is the letter of the correct option.",
}


def instruction(benchmark: str, cot: bool) -> str:
    return INSTRUCTIONS[("en" if benchmark == "mmlu" else "zh", cot)]


def chat_text(prompt: str, cue: str, benchmark: str, cot: bool) -> str:
    """The user turn: the multiple-choice prompt with its trailing answer cue replaced by the instruction."""
    body = prompt[: -len(cue)] if cue and prompt.endswith(cue) else prompt
    return body + instruction(benchmark, cot)


def answer_text(lm: Any, ids: list[int], max_new_tokens: int, text: str = "") -> str:
    """The model's greedy answer after `ids` (an endpoint: to the user turn `text`), without the stop marker."""
    if hasattr(getattr(lm, "server", None), "chat"):  # an endpoint renders its own template
        return lm.server.chat(text, max_new_tokens).strip()
    stop = lm.template.stop
    if getattr(lm, "server", None) is not None:
        req: dict[str, Any] = {"prompt": list(ids), "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
                               "cache_prompt": True}
        if stop:
            req["stop"] = [stop]
        r = lm.server.handle_completions(req)
        if isinstance(r, dict) and "error" in r:
            from cutegpt.errors import CuteGPTError

            raise CuteGPTError(f"llama.cpp refused a generation request ({str(r['error'])[:200]}).")
        text = str(r["choices"][0]["text"])
    else:
        import torch

        from cutegpt.model.tokenizer import end_of_generation_ids

        tok = lm.tokenizer
        eos = end_of_generation_ids(tok, stop)  # where llama.cpp ends the answer too
        device = next(lm.model.parameters()).device
        with torch.no_grad():
            out = lm.model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=eos or None, pad_token_id=tok.pad_token_id or (eos[0] if eos else 0),
                                    top_p=None, top_k=None, temperature=None)
        text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    if stop and stop in text:
        text = text[: text.index(stop)]
    return text.strip()


def generate_records(lm: Any, sub: Subject, prompts: list[tuple[Question, str]], ids: list[list[int]],
                     max_new_tokens: int, progress: Callable[[int], None] | None = None,
                     turns: list[str] | None = None) -> list[dict[str, Any]]:
    """`ids`: each prompt encoded with the template; `turns`: the user turns themselves (for an endpoint)."""
    out = []
    for n, ((q, text), prompt_ids) in enumerate(zip(prompts, ids)):
        answer = answer_text(lm, prompt_ids, max_new_tokens, turns[n] if turns else "")
        pred = extract_choice(answer, q.options)
        correct = (pred == q.answer) if q.answer else None
        out.append({
            "subject": sub.name,
            "id": q.id,
            "prompt_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
            "prompt_tokens": len(prompt_ids),
            "gold": q.answer,
            "pred": pred,
            "answer": answer,
            "extracted": pred is not None,
            "correct": correct,
            # no ranking from a text answer: right = rank 1, else last (XieZhi's MRR is then a lower bound)
            "rank": 1 if correct else len(LETTERS) if q.answer else None,
        })
        if progress is not None:
            progress(1)
    return out
