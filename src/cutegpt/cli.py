"""`cutegpt` command line: maps command names to (config dataclass, function).

Commands are imported lazily and their config modules import no torch, so
`cutegpt --help`, `cutegpt chat --help` and argument errors answer at once.
Each entry: words of the command -> (module, config class, function, summary).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import signal
import sys
import threading
import traceback

from cutegpt.errors import CuteGPTError

COMMANDS: dict[tuple[str, ...], tuple[str, str, str, str]] = {
    ("chat",): ("cutegpt.chat.cli", "ChatConfig", "run_chat", "interactive multi-turn chat (default: the embedded SmolLM2 model, English only)"),
    ("generate",): ("cutegpt.chat.batch", "GenerateConfig", "run_generate", "batched generation for a JSON Lines file of prompts"),
    ("serve",): ("cutegpt.serve.cli", "ServeConfig", "run_serve", "OpenAI-compatible server with a web chat page"),
    ("data", "convert"): ("cutegpt.data.convert", "ConvertConfig", "run_convert", "instruction data -> packed training dataset"),
    ("data", "stats"): ("cutegpt.data.stats", "StatsConfig", "run_stats", "counts, length histogram and packing efficiency of a dataset"),
    ("data", "show"): ("cutegpt.data.stats", "ShowConfig", "run_show", "one rendered sample with its trained-on spans marked"),
    ("data", "pairs"): ("cutegpt.chat.pairs", "PairsConfig", "run_pairs", "preference pairs: the file's answer vs the model's own (for train dpo)"),
    ("train", "sft"): ("cutegpt.training.sft", "SFTConfig", "run_sft", "instruction tuning (LoRA or full)"),
    ("train", "pt"): ("cutegpt.training.pt", "PTConfig", "run_pt", "continued pre-training on raw text"),
    ("train", "dpo"): ("cutegpt.training.dpo", "PrefConfig", "run_dpo", "preference tuning: DPO, IPO, ORPO, SimPO, KTO (trl)"),
    ("export",): ("cutegpt.export.cli", "ExportConfig", "run_export", "merge a LoRA adapter into its base model; write GGUF"),
    ("eval",): ("cutegpt.evaluation.cli", "EvalConfig", "run_eval", "C-Eval / CMMLU / MMLU / XieZhi multiple-choice evaluation"),
    ("compare",): ("cutegpt.chat.compare", "CompareConfig", "run_compare", "answers of several models side by side (Markdown, HTML), optionally judged pairwise"),
    ("vocab", "train"): ("cutegpt.vocab.train", "VocabTrainConfig", "run_vocab_train", "train a Chinese tokenizer on a corpus"),
    ("vocab", "extend"): ("cutegpt.vocab.extend", "VocabExtendConfig", "run_vocab_extend", "merge new pieces into a model's tokenizer and embeddings"),
    ("recipe",): ("cutegpt.recipe", "RecipeConfig", "run_recipe", "the whole CuteGPT recipe at small scale, end to end"),
    ("cache",): ("cutegpt.cache", "CacheConfig", "run_cache", "list what the cache holds, with sizes; --clear removes it"),
    ("llamacpp", "build"): ("cutegpt.runtime.native", "LlamaCppBuildConfig", "run_build", "compile llama.cpp for this CPU once into the cache (optional, faster prefill)"),
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _usage(group: str | None = None) -> str:
    head = f"cutegpt {group} SUBCOMMAND" if group else "cutegpt COMMAND"
    lines = [f"usage: {head} [options]   ({head.split()[0]} {group + ' ' if group else ''}{'SUBCOMMAND' if group else 'COMMAND'} --help for its options)",
             "", "subcommands:" if group else "commands:"]
    for words, (module, *_rest, summary) in COMMANDS.items():
        if (group and words[0] != group) or not _available(module):
            continue
        lines.append(f"  {' '.join(words):<14} {summary}")
    lines += ["", "global flags: --debug (show tracebacks)"]
    return "\n".join(lines)


def _find(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            return key, argv[n:]
    return None


def _quiet_libraries() -> None:
    """Silence start-up chatter that every command would otherwise print (before any library loads)."""
    import logging
    import warnings

    # bitsandbytes warns at import that an optional 4-bit CPU kernel package is absent
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # the libraries' own bars ("Loading weights", "Writing model shards") on every load and save; ours stay
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # deepspeed warns on each import when it has to guess the accelerator; CUDA_VISIBLE_DEVICES
    # or an nvidia device node tells us without importing torch (which costs seconds)
    if "DS_ACCELERATOR" not in os.environ and not (os.path.exists("/dev/nvidia0") or os.environ.get("CUDA_VISIBLE_DEVICES")):
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    # torch's safe unpickler notes the protocol of every refused pickle; the refusal itself is our message
    warnings.filterwarnings("ignore", message="Detected pickle protocol")


class Terminated(SystemExit):
    """SIGTERM (`kill`, a scheduler, torchrun stopping its workers) unwinds like an error, so each command's cleanup
    runs and no temporary file or folder is left behind; Python's default is to die on the spot."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)


# modules of the train extra (cutegpt/extras.py) a command needs, checked once its flags are parsed and before it
# loads or writes anything; the core install (chat, generate, serve, export, eval, vocab) has none of them
TRAIN = ("accelerate", "datasets", "peft")
NEEDS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("data", "convert"): ("datasets", "pyarrow"),
    ("data", "stats"): ("datasets", "pyarrow"),
    ("data", "show"): ("datasets", "pyarrow"),
    ("train", "sft"): TRAIN,
    ("train", "pt"): TRAIN,
    ("train", "dpo"): TRAIN + ("trl",),
    ("recipe",): TRAIN + ("trl",),
}


def _require_extras(words: tuple[str, ...], cfg: object) -> None:
    from cutegpt.extras import require

    needs = NEEDS.get(words, ())
    if getattr(cfg, "lora", None) and "peft" not in needs:  # an adapter is loaded (and merged) with peft
        needs += ("peft",)
    what = "cutegpt " + " ".join(words) + (" --lora" if needs == ("peft",) else "")
    require(needs, what)


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return _main(argv)  # someone else (a test runner, an embedding program) decides what SIGTERM does
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CUTEGPT_DEBUG") == "1"
    # deepspeed's launcher puts --local_rank=N before the command; LOCAL_RANK in the environment says the same
    argv = [a for a in argv if a != "--debug" and not re.fullmatch(r"--local[-_]rank=\d+", a)]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "version"):
        from cutegpt import __version__

        print(f"cutegpt {__version__}")
        return 0
    found = _find(argv)
    if found is None:
        groups = {words[0] for words in COMMANDS if len(words) > 1}
        if argv[0] in groups:
            if len(argv) == 1 or argv[1] in ("-h", "--help", "help"):
                print(_usage(argv[0]))
                return 0
            print(f"cutegpt: unknown subcommand '{argv[0]} {argv[1]}'.\n\n{_usage(argv[0])}", file=sys.stderr)
            return 2
        print(f"cutegpt: unknown command '{argv[0]}'.\n\n{_usage()}", file=sys.stderr)
        return 2
    words, rest = found
    _quiet_libraries()
    module_name, cls_name, fn_name, summary = COMMANDS[words]
    try:
        from cutegpt.config import parse_config

        module = importlib.import_module(module_name)
        cfg = parse_config(getattr(module, cls_name), rest, prog="cutegpt " + " ".join(words), description=summary)
        _require_extras(words, cfg)
        result = getattr(module, fn_name)(cfg)
        return int(result or 0)
    except Terminated as e:
        print("\nterminated; nothing half-written was kept.", file=sys.stderr)
        return int(e.code)
    except SystemExit as e:  # argparse's --help
        return int(e.code or 0) if isinstance(e.code, int) else 0
    except CuteGPTError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("\ninterrupted; nothing half-written was kept.", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if debug:
            traceback.print_exc()
        from cutegpt.extras import missing_message

        print(f"error: {missing_message(e.name, 'cutegpt ' + ' '.join(words)) or f'a required package is missing ({e}); reinstall with `pip install -e .`.'}",
              file=sys.stderr)
        return 1
    except MemoryError:
        if debug:
            traceback.print_exc()
        print("error: out of memory; use a smaller model, batch or --max-length.", file=sys.stderr)
        return 1
    except OSError as e:  # an operating-system error the command did not translate: still name the path
        if debug:
            traceback.print_exc()
        from cutegpt.io import describe_os_error

        print(f"error: {describe_os_error(e, e.filename or 'a file', 'reading or writing')}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug, not a user mistake: keep it short unless asked
        if debug:
            traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: {e} (run again with --debug for the traceback)", file=sys.stderr)
        return 1
