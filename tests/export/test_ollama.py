"""The Ollama Modelfile: its Go TEMPLATE renders what templates.py renders, byte for byte.

The reference is a small renderer of the Go text/template subset the Modelfile
uses (written here from Go's documented semantics: `range $i, $m := …`,
`if`/`else if`/`else`, `eq`, `ne`, `not`, `len`, `slice`, `$` and `.` fields,
`:=` variables, Go truthiness), fed the way ollama feeds a template: the user's
messages, the Modelfile's SYSTEM prepended when the user sends no system
message, consecutive messages of one role merged, all system messages joined
as `.System`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.export.ollama import go_template, modelfile_text
from cutegpt.templates import (
    CUTEGPT_DEFAULTS,
    ChatTemplate,
    CuteGPTTemplate,
    RawTemplate,
    Turn,
)
from tests.tiny import CHATML, build_tokenizer

# ------------------------------------------------------------------ reference Go-template renderer

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|\$?[A-Za-z_]*(?:\.[A-Za-z_]+)*|\$|-?\d+)')


def _parse(template: str) -> list[Any]:
    """Text and actions -> nested nodes: str, ("out", expr), ("set", var, expr), ("if", [(cond, body)...], else), ("range", ...)."""
    items: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    items.append(("text", template[pos:]))
    body, end = _block(items, 0)
    assert end == len(items), "unbalanced {{ end }}"
    return body


def _block(items: list[tuple[str, str]], i: int) -> tuple[list[Any], int]:
    out: list[Any] = []
    while i < len(items):
        kind, s = items[i]
        if kind == "text":
            out.append(s)
            i += 1
        elif s == "end" or s == "else" or s.startswith("else if "):
            return out, i
        elif s.startswith("if "):
            branches, other = [], []
            cond = s[3:]
            while True:
                body, i = _block(items, i + 1)
                branches.append((cond, body))
                tag = items[i][1]
                if tag.startswith("else if "):
                    cond = tag[8:]
                    continue
                if tag == "else":
                    other, i = _block(items, i + 1)
                    assert items[i][1] == "end"
                break
            out.append(("if", branches, other))
            i += 1
        elif s.startswith("range "):
            m = re.fullmatch(r"range \$(\w+), \$(\w+) := (.+)", s)
            assert m, f"unsupported range: {s}"
            body, i = _block(items, i + 1)
            assert items[i][1] == "end"
            out.append(("range", m.group(1), m.group(2), m.group(3), body))
            i += 1
        elif re.fullmatch(r"\$\w+ := .+", s):
            var, expr = s.split(" := ", 1)
            out.append(("set", var[1:], expr))
            i += 1
        else:
            out.append(("out", s))
            i += 1
    return out, i


def _truthy(v: Any) -> bool:
    return bool(v)  # Go: false, 0, "", nil and empty lists are false, as in Python


def _eval(expr: str, dot: Any, root: Any, env: dict[str, Any]) -> Any:
    tokens = [t for t in _TOKEN.findall(expr) if t]
    assert "".join(tokens) == expr.replace(" ", "").replace("\n", "") or '"' in expr, f"untokenised: {expr}"
    value, rest = _command(tokens, dot, root, env)
    assert not rest, f"trailing tokens in {expr}"
    return value


_FUNCS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truthy(a),
    "len": len,
    "slice": lambda x, *ij: x[ij[0]:ij[1]] if len(ij) == 2 else x[ij[0]:],
}


def _command(tokens: list[str], dot: Any, root: Any, env: dict[str, Any]) -> tuple[Any, list[str]]:
    if tokens[0] in _FUNCS:
        args, rest = [], tokens[1:]
        while rest and rest[0] != ")":
            arg, rest = _operand(rest, dot, root, env)
            args.append(arg)
        return _FUNCS[tokens[0]](*args), rest
    return _operand(tokens, dot, root, env)


def _operand(tokens: list[str], dot: Any, root: Any, env: dict[str, Any]) -> tuple[Any, list[str]]:
    t, rest = tokens[0], tokens[1:]
    if t == "(":
        value, rest = _command(rest, dot, root, env)
        assert rest[0] == ")"
        return value, rest[1:]
    if t.startswith('"'):
        return json.loads(t), rest
    if re.fullmatch(r"-?\d+", t):
        return int(t), rest
    if t.startswith("$"):
        head, *fields = t[1:].split(".")
        value = root if head == "" else env[head]
    else:
        assert t.startswith("."), f"unknown identifier {t}"
        value, fields = dot, t[1:].split(".")
    for f in fields:
        if f:
            value = value[f]
    return value, rest


def render_go(template: str, data: dict[str, Any]) -> str:
    out: list[str] = []

    def run(nodes: list[Any], dot: Any, env: dict[str, Any]) -> None:
        for node in nodes:
            if isinstance(node, str):
                out.append(node)
            elif node[0] == "out":
                out.append(str(_eval(node[1], dot, data, env)))
            elif node[0] == "set":
                env[node[1]] = _eval(node[2], dot, data, env)
            elif node[0] == "if":
                for cond, body in node[1]:
                    if _truthy(_eval(cond, dot, data, env)):
                        run(body, dot, dict(env))
                        break
                else:
                    run(node[2], dot, dict(env))
            elif node[0] == "range":
                for i, item in enumerate(_eval(node[3], dot, data, env)):
                    run(node[4], item, {**env, node[1]: i, node[2]: item})

    run(_parse(template), data, {})
    return "".join(out)


def test_reference_renderer_follows_go_semantics():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "System": ""}
    tpl = ('{{ if .System }}S{{ else if eq (len .Messages) 2 }}two{{ else }}other{{ end }}'
           '{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
           '[{{ $i }}:{{ $m.Role }}{{ if $last }}!{{ end }}{{ if ne .Role "user" }}~{{ end }}]{{ end }}\n  {{- "x" -}}  \n')
    assert render_go(tpl, data) == "two[0:user][1:assistant!~]x"


# ------------------------------------------------------------------ ollama's request handling, modelled


def parse_modelfile(text: str) -> dict[str, Any]:
    """TEMPLATE / SYSTEM (triple-quoted, verbatim), FROM and PARAMETER lines of a Modelfile we wrote."""
    out: dict[str, Any] = {"PARAMETER": []}
    for m in re.finditer(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, re.DOTALL | re.MULTILINE):
        out[m.group(1)] = m.group(2)
    for m in re.finditer(r"^(FROM|ADAPTER|PARAMETER) (.+)$", text, re.MULTILINE):
        if m.group(1) in ("FROM", "ADAPTER"):
            out[m.group(1)] = m.group(2)
        else:
            key, value = m.group(2).split(" ", 1)
            out["PARAMETER"].append((key, json.loads(value)))
    return out


def ollama_values(modelfile: dict[str, Any], messages: list[dict[str, str]]) -> dict[str, Any]:
    """What ollama's /api/chat hands the template for `messages` (server/routes.go + template/template.go)."""
    if modelfile.get("SYSTEM") and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": modelfile["SYSTEM"]}] + messages
    collated: list[dict[str, str]] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": collated}


def ollama_render(modelfile: dict[str, Any], messages: list[dict[str, str]]) -> str:
    return render_go(modelfile["TEMPLATE"], ollama_values(modelfile, messages))


def chat_messages(turns: list[Turn], system: str | None) -> list[dict[str, str]]:
    """The conversation as an ollama client sends it (a system message only when one is given)."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for t in turns:
        msgs.append({"role": "user", "content": t.instruction + ("\n" + t.input if t.input else "")})
        if t.output is not None:
            msgs.append({"role": "assistant", "content": t.output})
    return msgs


HISTORY = [Turn("中国的首都是哪里？", output="北京。"), Turn("Translate", "早上好", "Good morning."),
           Turn("Say \"hi\" {{ .System }}", output="hi\n")]
QUESTION = Turn("再说一遍", "第二行")
CONVERSATIONS = [HISTORY[:n] + [QUESTION] for n in range(4)]  # 0-3 answered turns, then an open one
SYSTEMS = [None, "You are terse.", "", "多行\n系统提示"]


def _modelfile(template_name: str, chat_template: str | None = None, system: str | None = None) -> dict[str, Any]:
    text = modelfile_text("m.gguf", go_template(template_name, chat_template), system=system,
                          sampling=CUTEGPT_DEFAULTS, eos="</s>")
    return parse_modelfile(text)


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=lambda t: f"{len(t) - 1}-turns")
@pytest.mark.parametrize("system", SYSTEMS, ids=["default", "override", "empty", "multiline"])
def test_cutegpt_go_template_renders_like_templates_py(turns, system):
    expected = CuteGPTTemplate().prompt(turns, system)
    assert ollama_render(_modelfile("cutegpt"), chat_messages(turns, system)) == expected


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=lambda t: f"{len(t) - 1}-turns")
def test_modelfile_system_flag_is_the_default_system_line(turns):
    """`--system` writes SYSTEM: a client that sends no system message gets it, as chat --system does."""
    mf = _modelfile("cutegpt", system="You are terse.")
    assert ollama_render(mf, chat_messages(turns, None)) == CuteGPTTemplate().prompt(turns, "You are terse.")


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=lambda t: f"{len(t) - 1}-turns")
@pytest.mark.parametrize("system", [None, "You are terse."])
def test_raw_go_template_renders_like_templates_py(turns, system):
    assert ollama_render(_modelfile("raw"), chat_messages(turns, system)) == RawTemplate().prompt(turns, system)


SMOL_STYLE = (  # a default system line when the conversation has none, as SmolLM2's template does
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("jinja", [CHATML, SMOL_STYLE], ids=["chatml", "chatml-default-system"])
def test_chatml_go_template_renders_like_the_models_own(jinja, tmp_path):
    tok = build_tokenizer(tmp_path)
    tok.chat_template = jinja
    reference = ChatTemplate(tok)
    mf = _modelfile("auto", jinja)
    assert mf["PARAMETER"][0] == ("stop", "<|im_end|>")
    assert mf.get("SYSTEM") == ("You are a helpful AI assistant." if jinja is SMOL_STYLE else None)
    for turns in CONVERSATIONS:
        for system in (None, "You are terse."):
            assert ollama_render(mf, chat_messages(turns, system)) == reference.prompt(turns, system)


def test_unknown_jinja_template_is_refused():
    llama2 = "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    with pytest.raises(CuteGPTError, match="no known Go-template equivalent"):
        go_template("auto", llama2)
    with pytest.raises(CuteGPTError, match="no chat template"):
        go_template("auto", None)
    with pytest.raises(CuteGPTError, match="not valid Jinja"):
        go_template("auto", "{% for m in messages %}")
    with pytest.raises(CuteGPTError, match="no known Go-template equivalent"):  # raises on every probe
        go_template("auto", "{{ raise_exception('no system messages') }}")


def test_parameters_come_from_the_template_defaults_and_eos():
    mf = _modelfile("cutegpt")
    assert mf["FROM"] == "./m.gguf"
    assert mf["PARAMETER"] == [("stop", "<end>"), ("stop", "</s>"), ("temperature", 1), ("top_p", 0.8),
                               ("top_k", 50), ("repeat_penalty", 1.1)]
    greedy = parse_modelfile(modelfile_text("m.gguf", go_template("raw"), system=None,
                                            sampling={**CUTEGPT_DEFAULTS, "greedy": True}, eos=None))
    assert ("temperature", 0) in greedy["PARAMETER"] and not any(k == "stop" for k, _ in greedy["PARAMETER"])


def test_triple_quotes_cannot_be_written():
    with pytest.raises(CuteGPTError, match="--system contains three double quotes"):
        modelfile_text("m.gguf", go_template("cutegpt"), system='say """', sampling=CUTEGPT_DEFAULTS, eos=None)


# ------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA whose tokenizer carries a ChatML chat template (so `auto` is its template)."""
    from tests.tiny import build_tiny_llama

    out = tmp_path_factory.mktemp("chatml")
    tok = build_tokenizer(out, chat_template=True)
    build_tiny_llama(out, vocab_size=len(tok))
    return out


def test_cli_writes_modelfile_beside_the_gguf(chatml_dir, tmp_path, capsys):
    from cutegpt.cli import main

    out = tmp_path / "m.gguf"
    args = ["export", "--format", "gguf", "--model", str(chatml_dir), "--out", str(out), "--template", "cutegpt",
            "--no-verify", "--quiet", "--ollama", "--system", "You are terse."]
    assert main(args) == 0
    assert "Modelfile" in capsys.readouterr().out
    mf = parse_modelfile((tmp_path / "Modelfile").read_text(encoding="utf-8"))
    assert mf["FROM"] == "./m.gguf" and mf["SYSTEM"] == "You are terse."
    assert ("stop", "<end>") in mf["PARAMETER"] and ("stop", "</s>") in mf["PARAMETER"]
    assert ("top_p", 0.8) in mf["PARAMETER"]
    turns = CONVERSATIONS[2]
    assert ollama_render(mf, chat_messages(turns, None)) == CuteGPTTemplate().prompt(turns, "You are terse.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]


def test_cli_auto_template_comes_from_the_gguf(chatml_dir, tmp_path, capsys):
    """The model's own ChatML template, read back from the exported file, becomes the Go template."""
    from transformers import AutoTokenizer

    from cutegpt.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(chatml_dir), "--out", str(out), "--no-verify",
                 "--quiet", "--ollama"]) == 0
    mf = parse_modelfile((tmp_path / "Modelfile").read_text(encoding="utf-8"))
    assert "SYSTEM" not in mf and mf["PARAMETER"][:3] == [("stop", "<|im_end|>"), ("stop", "<|im_start|>"), ("stop", "</s>")]
    assert ("temperature", 0) in mf["PARAMETER"]  # greedy, as chat decodes an `auto` model that recommends nothing
    reference = ChatTemplate(AutoTokenizer.from_pretrained(chatml_dir))
    for turns in CONVERSATIONS:
        assert ollama_render(mf, chat_messages(turns, "Be brief.")) == reference.prompt(turns, "Be brief.")
    assert main(["export", "--format", "gguf", "--model", str(chatml_dir), "--out", str(out), "--no-verify",
                 "--quiet", "--ollama"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_cli_refuses_an_existing_modelfile_before_exporting(chatml_dir, tmp_path, capsys):
    from cutegpt.cli import main

    (tmp_path / "Modelfile").write_text("mine\n", encoding="utf-8")
    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(chatml_dir), "--out", str(out), "--ollama"]) == 1
    err = capsys.readouterr().err
    assert "Modelfile already exists" in err and "--overwrite" in err
    assert not out.exists() and (tmp_path / "Modelfile").read_text(encoding="utf-8") == "mine\n"


@pytest.mark.parametrize("args, message", [
    (["--ollama"], "--ollama applies to --format gguf only"),
    (["--format", "gguf", "--system", "x"], "add --ollama"),
    (["--format", "gguf", "--ollama", "--system", 'a """ b'], "three double quotes"),
])
def test_cli_bad_flags(chatml_dir, tmp_path, capsys, args, message):
    from cutegpt.cli import main

    out = tmp_path / ("m.gguf" if "gguf" in args else "merged")
    assert main(["export", "--model", str(chatml_dir), "--out", str(out), *args]) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def chatml_lora(chatml_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A random LoRA adapter on the ChatML model, and the base's GGUF."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cutegpt.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("lora")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(chatml_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out / "adapter")
    base = export_gguf(str(chatml_dir), out / "base.gguf", quant="f32", verify=False, progress=False)
    return out / "adapter", base


@pytest.mark.parametrize("beside", [True, False], ids=["base-beside", "base-elsewhere"])
def test_gguf_lora_modelfile_is_from_base_with_adapter(chatml_dir, chatml_lora, tmp_path, capsys, beside):
    """ollama's documented pair, `FROM <base gguf>` + `ADAPTER <lora gguf>`, with the base's template and stops."""
    from transformers import AutoTokenizer

    from cutegpt.cli import main

    adapter, base = chatml_lora
    if beside:
        base = Path(shutil.copy(base, tmp_path / "base.gguf"))
    out = tmp_path / "lora.gguf"
    assert main(["export", "--format", "gguf-lora", "--lora", str(adapter), "--out", str(out), "--ollama",
                 "--base-gguf", str(base)]) == 0
    assert "Modelfile" in capsys.readouterr().out
    mf = parse_modelfile((tmp_path / "Modelfile").read_text(encoding="utf-8"))
    assert mf["FROM"] == ("./base.gguf" if beside else str(base.resolve())) and mf["ADAPTER"] == "./lora.gguf"
    assert mf["PARAMETER"][:3] == [("stop", "<|im_end|>"), ("stop", "<|im_start|>"), ("stop", "</s>")]
    reference = ChatTemplate(AutoTokenizer.from_pretrained(chatml_dir))
    for turns in CONVERSATIONS:
        assert ollama_render(mf, chat_messages(turns, "Be brief.")) == reference.prompt(turns, "Be brief.")


def test_gguf_lora_modelfile_uses_the_adapters_training_template(chatml_lora, tmp_path):
    """An adapter trained in the cutegpt format answers in it, whatever the base's own template."""
    from cutegpt.cli import main
    from cutegpt.templates import write_model_card

    adapter, base = chatml_lora
    cutegpt_adapter = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    write_model_card(cutegpt_adapter, "cutegpt")
    assert main(["export", "--format", "gguf-lora", "--lora", str(cutegpt_adapter), "--out", str(tmp_path / "a.gguf"),
                 "--ollama", "--base-gguf", str(base)]) == 0
    mf = parse_modelfile((tmp_path / "Modelfile").read_text(encoding="utf-8"))
    turns = CONVERSATIONS[2]
    assert ollama_render(mf, chat_messages(turns, None)) == CuteGPTTemplate().prompt(turns)


@pytest.mark.parametrize("args, message", [
    (["--ollama"], "--ollama with --format gguf-lora needs --base-gguf FILE"),
    (["--ollama", "--base-gguf", "missing.gguf"], "--base-gguf missing.gguf is not a .gguf file"),
    (["--base-gguf", "BASE"], "--base-gguf names the FROM of a LoRA's Modelfile"),  # a real base, without --ollama
    (["--ollama", "--base-gguf", "notes.txt"], "is not a .gguf file"),
])
def test_gguf_lora_modelfile_bad_flags_write_nothing(chatml_lora, tmp_path, capsys, monkeypatch, args, message):
    from cutegpt.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    adapter, base = chatml_lora
    args = [str(base) if a == "BASE" else a for a in args]
    assert main(["export", "--format", "gguf-lora", "--lora", str(adapter), "--out", str(tmp_path / "a.gguf"), *args]) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

func main() {
	var cases []struct {
		Template string         `json:"template"`
		Data     map[string]any `json:"data"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		var b strings.Builder
		if err := template.Must(template.New("").Parse(c.Template)).Execute(&b, c.Data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("go") is None, reason="needs the Go toolchain (`apt-get install golang-go`)")
def test_reference_renderer_agrees_with_go_text_template(tmp_path, chatml_dir):
    """The reference renderer against Go's own text/template, which ollama executes, on every Modelfile template."""
    from transformers import AutoTokenizer

    jinja = AutoTokenizer.from_pretrained(chatml_dir).chat_template
    cases = []
    for mf in (_modelfile("cutegpt"), _modelfile("raw"), _modelfile("auto", jinja), _modelfile("auto", SMOL_STYLE)):
        for turns in CONVERSATIONS:
            for system in SYSTEMS:
                msgs = chat_messages(turns, system)
                for messages in (msgs, msgs + [{"role": "assistant", "content": "partial"}]):
                    cases.append((mf["TEMPLATE"], ollama_values(mf, messages)))
    (tmp_path / "main.go").write_text(GO_RENDER, encoding="utf-8")
    payload = json.dumps([{"template": t, "data": d} for t, d in cases], ensure_ascii=False)
    run = subprocess.run(["go", "run", "main.go"], cwd=tmp_path, input=payload, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "GOCACHE": str(tmp_path / "cache"), "GOFLAGS": "-mod=mod",
                                           "GO111MODULE": "off"})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [render_go(t, d) for t, d in cases]
