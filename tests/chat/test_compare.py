"""`cutegpt compare`: the answer table (Markdown, HTML, JSON Lines) and pairwise judging with a stand-in judge.

The stand-in is a small HTTP server written here: as a model it answers `stub: <instruction>`; as a judge (a request
with MT-Bench's system prompt) it gives fixed verdicts chosen by the instruction, so the counts are known by hand.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cutegpt.config import parse_config
from cutegpt.errors import CuteGPTError
from cutegpt.chat.compare import (CompareConfig, combine, judge_messages, Instruction, pair_summary, parse_verdict,
                                        read_instructions, run_compare)

# instruction -> how the judge rules (the stub model's answer is the one starting with "stub:")
RULES = {"prefer stub": "stub", "prefer other": "other", "always A": "A", "say tie": "C", "no verdict": "none"}


class Stub:
    def __init__(self, fail_after: int | None = None, prefix: str = "stub: "):
        self.judge_calls: list[tuple[str, str, str]] = []  # (instruction, answer A, answer B)
        self.fail_after = fail_after
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "stub-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                msgs = body["messages"]
                if msgs[0]["role"] == "system" and "impartial judge" in msgs[0]["content"]:
                    if stub.fail_after is not None and len(stub.judge_calls) >= stub.fail_after:
                        return self._send(500, {"error": "judge overloaded"})
                    text = msgs[1]["content"]
                    question = text.split("[User Question]\n", 1)[1].split("\n", 1)[0]
                    a = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End", text, re.S).group(1)
                    b = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End", text, re.S).group(1)
                    stub.judge_calls.append((question, a, b))
                    rule = RULES[question]
                    if rule in ("stub", "other"):
                        stub_is_a = a.startswith("stub:")
                        verdict = "A" if stub_is_a == (rule == "stub") else "B"
                        reply = f"Explanation. [[{verdict}]]"
                    else:
                        reply = "I cannot decide." if rule == "none" else f"Both fine. [[{rule}]]"
                else:
                    reply = prefix + msgs[-1]["content"]
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def stub():
    s = Stub()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))


def _instructions(tmp_path, names=tuple(RULES)):
    path = tmp_path / "ins.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "task": "规划" if k % 2 else "qa", "reference": f"ref {k}"},
                                       ensure_ascii=False) + "\n" for k, q in enumerate(names)), encoding="utf-8")
    return path


def _cfg(*argv):
    return parse_config(CompareConfig, [str(a) for a in argv], prog="cutegpt compare")


# --------------------------------------------------------------------------- rules, by hand


def test_verdicts_are_parsed_strictly():
    assert parse_verdict("A is better. [[A]]") == "A"
    assert parse_verdict("[[ B ]]") == "B"
    assert parse_verdict("tie [[C]] ... final: [[C]]") == "C"
    assert parse_verdict("[[A]] no wait [[B]]") is None  # two different marks: never guessed
    assert parse_verdict("Assistant A is better.") is None
    assert parse_verdict("[A]") is None


@pytest.mark.parametrize("first,second,result", [
    ("A", "B", "win"), ("B", "A", "loss"), ("C", "C", "tie"),
    ("A", "A", "flip"), ("B", "B", "flip"), ("A", "C", "flip"), ("C", "B", "flip"),
    (None, "A", "unparsed"), ("A", None, "unparsed"),
])
def test_both_orders_combine_and_a_flip_is_a_tie(first, second, result):
    assert combine(first, second) == result


def test_pair_summary_counts_flips_and_identical_answers_as_ties():
    s = pair_summary(["win", "win", "loss", "tie", "flip", "identical", "unparsed"])
    assert (s["win"]["count"], s["tie"]["count"], s["loss"]["count"]) == (2, 3, 1)
    assert s["judged"] == 6 and s["unparsed"] == 1 and s["flips"] == 1 and s["identical"] == 1
    assert s["win_rate"] == pytest.approx(round(100 * (2 + 1.5) / 6, 1))
    lo, hi = s["win"]["ci95"]
    assert lo < 100 * 2 / 6 < hi


def test_the_judge_prompt_carries_question_reference_and_both_answers():
    msgs = judge_messages(Instruction("Q?", "more", reference="R"), "ans1", "ans2", "zh")
    assert "公正的评审" in msgs[0]["content"] and "参考答案" in msgs[0]["content"]
    user = msgs[1]["content"]
    assert user.index("Q?\nmore") < user.index("R") < user.index("ans1") < user.index("ans2")
    assert "Reference" not in judge_messages(Instruction("Q?"), "a", "b", "en")[1]["content"]


def test_instruction_files_are_checked_and_named(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(json.dumps([{"instruction": "计划", "input": "x", "output": "参考", "task": "规划"}], ensure_ascii=False),
                    encoding="utf-8")
    assert read_instructions(good) == [Instruction("计划", "x", "参考", "规划")]
    for text, match in [("", "holds no instructions"), ("\n\n", "holds no instructions"), ("[]", "holds no instructions"),
                        ('{"input": "x"}\n', r"line 1: field 'instruction' must be non-empty"),
                        ('{"instruction": "a"}\n{"instruction": 3}\n', r"line 2: field 'instruction' must be text"),
                        ('{"instruction": "a"}\nnot json\n', r"line 2"),
                        ('[{"instruction": "a", "reference": ["x"]}]', r"element 0: field 'reference' must be text")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(CuteGPTError, match=match):
            read_instructions(bad)


def test_bad_settings_fail_before_anything_runs(tmp_path, stub):
    ins = _instructions(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(CuteGPTError, match="at least two models"):
        run_compare(_cfg(ins, "--endpoint", stub.url, "--judge", stub.url, "--out", out))
    with pytest.raises(CuteGPTError, match="--label: 1 names for 2 models"):
        run_compare(_cfg(ins, "--endpoint", stub.url, stub.url + "/v1", "--label", "x", "--out", out))
    with pytest.raises(CuteGPTError, match="not an http"):
        _cfg(ins, "--endpoint", "ftp://x", "--out", out)
    with pytest.raises(CuteGPTError, match="neither an http"):
        run_compare(_cfg(ins, "--endpoint", stub.url, stub.url + "/v1", "--judge", tmp_path / "nothing", "--out", out))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CuteGPTError, match=rf"--endpoint http://127.0.0.1:{port} cannot be reached"):
        run_compare(_cfg(ins, "--endpoint", f"http://127.0.0.1:{port}", "--out", out))
    assert not out.exists()
    assert stub.judge_calls == []


# --------------------------------------------------------------------------- whole runs


def _run_three(tmp_path, tiny_model_dir, stub, *extra):
    """The tiny model and the stub twice (identical answers), judged by the stub."""
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / "out"
    rc = run_compare(_cfg(_instructions(tmp_path), "--model", tiny_model_dir, "--template", "cutegpt", "--backend", "torch",
                          "--greedy", "--max-new-tokens", 5, "--threads", 1,
                          "--endpoint", stub.url, stub.url + "/v1", "--judge", stub.url, "--out", out, *extra))
    return rc, out


def test_judged_run_gives_exact_counts_and_swaps_orders(tmp_path, tiny_model_dir, stub):
    rc, out = _run_three(tmp_path, tiny_model_dir, stub)
    assert rc == 0 and not (tmp_path / "out.partial").exists()
    rows = [json.loads(x) for x in (out / "compare.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["instruction"] for r in rows] == list(RULES) and rows[1]["category"] == "规划"
    labels = list(rows[0]["answers"])
    assert labels[1:] == ["stub-model #2", "stub-model #3"]
    assert all(r["answers"][labels[1]] == "stub: " + r["instruction"] for r in rows)
    tiny = [r["answers"][labels[0]] for r in rows]

    # pairs (tiny, stub #2) and (tiny, stub #3): 5 instructions x 2 orders each; (stub, stub) identical: not judged
    assert len(stub.judge_calls) == 20
    for q, tiny_answer in zip(RULES, tiny):
        calls = [(a, b) for (qq, a, b) in stub.judge_calls if qq == q]
        assert sorted(calls) == sorted([(tiny_answer.strip(), "stub: " + q)] * 2 + [("stub: " + q, tiny_answer.strip())] * 2)

    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    pairs = {(p["model"], p["against"]): p for p in res["judge"]["pairs"]}
    for other in labels[1:]:
        p = pairs[(labels[0], other)]
        # prefer other: tiny wins; prefer stub: tiny loses; always A: a flip (tie); say tie: tie; no verdict: unparsed
        assert (p["win"]["count"], p["tie"]["count"], p["loss"]["count"]) == (1, 2, 1)
        assert p["flips"] == 1 and p["unparsed"] == 1 and p["judged"] == 4
    same = pairs[(labels[1], labels[2])]
    assert (same["tie"]["count"], same["identical"], same["judged"]) == (5, 5, 5)
    judged = [json.loads(x) for x in (out / "judgments.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(judged) == 15
    flip = next(j for j in judged if j["instruction"] == 2 and j["against"] == labels[1])
    assert flip["result"] == "flip" and [o["verdict"] for o in flip["orders"]] == ["A", "A"]

    md = (out / "compare.md").read_text(encoding="utf-8")
    assert "| category | instruction | reference | " in md and "Judge prompt" in md and "impartial judge" in md
    body = md.split("## Pairwise")[0]
    assert body.index("prefer stub") < body.index("always A") < body.index("prefer other")  # grouped: qa rows first
    assert "0 (0.0%" in md and "1 (25.0%" in md
    html = (out / "compare.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "http" not in html.split("<body>")[0]


def test_an_interrupted_judge_resumes_with_the_same_result(tmp_path, tiny_model_dir, stub):
    whole_rc, whole = _run_three(tmp_path / "a", tiny_model_dir, stub)
    assert whole_rc == 0
    expected = (whole / "judgments.jsonl").read_text(encoding="utf-8")

    broken = Stub(fail_after=7)
    try:
        with pytest.raises(CuteGPTError, match="HTTP 500"):
            _run_three(tmp_path / "b", tiny_model_dir, broken)
        work = tmp_path / "b" / "out.partial"
        assert len((work / "judgments-raw.jsonl.partial").read_text(encoding="utf-8").splitlines()) == 7
        with pytest.raises(CuteGPTError, match="interrupted run left"):
            _run_three(tmp_path / "b", tiny_model_dir, broken)
        broken.fail_after = None
        rc, out = _run_three(tmp_path / "b", tiny_model_dir, broken, "--resume")
        assert rc == 0 and len(broken.judge_calls) == 20  # the 7 judged before the failure were not asked again
    finally:
        broken.close()
    got = (out / "judgments.jsonl").read_text(encoding="utf-8")
    assert got.replace(broken.url, "U") == expected.replace(stub.url, "U")


def test_html_and_markdown_escape_what_the_models_write(tmp_path, stub):
    ins = tmp_path / "x.jsonl"
    ins.write_text(json.dumps({"instruction": "<script>alert(1)</script> a|b\nline2"}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run_compare(_cfg(ins, "--endpoint", stub.url, "--out", out)) == 0
    html = (out / "compare.html").read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert "<script>" not in md and "a\\|b<br>line2" in md
    assert "reference" not in md.splitlines()[2]  # no reference column when no instruction has one
    with pytest.raises(CuteGPTError, match="already exists"):
        run_compare(_cfg(ins, "--endpoint", stub.url, "--out", out))
    assert run_compare(_cfg(ins, "--endpoint", stub.url, "--out", out, "--resume")) == 0  # nothing to do


def test_a_local_judge_runs_through_generate_and_its_errors_name_the_flag(tmp_path, tiny_model_dir, stub):
    """A local judge is `cutegpt generate` on the judge prompts: the tiny model's 512-token context cannot hold one,
    which is one sentence naming --judge, with every answer kept for --resume."""
    ins = _instructions(tmp_path, names=("prefer stub", "say tie"))
    out = tmp_path / "out"
    argv = [ins, "--endpoint", stub.url, "--model", tiny_model_dir, "--backend", "torch", "--template", "cutegpt", "--greedy",
            "--max-new-tokens", 4, "--threads", 1, "--judge", tiny_model_dir, "--judge-template", "cutegpt",
            "--judge-max-new-tokens", 4, "--out", out]
    with pytest.raises(CuteGPTError, match=rf"--judge {tiny_model_dir}: .*does not fit the model's context of 512 tokens"):
        run_compare(_cfg(*argv))
    work = tmp_path / "out.partial"
    assert len((work / "answers-1.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert len((work / "answers-2.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert not out.exists()


def test_resume_refuses_other_settings_and_keeps_the_answers(tmp_path, stub):
    other = Stub(fail_after=0, prefix="other: ")  # answers differently; as a judge it fails at once
    try:
        ins = _instructions(tmp_path, names=("say tie",))
        argv = [ins, "--endpoint", stub.url, other.url, "--judge", other.url, "--max-new-tokens", 8, "--out", tmp_path / "out"]
        with pytest.raises(CuteGPTError, match="HTTP 500"):
            run_compare(_cfg(*argv))
        work = tmp_path / "out.partial"
        assert [json.loads(x)["answer"] for x in (work / "answers-2.jsonl").read_text(encoding="utf-8").splitlines()] == ["other: say tie"]
        with pytest.raises(CuteGPTError, match=r"--resume: .* other settings \(generation\)"):
            run_compare(_cfg(*argv[:-4], "--max-new-tokens", 9, "--out", tmp_path / "out", "--resume"))
        other.fail_after = None
        assert run_compare(_cfg(*argv, "--resume")) == 0
        res = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
        assert res["judge"]["pairs"][0]["tie"]["count"] == 1 and len(other.judge_calls) == 2
    finally:
        other.close()
