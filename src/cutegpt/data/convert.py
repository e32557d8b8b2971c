"""`cutegpt data convert`: instruction data -> a packed, memory-mapped training dataset.

    INPUT (pickle / JSON / JSON Lines; cutegpt, alpaca, sharegpt, messages records)
      |  readers.Source: validate every record, keep offsets (JSON Lines) or objects
      |  plan_units: shuffle (seeded); optionally group 1-10 single-turn records
      v
    units --(workers)--> render (template or pool) -> tokenize in batches -> truncate -> +EOS
      |  scratch: flat int32 ids/labels on disk + one length per sample in memory
      v
    packing: bins (best-fit-decreasing) | pad (one per row) | concat (the original's blocks)
      v
    OUT/data (datasets Arrow) + OUT/manifest.json   [+ OUT/ift_data_ids.pkl with --export-pkl]

Truncation is the original's rule: the system line keeps its last ceil(L/3)
tokens (the original wrote `[-max_length//3:]`, which Python reads as
`(-max_length)//3`), each prompt its first L//3, each answer its first
2*(L//3)-1. With `bins`/`pad` a sample must fit in one row, so a conversation
still longer than L is cut after its last whole turn that fits (after the
stop marker, never inside it) and the rest continues in a new sample that
starts with the system line again (`--no-split-long` drops it); a cut answer
loses its stop marker and EOS, so the model never learns to stop in the middle
of an answer.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import multiprocessing as mp
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from cutegpt.config import arg
from cutegpt.data.augment import pool_segments
from cutegpt.data.manifest import DATA_DIR, FORMAT, MANIFEST, VERSION, tokenizer_info
from cutegpt.data.packing import pack_bins
from cutegpt.data.readers import MAX_RECORD_BYTES, RECORD_BYTES_LIMIT, Conversation, Sources, parse_spec
from cutegpt.errors import CuteGPTError
from cutegpt.io import atomic_dir, atomic_file, check_output, write_json
from cutegpt.templates import Segment, add_stop_token, get_template, read_model_card
from cutegpt.threads import THREADS_HELP, tokenizer_threads

IGNORE = -100
CHUNK_UNITS = 512  # conversations per tokenizer call / per task sent to a worker
PKL_NAME = "ift_data_ids.pkl"


@dataclass
class ConvertConfig:
    """Settings of `cutegpt data convert`."""

    input: list[str] = arg([], "instruction data files or folders of them (the original pickle, JSON, JSON Lines); "
                           "FILE:W weights a source (a.pkl:2 twice, b.jsonl:0.5 a seeded half)", positional=True)
    out: str | None = arg(None, "output dataset folder", aliases=("--output", "--output-dir", "--output_dir"),
                          absent="INPUT without its suffix + '-dataset' (one input file only)")
    model: str | None = arg(None, "model folder whose tokenizer to use; nothing = the embedded SmolLM2-135M-Instruct")
    template: str | None = arg("cutegpt", "prompt template: cutegpt, auto (the tokenizer's chat template) or raw; "
                               "none = what the model folder records, else cutegpt")
    max_length: int = arg(2048, "tokens per training row (L)", ge=16, aliases=("--cutoff_len",))
    packing: Literal["bins", "pad", "concat"] = arg(
        "bins", "bins: whole conversations packed into rows of L tokens; pad: one per row; concat: the original's fixed blocks")
    format: Literal["auto", "cutegpt", "alpaca", "sharegpt", "messages"] = arg("auto", "record format (auto-detected per record)")
    seed: int = arg(42, "seed for shuffling, grouping and the template pool")
    workers: int = arg(1, "tokenizer processes (1 already uses the fast tokenizer's own threads)", ge=1)
    threads: int = arg(0, THREADS_HELP + "; here the fast tokenizer's threads in each process", ge=0, aliases=("--num-threads",))
    skip_invalid: bool = arg(False, "skip and count invalid records (unparseable, not UTF-8, too long, wrong shape) instead of stopping at the first")
    max_record_bytes: int = arg(MAX_RECORD_BYTES, "largest JSON Lines record (one line) in bytes; a longer one is refused, "
                                "or skipped with --skip-invalid, without being read whole (at most 64 MiB: "
                                "parsing and tokenizing a line costs ~300x its size in memory)", ge=1, le=RECORD_BYTES_LIMIT)
    train_on_prompt: bool = arg(False, "also take the loss on system line and prompts")
    template_pool: bool = arg(False, "the original's augmentation: each turn rendered with a template drawn from its pools (bugs fixed)")
    group_single_turns: bool = arg(False, "the original's grouping of 1-10 consecutive single-turn records into one pseudo-dialogue")
    split_long: bool = arg(True, "bins/pad: the turns after a cut continue in a new sample (with the system line); --no-split-long drops them")
    export_pkl: bool = arg(False, f"also write the original's {{input_ids, labels, attention_mask}} pickle ({PKL_NAME})")
    add_stop_token: bool = arg(False, "make the stop marker <end> one special token (datasets for `train sft --method full`)")
    overwrite: bool = arg(False, "replace an existing output folder (once the new one is complete)")

    def check(self) -> None:
        if not self.input:
            raise CuteGPTError("INPUT is required: one or more conversation files (.pkl, .json, .jsonl) or folders of them.")


# ---------------------------------------------------------------- planning


def plan_units(n_turns: Sequence[int], seed: int, group_single_turns: bool) -> list[list[int]]:
    """Shuffle conversation indices (seeded) and optionally group single-turn ones.

    Grouping, as the original: walk the shuffled order and take 1-10 (uniform)
    consecutive single-turn records at a time; multi-turn conversations stay whole.

        shuffled:  s1 s2 M1 s3 s4 s5 M2        (s = single turn, M = multi-turn)
        units:     [s1 s2] [M1] [s3] [s4 s5] [M2]     (group sizes drawn 2, 1, 2...)
    """
    rng = random.Random(seed)
    order = list(range(len(n_turns)))
    rng.shuffle(order)
    if not group_single_turns:
        return [[i] for i in order]
    units: list[list[int]] = []
    pending: list[int] = []
    want = rng.randint(1, 10)
    for i in order:
        if n_turns[i] != 1:
            units.append([i])
            continue
        pending.append(i)
        if len(pending) == want:
            units.append(pending)
            pending, want = [], rng.randint(1, 10)
    if pending:
        units.append(pending)
    return units


def merge_unit(convs: Sequence[Conversation]) -> Conversation:
    if len(convs) == 1:
        return convs[0]
    return Conversation(tuple(t for c in convs for t in c.turns), convs[0].system)


# ---------------------------------------------------------------- encoding (runs in the workers)


@dataclass
class EncodeSettings:
    tokenizer_path: str
    template: str
    template_pool: bool
    train_on_prompt: bool
    max_length: int
    mode: Literal["original", "fit"]  # original = concat reproduction; fit = every sample <= max_length
    seed: int
    split_long: bool = True
    add_stop_token: bool = False


@dataclass
class EncodedChunk:
    ids: np.ndarray  # int32, all samples of the chunk back to back
    labels: np.ndarray  # int32
    lengths: np.ndarray  # int64, one per sample
    counts: dict[str, int] = field(default_factory=dict)


class Encoder:
    """Segments -> token ids + labels, with the truncation rules; one per process."""

    def __init__(self, s: EncodeSettings, tokenizer: Any = None):
        from cutegpt.model.loading import load_tokenizer

        self.s = s
        if tokenizer is None:
            tokenizer = load_tokenizer(Path(s.tokenizer_path))
            if s.add_stop_token:
                add_stop_token(tokenizer)
        self.tokenizer = tokenizer
        self.template = get_template(s.template, self.tokenizer)
        self.eos = self.tokenizer.eos_token_id
        if self.eos is None:
            raise CuteGPTError(f"the tokenizer in {s.tokenizer_path} has no EOS token, which ends every training conversation.")
        self._backend = _fast_backend(self.tokenizer)
        stop = "<end>" if s.template_pool else self.template.stop
        self.stop_ids = self.tokenizer(stop, add_special_tokens=False)["input_ids"] if stop else []
        self.eos_after = True if s.template_pool else self.template.eos_after_conversation

    def segments(self, unit_index: int, conv: Conversation) -> list[Segment]:
        if self.s.template_pool and not conv.tools:
            # one RNG per unit: the same seed gives the same text whatever the worker count
            return pool_segments(conv.turns, conv.system, random.Random(self.s.seed * 1_000_000_007 + unit_index))
        return self.template.segments(conv.turns, conv.system, conv.tools)

    def encode_chunk(self, units: Sequence[tuple[int, Conversation]]) -> EncodedChunk:
        seg_lists = [self.segments(i, c) for i, c in units]
        texts = [s.text for segs in seg_lists for s in segs]
        encoded = self.encode_texts(texts)
        ids_out: list[list[int]] = []
        lab_out: list[list[int]] = []
        counts: collections.Counter[str] = collections.Counter()
        k = 0
        for segs, (_, conv) in zip(seg_lists, units):
            seg_ids = encoded[k:k + len(segs)]
            k += len(segs)
            for ids, labels in self.assemble(segs, seg_ids, counts, tools=bool(conv.tools)):
                ids_out.append(ids)
                lab_out.append(labels)
        lengths = np.array([len(x) for x in ids_out], dtype=np.int64)
        flat_ids = np.array(list(itertools.chain.from_iterable(ids_out)), dtype=np.int32)
        flat_lab = np.array(list(itertools.chain.from_iterable(lab_out)), dtype=np.int32)
        return EncodedChunk(flat_ids, flat_lab, lengths, dict(counts))

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text alone (as templates.encode_segments), in one batched call.

        Repeated texts (the system line of every conversation, pool prompts) are
        tokenized once. With a fast tokenizer the Rust `encode_batch_fast` is
        called directly (no offsets, no Python wrapper): same ids, checked at start.
        """
        if not texts:
            return []
        unique = list(dict.fromkeys(texts))
        if self._backend is not None:
            ids = [e.ids for e in self._backend.encode_batch_fast(unique, add_special_tokens=False)]
        else:
            ids = self.tokenizer(unique, add_special_tokens=False)["input_ids"]
        if len(unique) == len(texts):
            return ids
        by_text = dict(zip(unique, ids))
        return [by_text[t] for t in texts]

    def assemble(self, segs: Sequence[Segment], seg_ids: Sequence[list[int]], counts: collections.Counter,
                 tools: bool = False) -> list[tuple[list[int], list[int]]]:
        """Truncate per segment, join, add EOS; in `fit` mode cut into samples of <= max_length at turn boundaries.

        A system part that describes tools is never cut (a cut tool list teaches calls to tools that are not
        there); when it takes more than 2/3 of max_length the conversation is dropped and counted.
        """
        L = self.s.max_length
        third = L // 3
        system_at = 0 if len(segs) > 1 and not segs[0].train and not segs[1].train else -1
        if tools and system_at == 0 and len(seg_ids[0]) > 2 * third:
            counts["dropped_long_tool_lists"] += 1
            return []
        pieces: list[tuple[list[int], bool, bool, bool]] = []  # (ids, has loss, is an answer, answer was cut)
        for k, (seg, ids) in enumerate(zip(segs, seg_ids)):
            if k == system_at and tools:
                pass
            elif k == system_at:
                ids = ids[(-L) // 3:]  # the original's [-max_length//3:]
            elif not seg.train:
                ids = ids[:third]
            elif len(ids) > 2 * third - 1:
                counts["truncated_answers"] += 1
                ids = self._cut_answer(ids, 2 * third - 1)
            if not seg.train and len(ids) < len(seg_ids[k]):
                counts["truncated_prompts"] += 1
            pieces.append((ids, seg.train or self.s.train_on_prompt, seg.train, len(ids) < len(seg_ids[k])))
        counts["conversations"] += 1
        if self.s.mode == "original":
            # the original always appended a trained EOS after a conversation with turns
            pieces.append(([self.eos], True, False, False))
            samples = [pieces]
        else:
            samples = self._fit(pieces, pieces[:1] if system_at == 0 else [], counts)
        out = []
        for sample in samples:
            ids_out: list[int] = []
            labels: list[int] = []
            for ids, trained, _, _ in sample:
                ids_out.extend(ids)
                labels.extend(ids if trained else [IGNORE] * len(ids))
            out.append((ids_out, labels))
        return out

    def _cut_answer(self, ids: list[int], room: int) -> list[int]:
        """An answer cut to `room` tokens; a cut answer never keeps (part of) its stop marker."""
        n = len(self.stop_ids)
        if n and ids[-n:] == self.stop_ids:
            return ids[:min(room, len(ids) - n)]
        return ids[:room]

    def _fit(self, pieces: list, head: list, counts: collections.Counter) -> list[list]:
        """Samples of <= max_length: the conversation whole (+ EOS), or cut after whole turns.

        With `split_long` the turns after a cut continue in a new sample that
        starts again with `head` (the system line); without it they are dropped.

            [sys q1 a1 q2 a2 q3 a3 q4 a4] > L   ->   [sys q1 a1 q2 a2 EOS]  [sys q3 a3 q4 a4 EOS]
        """
        L = self.s.max_length

        def with_eos(ps: list) -> list:
            last_answer = next((p for p in reversed(ps) if p[2]), None)
            ok = self.eos_after and last_answer is not None and not last_answer[3]
            return ps + [([self.eos], True, False, False)] if ok else ps

        if sum(len(p[0]) for p in pieces) + 1 <= L:
            return [with_eos(pieces)]
        counts["truncated_conversations"] += 1
        samples: list[list] = []
        rest = pieces
        while True:
            sample, rest = self._longest_prefix(rest, L)
            samples.append(with_eos(sample))
            if not any(p[2] for p in rest):
                return samples
            if not self.s.split_long:
                counts["dropped_turns"] += sum(1 for p in rest if p[2])
                return samples
            counts["continued_samples"] += 1
            rest = head + rest
            if sum(len(p[0]) for p in rest) + 1 <= L:
                samples.append(with_eos(rest))
                return samples

    def _longest_prefix(self, pieces: list, L: int) -> tuple[list, list]:
        """(prefix ending right after an answer that fits with EOS, the rest); each call consumes >= 1 answer."""
        used = 0
        best = -1
        for k, (ids, _, is_answer, _) in enumerate(pieces):
            used += len(ids)
            if is_answer and used + 1 <= L:
                best = k
            if used >= L:
                break
        if best >= 0:
            return pieces[:best + 1], pieces[best + 1:]
        # even the first answer does not fit: cut it (no stop marker, no EOS)
        out: list = []
        used = 0
        for k, (ids, trained, is_answer, _) in enumerate(pieces):
            if is_answer:
                out.append((self._cut_answer(ids, L - used), trained, True, True))
                return out, pieces[k + 1:]
            out.append((ids[:L - used], trained, False, False))
            used += len(out[-1][0])
        return out, []


PROBES = ("你是复旦大学知识工场实验室训练出来的语言模型CuteGPT。\n", "问：中国的首都是哪里？\n答：\n", " leading space, <end>",
          "Instruction:x\nResponse:\n", "<|im_start|>user\nhi<|im_end|>\n</s><s>", "  two  spaces\t\r\n", "")


def _fast_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer behind a fast HF tokenizer, if it gives the same ids as the HF call on probes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    try:
        direct = [e.ids for e in backend.encode_batch_fast(list(PROBES), add_special_tokens=False)]
    except Exception:
        return None
    return backend if direct == tokenizer(list(PROBES), add_special_tokens=False)["input_ids"] else None


_WORKER: Encoder | None = None


def _init_worker(settings: EncodeSettings) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: no oversubscription
    _WORKER = Encoder(settings)


def _work(units: list[tuple[int, Conversation]]) -> EncodedChunk:
    assert _WORKER is not None
    return _WORKER.encode_chunk(units)


# ---------------------------------------------------------------- the scratch store of samples


class SampleStore:
    """Samples as two flat int32 files + offsets in memory (8 bytes a sample).

    Read back with positioned reads (not a memory map), so the process's
    resident memory stays flat however large the data set is.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._ids = open(folder / "ids.i32", "w+b")
        self._labels = open(folder / "labels.i32", "w+b")
        self._lengths: list[np.ndarray] = []

    def add(self, chunk: EncodedChunk) -> None:
        self._ids.write(chunk.ids.tobytes())
        self._labels.write(chunk.labels.tobytes())
        self._lengths.append(chunk.lengths)

    def close(self) -> None:
        """Finish writing; reading works from here on."""
        self._ids.flush()
        self._labels.flush()
        self.lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        self._lengths = []
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.total = int(self.offsets[-1])

    def release(self) -> None:
        self._ids.close()
        self._labels.close()

    def span(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and labels of stream positions a..b."""
        n = (b - a) * 4
        ids = np.frombuffer(os.pread(self._ids.fileno(), n, a * 4), dtype=np.int32)
        labels = np.frombuffer(os.pread(self._labels.fileno(), n, a * 4), dtype=np.int32)
        return ids, labels

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.span(int(self.offsets[i]), int(self.offsets[i + 1]))


# ---------------------------------------------------------------- rows


def iter_rows(store: SampleStore, packing: str, max_length: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[int]]]:
    """(input_ids, labels, seq_lens) of each output row."""
    lengths = store.lengths
    if packing == "concat":
        # the original: one stream cut into full blocks of L; the last, partial block is dropped (its len() did)
        for start in range(0, store.total - max_length + 1, max_length):
            ids, labels = store.span(start, start + max_length)
            yield ids, labels, [max_length]
        return
    if packing == "pad":
        bins = [[i] for i in range(len(lengths))]
    else:
        bins = pack_bins(lengths.tolist(), max_length)
        random.Random(seed).shuffle(bins)  # bins come out longest-first; mix them for a trainer that does not shuffle
    for b in bins:
        parts = [store.sample(i) for i in b]
        ids = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])  # a fresh, writable copy
        start = 0
        for p in parts:
            labels[start] = IGNORE  # no loss across a sample boundary (predicting a sample's first token from the previous one)
            start += len(p[0])
        yield ids, labels, [len(p[0]) for p in parts]


def write_rows(rows: Iterator[tuple[np.ndarray, np.ndarray, list[int]]], path: Path, batch_rows: int = 1024) -> dict[str, int]:
    """Write rows as an Arrow stream file (what `datasets` memory-maps), in batches."""
    import pyarrow as pa

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("seq_lens", pa.list_(pa.int32()))])
    stats = collections.Counter()

    def lists(arrays: list[np.ndarray]) -> pa.Array:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        values = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        buf: list[tuple[np.ndarray, np.ndarray, list[int]]] = []

        def flush() -> None:
            if buf:
                writer.write_batch(pa.record_batch([lists([r[0] for r in buf]), lists([r[1] for r in buf]),
                                                    lists([np.asarray(r[2], dtype=np.int32) for r in buf])], schema=schema))
                buf.clear()

        for ids, labels, seq_lens in rows:
            buf.append((ids, labels, seq_lens))
            stats["rows"] += 1
            stats["tokens"] += len(ids)
            stats["trained_tokens"] += int((labels != IGNORE).sum())
            stats["samples"] += len(seq_lens)
            if len(buf) >= batch_rows:
                flush()
        flush()
    return dict(stats)


def export_pkl(store: SampleStore, packing: str, max_length: int, seed: int, pad_id: int, path: Path) -> None:
    """The original's flat {input_ids, labels, attention_mask} pickle.

    concat: the whole stream, exactly what the original wrote (its trainer cuts blocks).
    bins/pad: every row padded to L (attention_mask 0 on padding) so the original
    trainer's fixed-L slicing sees one row per block.
    """
    if packing == "concat":
        a, b = store.span(0, store.total)
        ids, labels = a.tolist(), b.tolist()
        mask = [1] * len(ids)
    else:
        ids, labels, mask = [], [], []
        for r_ids, r_labels, _ in iter_rows(store, packing, max_length, seed):
            pad = max_length - len(r_ids)
            ids += r_ids.tolist() + [pad_id] * pad
            labels += r_labels.tolist() + [IGNORE] * pad
            mask += [1] * len(r_ids) + [0] * pad
    with atomic_file(path, "wb") as f:
        pickle.dump({"input_ids": ids, "labels": labels, "attention_mask": mask}, f, protocol=4)


# ---------------------------------------------------------------- the command


def _tokenizer_dir(model: str | None) -> Path:
    if model is None:
        from cutegpt.model.embedded import embedded_model_dir

        return embedded_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise CuteGPTError(f"--model {path} does not exist.")
    if not path.is_dir():
        raise CuteGPTError(f"--model {path} is a file, not a folder; convert needs a model (or tokenizer) folder to take the tokenizer from.")
    return path


def _encode_all(source: Sources, units: list[list[int]], settings: EncodeSettings, workers: int, store: SampleStore,
                tokenizer: Any) -> collections.Counter:
    from tqdm import tqdm

    counts: collections.Counter[str] = collections.Counter()

    def tasks() -> Iterator[list[tuple[int, Conversation]]]:
        for start in range(0, len(units), CHUNK_UNITS):
            yield [(u, merge_unit([source[i] for i in units[u]])) for u in range(start, min(start + CHUNK_UNITS, len(units)))]

    bar = tqdm(total=len(units), desc="tokenizing", unit="conv", disable=None, leave=False)
    if workers <= 1:
        encoder = Encoder(settings, tokenizer)
        for task in tasks():
            chunk = encoder.encode_chunk(task)
            store.add(chunk)
            counts.update(chunk.counts)
            bar.update(len(task))
    else:
        ctx = mp.get_context("spawn")  # fresh processes: no forked tokenizer thread pools
        with ctx.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
            window: collections.deque = collections.deque()  # bounded: memory does not grow with the input
            for task in tasks():
                window.append((len(task), pool.apply_async(_work, (task,))))
                while len(window) > 2 * workers:
                    n, res = window.popleft()
                    chunk = res.get()
                    store.add(chunk)
                    counts.update(chunk.counts)
                    bar.update(n)
            while window:
                n, res = window.popleft()
                chunk = res.get()
                store.add(chunk)
                counts.update(chunk.counts)
                bar.update(n)
    bar.close()
    return counts


def convert(cfg: ConvertConfig) -> Path:
    """Convert `cfg.input` into a dataset folder; returns its path (the Python API `train sft` calls)."""
    from cutegpt.model.loading import load_tokenizer

    inputs = [cfg.input] if isinstance(cfg.input, (str, Path)) else list(cfg.input)
    if not inputs:
        raise CuteGPTError("INPUT is required: one or more conversation files (.pkl, .json, .jsonl) or folders of them.")
    cfg = dataclasses.replace(cfg, input=[str(x) for x in inputs])
    if cfg.max_length < 16:
        raise CuteGPTError(f"--max-length must be at least 16 tokens, not {cfg.max_length}.")
    if cfg.workers < 1:
        raise CuteGPTError(f"--workers must be at least 1, not {cfg.workers}.")
    if cfg.max_record_bytes < 1:
        raise CuteGPTError(f"--max-record-bytes must be at least 1, not {cfg.max_record_bytes}.")
    if cfg.template_pool and cfg.template not in (None, "cutegpt"):
        raise CuteGPTError(f"--template-pool renders the original CuteGPT pools; it cannot be combined with --template {cfg.template}.")
    # every setting and path is checked before anything is read or written
    from cutegpt.data.readers import source_files

    files = source_files(cfg.input)
    in_path = files[0][0]
    if cfg.out:
        out = Path(cfg.out).expanduser()
    elif len(cfg.input) == 1 and parse_spec(cfg.input[0])[0].is_file():
        out = in_path.with_name(in_path.stem + "-dataset")
    else:
        raise CuteGPTError("--out is required with several inputs or a folder: name the dataset folder to write.")
    tok_dir = _tokenizer_dir(cfg.model)
    given = [parse_spec(x)[0] for x in cfg.input]
    check_output(out, flag="--out", inputs=[*given, *(f for f, _ in files), tok_dir], overwrite=cfg.overwrite, kind="folder")
    if cfg.template is None:  # e.g. `train sft` converting on the fly: the template the model was trained with
        cfg = dataclasses.replace(cfg, template=read_model_card(tok_dir).get("template") or "cutegpt")
    if cfg.template_pool and cfg.template != "cutegpt":
        raise CuteGPTError(f"--template-pool renders the original CuteGPT pools; it cannot be combined with --template {cfg.template}.")
    tokenizer = load_tokenizer(tok_dir)
    if cfg.add_stop_token:
        add_stop_token(tokenizer)
    template = get_template(cfg.template, tokenizer)  # unknown names fail before any work
    stop = "<end>" if cfg.template_pool else template.stop
    stop_info = {"text": stop, "ids": tokenizer(stop, add_special_tokens=False)["input_ids"]} if stop else None
    source = Sources(cfg.input, cfg.format, cfg.skip_invalid, cfg.max_record_bytes, cfg.seed)
    try:
        units = plan_units(source.n_turns, cfg.seed, cfg.group_single_turns)
        settings = EncodeSettings(str(tok_dir), cfg.template, cfg.template_pool, cfg.train_on_prompt, cfg.max_length,
                                  "original" if cfg.packing == "concat" else "fit", cfg.seed, cfg.split_long,
                                  cfg.add_stop_token)
        with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            scratch = tmp / ".scratch"
            store = SampleStore(scratch)
            try:
                counts = _encode_all(source, units, settings, cfg.workers, store, tokenizer)
            finally:
                store.close()
            if not len(store.lengths) and counts.get("dropped_long_tool_lists"):
                raise CuteGPTError(f"{in_path}: every conversation's tool list takes more than 2/3 of --max-length "
                                   f"{cfg.max_length} tokens, so none is left to train on; raise --max-length.")
            if cfg.packing == "concat" and store.total < cfg.max_length:
                raise CuteGPTError(f"{in_path}: --packing concat cuts blocks of {cfg.max_length} tokens, but the whole data has only "
                                   f"{store.total} tokens; use a smaller --max-length or --packing bins.")
            row_stats = write_rows(iter_rows(store, cfg.packing, cfg.max_length, cfg.seed), scratch / "rows.arrow")
            _save_dataset(scratch / "rows.arrow", tmp / DATA_DIR)
            sample_tokens = int(store.lengths.sum())
            n_samples = len(store.lengths)
            if cfg.export_pkl:
                export_pkl(store, cfg.packing, cfg.max_length, cfg.seed, tokenizer.pad_token_id or tokenizer.eos_token_id, tmp / PKL_NAME)
            store.release()
            shutil.rmtree(scratch)
            manifest = _manifest(cfg, in_path, source, tokenizer, counts, row_stats, sample_tokens, len(units), n_samples)
            manifest["stop"] = stop_info
            write_json(tmp / MANIFEST, manifest)
    finally:
        source.close()
    return out


def _save_dataset(arrow_file: Path, folder: Path) -> None:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    was_enabled = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        ds = Dataset.from_file(str(arrow_file))  # memory-mapped
        ds.save_to_disk(str(folder))
        del ds
    finally:
        if was_enabled:
            enable_progress_bar()


def _manifest(cfg: ConvertConfig, in_path: Path, source: Sources, tokenizer: Any, counts: collections.Counter,
              rows: dict[str, int], sample_tokens: int, n_units: int, n_samples: int) -> dict[str, Any]:
    n_rows = rows.get("rows", 0)
    block_tokens = n_rows * cfg.max_length
    counts_out = {
        "records_read": source.read,
        "records_skipped": len(source.skipped),
        "conversations": sum(len(s) for s in source.sources),  # valid ones
        "conversations_used": len(source),  # after the weights of the sources
        "turns": int(sum(source.n_turns)),  # of the conversations used
        "units": n_units,  # conversations after grouping
        "samples": n_samples,  # training samples (a conversation longer than L may give several)
        "truncated_conversations": counts.get("truncated_conversations", 0),
        "truncated_answers": counts.get("truncated_answers", 0),
        "truncated_prompts": counts.get("truncated_prompts", 0),
        "dropped_turns": counts.get("dropped_turns", 0),
        "continued_samples": counts.get("continued_samples", 0),
        "dropped_long_tool_lists": counts.get("dropped_long_tool_lists", 0),  # tool descriptions over 2/3 of L
        "rows": n_rows,
        "tokens": rows.get("tokens", 0),
        "trained_tokens": rows.get("trained_tokens", 0),
        "sample_tokens": sample_tokens,
        "dropped_tail_tokens": sample_tokens - rows.get("tokens", 0) if cfg.packing == "concat" else 0,
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": str(in_path.resolve()),
        "source_container": source.container,
        "sources": source.describe(),
        "tokenizer": tokenizer_info(tokenizer),
        "template": cfg.template,
        "template_pool": cfg.template_pool,
        "group_single_turns": cfg.group_single_turns,
        "train_on_prompt": cfg.train_on_prompt,
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        "seed": cfg.seed,
        "counts": counts_out,
        # real tokens / block tokens (rows x L); concat is full by construction, but its samples see each other
        "packing_efficiency": round(rows.get("tokens", 0) / block_tokens, 6) if block_tokens else 0.0,
        "skipped_examples": source.skipped[:20],
        "settings": asdict(cfg),
    }


def run_convert(cfg: ConvertConfig) -> int:
    with tokenizer_threads(cfg.threads):
        out = convert(cfg)
    from cutegpt.data.manifest import read_manifest

    m = read_manifest(out)
    c = m["counts"]
    print(f"wrote {out}: {c['rows']:,} rows of <= {m['max_length']} tokens ({m['packing']}), {c['samples']:,} samples "
          f"from {c['conversations']:,} conversations; packing efficiency {m['packing_efficiency']:.1%}")
    print(f"records read {c['records_read']:,}, skipped {c['records_skipped']:,}, truncated conversations "
          f"{c['truncated_conversations']:,} (answers cut {c['truncated_answers']:,}, continued in new samples {c['continued_samples']:,}, "
          f"turns dropped {c['dropped_turns']:,}); "
          + (f"conversations dropped for a tool list over 2/3 of --max-length {c['dropped_long_tool_lists']:,}; "
             if c.get("dropped_long_tool_lists") else "") +
          f"tokens {c['tokens']:,}, trained {c['trained_tokens']:,}")
    for msg in m.get("skipped_examples", [])[:5]:
        print(f"  skipped: {msg}")
    return 0
