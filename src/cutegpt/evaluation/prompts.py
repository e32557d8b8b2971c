"""Prompt text of the reference protocols (C-Eval's LLaMA evaluator, CMMLU's, MMLU's).

Five-shot C-Eval prompt, exactly as the C-Eval authors build it:

    以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n     <- header
    {dev question 1}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：C\\n\\n          <- shot (x5, dev file order)
    ...
    {test question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：                 <- the model's next token is read here

Zero-shot drops the shots. Header + shots are shared by every question of a
subject: the scorer computes their KV cache once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cutegpt.errors import CuteGPTError
from cutegpt.evaluation.data import LETTERS, Question, Subject

HEADERS = {
    "ceval": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
    "cmmlu": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
    "xiezhi": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
    "mmlu": "The following are multiple choice questions (with answers) about {subject}.\n\n",
}
ANSWER_CUE = {"ceval": "答案：", "cmmlu": "答案：", "xiezhi": "答案：", "mmlu": "Answer:"}
# What comes between the cue and the letter in a shot (MMLU writes "Answer: C").
LETTER_PREFIX = {"ceval": "", "cmmlu": "", "xiezhi": "", "mmlu": " "}


@dataclass(frozen=True)
class PromptStyle:
    benchmark: str

    def header(self, subject: Subject) -> str:
        name = subject.en if self.benchmark == "mmlu" else subject.zh
        return HEADERS[self.benchmark].format(subject=name)

    def question(self, q: Question) -> str:
        """The question with its options, ending with the answer cue (no answer)."""
        text = q.question
        for letter, option in zip(LETTERS, q.options):
            text += f"\n{letter}. {option}"
        return text + "\n" + ANSWER_CUE[self.benchmark]

    def shot(self, q: Question) -> str:
        return self.question(q) + LETTER_PREFIX[self.benchmark] + str(q.answer) + "\n\n"

    def prefix(self, subject: Subject, shots: list[Question]) -> str:
        return self.header(subject) + "".join(self.shot(q) for q in shots)


def pick_shots(subject: Subject, k: int, order: str, seed: int, dev_file: str) -> list[Question]:
    """The first k dev questions (the reference protocol) or k seeded-random ones."""
    if k == 0:
        return []
    if len(subject.dev) < k:
        raise CuteGPTError(f"{dev_file}: {len(subject.dev)} dev questions for subject '{subject.name}', "
                           f"{k}-shot needs at least {k}.")
    if order == "file":
        return subject.dev[:k]
    rng = random.Random(f"{seed}:{subject.name}")  # per subject, so --subjects does not change the picks
    return rng.sample(subject.dev, k)
