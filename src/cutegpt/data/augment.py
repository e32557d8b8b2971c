"""The original's template-pool augmentation, as data-only `Segment`s (bugs fixed).

Each turn is rendered with a template drawn at random from the original pools
(`code/config.py`), and a non-empty input is first wrapped by one of the
original input wrappers. The prompt is the pool template formatted with an
empty answer, exactly as `get_multiround_data` did:

    "问：{}\\n答：{}\\n".format(instruction, "")  ->  "问：<instruction>\\n答：\\n"   (not trained)
    output + "<end>"                                                      (trained)

The two bugs of the original pools, fixed here:
1. `"Instruction:{}\\Response:{}\\n"` lacks an `n`: the model was trained on a
   literal backslash-R (`Instruction:…\\Response:`). Fixed to `\\nResponse:`.
2. The single-round pools (`woround_*`) miss a comma, so Python glued two
   entries into one (`"Instruction:{}\\nResponse:{}\\n{}\\n{}\\n"`): a template
   with four slots, one of them never filled. Fixed: three separate entries.
   (The original code only ever drew from the multi-round pools; here the
   single-round pools are used for one-turn conversations, which is what
   their names say they are for.)
"""

from __future__ import annotations

import random
from typing import Sequence

from cutegpt.templates import CUTEGPT_STOP, CUTEGPT_SYSTEM, Segment, Turn

# bare "{}" three times: as likely as in the original list
INPUT_WRAPPERS = ("Input:{}", "Question:{}", "Problem:{}", "Q:{}", "*Question*:{}", "(Problem){}", "{}", "{}", "{}")

MULTI_NO_INPUT = ("问：{}\n答：{}\n", "Instruction:{}\nResponse:{}\n", "{}\n{}\n")
MULTI_WITH_INPUT = ("背景：{}\n{}\n答：{}\n", "已知：{}\n{}\n回答：{}\n", "问：{}\n{}\n答：{}\n",
                    "Instruction:{}\n{}\nResponse:{}\n", "{}\n{}\n{}\n")
SINGLE_NO_INPUT = ("问：{}\n答：{}\n", "Instruction:{}\nResponse:{}\n", "{}\n{}\n")
SINGLE_WITH_INPUT = ("问：{}\n{}\n答：{}\n", "Instruction:{}\n{}\nResponse:{}\n", "{}\n{}\n{}\n")


def pool_segments(turns: Sequence[Turn], system: str | None, rng: random.Random) -> list[Segment]:
    """System line, then per turn a pool-drawn prompt (untrained) and output + <end> (trained)."""
    system = CUTEGPT_SYSTEM if system is None else system
    if system and not system.endswith("\n"):
        system += "\n"
    single = len(turns) == 1
    no_input, with_input = (SINGLE_NO_INPUT, SINGLE_WITH_INPUT) if single else (MULTI_NO_INPUT, MULTI_WITH_INPUT)
    out = [Segment(system, False)] if system else []
    for t in turns:
        if t.input == "":  # the original tested == '' too
            prompt = rng.choice(no_input).format(t.instruction, "")
        else:
            prompt = rng.choice(with_input).format(t.instruction, rng.choice(INPUT_WRAPPERS).format(t.input), "")
        out.append(Segment(prompt, False))
        out.append(Segment((t.output or "") + CUTEGPT_STOP, True))
    return out
