"""Prompt text of the reference protocols, in two forms (`--prompt official|lm-eval`).

Five-shot C-Eval prompt (`--prompt official`), exactly as the C-Eval authors build it:

    以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n     <- header
    {dev question 1}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：C\\n\\n          <- shot (x5, dev file order)
    ...
    {test question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：                 <- the model's next token is read here

CMMLU's official form (the CMMLU authors' `src/mp_utils.py`, `format_example` / `gen_prompt`):

    以下是关于{主题}的单项选择题，请直接给出正确答案的选项。\\n\\n
    题目：{dev question 1}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案是：C\\n\\n
    ...
    题目：{test question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案是：

`--prompt lm-eval` is lm-evaluation-harness's task text (ceval-valid, cmmlu, mmlu): no `考试`
in the C-Eval header, no `题目：` / `答案是：` in CMMLU, the question stripped of surrounding
white space. Between the cue and a shot's letter stands the target delimiter
(`--target-delimiter`; stock lm-eval uses " ").

Zero-shot drops the shots. Header + shots are shared by the questions of a
subject: the scorer computes their KV cache once.
"""

from __future__ import annotations

import random
from pathlib import Path
from dataclasses import dataclass

from cutegpt.errors import CuteGPTError
from cutegpt.evaluation.data import LETTERS, Question, Subject

PROMPTS = ("official", "lm-eval")

# (benchmark, form) -> header, text before the question, answer cue
_FORMS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("ceval", "official"): ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "", "答案："),
    ("ceval", "lm-eval"): ("以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n", "", "答案："),
    ("cmmlu", "official"): ("以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "题目：", "答案是："),
    ("cmmlu", "lm-eval"): ("以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "", "答案："),
    # XieZhi has no lm-eval task: both forms are the CMMLU-style text used for it so far.
    ("xiezhi", "official"): ("以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "", "答案："),
    ("xiezhi", "lm-eval"): ("以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "", "答案："),
    ("mmlu", "official"): ("The following are multiple choice questions (with answers) about {subject}.\n\n", "", "Answer:"),
    ("mmlu", "lm-eval"): ("The following are multiple choice questions (with answers) about {subject}.\n\n", "", "Answer:"),
}
# Kept for callers that want the official form's pieces.
HEADERS = {b: _FORMS[(b, "official")][0] for b in ("ceval", "cmmlu", "xiezhi", "mmlu")}
ANSWER_CUE = {b: _FORMS[(b, "official")][2] for b in ("ceval", "cmmlu", "xiezhi", "mmlu")}
# Default target delimiter: what comes between the cue and the letter (MMLU writes "Answer: C").
LETTER_PREFIX = {"ceval": "", "cmmlu": "", "xiezhi": "", "mmlu": " "}
SOURCES = {
    ("ceval", "official"): "C-Eval authors' LLaMA evaluator (hkust-nlp/ceval)",
    ("ceval", "lm-eval"): "lm-evaluation-harness task ceval-valid",
    ("cmmlu", "official"): "CMMLU authors' src/mp_utils.py (haonan-li/CMMLU)",
    ("cmmlu", "lm-eval"): "lm-evaluation-harness task cmmlu",
    ("xiezhi", "official"): "CMMLU-style header with the XieZhi discipline (XieZhi has no letter-prompt reference)",
    ("xiezhi", "lm-eval"): "same as official (lm-evaluation-harness has no XieZhi task)",
    ("mmlu", "official"): "MMLU authors' evaluate.py (hendrycks/test)",
    ("mmlu", "lm-eval"): "lm-evaluation-harness task mmlu (same text as official)",
}


@dataclass(frozen=True)
class PromptStyle:
    benchmark: str
    form: str = "official"
    delimiter: str | None = None  # between the cue and a shot's letter; None = the benchmark's default

    @property
    def target_delimiter(self) -> str:
        return LETTER_PREFIX[self.benchmark] if self.delimiter is None else self.delimiter

    @property
    def parts(self) -> tuple[str, str, str]:
        return _FORMS[(self.benchmark, self.form)]

    def header(self, subject: Subject) -> str:
        name = subject.en if self.benchmark == "mmlu" else subject.zh
        return self.parts[0].format(subject=name)

    def question(self, q: Question) -> str:
        """The question with its options, ending with the answer cue (no answer)."""
        _h, lead, cue = self.parts
        text = lead + (q.question.strip() if self.form == "lm-eval" else q.question)
        for letter, option in zip(LETTERS, q.options):
            text += f"\n{letter}. {option}"
        return text + "\n" + cue

    def shot(self, q: Question) -> str:
        return self.question(q) + self.target_delimiter + str(q.answer) + "\n\n"

    def prefix(self, subject: Subject, shots: list[Question]) -> str:
        return self.header(subject) + "".join(self.shot(q) for q in shots)


def same_question(a: Question, b: Question) -> bool:
    return a.id == b.id and a.question == b.question and a.options == b.options


def pick_shots(subject: Subject, k: int, order: str, seed: int, dev_file: str,
               leave_out: Question | None = None) -> list[Question]:
    """The first k dev questions (the reference protocol) or k seeded-random ones.

    `leave_out`: a question that must not be among its own shots (the dev split, where the
    questions and the few-shot pool are the same file; lm-eval's rule).
    """
    if k == 0:
        return []
    if not subject.dev and dev_file and not Path(dev_file).is_file():
        raise CuteGPTError(f"{dev_file} is missing: {k}-shot takes its examples from that file; add it or use --shots 0.")
    pool = [q for q in subject.dev if leave_out is None or not same_question(q, leave_out)]
    if len(pool) < k:
        if leave_out is not None:
            raise CuteGPTError(f"{dev_file}: {len(subject.dev)} dev questions for subject '{subject.name}', and on the dev split each "
                               f"question is left out of its own shots, so --shots can be at most {len(subject.dev) - 1}.")
        raise CuteGPTError(f"{dev_file}: {len(subject.dev)} dev questions for subject '{subject.name}', "
                           f"{k}-shot needs at least {k}.")
    if order == "file":
        return pool[:k]
    rng = random.Random(f"{seed}:{subject.name}")  # per subject, so --subjects does not change the picks
    if leave_out is None:
        return rng.sample(pool, k)
    # draw from the whole pool as without leave-out, then drop the question itself (lm-eval draws k+1)
    drawn = rng.sample(subject.dev, min(k + 1, len(subject.dev)))
    return [q for q in drawn if not same_question(q, leave_out)][:k]
