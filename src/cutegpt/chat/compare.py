"""`cutegpt compare`: the original CuteGPT README's answer table, and an LLM judge's pairwise verdicts.

    cutegpt compare instructions.jsonl --model full/ --model base/ --lora lora/ --endpoint http://host:8000/v1 \\
                    --judge http://judge:8000/v1 --out compare-results

Input: JSON Lines (or one JSON array) of {"instruction", "input"?, "reference"?, "category"?}; `task` is read as
`category` and `output` as `reference` (the original sample data's field names).

Each model (a folder, an adapter, a GGUF file, the embedded model, or an endpoint) answers every instruction as
one chat turn through `cutegpt generate`'s engines (its backends, templates, generation settings and resume);
an endpoint through its /v1/chat/completions. The results folder:

    compare.md / compare.html   a row per instruction (grouped by category): category | instruction | reference |
                                each model's answer; with --judge, win/tie/loss per model pair and the judge prompt
    compare.jsonl               a line per instruction with every model's answer
    judgments.jsonl             --judge: both orders' judge answers and verdicts for each instruction and model pair
    results.json                models, settings, counts

Judging follows MT-Bench's pairwise protocol: the judge sees the question (and the reference, when there is
one) and two answers, and ends with [[A]], [[B]] or [[C]] (tie). Each pair is judged twice with the answers
swapped; a verdict that flips with the order is a tie. A judge answer without exactly one verdict mark is
counted as unparsed and the pair left out of win/tie/loss (never guessed). Two identical answers are a tie
without asking the judge.

The work happens in OUT.partial/ (answers as they come); it becomes OUT when the tables are written, so an
interrupted run keeps every finished answer and judgment and `--resume` continues it.
It lives beside `generate` (chat/) because it is built on it, as `data pairs` is; the statistics are evaluation's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cutegpt.generation import GenerationArgs
from cutegpt.chat.backend import BACKEND_HELP, EMBEDDED_NAME, Backend
from cutegpt.config import arg
from cutegpt.errors import CuteGPTError
from cutegpt.model.args import ModelArgs
from cutegpt.threads import THREADS_HELP

PARTIAL = ".partial"
VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


@dataclass(kw_only=True)
class CompareConfig(ModelArgs, GenerationArgs):
    """Settings of `cutegpt compare` (model flags from ModelArgs, sampling from GenerationArgs)."""

    input: str = arg("", "instructions: JSON Lines or a JSON array of {instruction, input?, reference?, category?}", positional=True)
    model: list[str] | None = arg(None, "model folder, .gguf file or hub id in the local hub cache; repeat for several models",
                                  aliases=("--model_name_or_path",), repeatable=True,
                                  absent="the embedded SmolLM2-135M-Instruct unless --endpoint is given")
    lora: list[str] | None = arg(None, "LoRA adapter on top of --model; one per --model ('none' for no adapter), or several "
                                 "on one --model", aliases=("--adapter_name_or_path",), repeatable=True)
    endpoint: list[str] | None = arg(None, "an OpenAI-compatible server (cutegpt serve, vLLM, llama.cpp's server) whose model "
                                     "answers too, after the --model ones; repeatable", repeatable=True)
    api_key: str | None = arg(None, "API key for --endpoint (a Bearer token)")
    label: list[str] | None = arg(None, "column names, one per model in order (--model ones, then --endpoint ones)",
                                  repeatable=True, absent="the model's name (file, folder, adapter, served model id)")
    judge: str | None = arg(None, "judge the answers pairwise: an OpenAI-compatible endpoint URL, or a model "
                            "(folder or .gguf) run locally", absent="no judging, the table only")
    judge_api_key: str | None = arg(None, "API key for a --judge endpoint", absent="--api-key")
    judge_language: Literal["en", "zh"] = arg("en", "language of the judge prompt (MT-Bench's pairwise prompt, or its Chinese translation)")
    judge_max_new_tokens: int = arg(512, "most tokens of each judge answer (its explanation and verdict)", ge=1)
    judge_template: str | None = arg(None, "prompt template of a local --judge model", absent="what the judge model records, else auto")
    out: str = arg("compare-results", "results folder (must not exist unless --overwrite)", aliases=("--output", "--output-dir", "--output_dir"))
    overwrite: bool = arg(False, "replace an existing --out folder once the new one is complete")
    resume: bool = arg(False, "continue an interrupted run from OUT.partial/ (every finished answer and judgment kept)")
    batch_size: int = arg(8, "prompts generated together on torch", ge=1)
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    system: str | None = arg(None, "replace the template's system line for the answering models")
    backend: Backend = arg("auto", BACKEND_HELP)

    def check(self) -> None:
        if not self.input:
            raise CuteGPTError("give the instruction file: cutegpt compare instructions.jsonl --model A --model B")
        if self.resume and self.overwrite:
            raise CuteGPTError("--resume continues OUT.partial and --overwrite starts again: give one of them.")
        for url in (self.endpoint or []) + ([self.judge] if self.judge and _is_url(self.judge) else []):
            if not url.startswith(("http://", "https://")):
                raise CuteGPTError(f"--endpoint {url} is not an http:// or https:// URL.")


def _is_url(text: str) -> bool:
    return "://" in text


# --------------------------------------------------------------------------- instructions


@dataclass(frozen=True)
class Instruction:
    instruction: str
    input: str = ""
    reference: str | None = None
    category: str | None = None

    def user_text(self) -> str:
        # instruction + "\n" + input renders the same bytes as a Turn with both (templates.py)
        return self.instruction + (("\n" + self.input) if self.input else "")


FIELDS = {"instruction": ("instruction",), "input": ("input",), "reference": ("reference", "output"), "category": ("category", "task")}


def _instruction(obj: Any, where: str) -> Instruction:
    if not isinstance(obj, dict):
        raise CuteGPTError(f"{where}: expected a JSON object with an 'instruction'.")
    values: dict[str, Any] = {}
    for name, keys in FIELDS.items():
        key = next((k for k in keys if obj.get(k) is not None), None)
        if key is None:
            continue
        if not isinstance(obj[key], str):
            raise CuteGPTError(f"{where}: field '{key}' must be text, not {type(obj[key]).__name__}.")
        values[name] = obj[key]
    if not values.get("instruction", "").strip():
        raise CuteGPTError(f"{where}: field 'instruction' must be non-empty text.")
    return Instruction(values["instruction"], values.get("input", ""), values.get("reference") or None,
                       values.get("category") or None)


def read_instructions(path: Path) -> list[Instruction]:
    """The instruction file: JSON Lines, or one JSON array; every line or element checked, named when wrong."""
    from cutegpt.io import load_json_text, os_errors

    if not path.is_file():
        raise CuteGPTError(f"instruction file {path} does not exist." if not path.exists() else f"instruction file {path} is a folder.")
    with os_errors(path, "reading"):
        raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CuteGPTError(f"instruction file {path} is not UTF-8 text.") from None
    if text.lstrip().startswith("["):
        items = load_json_text(text, str(path))
        out = [_instruction(obj, f"{path}, element {k}") for k, obj in enumerate(items)]
    else:
        out = [_instruction(load_json_text(line, f"{path}, line {n}"), f"{path}, line {n}")
               for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not out:
        raise CuteGPTError(f"instruction file {path} holds no instructions.")
    return out


# --------------------------------------------------------------------------- the models


@dataclass
class Contestant:
    """One column of the table: a local model (a generate config) or an endpoint URL."""

    label: str
    local: Any = None  # GenerateConfig for a local model
    url: str | None = None


def model_label(model: str | None, lora: str | None) -> str:
    """A model's own name: the embedded model's, a GGUF file's or a folder's (never a cache folder), + its adapter."""
    name = EMBEDDED_NAME if model is None else Path(model).name.removesuffix(".gguf") if model.endswith(".gguf") \
        else Path(model).expanduser().resolve().name if Path(model).expanduser().exists() else model
    return name + (f" + {Path(lora).name}" if lora else "")


def contestants(cfg: CompareConfig) -> list[Contestant]:
    from cutegpt.chat.batch import GenerateConfig
    from cutegpt.chat.backend import choose_backend
    from cutegpt.evaluation.cli import model_configs

    out: list[Contestant] = []
    if cfg.model or cfg.lora or not cfg.endpoint:
        for mc in model_configs(cfg):
            gen = GenerateConfig(**{f.name: getattr(mc, f.name) for f in dataclasses.fields(GenerateConfig)
                                    if hasattr(mc, f.name) and f.name not in ("input", "out", "resume", "overwrite")})
            choose_backend(gen)  # a flag the backend cannot honour is named before anything loads
            _check_local(mc.model, mc.lora)  # every model is found before the first one answers into OUT.partial
            out.append(Contestant(model_label(mc.model, mc.lora), local=gen))
    for url in cfg.endpoint or []:
        from cutegpt.evaluation.endpoint import EndpointServer

        out.append(Contestant(served_name(EndpointServer(url, cfg.api_key), "--endpoint"), url=url))
    labels = cfg.label or []
    if labels and len(labels) != len(out):
        raise CuteGPTError(f"--label: {len(labels)} names for {len(out)} models; give one --label per model, in order "
                           f"(--model ones, then --endpoint ones).")
    for c, name in zip(out, labels):
        c.label = name
    names = [c.label for c in out]
    for k, c in enumerate(out):
        if names.count(c.label) > 1:
            c.label = f"{c.label} #{k + 1}"
    return out


def _check_local(model: str | None, lora: str | None) -> None:
    """One sentence for a --model or --lora that cannot load, read from the files alone (nothing loads)."""
    from cutegpt.model.hub import resolve_model_path
    from cutegpt.model.loading import _check_model_folder

    if model:
        path = resolve_model_path(model, "--model")
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise CuteGPTError(f"--model {model}: " + ("it is a folder, not a GGUF file." if path.exists() else "no such file."))
        else:
            _check_model_folder(path)
    if lora:
        path = resolve_model_path(lora, "--lora")
        if path.suffix.lower() == ".gguf" and not path.is_file():
            raise CuteGPTError(f"--lora {lora}: " + ("it is a folder, not a GGUF file." if path.exists() else "no such file."))
        if path.suffix.lower() != ".gguf" and not (path / "adapter_config.json").is_file():
            raise CuteGPTError(f"--lora {lora} is not a LoRA adapter folder (no adapter_config.json)."
                               if path.exists() else f"--lora {lora} does not exist.")


def served_name(server: Any, flag: str) -> str:
    """The model id the server announces (else its URL); a server that cannot be reached is refused now, before
    any work folder exists."""
    import urllib.error
    import urllib.request

    name = server.model_id()
    if name is None:
        try:
            urllib.request.urlopen(server.base + "/health", timeout=30).close()
        except urllib.error.HTTPError:
            pass  # it answers: a server without /health or /v1/models
        except (urllib.error.URLError, OSError) as e:
            raise CuteGPTError(f"{flag} {server.url} cannot be reached ({getattr(e, 'reason', e)}); is the server running?") from None
    return name or server.url


def endpoint_sampling(gen: GenerationArgs) -> dict[str, Any] | None:
    """The sampling flags the user gave, in OpenAI / llama.cpp names; None = greedy (the default for an unset --greedy
    would be the server's own: pass only what was given)."""
    out: dict[str, Any] = {}
    if gen.greedy:
        out.update(temperature=0.0, top_k=1)
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("repetition_penalty", "repeat_penalty"), ("seed", "seed")):
        value = getattr(gen, ours)
        if value is not None and not (gen.greedy and ours in ("temperature", "top_k")):
            out[theirs] = value
    return out


def answer_with_endpoint(url: str, api_key: str | None, prompts: list[dict[str, Any]], out: Path,
                         max_tokens: int, sampling: dict[str, Any] | None, resume: bool) -> None:
    """Like `cutegpt generate` on a server: each answer appended to OUT.partial as it comes, which becomes `out`
    when all are done; a resumed run keeps the complete lines and starts after them."""
    from tqdm import tqdm

    from cutegpt.evaluation.endpoint import EndpointServer
    from cutegpt.io import os_errors

    if out.is_file():
        return
    server = EndpointServer(url, api_key)
    partial = out.with_name(out.name + PARTIAL)
    done = _complete_lines(partial, prompts) if resume and partial.is_file() else 0
    with os_errors(partial, "writing"), partial.open("ab" if done else "wb") as f, \
            tqdm(total=len(prompts), initial=done, desc=f"answers from {url}", unit="prompt") as bar:
        for rec in prompts[done:]:
            answer = server.chat(rec["messages"], max_tokens, sampling)
            f.write((json.dumps({**rec, "answer": answer}, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            bar.update(1)
    os.replace(partial, out)


def _complete_lines(partial: Path, prompts: list[dict[str, Any]]) -> int:
    """How many answers of `partial` belong, line by line, to `prompts` (a torn last line is dropped)."""
    kept, good = 0, 0
    with partial.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                obj = json.loads(raw)
            except ValueError:
                raise CuteGPTError(f"{partial}, line {kept + 1}: not JSON; remove the line and run --resume again, "
                                   f"or start again with --overwrite.") from None
            if kept >= len(prompts) or not isinstance(obj, dict) or {k: v for k, v in obj.items() if k != "answer"} != prompts[kept]:
                raise CuteGPTError(f"{partial}: answer {kept + 1} is not for the prompt of this run; start again with --overwrite.")
            kept, good = kept + 1, good + len(raw)
    with partial.open("r+b") as f:
        f.truncate(good)
    return kept


def answer_locally(gen_cfg: Any, prompts: list[dict[str, Any]], work: Path, name: str, resume: bool) -> Path:
    """`cutegpt generate` on `prompts` into work/name.jsonl (resumed when its .partial is there)."""
    from cutegpt.chat.batch import run_generate

    src, out = work / f"{name}-prompts.jsonl", work / f"{name}.jsonl"
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts)
    if not src.is_file() or src.read_text(encoding="utf-8") != text:
        src.write_text(text, encoding="utf-8")
    if out.is_file():
        return out
    partial = out.with_name(out.name + PARTIAL)
    rc = run_generate(dataclasses.replace(gen_cfg, input=str(src), out=str(out), overwrite=not partial.exists(),
                                          resume=resume and partial.exists()))
    if rc:
        raise KeyboardInterrupt  # generate reported the interruption and kept its answers
    return out


def read_answers(path: Path) -> list[str]:
    return [str(json.loads(line)["answer"]) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- the judge

JUDGE_SYSTEM = {
    "en": ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
           "user question displayed below. You should choose the assistant that follows the user's instructions and answers "
           "the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, "
           "depth, creativity, and level of detail of their responses.{ref_note} Begin your evaluation by comparing the two "
           "responses and provide a short explanation. Avoid any position biases and ensure that the order in which the "
           "responses were presented does not influence your decision. Do not allow the length of the responses to influence "
           "your evaluation. Do not favor certain names of the assistants. Be as objective as possible. After providing your "
           "explanation, output your final verdict by strictly following this format: \"[[A]]\" if assistant A is better, "
           "\"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."),
    "zh": ("请作为一名公正的评审，评价两个AI助手对下面用户问题所给回答的质量。你应选择更好地遵循用户指令、更好地回答用户问题的助手。"
           "评价应考虑回答的有用性、相关性、准确性、深度、创造性和详细程度。{ref_note}请先比较两个回答，并给出简短的解释。"
           "避免任何位置偏见，确保回答的呈现顺序不影响你的判断。不要让回答的长度影响你的评价。不要偏向助手的某个名字。尽可能客观。"
           "给出解释后，严格按照以下格式输出最终结论：助手A更好输出\"[[A]]\"，助手B更好输出\"[[B]]\"，平局输出\"[[C]]\"。"),
}
REF_NOTE = {
    "en": " A reference answer is given: compare both responses with it and identify their mistakes.",
    "zh": "题目附有参考答案：请将两个回答与参考答案比较，指出其中的错误。",
}
JUDGE_USER = {
    "en": ("[User Question]\n{question}\n\n{reference}[The Start of Assistant A's Answer]\n{answer_a}\n"
           "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"),
    "zh": ("[用户问题]\n{question}\n\n{reference}[助手A的回答开始]\n{answer_a}\n[助手A的回答结束]\n\n"
           "[助手B的回答开始]\n{answer_b}\n[助手B的回答结束]"),
}
JUDGE_REFERENCE = {
    "en": "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n",
    "zh": "[参考答案开始]\n{reference}\n[参考答案结束]\n\n",
}


def judge_messages(item: Instruction, answer_a: str, answer_b: str, language: str) -> list[dict[str, str]]:
    """MT-Bench's pairwise prompt (pair-v2; with a reference, its reference-guided variant)."""
    ref = item.reference is not None
    system = JUDGE_SYSTEM[language].format(ref_note=REF_NOTE[language] if ref else "")
    reference = JUDGE_REFERENCE[language].format(reference=item.reference) if ref else ""
    user = JUDGE_USER[language].format(question=item.user_text(), reference=reference, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'C' (tie) when the answer holds verdict marks of exactly one kind; None otherwise (unparsed)."""
    found = set(VERDICT.findall(text))
    return found.pop() if len(found) == 1 else None


def combine(first: str | None, second: str | None) -> str:
    """The result for the first model of a pair, from the verdicts with it as A (`first`) and as B (`second`):
    win, loss or tie when both orders agree, tie when they disagree ('flip'), 'unparsed' when one is missing."""
    if first is None or second is None:
        return "unparsed"
    as_first = {"A": "win", "B": "loss", "C": "tie"}[first]
    swapped = {"A": "loss", "B": "win", "C": "tie"}[second]
    return as_first if as_first == swapped else "flip"


def pair_summary(results: list[str]) -> dict[str, Any]:
    """Counts of win / tie / loss (flips and identical answers count as ties) and each share's 95% Wilson interval
    over the judged pairs; unparsed pairs are counted apart."""
    from cutegpt.evaluation.results import wilson

    wins, losses = results.count("win"), results.count("loss")
    flips, same = results.count("flip"), results.count("identical")
    ties = results.count("tie") + flips + same
    n = wins + losses + ties
    share = {k: {"count": c, "percent": round(100.0 * c / n, 1) if n else None,
                 "ci95": [round(x, 1) for x in wilson(c, n)] if n else None}
             for k, c in (("win", wins), ("tie", ties), ("loss", losses))}
    return {**share, "judged": n, "flips": flips, "identical": same, "unparsed": results.count("unparsed"),
            "win_rate": round(100.0 * (wins + 0.5 * ties) / n, 1) if n else None}


# --------------------------------------------------------------------------- writing the table


def _order(items: list[Instruction]) -> list[int]:
    """Rows grouped by category in order of first appearance, the file's order within each."""
    first: dict[str | None, int] = {}
    for k, it in enumerate(items):
        first.setdefault(it.category, k)
    return sorted(range(len(items)), key=lambda k: (first[items[k].category], k))


def _columns(items: list[Instruction], labels: list[str], answers: list[list[str]]) -> tuple[list[str], list[list[str | None]]]:
    """The table's head and rows: category and reference only when some instruction has one."""
    has_cat, has_ref = any(it.category for it in items), any(it.reference for it in items)
    head = (["category"] if has_cat else []) + ["instruction"] + (["reference"] if has_ref else []) + labels
    rows = [([items[k].category] if has_cat else []) + [items[k].user_text()] + ([items[k].reference] if has_ref else [])
            + [a[k] for a in answers] for k in _order(items)]
    return head, rows


def _md_cell(text: str | None) -> str:
    if text is None:
        return ""
    return html.escape(text.strip(), quote=False).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _fmt_share(s: dict[str, Any]) -> str:
    if s["percent"] is None:
        return f"{s['count']}"
    return f"{s['count']} ({s['percent']:.1f}%, 95% CI {s['ci95'][0]:.1f}–{s['ci95'][1]:.1f})"


def verdict_rows(labels: list[str], summaries: dict[tuple[int, int], dict[str, Any]]) -> list[list[str]]:
    return [[labels[i], labels[j], _fmt_share(s["win"]), _fmt_share(s["tie"]), _fmt_share(s["loss"]),
             "-" if s["win_rate"] is None else f"{s['win_rate']:.1f}%", str(s["flips"]), str(s["unparsed"])]
            for (i, j), s in summaries.items()]


VERDICT_HEAD = ["model", "against", "win", "tie", "loss", "win rate (ties ½)", "flips (ties)", "unparsed"]


def markdown(items: list[Instruction], labels: list[str], answers: list[list[str]], judge: dict[str, Any] | None) -> str:
    head, cells = _columns(items, labels, answers)
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    for row in cells:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    text = "\n".join(lines) + "\n"
    if judge:
        text += (f"\n## Pairwise verdicts (judge: {_md_cell(judge['name'])})\n\nEach pair judged in both orders; a verdict "
                 "that flips with the order is a tie, identical answers are a tie without judging; intervals are 95% Wilson "
                 "intervals of each share.\n\n| " + " | ".join(VERDICT_HEAD) + " |\n|" + "---|" * len(VERDICT_HEAD) + "\n")
        text += "".join("| " + " | ".join(_md_cell(c) for c in r) + " |\n" for r in judge["rows"])
        text += "\n### Judge prompt\n\n```text\n" + judge["prompt"].replace("```", "'''") + "\n```\n"
    return text


STYLE = ("body{font-family:system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse;width:100%}"
         "th,td{border:1px solid #ccc;padding:.4em;vertical-align:top;text-align:left}th{background:#f3f3f3}"
         "td{white-space:pre-wrap}pre{white-space:pre-wrap;background:#f7f7f7;padding:1em}")


def html_page(items: list[Instruction], labels: list[str], answers: list[list[str]], judge: dict[str, Any] | None,
              title: str) -> str:
    """One self-contained page (no script, no external file); every text escaped."""
    e = html.escape
    head, cells = _columns(items, labels, answers)
    rows = ["<tr>" + "".join(f"<td>{e((c or '').strip())}</td>" for c in row) + "</tr>" for row in cells]
    parts = [f"<!DOCTYPE html>\n<html lang=\"zh\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>{e(title)}</h1>",
             "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>",
             "\n".join(rows), "</tbody></table>"]
    if judge:
        parts += [f"<h2>Pairwise verdicts (judge: {e(judge['name'])})</h2>",
                  "<p>Each pair judged in both orders; a verdict that flips with the order is a tie, identical answers are a tie "
                  "without judging; intervals are 95% Wilson intervals of each share.</p>",
                  "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in VERDICT_HEAD) + "</tr></thead><tbody>",
                  "\n".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in judge["rows"]),
                  "</tbody></table>", "<h3>Judge prompt</h3>", f"<pre>{e(judge['prompt'])}</pre>"]
    return "\n".join(parts) + "\n</body></html>\n"


# --------------------------------------------------------------------------- the run


def _settings(cfg: CompareConfig, items_hash: str, people: list[Contestant]) -> dict[str, Any]:
    """What OUT.partial's answers were made with; --resume refuses other settings."""
    gen = {f: getattr(cfg, f) for f in GenerationArgs.__dataclass_fields__}
    return {"input_sha256": items_hash, "models": [c.local.model if c.local else c.url for c in people],
            "loras": [c.local.lora if c.local else None for c in people], "template": cfg.template, "system": cfg.system,
            "generation": gen, "judge": cfg.judge, "judge_language": cfg.judge_language,
            "judge_max_new_tokens": cfg.judge_max_new_tokens, "judge_template": cfg.judge_template}


def _start_work(cfg: CompareConfig, work: Path, settings: dict[str, Any]) -> None:
    from cutegpt.io import os_errors

    saved = work / "settings.json"
    if work.exists() and not cfg.resume:
        if not cfg.overwrite:
            raise CuteGPTError(f"an interrupted run left {work}: add --resume to continue it, or --overwrite to start again.")
        shutil.rmtree(work)
    if cfg.resume and work.is_dir() and saved.is_file():
        before = json.loads(saved.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise CuteGPTError(f"--resume: {work} was made with other settings ({', '.join(changed)}); restore them, or start "
                               f"again with --overwrite.")
    with os_errors(work, "creating the work folder"):
        work.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(settings, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _judge_runner(cfg: CompareConfig) -> tuple[str, Any]:
    """The judge's name and a function answering a list of message prompts into a file."""
    if _is_url(cfg.judge):
        from cutegpt.evaluation.endpoint import EndpointServer

        key = cfg.judge_api_key or cfg.api_key
        name = served_name(EndpointServer(cfg.judge, key), "--judge")
        return name, lambda prompts, out, resume: answer_with_endpoint(cfg.judge, key, prompts, out, cfg.judge_max_new_tokens,
                                                                       None, resume)
    from cutegpt.chat.batch import GenerateConfig

    gen = GenerateConfig(model=cfg.judge, template=cfg.judge_template, greedy=True, max_new_tokens=cfg.judge_max_new_tokens,
                         threads=cfg.threads, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
                         trust_remote_code=cfg.trust_remote_code)
    if not Path(cfg.judge).expanduser().exists():
        raise CuteGPTError(f"--judge {cfg.judge} is neither an http(s) URL nor an existing model folder or .gguf file.")
    name = model_label(cfg.judge, None)

    def run(prompts: list[dict[str, Any]], out: Path, resume: bool) -> None:
        try:
            answer_locally(gen, prompts, out.parent, out.stem, resume)
        except CuteGPTError as e:  # generate names its own files; the user knows the judge by its flag
            raise CuteGPTError(f"--judge {cfg.judge}: {e}") from None

    return name, run


def run_compare(cfg: CompareConfig) -> int:
    from cutegpt.io import check_output, put_in_place

    out = Path(cfg.out)
    work = out.with_name(out.name + PARTIAL)
    source = Path(cfg.input)
    if cfg.resume and out.is_dir() and not work.exists():
        print(f"nothing to do: {out} is complete (no {work.name} to continue).", file=sys.stderr)
        return 0
    check_output(out, flag="--out", inputs=[source, *(cfg.model or []), *(cfg.lora or []),
                                             cfg.judge if cfg.judge and not _is_url(cfg.judge) else None], overwrite=cfg.overwrite)
    items = read_instructions(source)
    people = contestants(cfg)
    if cfg.judge and len(people) < 2:
        raise CuteGPTError("--judge compares answers pairwise: give at least two models (--model / --endpoint).")
    items_hash = hashlib.sha256(json.dumps([dataclasses.asdict(it) for it in items], ensure_ascii=False).encode()).hexdigest()
    judge_name, judge_run = _judge_runner(cfg) if cfg.judge else (None, None)
    _start_work(cfg, work, _settings(cfg, items_hash, people))

    prompts = [{"messages": ([{"role": "system", "content": cfg.system}] if cfg.system is not None else [])
                + [{"role": "user", "content": it.user_text()}]} for it in items]
    answers: list[list[str]] = []
    try:
        for n, c in enumerate(people, 1):
            print(f"[{n}/{len(people)}] {c.label}", flush=True)
            path = work / f"answers-{n}.jsonl"
            if c.url:
                gen = GenerationArgs.of(cfg)
                answer_with_endpoint(c.url, cfg.api_key, prompts, path, gen.max_new_tokens or 256,
                                     endpoint_sampling(gen), cfg.resume)
            else:
                answer_locally(c.local, prompts, work, path.stem, cfg.resume)
            answers.append(read_answers(path))
        judge = None
        if cfg.judge:
            judge = judge_all(cfg, items, people, answers, work, judge_name, judge_run)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished answers are in {work}; run the same command with --resume to continue.", file=sys.stderr)
        return 130

    labels = [c.label for c in people]
    title = f"{source.name}: {len(items)} instructions, {len(labels)} models"
    with open(work / "compare.jsonl", "w", encoding="utf-8") as f:
        for k, it in enumerate(items):
            f.write(json.dumps({**dataclasses.asdict(it), "answers": {lab: a[k] for lab, a in zip(labels, answers)}},
                               ensure_ascii=False) + "\n")
    (work / "compare.md").write_text(f"# {title}\n\n" + markdown(items, labels, answers, judge), encoding="utf-8")
    (work / "compare.html").write_text(html_page(items, labels, answers, judge, title), encoding="utf-8")
    results = {"input": str(source), "instructions": len(items),
               "models": [{"label": c.label, "model": c.local.model if c.local else None,
                           "lora": c.local.lora if c.local else None, "endpoint": c.url} for c in people],
               "settings": _settings(cfg, items_hash, people)}
    if judge:
        results["judge"] = {k: v for k, v in judge.items() if k != "rows"}
    (work / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if out.exists() and not cfg.overwrite:
        raise CuteGPTError(f"--out {out} appeared while this run was working (another run on the same --out?); "
                           f"the results stay in {work}.")
    put_in_place(work, out)
    if judge:
        print(f"\njudge {judge['name']}: win / tie / loss of each model against each other")
        for r in judge["rows"]:
            print(f"  {r[0]} vs {r[1]}: win {r[2]}, tie {r[3]}, loss {r[4]}; flips {r[6]}, unparsed {r[7]}")
        if any(s["unparsed"] for s in judge["pairs"]):
            print("(unparsed: a judge answer without exactly one [[A]]/[[B]]/[[C]] mark; those pairs are left out, "
                  "each answer is in judgments.jsonl)")
    print(f"results: {out}/ (compare.md, compare.html, compare.jsonl)")
    return 0


def judge_all(cfg: CompareConfig, items: list[Instruction], people: list[Contestant], answers: list[list[str]],
              work: Path, name: str, run: Any) -> dict[str, Any]:
    """Every model pair on every instruction, both orders, through one judge run (resumable like the answers)."""
    pairs = [(i, j) for i in range(len(people)) for j in range(i + 1, len(people))]
    asks: list[dict[str, Any]] = []
    where: dict[tuple[int, int, int], int] = {}  # (pair, instruction, order) -> line of the judge run
    for p, (i, j) in enumerate(pairs):
        for k, it in enumerate(items):
            if answers[i][k].strip() == answers[j][k].strip():
                continue
            for order, (a, b) in enumerate(((i, j), (j, i))):
                where[(p, k, order)] = len(asks)
                asks.append({"messages": judge_messages(it, answers[a][k].strip(), answers[b][k].strip(), cfg.judge_language)})
    print(f"judge {name}: {len(asks)} judgments ({len(pairs)} model pairs x {len(items)} instructions x 2 orders, "
          f"identical answers skipped)", flush=True)
    said: list[str] = []
    if asks:
        path = work / "judgments-raw.jsonl"
        run(asks, path, cfg.resume)
        said = read_answers(path)
    summaries: dict[tuple[int, int], dict[str, Any]] = {}
    with open(work / "judgments.jsonl", "w", encoding="utf-8") as f:
        for p, (i, j) in enumerate(pairs):
            outcomes = []
            for k in range(len(items)):
                if (p, k, 0) not in where:
                    result, orders = "identical", []
                else:
                    texts = [said[where[(p, k, o)]] for o in (0, 1)]
                    verdicts = [parse_verdict(t) for t in texts]
                    result = combine(*verdicts)
                    orders = [{"A": people[a].label, "B": people[b].label, "judge_answer": t, "verdict": v}
                              for (a, b), t, v in zip(((i, j), (j, i)), texts, verdicts)]
                outcomes.append(result)
                f.write(json.dumps({"instruction": k, "model": people[i].label, "against": people[j].label,
                                    "result": result, "orders": orders}, ensure_ascii=False) + "\n")
            summaries[(i, j)] = pair_summary(outcomes)
    labels = [c.label for c in people]
    prompt_shown = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in judge_messages(
        Instruction("{question}", reference="{reference}" if any(it.reference for it in items) else None),
        "{answer_a}", "{answer_b}", cfg.judge_language))
    return {"name": name, "language": cfg.judge_language, "prompt": prompt_shown, "rows": verdict_rows(labels, summaries),
            "pairs": [{"model": labels[i], "against": labels[j], **s} for (i, j), s in summaries.items()]}
