"""Readers of the official layouts: real CSV parsing, clear errors naming file and row."""

from __future__ import annotations

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.evaluation.data import load_benchmark, resolve_data_dir, resource
from tests.evaluation.conftest import CEVAL_DEV, make_ceval, write_csv


def test_ceval_reads_crlf_inside_quoted_cells(ceval_dir):
    bench = load_benchmark("ceval", ceval_dir, "val")
    assert list(bench.subjects) == ["computer_network", "high_school_physics"]
    net = bench.subjects["computer_network"]
    assert net.zh == "计算机网络" and net.categories == ["STEM"]
    assert [q.question for q in net.questions] == ["UDP是___", "网关\r\n作用___", "ping用___"]
    assert net.questions[1].options == ("转发", "存储", "显示", "打印")
    assert [q.answer for q in net.questions] == ["B", "A", "C"]
    assert net.dev[2].question == "HTTP默认端口\r\n是___" and len(net.dev) == 5


def test_ceval_test_split_has_no_answers(ceval_dir):
    bench = load_benchmark("ceval", ceval_dir, "test")
    assert all(q.answer is None for s in bench.subjects.values() for q in s.questions)


def test_missing_option_names_file_and_row(tmp_path):
    root = make_ceval(tmp_path / "c", val={"computer_network": [["0", "q", "a", "b", "", "d", "A"]]})
    with pytest.raises(CuteGPTError, match=r"computer_network_val\.csv: row 2: option C is missing"):
        load_benchmark("ceval", root, "val")


def test_answer_not_a_letter(tmp_path):
    root = make_ceval(tmp_path / "c", val={"computer_network": [["0", "q", "a", "b", "c", "d", "E"]]})
    with pytest.raises(CuteGPTError, match=r"row 2: the answer 'E' is not one of A, B, C, D"):
        load_benchmark("ceval", root, "val")


def test_unknown_subject(tmp_path):
    root = make_ceval(tmp_path / "c")
    write_csv(root / "val" / "underwater_basket_weaving_val.csv", ["id", "question", "A", "B", "C", "D", "answer"],
              [["0", "q", "a", "b", "c", "d", "A"]])
    with pytest.raises(CuteGPTError, match="underwater_basket_weaving.*not in the ceval subject list"):
        load_benchmark("ceval", root, "val")


def test_subject_selection(ceval_dir):
    bench = load_benchmark("ceval", ceval_dir, "val", ["high_school_physics"])
    assert list(bench.subjects) == ["high_school_physics"]
    with pytest.raises(CuteGPTError, match="'nope' is not a ceval subject"):
        load_benchmark("ceval", ceval_dir, "val", ["nope"])


def test_missing_data_folder_says_where_to_get_it(monkeypatch, tmp_path):
    for var in ("CEVAL_DATA", "CUTEGPT_DATA"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(CuteGPTError, match="ceval-exam"):
        resolve_data_dir("ceval", None)
    with pytest.raises(CuteGPTError, match="does not exist.*C-Eval"):
        resolve_data_dir("ceval", str(tmp_path / "nowhere"))
    monkeypatch.setenv("CUTEGPT_DATA", str(tmp_path))
    (tmp_path / "cmmlu").mkdir()
    assert resolve_data_dir("cmmlu", None) == tmp_path / "cmmlu"


def test_cmmlu_and_mmlu_layouts(cmmlu_dir, mmlu_dir):
    cm = load_benchmark("cmmlu", cmmlu_dir, "test")
    agr = cm.subjects["agronomy"]
    assert agr.zh == "农学" and agr.questions[0].answer == "B" and len(agr.dev) == 5
    mm = load_benchmark("mmlu", mmlu_dir, "test")
    ast = mm.subjects["astronomy"]
    assert ast.categories == ["STEM"] and ast.questions[0].options == ("gas", "rock", "ice", "wood")


def test_xiezhi_answers_and_disciplines(xiezhi_dir):
    bench = load_benchmark("xiezhi", xiezhi_dir, "spec")
    assert list(bench.subjects) == ["医学", "艺术学"]  # taxonomy order; 方剂学 -> 中医学 -> 医学
    med = bench.subjects["医学"].questions
    assert [q.answer for q in med] == ["B", "D"]
    assert bench.subjects["艺术学"].questions[0].options[0] == "聂耳"


def test_resources_are_complete():
    ceval = resource("ceval")
    assert len(ceval["subjects"]) == 52 and len(ceval["hard"]) == 8
    assert set(ceval["hard"]) <= set(ceval["subjects"])
    assert len(resource("cmmlu")["subjects"]) == 67 and len(resource("mmlu")["subjects"]) == 57
    assert len(resource("xiezhi")["disciplines"]) == 13
    assert set(CEVAL_DEV) <= set(ceval["subjects"])


@pytest.mark.parametrize("reader, header", [("read_ceval_csv", ["id", "question", "A", "B", "C", "D", "answer"]),
                                            ("read_cmmlu_csv", ["", "Question", "A", "B", "C", "D", "Answer"]),
                                            ("read_mmlu_csv", None)])
def test_header_only_csv_is_one_sentence(tmp_path, reader, header):
    from cutegpt.evaluation import data

    path = tmp_path / "computer_network_val.csv"
    write_csv(path, header, [])
    with pytest.raises(CuteGPTError, match=r"computer_network_val\.csv: holds no question \(a header only, or an empty file\)"):
        getattr(data, reader)(path, "computer_network")


def test_header_only_csv_from_the_command_line(tmp_path, capsys):
    from cutegpt.cli import main

    root = make_ceval(tmp_path / "ceval")
    for f in (root / "val").glob("*.csv"):
        f.write_text(f.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    assert main(["eval", "ceval", "--data", str(root), "--out", str(tmp_path / "res")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "holds no question" in err and "unexpected" not in err
    assert not (tmp_path / "res").exists()
