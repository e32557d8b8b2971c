"""Issue 11, "keep it true": sweep every command's flags with bad values and bad paths.

For every command in `cutegpt.cli.COMMANDS` whose module imports, the flags are read from
its config dataclass (`cutegpt.config.visible_fields`), so a new flag is swept as soon as it
exists:

  numbers   0, -1, a huge value and a non-number. A value outside the declared bounds
            (ge/gt/le/lt) must give exit 1 and one line naming the flag; a value inside them
            (0 for --threads, -1 for --max-steps) must parse (or be refused by the config's own
            check, naming the flag). Nothing else is decided by hand.
  choices   a value that is not one of the choices.
  paths     inputs: a missing path, a file for a folder, a folder for a file, a folder named
            x.gguf; outputs: an existing output, a file for a folder and vice versa, a
            read-only place (the OSError is injected: we run as root, where chmod does not
            stop writes), an output that is, or lies inside, an input.

Each case runs in-process through `cutegpt.cli.main` and must give exit 1, one line on stderr
naming the flag or the path, no traceback, no "unexpected", and leave every file as it was
(checksums of the work folder and of the shared inputs before and after).

Every text flag must be classified below as a path (input/output, file/folder) or not a path:
an unclassified new flag fails `test_every_text_flag_is_classified`. Cases that fail in
another helper's area are listed in KNOWN with the reason, as strict xfails.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import importlib
import io
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path

import pytest

from cutegpt.cli import COMMANDS, main
from cutegpt.config import _is_list, _unwrap_optional, flag_name, parse_config, visible_fields
from cutegpt.errors import CuteGPTError

# ---------------------------------------------------------------- what each text flag is

# field -> (role, kind); role in/out, kind file/folder/any (any = a file or a folder are both fine)
PATHS: dict[str, tuple[str, str]] = {
    "model": ("in", "model"), "lora": ("in", "folder"), "resume_lora": ("in", "folder"), "input": ("in", "file"),
    "data": ("in", "any"), "dataset": ("in", "folder"), "corpus": ("in", "any"), "pieces": ("in", "any"),
    "deepspeed": ("in", "file"), "sft_data": ("in", "any"), "eval_data": ("in", "folder"), "val_data": ("in", "any"),
    "out": ("out", "folder"), "plot": ("out", "file"), "sdist": ("in", "file"),
}
PATHS_BY_COMMAND: dict[tuple[tuple[str, ...], str], tuple[str, str]] = {
    (("generate",), "out"): ("out", "file"),
    (("data", "pairs"), "out"): ("out", "file"),
    (("eval",), "data"): ("in", "folder"),
    (("data", "convert"), "input"): ("in", "any"),
    (("export",), "base_gguf"): ("in", "file"),
}
# outputs that may lie inside an input by design (the plot's default place is DATASET/lengths.png):
# for them the case writes over a part of the input instead
INSIDE_BY_DESIGN = {(("data", "stats"), "plot"): "data"}
NOT_PATHS = {"template", "system", "text_field", "split", "eval_split", "lora_targets", "modules_to_save", "subjects",
             "api_key", "host", "engine", "backend", "prompt", "target_delimiter", "report_to", "endpoint",
             "entries",  # cutegpt cache: names of cache entries, checked against the cache
             "cmake_args",  # llamacpp build: arguments for CMake
             "name",  # export: the model's name inside the GGUF
             "label", "judge", "judge_api_key", "judge_template"}  # compare: column names; a judge URL or model


def path_role(words: tuple[str, ...], name: str) -> tuple[str, str] | None:
    return PATHS_BY_COMMAND.get((words, name)) or PATHS.get(name)


# ---------------------------------------------------------------- commands and their valid base settings


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


ALL_COMMANDS = list(COMMANDS)
LIVE = [w for w in ALL_COMMANDS if _importable(COMMANDS[w][0])]


def config_class(words: tuple[str, ...]) -> type:
    module, cls, *_ = COMMANDS[words]
    return getattr(importlib.import_module(module), cls)


def base_spec(words: tuple[str, ...], s: dict[str, Path]) -> dict[str, typing.Any]:
    """Settings with which the command would run (quickly, on the tiny model); outputs relative to the work folder."""
    m = str(s["model"])
    return {
        ("chat",): dict(model=m, input=str(s["chat_in"]), max_new_tokens=2, greedy=True, threads=1),
        ("generate",): dict(input=str(s["prompts"]), model=m, out="answers.jsonl", max_new_tokens=2, greedy=True, threads=1),
        ("compare",): dict(input=str(s["prompts"]), model=[m], out="compare", max_new_tokens=2, greedy=True, threads=1),
        ("serve",): dict(model=m),
        ("data", "convert"): dict(input=[str(s["conv"])], out="ds-new", model=m, max_length=64),
        ("data", "pairs"): dict(input=str(s["qa"]), model=m, out="pairs.jsonl", max_new_tokens=2, greedy=True, threads=1),
        ("train", "dpo"): dict(model=m, data=[str(s["pairs"])], out="dpo", max_steps=1, micro_batch=1, grad_accum=1, threads=1,
                               max_length=64),
        ("data", "stats"): dict(dataset=str(s["dataset"]), plot="plot.png"),
        ("data", "show"): dict(dataset=str(s["dataset"]), index=0, model=m, color=False),
        ("train", "sft"): dict(model=m, data=[str(s["dataset"])], out="sft", max_steps=1, micro_batch=1, grad_accum=1, threads=1,
                               max_length=64),
        ("train", "pt"): dict(model=m, data=[str(s["corpus"])], out="pt", max_steps=1, micro_batch=1, grad_accum=1, threads=1,
                              max_length=32),
        ("export",): dict(model=m, lora=str(s["lora"]), out="merged"),
        ("eval",): dict(benchmark="ceval", model=m, data=str(s["ceval"]), out="eval", limit=1, shots=0, threads=1),
        ("vocab", "train"): dict(out="zh", corpus=[str(s["corpus"])], model=m, vocab_size=400),
        ("vocab", "extend"): dict(model=m, pieces=str(s["pieces"]), out="ext"),
        ("cache",): dict(),
        ("llamacpp", "build"): dict(),
        ("recipe",): dict(out="recipe", model=m, corpus=[str(s["corpus"])], sft_data=str(s["sft"]), eval_data=str(s["ceval"]),
                          vocab_size=400, pt_steps=1, sft_steps=1, max_length=64, micro_batch=1, threads=1, max_new_tokens=2,
                          eval_limit=1, eval_base=False),
    }[words]


def argv_of(words: tuple[str, ...], spec: dict[str, typing.Any]) -> list[str]:
    cls = config_class(words)
    fields = {f.name: f for f in visible_fields(cls)}
    argv = list(words)
    for name, f in fields.items():  # positionals in declaration order
        if f.metadata.get("positional") and name in spec:
            v = spec[name]
            argv += [str(x) for x in v] if isinstance(v, list) else [str(v)]
    for name, v in spec.items():
        f = fields[name]
        if f.metadata.get("positional"):
            continue
        if v is True:
            argv.append(flag_name(name))
        elif v is False:
            argv.append("--no-" + flag_name(name)[2:])
        elif v is not None:
            argv += [flag_name(name), *([str(x) for x in v] if isinstance(v, list) else [str(v)])]
    return argv


# ---------------------------------------------------------------- shared inputs (made once)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    from cutegpt.data.convert import ConvertConfig, convert
    from cutegpt.recipe import RecipeConfig, write_bundled
    from tests.data.conftest import CONVERSATIONS

    root = tmp_path_factory.mktemp("sweep-shared")
    s: dict[str, Path] = {"root": root, "model": root / "model"}
    shutil.copytree(tiny_model_dir, s["model"])
    bundle = write_bundled(root / "bundle", RecipeConfig(out=str(root / "unused")))
    s["corpus"], s["sft"], s["ceval"] = bundle["corpus"], bundle["sft"], bundle["eval"]
    s["conv"] = root / "conv.jsonl"
    s["conv"].write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in CONVERSATIONS) + "\n", encoding="utf-8")
    s["prompts"] = root / "prompts.jsonl"
    s["prompts"].write_text('{"instruction": "hi"}\n', encoding="utf-8")
    s["qa"] = root / "qa.jsonl"
    s["qa"].write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "2+2?", "output": "4"}\n', encoding="utf-8")
    s["pairs"] = root / "pairs.jsonl"
    s["pairs"].write_text('{"instruction": "hi", "chosen": "hello", "rejected": "go away"}\n'
                          '{"instruction": "2+2?", "chosen": "4", "rejected": "5"}\n', encoding="utf-8")
    s["chat_in"] = root / "chat.txt"
    s["chat_in"].write_text("hi\n", encoding="utf-8")
    s["dataset"] = convert(ConvertConfig(input=[str(s["conv"])], out=str(root / "dataset"), model=str(s["model"]), max_length=64))
    s["lora"] = root / "lora"
    _make_adapter(s["model"], s["lora"])
    from cutegpt.vocab.train import VocabTrainConfig, run_vocab_train

    s["pieces"] = root / "pieces"
    run_vocab_train(VocabTrainConfig(out=str(s["pieces"]), corpus=[str(s["corpus"])], model=str(s["model"]), vocab_size=400))
    return s


def _make_adapter(model_dir: Path, out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(out)


def tree(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            key = str(p)
            if p.is_symlink():
                out[key] = "link"
            elif p.is_dir():
                out[key] = "dir"
            else:
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture()
def work(tmp_path, monkeypatch, shared):
    """A fresh work folder as the current directory; caches kept outside it."""
    w = tmp_path / "work"
    w.mkdir()
    monkeypatch.chdir(w)
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    return w


def check_refused(argv: list[str], names: list[str], capsys, *roots: Path) -> None:
    before = tree(*roots)
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 1, f"exit {code} for {argv}; stderr: {err[-500:]}"
    assert err.startswith("error: ") and "\n" not in err, f"not one line: {err[-800:]}"
    assert "Traceback" not in err + captured.out and "unexpected" not in err, err
    assert any(n in err for n in names), f"names none of {names}: {err}"
    assert tree(*roots) == before, "files changed on disk"


# ---------------------------------------------------------------- read-only places, injected


@contextlib.contextmanager
def read_only(root: Path, monkeypatch, code: int = errno.EROFS):
    """Make `root` behave as a read-only folder: os.access says so, and writes under it raise EROFS.

    With code=ENOSPC it is a full disk instead: access is granted, every write fails.
    """
    root = root.resolve()
    message = os.strerror(code)

    def under(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(root)
        except (TypeError, ValueError):
            return False

    def deny(path):
        raise OSError(code, message, os.fsdecode(path))

    real_access, real_mkdir, real_open, real_os_open = os.access, os.mkdir, builtins.open, os.open
    real_replace, real_rename = os.replace, os.rename

    def access(path, mode, *a, **k):
        if code == errno.EROFS and mode & os.W_OK and under(path):
            return False
        return real_access(path, mode, *a, **k)

    def mkdir(path, *a, **k):
        if under(path):
            deny(path)
        return real_mkdir(path, *a, **k)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and under(file):
            deny(file)
        return real_open(file, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            deny(path)
        return real_os_open(path, flags, *a, **k)

    def replace(src, dst, *a, **k):
        if under(dst) or under(src):
            deny(dst)
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", replace)
    try:
        yield
    finally:
        monkeypatch.undo()


# ---------------------------------------------------------------- the cases


def _hints(words):
    cls = config_class(words)
    return cls, typing.get_type_hints(cls)


def _scalar_type(tp):
    base, _ = _unwrap_optional(tp)
    is_list, item = _is_list(tp)
    return (item if is_list else base), is_list


HUGE = {int: "1" + "0" * 30, float: "1e30"}


def numeric_cases():
    for words in LIVE:
        cls, hints = _hints(words)
        for f in visible_fields(cls):
            t, is_list = _scalar_type(hints[f.name])
            if t not in (int, float):
                continue
            for label, value in (("zero", "0"), ("minus1", "-1"), ("huge", HUGE[t]), ("nan-text", "abc")):
                yield pytest.param(words, f.name, label, value, id=f"{'-'.join(words)}:{f.name}:{label}")


def _violates(bounds: dict, value: float) -> bool:
    return any(not {"ge": value >= b, "gt": value > b, "le": value <= b, "lt": value < b}[k] for k, b in bounds.items())


def choice_cases():
    for words in LIVE:
        cls, hints = _hints(words)
        for f in visible_fields(cls):
            t, _ = _scalar_type(hints[f.name])
            if typing.get_origin(t) is typing.Literal:
                yield pytest.param(words, f.name, id=f"{'-'.join(words)}:{f.name}")


INPUT_CASES = ("missing", "file_for_folder", "folder_for_file", "gguf_folder")
OUTPUT_CASES = ("exists", "file_for_folder", "folder_for_file", "read_only", "inside_input", "is_input")


def path_cases():
    for words in LIVE:
        cls, hints = _hints(words)
        for f in visible_fields(cls):
            t, _ = _scalar_type(hints[f.name])
            role = path_role(words, f.name) if t is str else None
            if role is None:
                continue
            direction, kind = role
            for case in (INPUT_CASES if direction == "in" else OUTPUT_CASES):
                if case == "file_for_folder" and kind not in ("folder", "model"):
                    continue
                if case == "folder_for_file" and kind != "file":
                    continue
                if case == "gguf_folder" and kind != "model":
                    continue
                yield pytest.param(words, f.name, case, id=f"{'-'.join(words)}:{f.name}:{case}")


# Cases that fail outside the safety helper's area (strict: they must start passing when fixed).
# Filled from a run of this sweep; the reason names the owner.
_EVAL = ("evalfix helper: eval checks --out only after the model loads (existing/file/read-only/inside an input); "
         "call io.check_output before loading (an existing --out with --resume is legitimate: say so)")
KNOWN: dict[str, str] = {
}


def _known(params):
    for p in params:
        reason = KNOWN.get(p.id)
        yield pytest.param(*p.values, id=p.id, marks=pytest.mark.xfail(strict=True, reason=reason)) if reason else p


# ---------------------------------------------------------------- tests


def test_every_command_is_swept():
    missing = [w for w in ALL_COMMANDS if w not in LIVE]
    assert all(w == ("serve",) for w in missing), f"commands whose module does not import: {missing}"
    assert {w for w in ALL_COMMANDS if w != ("serve",)} <= set(LIVE)


@pytest.mark.parametrize("words", LIVE, ids=lambda w: "-".join(w))
def test_every_text_flag_is_classified(words):
    cls, hints = _hints(words)
    loose = [f.name for f in visible_fields(cls)
             if _scalar_type(hints[f.name])[0] is str and path_role(words, f.name) is None and f.name not in NOT_PATHS]
    assert not loose, f"classify these flags of `cutegpt {' '.join(words)}` in tests/test_sweep.py (PATHS or NOT_PATHS): {loose}"


@pytest.mark.parametrize("words", LIVE, ids=lambda w: "-".join(w))
def test_base_settings_parse(words, shared):
    """The settings each case starts from are valid, so a refusal is the swept value's."""
    argv = argv_of(words, base_spec(words, shared))
    parse_config(config_class(words), argv[len(words):], prog="cutegpt " + " ".join(words))


@pytest.mark.parametrize("words,name,label,value", list(_known(numeric_cases())))
def test_numeric_flag(words, name, label, value, shared, work, capsys):
    cls, hints = _hints(words)
    f = next(f for f in visible_fields(cls) if f.name == name)
    t, _ = _scalar_type(hints[name])
    spec = dict(base_spec(words, shared))
    spec[name] = value
    argv = argv_of(words, spec)
    names = [flag_name(name, f.metadata.get("positional", False)), "--" + name, *f.metadata.get("aliases", ())]
    bounds = f.metadata.get("bounds") or {}
    number = float(value) if label != "nan-text" else None
    if number is not None and not _violates(bounds, number) and not (t is float and abs(number) > 1e300):
        # valid by its declared bounds: it must parse (or be refused by the config's own check, naming the flag)
        try:
            parse_config(cls, argv[len(words):], prog="cutegpt " + " ".join(words))
        except CuteGPTError as e:
            assert any(n in str(e) for n in names), str(e)
        return
    check_refused(argv, names, capsys, work, shared["root"])


@pytest.mark.parametrize("words,name", list(_known(choice_cases())))
def test_choice_flag(words, name, shared, work, capsys):
    spec = dict(base_spec(words, shared))
    spec[name] = "no-such-choice"
    cls = config_class(words)
    f = next(f for f in visible_fields(cls) if f.name == name)
    check_refused(argv_of(words, spec), [flag_name(name, f.metadata.get("positional", False))], capsys, work, shared["root"])


def _set_path(spec: dict, cls, name: str, value: str) -> None:
    _, is_list = _scalar_type(typing.get_type_hints(cls)[name])
    spec[name] = [value] if is_list else value


@pytest.mark.parametrize("words,name,case", list(_known(path_cases())))
def test_path_flag(words, name, case, shared, work, capsys, monkeypatch):
    cls = config_class(words)
    f = next(f for f in visible_fields(cls) if f.name == name)
    direction, kind = path_role(words, name)
    spec = dict(base_spec(words, shared))
    fields = {g.name for g in visible_fields(cls)}
    names = [flag_name(name, f.metadata.get("positional", False))]
    if direction == "in":
        target = {"missing": work / "nonexistent-9", "file_for_folder": work / "plain-file.txt",
                  "folder_for_file": work / "plain-folder", "gguf_folder": work / "x.gguf"}[case]
        if case == "file_for_folder":
            target.write_text("not what was asked for\n")
        elif case in ("folder_for_file", "gguf_folder"):
            target.mkdir()
        _set_path(spec, cls, name, str(target))
        names.append(target.name)
        check_refused(argv_of(words, spec), names, capsys, work, shared["root"])
        return
    # outputs
    target = work / ("out-" + name + (".png" if name == "plot" else ".jsonl" if kind == "file" else ""))
    if "overwrite" in fields and case not in ("exists",):
        spec["overwrite"] = True  # the refusal must come from the case itself, not from "already exists"
    if case == "exists":
        if kind == "file":
            target.write_text("old answers\n")
        else:
            target.mkdir()
            (target / "old.txt").write_text("old result\n")
        spec.pop("overwrite", None)
    elif case == "file_for_folder":
        if kind != "folder":
            pytest.skip("the output is a file")
        target.write_text("a file where a folder goes\n")
    elif case == "folder_for_file":
        if kind != "file":
            pytest.skip("the output is a folder")
        target.mkdir()
        (target / "keep.txt").write_text("keep\n")
    elif case in ("inside_input", "is_input"):
        inputs = [g.name for g in visible_fields(cls) if (path_role(words, g.name) or ("",))[0] == "in" and spec.get(g.name)]
        if not inputs:
            pytest.skip("the command has no input path set")
        src_name = inputs[0]
        given = spec[src_name][0] if isinstance(spec[src_name], list) else spec[src_name]
        copy = work / ("input-" + Path(given).name)
        (shutil.copytree if Path(given).is_dir() else shutil.copy2)(given, copy)
        _set_path(spec, cls, src_name, str(copy))
        if case == "is_input":
            target = copy
        else:
            if not copy.is_dir():
                pytest.skip("the input is a file")
            target = copy / INSIDE_BY_DESIGN.get((words, name), "sub")
        names.append(target.name)
    elif case == "read_only":
        ro = work / "ro"
        ro.mkdir()
        target = ro / target.name
        names.append("ro")
    names.append(target.name)
    spec[name] = str(target)
    argv = argv_of(words, spec)
    if case == "read_only":
        before = tree(work, shared["root"])
        with read_only(work / "ro", monkeypatch):
            code = main(argv)
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert code == 1, f"exit {code}; stderr: {err[-500:]}"
        assert err.startswith("error: ") and "\n" not in err and "unexpected" not in err, err[-800:]
        assert any(n in err for n in names), err
        assert tree(work, shared["root"]) == before
        return
    check_refused(argv, names, capsys, work, shared["root"])


# ---------------------------------------------------------------- disk full at the write (every command that writes)

WRITERS = [w for w in LIVE if "out" in {f.name for f in visible_fields(config_class(w))}]
_PROGRESS = ("{owner}: the whole run happens before the write fails, and its progress bar ({bar}) goes to stderr, so the "
             "error is not one line (the sentence itself is right); check --out before loading and end the bar before the error")
DISK_FULL_KNOWN: dict[str, str] = {}


@pytest.mark.parametrize("words", [pytest.param(w, id="-".join(w), marks=pytest.mark.xfail(strict=True, reason=DISK_FULL_KNOWN["-".join(w)]))
                                   if "-".join(w) in DISK_FULL_KNOWN else pytest.param(w, id="-".join(w)) for w in WRITERS])
def test_disk_full_is_one_sentence_and_leaves_nothing(words, shared, work, capsys, monkeypatch):
    """ENOSPC injected at every write under the work folder: one sentence naming a path, nothing half-written."""
    spec = dict(base_spec(words, shared))
    before = tree(work, shared["root"])
    with read_only(work, monkeypatch, errno.ENOSPC):
        code = main(argv_of(words, spec))
    err = capsys.readouterr().err.strip()
    assert code == 1, err[-500:]
    # a command may have shown a progress bar before the write failed; the error itself is one last line
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err[-800:]
    assert "Traceback" not in err and "unexpected" not in err, err[-800:]
    err = lines[0]
    assert "disk is full" in err and Path(spec["out"]).name in err, err
    assert tree(work, shared["root"]) == before


# ---------------------------------------------------------------- leftovers of killed runs (item 14)


def test_model_cache_leftovers_are_cleaned_at_start(tmp_path, monkeypatch):
    from cutegpt.model import embedded

    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    try:
        gguf = embedded.embedded_gguf()
    except CuteGPTError:
        pytest.skip("the embedded model package is not installed")
    from cutegpt.model.tokenizer import RULE_VERSION

    key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}:{RULE_VERSION}".encode()).hexdigest()[:12]
    models = embedded.cache_dir() / "models"
    target = models / f"smollm2-135m-instruct-{key}"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # already converted: no conversion needed
    dead = models / f".{target.name}.tmp-999999999-abc"  # a pid that cannot be alive
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    old = models / f".{target.name}.old-999999999"
    old.mkdir()
    assert embedded.embedded_model_dir() == target
    assert not dead.exists() and not old.exists()


def test_leftovers_beside_an_output_are_cleaned(tmp_path, shared, work, capsys):
    """data convert (through atomic_dir) removes a killed run's temporary folder beside --out."""
    dead = work / ".ds-new.tmp-999999999-abc"
    dead.mkdir()
    (dead / "half").write_text("x")
    spec = dict(base_spec(("data", "convert"), shared))
    assert main(argv_of(("data", "convert"), spec)) == 0
    assert not dead.exists() and (work / "ds-new" / "manifest.json").is_file()


# ---------------------------------------------------------------- several --data sources for train sft (item 7, 13)


def test_train_sft_two_dataset_folders_named_right(shared, work, capsys):
    other = work / "dir2"
    shutil.copytree(shared["dataset"], other)
    spec = dict(base_spec(("train", "sft"), shared))
    spec["data"] = [str(shared["dataset"]), str(other)]
    check_refused(argv_of(("train", "sft"), spec), ["is a converted dataset folder"], capsys, work, shared["root"])


def test_train_sft_several_conversation_files(shared, work, capsys):
    import pickle

    from tests.data.conftest import CONVERSATIONS

    b = work.parent / "b.pkl"
    b.write_bytes(pickle.dumps(CONVERSATIONS[:2]))
    spec = dict(base_spec(("train", "sft"), shared))
    spec["data"] = [str(shared["conv"]), f"{b}:2"]
    assert main(argv_of(("train", "sft"), spec)) == 0, capsys.readouterr().err[-500:]
