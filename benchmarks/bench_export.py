"""GGUF export of the embedded model: cutegpt vs llama.cpp's own convert_hf_to_gguf.py, side by side.

For f16 and q8_0 each side converts the embedded SmolLM2-135M-Instruct HF folder in a fresh
process (one thread); the table shows wall time and peak RSS of that process (os.wait4), then
the two files are compared: metadata keys and values, tensor names, types, shapes and bytes.
Finally a projection for a 13B LLaMA from the measured throughput and the streaming design.

With --archs: the tiny Llama-3, Mistral, Qwen2, Qwen3 and Gemma 2 models of the tests instead, medians of
--repeats interleaved runs. The converter refuses byte-level BPE vocabularies it does not list; here it is run
with one change, the pre-tokenizer name cutegpt chose for an unlisted one (KNOWN_PRE_WRAPPER).

llama.cpp's converter ships in the llama-cpp-python sdist; run it in its own venv with that
checkout's gguf-py:

    mkdir -p /tmp/llcpp && cd /tmp/llcpp
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    python -m venv --system-site-packages venv && venv/bin/pip install --no-deps llama_cpp_python-*/vendor/llama.cpp/gguf-py
    cd -; OMP_NUM_THREADS=1 python benchmarks/bench_export.py --llamacpp /tmp/llcpp/llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --python /tmp/llcpp/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import cpu_model  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def run(cmd: list[str], env: dict[str, str], refusal_ok: bool = False) -> Any:
    """Wall seconds and peak RSS bytes of one child process (refusal_ok: its last error line, a str, when it fails)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        if refusal_ok:
            return (err.strip().splitlines() or ["failed"])[-1][:160]
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def compare(ours: Path, ref: Path) -> dict:
    import gguf
    import numpy as np

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    fa = {k: v for k, v in a.fields.items() if not k.startswith("GGUF")}
    fb = {k: v for k, v in b.fields.items() if not k.startswith("GGUF")}
    diff = sorted(k for k in fa.keys() & fb.keys() if fa[k].contents() != fb[k].contents())
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    same_layout = {n: (t.tensor_type, tuple(t.shape)) for n, t in ta.items()} == {n: (t.tensor_type, tuple(t.shape)) for n, t in tb.items()}
    different_bytes = [n for n in ta.keys() & tb.keys() if not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
    types = {}
    for t in a.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"only_ours": sorted(fa.keys() - fb.keys()), "only_ref": sorted(fb.keys() - fa.keys()), "different_values": diff,
            "same_tensor_layout": same_layout, "tensors_with_different_bytes": len(different_bytes), "tensor_types": types,
            "tensors": len(ta)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llamacpp", required=True, help="llama.cpp checkout (holds convert_hf_to_gguf.py)")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the converter's venv")
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per tool and model (medians)")
    ap.add_argument("--no-verified-run", dest="verified_run", action="store_false",
                    help="skip the extra timing of cutegpt's export with verification (embedded model)")
    ap.add_argument("--archs", action="store_true",
                    help="instead of the embedded model: the tiny Llama-3, Mistral, Qwen2, Qwen3 and Gemma 2 models of the tests")
    args = ap.parse_args()
    if args.archs:
        return bench_archs(args)

    sys.path.insert(0, str(SRC))
    from cutegpt.model.embedded import embedded_model_dir

    folder = embedded_model_dir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    ours_env = dict(env, PYTHONPATH=str(SRC))
    converter = str(Path(args.llamacpp) / "convert_hf_to_gguf.py")
    src_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    import platform
    import statistics

    print(f"embedded model folder: {src_bytes / 2**20:.0f} MiB of safetensors; CPU: {cpu_model() or platform.processor()}; load "
          f"average at the start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; one thread; medians of {args.repeats} "
          "interleaved runs")
    print("| quant | tool | seconds | peak RSS MiB | file MiB |\n|---|---|---|---|---|")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for q in args.quants:
            ours = Path(tmp) / f"ours-{q}.gguf"
            ref = Path(tmp) / f"ref-{q}.gguf"
            cmd_ours = [sys.executable, "-m", "cutegpt", "export", "--format", "gguf", "--out", str(ours), "--quant", q, "--no-verify",
                        "--quiet", "--overwrite"]
            cmd_ref = [args.python, converter, str(folder), "--outtype", q, "--outfile", str(ref)]
            runs_ours, runs_ref = [], []
            for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both tools alike
                runs_ours.append(run(cmd_ours, ours_env))
                runs_ref.append(run(cmd_ref, env))
            r_ours = tuple(statistics.median(r[i] for r in runs_ours) for i in (0, 1))
            r_ref = tuple(statistics.median(r[i] for r in runs_ref) for i in (0, 1))
            for tool, (wall, rss), path in (("cutegpt export", r_ours, ours), ("convert_hf_to_gguf.py", r_ref, ref)):
                print(f"| {q} | {tool} | {wall:.1f} | {rss / 2**20:.0f} | {path.stat().st_size / 2**20:.1f} |", flush=True)
            results[q] = {"ours": r_ours, "ref": r_ref, "compare": compare(ours, ref)}
        if args.verified_run:
            verify_out = Path(tmp) / "verify-f16.gguf"
            wall_v, rss_v = run([sys.executable, "-m", "cutegpt", "export", "--format", "gguf", "--out", str(verify_out), "--quant", "f16", "--quiet"], ours_env)
            print(f"\ncutegpt export f16 with verification (llama.cpp + transformers checks): {wall_v:.1f} s, peak RSS {rss_v / 2**20:.0f} MiB")
    for q, r in results.items():
        c = r["compare"]
        print(f"\n{q}: {c['tensors']} tensors {c['tensor_types']}; same names/types/shapes as llama.cpp's: {c['same_tensor_layout']}; "
              f"tensors with different bytes: {c['tensors_with_different_bytes']}")
        print(f"  metadata only in ours: {c['only_ours']}; only in llama.cpp's: {c['only_ref']}; different values: {c['different_values']}")
        print(f"  time ours / llama.cpp {r['ours'][0] / r['ref'][0]:.2f}x, peak RSS ours / llama.cpp {r['ours'][1] / r['ref'][1]:.2f}x")

    # 13B projection: time scales with bytes read; memory = the process's fixed part + the largest tensor's working set.
    import torch  # noqa: F401  (the fixed part is what an idle exporter process holds after imports)

    base = run([sys.executable, "-c", "import torch, transformers, gguf, safetensors, numpy; import cutegpt.export.gguf"], ours_env)[1]
    emb_rows, hidden = 70000, 5120  # CuteGPT-13B: LLaMA-13B with a 70k vocabulary, untied head, stored in fp16
    n13 = 40 * (4 * hidden * hidden + 3 * hidden * 13824) + 2 * emb_rows * hidden + 81 * hidden
    largest = emb_rows * hidden
    chunk = 4096 * hidden * 4
    for q, r in results.items():
        ours_s = r["ours"][0]
        per_param = ours_s / (src_bytes / 4)  # the embedded folder stores float32
        out_bytes = 2 if q == "f16" else 34 / 32
        mem = base + largest * 2 + largest * out_bytes + 6 * chunk
        print(f"13B projection, {q}: about {per_param * n13 / 60:.0f} min at this machine's rate "
              f"({n13 / 1e9:.1f}B parameters), peak RSS about {mem / 2**30:.1f} GiB "
              f"(imports {base / 2**30:.2f} GiB + the 70k x 5120 embedding in fp16 and as {q} + conversion chunks)")


def bench_archs(args: argparse.Namespace) -> None:
    """Each supported architecture as a tiny random model (tests/export/archs.py): both tools, side by side."""
    import platform
    import statistics

    # only the names are needed here; tests/export/archs.py imports torch, which would raise every child's peak RSS
    variants = _variant_names(ROOT / "tests" / "export" / "archs.py")

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    ours_env = dict(env, PYTHONPATH=str(SRC))
    print(f"CPU: {cpu_model() or platform.processor()}; load average at the start {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores; one thread; medians of {args.repeats} interleaved runs; tiny 2-layer models")
    print("| model | quant | cutegpt s | converter s | time ratio | cutegpt RSS MiB | converter RSS MiB | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|")
    notes: list[str] = []
    pairs: list[tuple[str, str, Path, Path]] = []
    ratios: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        # built in a child process: a child's peak RSS starts from its parent's at fork, so this one stays small
        subprocess.run([sys.executable, "-c", BUILD, tmp, json.dumps(variants)], env=dict(ours_env, PYTHONPATH=f"{SRC}{os.pathsep}{ROOT}"),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        for label in variants:
            folder = Path(tmp) / label
            for q in args.quants:
                ours, ref = Path(tmp) / f"{label}-ours-{q}.gguf", Path(tmp) / f"{label}-ref-{q}.gguf"
                cmd_ours = [sys.executable, "-m", "cutegpt", "export", "--format", "gguf", "--model", str(folder), "--out",
                            str(ours), "--quant", q, "--template", "auto", "--no-verify", "--quiet", "--overwrite"]
                runs_ours, runs_ref = [], []
                for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both tools alike
                    runs_ours.append(run(cmd_ours, ours_env))
                    runs_ref.append(run(_converter_cmd(args, folder, q, ref, _pre_of(ours)), env))
                t_o, m_o = statistics.median(r[0] for r in runs_ours), statistics.median(r[1] for r in runs_ours)
                t_r, m_r = statistics.median(r[0] for r in runs_ref), statistics.median(r[1] for r in runs_ref)
                ratios.append((t_o / t_r, m_o / m_r))
                print(f"| {label} | {q} | {t_o:.1f} | {t_r:.1f} | {t_o / t_r:.2f}x | {m_o / 2**20:.0f} | "
                      f"{m_r / 2**20:.0f} | {m_o / m_r:.2f}x |", flush=True)
                pairs.append((label, q, ours, ref))
        for label, q, ours, ref in pairs:  # after every run: reading GGUF here would raise the children's RSS floor
            c = compare(ours, ref)
            notes.append(f"{label} {q}: {c['tensors']} tensors {c['tensor_types']}; same names/types/shapes: "
                         f"{c['same_tensor_layout']}; tensors with different bytes: {c['tensors_with_different_bytes']}; "
                         f"metadata only in ours: {c['only_ours']}; only in the converter's: {c['only_ref']}; "
                         f"different values: {c['different_values']}")
    print(f"\nall rows: time ratio {min(r[0] for r in ratios):.2f}-{max(r[0] for r in ratios):.2f}x "
          f"(median {statistics.median(r[0] for r in ratios):.2f}x), RSS ratio {min(r[1] for r in ratios):.2f}-"
          f"{max(r[1] for r in ratios):.2f}x")
    print("\n".join(notes))


# llama.cpp's converter names a byte-level BPE pre-tokenizer only by the fingerprint of a vocabulary it lists
# (get_vocab_base_pre), so it refuses any other (the tests' tiny vocabularies, a `vocab extend`ed one). This runs
# it unchanged except there: an unknown fingerprint gets the name cutegpt chose from the pre-tokenizer's rules
# (read from cutegpt's file), as if the converter's table listed that vocabulary.
KNOWN_PRE_WRAPPER = """
import runpy, sys
converter, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, str(__import__("pathlib").Path(converter).parent))
from conversion.base import TextModel
listed = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return listed(self, tokenizer)
    except NotImplementedError:
        return pre
TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [converter, *sys.argv[3:]]
runpy.run_path(converter, run_name="__main__")
"""


def _converter_cmd(args: argparse.Namespace, folder: Path, q: str, out: Path, pre: str | None) -> list[str]:
    converter = str(Path(args.llamacpp) / "convert_hf_to_gguf.py")
    tail = [str(folder), "--outtype", q, "--outfile", str(out)]
    if pre is None or pre == "default":  # SentencePiece: nothing to name
        return [args.python, converter, *tail]
    return [args.python, "-c", KNOWN_PRE_WRAPPER, converter, pre, *tail]


def _pre_of(path: Path) -> str | None:
    """tokenizer.ggml.pre of a GGUF file, read from its header in a child (no gguf import here: it would raise the
    RSS every later child starts from)."""
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from cutegpt.model.gguf_header import read_metadata; "
            "print(read_metadata(__import__('pathlib').Path(sys.argv[1])).get('tokenizer.ggml.pre', ''))")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(SRC)], capture_output=True, text=True, check=True)
    return out.stdout.strip() or None


BUILD = """
import json, sys
from pathlib import Path
from tests.export.archs import build_arch_variant
tmp, names = Path(sys.argv[1]), json.loads(sys.argv[2])
for name in names:
    build_arch_variant(tmp / name, name)
"""


def _variant_names(path: Path) -> list[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if getattr(target, "id", None) == "ARCH_VARIANTS":
                return [k.value for k in node.value.keys]
    raise SystemExit(f"{path}: no ARCH_VARIANTS")


if __name__ == "__main__":
    main()
