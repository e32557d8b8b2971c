"""Small benchmark folders in the official layouts, written by hand (never the real data)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

# Two C-Eval subjects; a quoted cell holds a CRLF line break like the real files.
CEVAL_DEV = {
    "computer_network": [
        ["0", "TCP是___协议", "面向连接", "无连接", "广播", "组播", "A", "解释"],
        ["1", "IP地址有___位", "16", "32", "64", "128", "B", ""],
        ["2", "HTTP默认端口\r\n是___", "21", "25", "80", "443", "C", ""],
        ["3", "DNS用于___", "路由", "加密", "压缩", "域名解析", "D", ""],
        ["4", "以太网帧最小___字节", "64", "32", "128", "16", "A", ""],
    ],
    "high_school_physics": [
        ["0", "力的单位是___", "牛顿", "焦耳", "瓦特", "伏特", "A", ""],
        ["1", "光速约为___", "3", "3e8", "30", "300", "B", ""],
        ["2", "g约为___", "1", "5", "9.8", "20", "C", ""],
        ["3", "电流单位___", "伏", "欧", "瓦", "安", "D", ""],
        ["4", "能量单位___", "焦耳", "牛顿", "米", "秒", "A", ""],
    ],
}
CEVAL_VAL = {
    "computer_network": [
        ["0", "UDP是___", "可靠", "不可靠", "有连接", "慢", "B"],
        ["1", "网关\r\n作用___", "转发", "存储", "显示", "打印", "A"],
        ["2", "ping用___", "TCP", "UDP", "ICMP", "ARP", "C"],
    ],
    "high_school_physics": [
        ["0", "1+1=?", "1", "2", "3", "4", "B"],
        ["1", "今天天气很好", "A", "B", "C", "D", "D"],
    ],
}


def write_csv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\r\n")
        if header:
            w.writerow(header)
        w.writerows(rows)


def make_ceval(root: Path, dev=None, val=None, with_test: bool = True) -> Path:
    dev = CEVAL_DEV if dev is None else dev
    val = CEVAL_VAL if val is None else val
    for subject, rows in dev.items():
        write_csv(root / "dev" / f"{subject}_dev.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"], rows)
    for subject, rows in val.items():
        write_csv(root / "val" / f"{subject}_val.csv", ["id", "question", "A", "B", "C", "D", "answer"], rows)
        if with_test:
            write_csv(root / "test" / f"{subject}_test.csv", ["id", "question", "A", "B", "C", "D"],
                      [r[:6] for r in rows])
    return root


@pytest.fixture()
def ceval_dir(tmp_path) -> Path:
    return make_ceval(tmp_path / "ceval")


@pytest.fixture()
def cmmlu_dir(tmp_path) -> Path:
    root = tmp_path / "cmmlu"
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    dev = [[str(i), f"问题{i}", "甲", "乙", "丙", "丁", "ABCDA"[i]] for i in range(5)]
    write_csv(root / "dev" / "agronomy.csv", header, dev)
    write_csv(root / "test" / "agronomy.csv", header, [["0", "土地是___", "工具", "资料", "资金", "劳力", "B"]])
    return root


@pytest.fixture()
def mmlu_dir(tmp_path) -> Path:
    root = tmp_path / "mmlu"
    dev = [[f"Q{i}?", "w", "x", "y", "z", "ABCDA"[i]] for i in range(5)]
    write_csv(root / "dev" / "astronomy_dev.csv", None, dev)
    write_csv(root / "test" / "astronomy_test.csv", None, [["What is a star?", "gas", "rock", "ice", "wood", "A"]])
    return root


@pytest.fixture()
def xiezhi_dir(tmp_path) -> Path:
    root = tmp_path / "xiezhi"
    recs = [
        {"question": "《义勇军进行曲》的曲作者是_____", "labels": ["艺术学"], "answer": "聂耳", "options": "聂耳\n冼星海\n光未然\n田汉"},
        {"question": "最早的医书_____", "labels": ["中医学", "医学"], "answer": "乙", "options": "甲\n乙\n丙\n丁"},
        {"question": "某方剂_____", "labels": ["方剂学"], "answer": "丁", "options": "甲\n乙\n丙\n丁"},
    ]
    path = root / "test" / "xiezhi_spec_chn" / "xiezhi.v1.1.json"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    tree = root / "discipline_taxonomy" / "subjects_tree_chn.json"
    tree.parent.mkdir(parents=True)
    tree.write_text(json.dumps({"医学": {"中医学": ["方剂学"]}, "艺术学": {}}, ensure_ascii=False), encoding="utf-8")
    return root
