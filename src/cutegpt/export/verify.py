"""Check a GGUF file in llama.cpp (through xllamacpp) against the HF model it came from.

    (a) tokenization   the probe corpus (cutegpt.model.probes: white space, text after every special and added
                       token, digits in several scripts, CJK, emoji, code, the template's turn boundaries):
                       llama.cpp ids == the reference tokenizer's ids, id for id, with and without BOS/EOS
    (b) top-1          next-token argmax at every position of a probe corpus agrees with transformers
                       (threshold per quant type); f32/f16/bf16 must also give the same greedy continuation
    (c) template       llama.cpp's Jinja engine renders the embedded chat template like templates.py

llama.cpp runs in-process (xllamacpp.Server); its HTTP side, bound to 127.0.0.1 on a
free port, answers /tokenize and /apply-template.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

from cutegpt.errors import CuteGPTError
from cutegpt.runtime.llamacpp import LlamaCpp

PROBE_TEXT = (
    "Hello, world! The quick brown fox jumps over 13 lazy dogs. 你好，世界！今天天气很好，我们去公园散步吧。\n"
    "def add(a, b):\n    return a + b  # 加法 <end>\n"
    "Emoji 😀🚀 and naïve café — «quotes» 1234567890\t tabs  double  spaces"
)
PROBE_CORPUS = (
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and its cafes.",
    "中国的首都是北京。北京是一座历史悠久的城市，有故宫、长城和天坛。",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Machine learning is a branch of artificial intelligence. 机器学习是人工智能的一个分支。",
)
GREEDY_TOKENS = 16
# minimum top-1 agreement per type: exact types must match (measured: F16 agrees 100%), quantized ones must be sane (a broken file agrees at chance level; tiny random models quantize badly)
THRESHOLDS = {"f32": 0.99, "f16": 0.99, "bf16": 0.95, "q8_0": 0.85, "q5_1": 0.5, "q5_0": 0.5, "q4_1": 0.4, "q4_0": 0.4,
              "q6_k": 0.7, "q5_k_m": 0.5, "q4_k_m": 0.4}
EXACT = ("f32", "f16")
TIE = 0.05  # logit gap below which two next tokens are a tie (llama.cpp keeps the KV cache in f16)


def template_conversations() -> list[tuple[list[dict[str, str]], Any]]:
    """(messages, turns, system) cases for check (c): history, custom system, Chinese and English."""
    from cutegpt.templates import Turn

    return [
        ([{"role": "user", "content": "你好"}], ([Turn("你好")], None)),
        ([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "中国的首都是哪里？"}],
         ([Turn("What is 2+2?", output="4"), Turn("中国的首都是哪里？")], "You are a helpful assistant.")),
    ]


def verify_gguf(path: Path, folder: Path, tokenizer: Any, quant: str, template_name: str, progress: bool = True,
                threads: int = 1) -> dict[str, Any]:
    """Run checks (a)-(c) with llama.cpp on `threads` threads; raise CuteGPTError naming the first failed check."""
    report: dict[str, Any] = {}
    with LlamaCpp(path, threads=threads) as cpp:
        report["tokenization"] = _check_tokenization(cpp, tokenizer)

        # (c) template
        report["template"] = _check_template(cpp, tokenizer, template_name)

        # (b) top-1 agreement and greedy continuation
        report["top1"] = _check_top1(cpp, folder, tokenizer, quant, progress)
    return report


def verify_tokenizer(path: Path, tokenizer: Any, template_name: str, threads: int = 1) -> dict[str, Any]:
    """Checks (a) and (c) only, for a file whose weights are known to be right (a GGUF rewritten at another type)."""
    with LlamaCpp(path, threads=threads) as cpp:
        return {"tokenization": _check_tokenization(cpp, tokenizer), "template": _check_template(cpp, tokenizer, template_name)}


def _check_tokenization(cpp: LlamaCpp, tokenizer: Any) -> dict[str, Any]:
    """(a): every probe text, id for id, with and without the BOS/EOS the tokenizer adds."""
    from cutegpt.model.probes import probe_texts

    texts = [PROBE_TEXT] + probe_texts(tokenizer)
    nfc = _normalizes_nfc(tokenizer)
    if nfc:  # llama.cpp does not NFC-normalize (Qwen2's tokenizer does): compare on text that is NFC already
        texts = list(dict.fromkeys(unicodedata.normalize("NFC", text) for text in texts))
    n_tokens = 0
    for text in texts:
        for add in (False, True):
            hf = list(tokenizer(text, add_special_tokens=add)["input_ids"])
            ll = cpp.tokenize(text, add_special=add)
            n_tokens += len(hf)
            if hf != ll:
                at = next((i for i, (a, b) in enumerate(zip(hf, ll)) if a != b), min(len(hf), len(ll)))
                raise CuteGPTError(
                    f"verification failed (tokenization): llama.cpp tokenizes the probe text {text[:40]!r} differently from the "
                    f"HF tokenizer from token {at} on ({hf[at:at + 3]} vs {ll[at:at + 3]}{', special tokens added' if add else ''}); "
                    "the file was not kept.")
    return {"ok": True, "probe_texts": len(texts), "probe_tokens": n_tokens,
            **({"note": "probe texts NFC-normalized: the tokenizer normalizes to NFC and llama.cpp does not, so "
                        "text sent to llama.cpp as text (not ids) should be NFC"} if nfc else {})}


def _normalizes_nfc(tokenizer: Any) -> bool:
    """Whether the fast tokenizer's normalizer (or one step of it) is NFC."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return False
    try:
        spec = json.loads(backend.to_str()).get("normalizer") or {}
    except (ValueError, AttributeError):
        return False
    steps = spec.get("normalizers", []) if spec.get("type") == "Sequence" else [spec]
    return any(isinstance(s, dict) and s.get("type") == "NFC" for s in steps)


def _check_template(cpp: LlamaCpp, tokenizer: Any, template_name: str) -> dict[str, Any]:
    from cutegpt.templates import get_template

    if template_name == "raw" or (template_name == "auto" and not getattr(tokenizer, "chat_template", None)):
        return {"ok": True, "checked": 0}
    n = 0
    for messages, (turns, system) in template_conversations():
        if template_name == "cutegpt":
            want = get_template("cutegpt").prompt(turns, system)
        else:
            want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        got = cpp.apply_template(messages)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and want.startswith(bos) and not got.startswith(bos):
            want = want[len(bos):]  # llama.cpp drops a template's leading BOS text: tokenizing adds BOS as a token
        if got != want:
            raise CuteGPTError(
                f"verification failed (chat template): llama.cpp renders the embedded {template_name} template as {got[-60:]!r} "
                f"where cutegpt renders {want[-60:]!r}; the file was not kept.")
        n += 1
    return {"ok": True, "checked": n}


def _check_top1(cpp: LlamaCpp, folder: Path, tokenizer: Any, quant: str, progress: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    need = _fp32_bytes(folder)
    avail = _available_memory()
    if avail is not None and need > avail * 0.8:
        return {"ok": None, "skipped": f"needs {need / 2**30:.1f} GiB for the float32 reference, {avail / 2**30:.1f} GiB available"}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    agree = total = 0
    greedy_same = True
    ties = 0
    first_diff = None
    texts = list(PROBE_CORPUS)
    from tqdm import tqdm

    for text in tqdm(texts, desc="verify top-1", disable=not progress, leave=False):
        ids = list(tokenizer(text)["input_ids"])
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        for k in range(1, len(ids)):  # the next token after each prefix
            total += 1
            agree += int(cpp.greedy(ids[:k], 1) == [ref[k - 1]])
        prompt = ids[: max(2, len(ids) // 2)]
        want = _hf_greedy(model, prompt, GREEDY_TOKENS)
        got = cpp.greedy(prompt, GREEDY_TOKENS)
        if not got or got != want[: len(got)]:  # llama.cpp may stop early at a token it treats as end of generation
            j = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), 0)
            margin = _margin(model, prompt + want[:j], want[j], got[j] if got else want[j])
            if margin > TIE:
                greedy_same = False
                first_diff = first_diff or text[:30]
            else:  # transformers itself hesitated: its two choices are closer than float rounding
                ties += 1
    del model
    rate = agree / max(total, 1)
    threshold = THRESHOLDS[quant]
    result = {"ok": True, "agreement": round(rate, 4), "positions": total, "threshold": threshold,
              "greedy_same": greedy_same, "greedy_tokens": GREEDY_TOKENS,
              "greedy_near_ties": ties}
    if rate < threshold:
        raise CuteGPTError(
            f"verification failed (top-1 agreement): llama.cpp's next token agrees with transformers at {rate:.1%} of "
            f"{total} positions, below the {threshold:.0%} a {quant} file must reach; the file was not kept.")
    if quant in EXACT and not greedy_same:
        raise CuteGPTError(
            f"verification failed (greedy continuation): llama.cpp's {GREEDY_TOKENS} greedy tokens after {first_diff!r}... "
            f"differ from transformers' on a {quant} file; the file was not kept.")
    return result


def _margin(model: Any, ids: list[int], a: int, b: int) -> float:
    """transformers' logit of token `a` minus that of `b` after `ids`."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    return float(logits[a] - logits[b])


def _hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """`n` argmax tokens from transformers, no logits processors (generate's min/max-length rules differ from llama.cpp's)."""
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):  # whole sequence each step: short probes, and no KV-cache API to keep up with
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def _fp32_bytes(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += 4 * n
    return total


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
