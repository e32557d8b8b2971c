"""Rendered prompts equal the reference protocols' text, written out by hand."""

from __future__ import annotations

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.evaluation.cli import EvalConfig, subject_prompts
from cutegpt.evaluation.data import load_benchmark
from cutegpt.evaluation.prompts import PromptStyle, pick_shots
from tests.evaluation.conftest import make_ceval


def _prompts(bench, subject, **kw):
    cfg = EvalConfig(benchmark=bench.name, **kw)
    return [text for _q, text in subject_prompts(bench, bench.subjects[subject], cfg)]


def test_ceval_zero_shot(ceval_dir):
    bench = load_benchmark("ceval", ceval_dir, "val")
    first = _prompts(bench, "computer_network", shots=0)[0]
    assert first == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "UDP是___\nA. 可靠\nB. 不可靠\nC. 有连接\nD. 慢\n答案："
    )


def test_ceval_five_shot(ceval_dir):
    bench = load_benchmark("ceval", ceval_dir, "val")
    second = _prompts(bench, "computer_network", shots=5)[1]
    assert second == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "TCP是___协议\nA. 面向连接\nB. 无连接\nC. 广播\nD. 组播\n答案：A\n\n"
        "IP地址有___位\nA. 16\nB. 32\nC. 64\nD. 128\n答案：B\n\n"
        "HTTP默认端口\r\n是___\nA. 21\nB. 25\nC. 80\nD. 443\n答案：C\n\n"
        "DNS用于___\nA. 路由\nB. 加密\nC. 压缩\nD. 域名解析\n答案：D\n\n"
        "以太网帧最小___字节\nA. 64\nB. 32\nC. 128\nD. 16\n答案：A\n\n"
        "网关\r\n作用___\nA. 转发\nB. 存储\nC. 显示\nD. 打印\n答案："
    )


def test_cmmlu_and_mmlu_headers(cmmlu_dir, mmlu_dir):
    cm = load_benchmark("cmmlu", cmmlu_dir, "test")
    assert _prompts(cm, "agronomy", shots=1, prompt="lm-eval")[0] == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "问题0\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：A\n\n"
        "土地是___\nA. 工具\nB. 资料\nC. 资金\nD. 劳力\n答案："
    )
    mm = load_benchmark("mmlu", mmlu_dir, "test")
    assert _prompts(mm, "astronomy", shots=1)[0] == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Q0?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
        "What is a star?\nA. gas\nB. rock\nC. ice\nD. wood\nAnswer:"
    )


CMMLU_HEADER = "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"  # mp_utils.gen_prompt, name_en2zh["agronomy"]


def test_cmmlu_official_prompt_zero_shot(cmmlu_dir):
    """The CMMLU authors' src/mp_utils.py: format_example writes 题目： … 答案是：."""
    cm = load_benchmark("cmmlu", cmmlu_dir, "test")
    assert _prompts(cm, "agronomy", shots=0)[0] == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：土地是___\nA. 工具\nB. 资料\nC. 资金\nD. 劳力\n答案是："
    )


def test_cmmlu_official_prompt_five_shot(cmmlu_dir):
    cm = load_benchmark("cmmlu", cmmlu_dir, "test")
    assert _prompts(cm, "agronomy", shots=5, prompt="official")[0] == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：问题0\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：A\n\n"
        "题目：问题1\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：B\n\n"
        "题目：问题2\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：C\n\n"
        "题目：问题3\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：D\n\n"
        "题目：问题4\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：A\n\n"
        "题目：土地是___\nA. 工具\nB. 资料\nC. 资金\nD. 劳力\n答案是："
    )


def test_ceval_lm_eval_form_with_space_delimiter(ceval_dir):
    """lm-eval's ceval-valid: no 考试 in the header; target delimiter " " before every shot's letter."""
    bench = load_benchmark("ceval", ceval_dir, "val")
    got = _prompts(bench, "high_school_physics", shots=1, prompt="lm-eval", target_delimiter=" ")[0]
    assert got == (
        "以下是中国关于高中物理的单项选择题，请选出其中的正确答案。\n\n"
        "力的单位是___\nA. 牛顿\nB. 焦耳\nC. 瓦特\nD. 伏特\n答案： A\n\n"
        "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    )


@pytest.mark.parametrize("order", ["file", "random"])
@pytest.mark.parametrize("shots", [1, 4])
def test_dev_split_never_shows_a_question_its_own_answer(ceval_dir, order, shots):
    bench = load_benchmark("ceval", ceval_dir, "dev")
    style = PromptStyle("ceval")
    for name, sub in bench.subjects.items():
        pairs = subject_prompts(bench, sub, EvalConfig(benchmark="ceval", shots=shots, fewshot_order=order, split="dev"))
        assert len(pairs) == 5
        for q, text in pairs:
            assert style.shot(q) not in text, f"{name} {q.id}: the question is among its own shots"
            assert text.count("答案：") == shots + 1  # still k shots, just other ones


def test_dev_split_needs_one_more_dev_question(ceval_dir):
    bench = load_benchmark("ceval", ceval_dir, "dev")
    with pytest.raises(CuteGPTError, match=r"left out of its own shots, so --shots can be at most 4"):
        _prompts(bench, "computer_network", shots=5)


def test_missing_dev_file_says_missing(tmp_path):
    root = make_ceval(tmp_path / "c", dev={}, val={"computer_network": [["0", "q", "a", "b", "c", "d", "A"]]})
    bench = load_benchmark("ceval", root, "val")
    with pytest.raises(CuteGPTError, match=r"computer_network_dev\.csv is missing"):
        _prompts(bench, "computer_network", shots=5)


def test_random_shots_are_seeded(ceval_dir):
    sub = load_benchmark("ceval", ceval_dir, "val").subjects["computer_network"]
    a = pick_shots(sub, 3, "random", 7, "dev")
    assert a == pick_shots(sub, 3, "random", 7, "dev") and len(set(q.id for q in a)) == 3
    assert pick_shots(sub, 5, "file", 0, "dev") == sub.dev


def test_short_dev_file_for_five_shot(tmp_path):
    root = make_ceval(tmp_path / "c", dev={"computer_network": [["0", "q", "a", "b", "c", "d", "A", ""]]},
                      val={"computer_network": [["0", "q", "a", "b", "c", "d", "A"]]})
    bench = load_benchmark("ceval", root, "val")
    with pytest.raises(CuteGPTError, match=r"computer_network_dev\.csv: 1 dev questions.*5-shot needs at least 5"):
        _prompts(bench, "computer_network", shots=5)
