import random

from cutegpt.data import augment
from cutegpt.data.augment import pool_segments
from cutegpt.templates import CUTEGPT_SYSTEM, Segment, Turn


def test_bugs_are_fixed():
    for pool in (augment.MULTI_NO_INPUT, augment.MULTI_WITH_INPUT, augment.SINGLE_NO_INPUT, augment.SINGLE_WITH_INPUT):
        for t in pool:
            assert "\\R" not in t  # bug 1: "Instruction:{}\Response:{}\n"
    # bug 2: missing commas glued two entries into one template with 4 (resp. 5) slots
    assert all(t.count("{}") == 2 for t in augment.SINGLE_NO_INPUT + augment.MULTI_NO_INPUT)
    assert all(t.count("{}") == 3 for t in augment.SINGLE_WITH_INPUT + augment.MULTI_WITH_INPUT)
    assert len(augment.SINGLE_NO_INPUT) == 3 and len(augment.SINGLE_WITH_INPUT) == 3
    assert augment.INPUT_WRAPPERS.count("{}") == 3


def test_segments_like_the_original():
    turns = [Turn("中国的首都是哪里？", "", "北京。"), Turn("Summarize.", "The fox.", "A fox.")]
    segs = pool_segments(turns, None, random.Random(0))
    assert segs[0] == Segment(CUTEGPT_SYSTEM, False)
    assert [s.train for s in segs] == [False, False, True, False, True]
    assert segs[2] == Segment("北京。<end>", True) and segs[4] == Segment("A fox.<end>", True)
    # the prompt is a pool template formatted with '' as the answer
    prompts_no_input = {t.format("中国的首都是哪里？", "") for t in augment.MULTI_NO_INPUT}
    assert segs[1].text in prompts_no_input
    with_input = {t.format("Summarize.", w.format("The fox."), "") for t in augment.MULTI_WITH_INPUT for w in augment.INPUT_WRAPPERS}
    assert segs[3].text in with_input


def test_seeded_and_covers_the_pool():
    turns = [Turn("q", "", "a")]
    seen = {pool_segments(turns, None, random.Random(s))[1].text for s in range(200)}
    assert seen == {t.format("q", "") for t in augment.SINGLE_NO_INPUT}
    assert pool_segments(turns, None, random.Random(3)) == pool_segments(turns, None, random.Random(3))
    assert pool_segments(turns, "", random.Random(3))[0].train is False  # "" = no system line
    assert len(pool_segments(turns, "", random.Random(3))) == 2
