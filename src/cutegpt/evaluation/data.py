"""Readers for the official layouts of C-Eval, CMMLU, MMLU and XieZhi.

The project ships only facts (subject lists, Chinese names, categories) in
`resources/`; the questions come from the user's copy of the official data:

    ceval/   dev/{subject}_dev.csv  val/{subject}_val.csv  test/{subject}_test.csv
             columns id,question,A,B,C,D,answer[,explanation]   (test: no answer)
    cmmlu/   dev/{subject}.csv  test/{subject}.csv
             columns <index>,Question,A,B,C,D,Answer
    mmlu/    dev/{subject}_dev.csv  val/...  test/...   (no header: question,A,B,C,D,answer)
    xiezhi/  test/xiezhi_spec_chn/xiezhi.v1.1.json, test/xiezhi_inter_chn/..., train/xiezhi_train_chn/...
             JSON Lines: question, options (newline-separated text), answer (option text), labels

C-Eval cells contain CRLF line breaks inside quotes, so every CSV goes through
the `csv` module opened with newline='' (a line-based reader changes questions).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cutegpt.errors import CuteGPTError

LETTERS = ("A", "B", "C", "D")
BENCHMARKS = ("ceval", "cmmlu", "mmlu", "xiezhi")

# Where users get the data; named in the "missing folder" message.
SOURCES = {
    "ceval": "download the official C-Eval data (ceval-exam on Hugging Face, or hkust-nlp/ceval on GitHub) and pass its folder",
    "cmmlu": "download the official CMMLU data (haonan-li/cmmlu on Hugging Face, or haonan-li/CMMLU on GitHub) and pass its folder",
    "mmlu": "download the official MMLU data (data.tar from hendrycks/test on GitHub, or cais/mmlu on Hugging Face) and pass its data folder",
    "xiezhi": "download the official XieZhi data (MikeGu721/XieZhiBenchmark on GitHub) and pass its folder",
}
ENV_VARS = {"ceval": "CEVAL_DATA", "cmmlu": "CMMLU_DATA", "mmlu": "MMLU_DATA", "xiezhi": "XIEZHI_DATA"}
SPLITS = {"ceval": ("val", "test", "dev"), "cmmlu": ("test", "dev"), "mmlu": ("val", "test", "dev"),
          "xiezhi": ("spec", "inter")}


@dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    options: tuple[str, ...]  # option texts, in letter order
    answer: str | None  # gold letter, None on the C-Eval test split
    source: str = ""  # "file:row" for error messages


@dataclass
class Subject:
    name: str  # key, e.g. computer_network
    zh: str  # name used in the prompt header
    en: str
    categories: list[str]  # C-Eval: one; CMMLU: one or two ("China specific")
    questions: list[Question] = field(default_factory=list)
    dev: list[Question] = field(default_factory=list)  # few-shot pool, file order
    dev_file: str = ""  # where the pool comes from, for error messages


@dataclass
class Benchmark:
    name: str
    split: str
    data_dir: Path
    categories: list[str]  # column order of the table
    subjects: dict[str, Subject]
    hard: list[str]  # C-Eval Hard subjects (empty elsewhere)
    files: list[Path]  # everything read, for the data hash

    def data_hash(self) -> str:
        h = hashlib.sha256()
        for f in sorted(self.files):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()[:16]


def resource(name: str) -> dict[str, Any]:
    """One of the shipped subject/category tables (resources/{name}.json)."""
    text = resources.files("cutegpt.evaluation").joinpath("resources", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def resolve_data_dir(benchmark: str, data: str | None) -> Path:
    """--data, else $CEVAL_DATA (etc.), else $CUTEGPT_DATA/<benchmark>; with a helpful message when missing."""
    if data:
        path = Path(data).expanduser()
        how = "--data"
    elif os.environ.get(ENV_VARS[benchmark]):
        path = Path(os.environ[ENV_VARS[benchmark]]).expanduser()
        how = f"${ENV_VARS[benchmark]}"
    elif os.environ.get("CUTEGPT_DATA"):
        path = Path(os.environ["CUTEGPT_DATA"]).expanduser() / benchmark
        how = "$CUTEGPT_DATA"
    else:
        raise CuteGPTError(
            f"no {benchmark} data folder given: {SOURCES[benchmark]} with --data DIR "
            f"(or set ${ENV_VARS[benchmark]}, or $CUTEGPT_DATA to a folder holding {benchmark}/)."
        )
    if not path.is_dir():
        raise CuteGPTError(f"{benchmark} data folder {path} (from {how}) does not exist: {SOURCES[benchmark]} with --data DIR.")
    return path


def _read_csv(path: Path, header: bool) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise CuteGPTError(f"{path}: not UTF-8 text.") from None
    except csv.Error as e:
        raise CuteGPTError(f"{path}: not a valid CSV file ({e}).") from None
    return rows[1:] if header and rows else rows


def _check_answer(answer: str, where: str, optional: bool) -> str | None:
    answer = answer.strip()
    if not answer and optional:
        return None
    if answer not in LETTERS:
        raise CuteGPTError(f"{where}: the answer {answer!r} is not one of A, B, C, D.")
    return answer


def _row_question(subject: str, qid: str, cells: list[str], where: str, answer_optional: bool) -> Question:
    """cells = question, A, B, C, D[, answer]."""
    if len(cells) < 5 or any(c.strip() == "" for c in cells[1:5]):
        missing = [LETTERS[i] for i in range(4) if len(cells) <= i + 1 or cells[i + 1].strip() == ""]
        raise CuteGPTError(f"{where}: option {', '.join(missing)} is missing.")
    answer = _check_answer(cells[5] if len(cells) > 5 else "", where, answer_optional)
    return Question(subject, qid, cells[0], tuple(cells[1:5]), answer, where)


def read_ceval_csv(path: Path, subject: str, answer_optional: bool = False) -> list[Question]:
    rows = _read_csv(path, header=False)
    if not rows:
        raise CuteGPTError(f"{path}: empty file.")
    head = [h.strip() for h in rows[0]]
    need = ["id", "question", "A", "B", "C", "D"]
    if head[:6] != need:
        raise CuteGPTError(f"{path}: the header must start with {','.join(need)}, not {','.join(head[:6])}.")
    has_answer = len(head) > 6 and head[6] == "answer"
    out = []
    for i, row in enumerate(rows[1:], start=2):
        where = f"{path}: row {i}"
        if len(row) < 6:
            raise CuteGPTError(f"{where}: {len(row)} fields where id,question,A,B,C,D{',answer' if has_answer else ''} are needed.")
        cells = row[1:6] + ([row[6]] if has_answer and len(row) > 6 else [""])
        out.append(_row_question(subject, row[0], cells, where, answer_optional or not has_answer))
    if not out:
        raise CuteGPTError(f"{path}: holds no question (a header only, or an empty file).")
    return out


def read_cmmlu_csv(path: Path, subject: str) -> list[Question]:
    rows = _read_csv(path, header=True)
    out = []
    for i, row in enumerate(rows, start=2):
        where = f"{path}: row {i}"
        if len(row) < 7:
            raise CuteGPTError(f"{where}: {len(row)} fields where index,Question,A,B,C,D,Answer are needed.")
        out.append(_row_question(subject, row[0], row[1:7], where, False))
    if not out:
        raise CuteGPTError(f"{path}: holds no question (a header only, or an empty file).")
    return out


def read_mmlu_csv(path: Path, subject: str) -> list[Question]:
    rows = _read_csv(path, header=False)
    out = []
    for i, row in enumerate(rows, start=1):
        where = f"{path}: row {i}"
        if len(row) < 6:
            raise CuteGPTError(f"{where}: {len(row)} fields where question,A,B,C,D,answer are needed.")
        out.append(_row_question(subject, str(i - 1), row[:6], where, False))
    if not out:
        raise CuteGPTError(f"{path}: holds no question (a header only, or an empty file).")
    return out


def _csv_benchmark(name: str, data_dir: Path, split: str, only: list[str] | None) -> Benchmark:
    table = resource(name)
    known = table["subjects"]
    split_dir = data_dir / split
    if not split_dir.is_dir():
        raise CuteGPTError(f"{data_dir} has no {split}/ folder: {SOURCES[name]} (its folder holds dev/ and {split}/).")

    def file_of(folder: Path, subject: str, kind: str) -> Path:
        return folder / (f"{subject}.csv" if name == "cmmlu" else f"{subject}_{kind}.csv")

    suffix = ".csv" if name == "cmmlu" else f"_{split}.csv"
    present = sorted(p.name[: -len(suffix)] for p in split_dir.glob(f"*{suffix}"))
    if not present:
        raise CuteGPTError(f"{split_dir} holds no *{suffix} files.")
    for subject in present:
        if subject not in known:
            raise CuteGPTError(f"{split_dir / (subject + suffix)}: subject '{subject}' is not in the {name} subject list.")
    if only:
        for subject in only:
            if subject not in known:
                raise CuteGPTError(f"--subjects: '{subject}' is not a {name} subject (e.g. {', '.join(list(known)[:3])}).")
            if subject not in present:
                raise CuteGPTError(f"{split_dir} has no file for subject '{subject}'.")
        present = [s for s in present if s in only]
    subjects: dict[str, Subject] = {}
    files: list[Path] = []
    for subject in present:
        info = known[subject]
        cats = info.get("categories") or [info["category"]]
        sub = Subject(subject, info.get("zh", info["en"]), info["en"], list(cats))
        path = file_of(split_dir, subject, split)
        files.append(path)
        if name == "ceval":
            sub.questions = read_ceval_csv(path, subject, answer_optional=(split == "test"))
        elif name == "cmmlu":
            sub.questions = read_cmmlu_csv(path, subject)
        else:
            sub.questions = read_mmlu_csv(path, subject)
        dev_path = file_of(data_dir / "dev", subject, "dev")
        sub.dev_file = str(dev_path)
        if dev_path.is_file():
            files.append(dev_path)
            reader = {"ceval": read_ceval_csv, "cmmlu": read_cmmlu_csv, "mmlu": read_mmlu_csv}[name]
            sub.dev = reader(dev_path, subject)
        subjects[subject] = sub
    return Benchmark(name, split, data_dir, list(table["categories"]), subjects, list(table.get("hard", [])), files)


def _xiezhi_top(labels: list[str], tops: dict[str, str], parent: dict[str, str]) -> str | None:
    for label in labels:
        if label in tops:
            return label
    for label in labels:
        if label in parent:
            return parent[label]
    return None


def read_xiezhi(path: Path, tops: dict[str, str], parent: dict[str, str]) -> list[Question]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CuteGPTError(f"{path}: not UTF-8 text.") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CuteGPTError(f"{where}: not valid JSON ({e.msg}).") from None
        for key in ("question", "options", "answer", "labels"):
            if key not in rec:
                raise CuteGPTError(f"{where}: the field '{key}' is missing.")
        options = [o for o in str(rec["options"]).split("\n")]
        if len(options) != 4 or any(not o.strip() for o in options):
            raise CuteGPTError(f"{where}: 'options' must hold 4 non-empty lines, it has {len(options)}.")
        if rec["answer"] not in options:
            raise CuteGPTError(f"{where}: the answer {rec['answer']!r} is not one of the options.")
        labels = rec["labels"] if isinstance(rec["labels"], list) else [rec["labels"]]
        top = _xiezhi_top([str(x) for x in labels], tops, parent) or "其他"
        out.append(Question(top, str(i - 1), str(rec["question"]), tuple(options),
                            LETTERS[options.index(rec["answer"])], where))
    return out


def _xiezhi_parents(data_dir: Path) -> dict[str, str]:
    """Every discipline in the data's taxonomy tree -> its top-level discipline."""
    tree_path = data_dir / "discipline_taxonomy" / "subjects_tree_chn.json"
    if not tree_path.is_file():
        return {}
    parent: dict[str, str] = {}

    def walk(node: Any, top: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                parent.setdefault(str(k), top)
                walk(v, top)
        elif isinstance(node, list):
            for v in node:
                walk(v, top)
        else:
            parent.setdefault(str(node), top)

    for top, sub in json.loads(tree_path.read_text(encoding="utf-8")).items():
        walk(sub, top)
    return parent


def _xiezhi_benchmark(data_dir: Path, split: str, only: list[str] | None) -> Benchmark:
    tops: dict[str, str] = resource("xiezhi")["disciplines"]
    parent = _xiezhi_parents(data_dir)
    path = data_dir / "test" / f"xiezhi_{split}_chn" / "xiezhi.v1.1.json"
    if not path.is_file():
        raise CuteGPTError(f"{path} does not exist: {SOURCES['xiezhi']} (its folder holds test/xiezhi_{split}_chn/).")
    files = [path]
    questions = read_xiezhi(path, tops, parent)
    train_path = data_dir / "train" / "xiezhi_train_chn" / "xiezhi.v1.1.json"
    train = read_xiezhi(train_path, tops, parent) if train_path.is_file() else []
    if train:
        files.append(train_path)
    names = list(tops) + ["其他"]
    subjects: dict[str, Subject] = {}
    for name in names:
        if only and name not in only:
            continue
        sub = Subject(name, name, tops.get(name, "Other"), [name])
        sub.questions = [q for q in questions if q.subject == name]
        sub.dev = [q for q in train if q.subject == name]
        sub.dev_file = str(train_path)
        if sub.questions:
            subjects[name] = sub
    if only:
        for name in only:
            if name not in subjects:
                raise CuteGPTError(f"--subjects: '{name}' is not a XieZhi top-level discipline with questions ({', '.join(tops)}).")
    return Benchmark("xiezhi", split, data_dir, [s for s in names if s in subjects], subjects, [], files)


def load_benchmark(name: str, data_dir: Path, split: str, subjects: list[str] | None = None) -> Benchmark:
    if name not in BENCHMARKS:
        raise CuteGPTError(f"unknown benchmark '{name}'; choose one of {', '.join(BENCHMARKS)}.")
    if split not in SPLITS[name]:
        raise CuteGPTError(f"{name} has no split '{split}'; choose one of {', '.join(SPLITS[name])}.")
    if name == "xiezhi":
        return _xiezhi_benchmark(data_dir, split, subjects)
    return _csv_benchmark(name, data_dir, split, subjects)
