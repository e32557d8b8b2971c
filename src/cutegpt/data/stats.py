"""`cutegpt data stats` and `cutegpt data show`: what a converted dataset holds, and what the model learns from it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cutegpt.config import arg
from cutegpt.data.manifest import load_dataset
from cutegpt.errors import CuteGPTError

IGNORE = -100


@dataclass
class StatsConfig:
    """Settings of `cutegpt data stats`."""

    dataset: str = arg(help="dataset folder made by `cutegpt data convert`", positional=True)
    plot: str | None = arg(None, "where to write the length histogram PNG", absent="DATASET/lengths.png (replaced each time)")
    overwrite: bool = arg(False, "replace an existing --plot file")


@dataclass
class ShowConfig:
    """Settings of `cutegpt data show`."""

    dataset: str = arg(help="dataset folder made by `cutegpt data convert`", positional=True)
    index: int = arg(0, "row to show", positional=True, ge=0)
    model: str | None = arg(None, "model folder whose tokenizer decodes the ids; must match the dataset", absent="the embedded model")
    color: bool = arg(sys.stdout.isatty(), "mark trained-on text in green instead of with [[ ]]")


def dataset_stats(ds: Any, max_length: int) -> dict[str, Any]:
    """Counts and length distributions computed from the rows themselves (not trusted from the manifest)."""
    import pyarrow.compute as pc

    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    seq = table.column("seq_lens").combine_chunks()  # small: one int per sample
    sample_lens = np.asarray(seq.flatten().to_numpy(zero_copy_only=False), dtype=np.int64)
    offsets = np.asarray(seq.offsets.to_numpy(), dtype=np.int64)
    row_tokens = np.add.reduceat(sample_lens, offsets[:-1]) if len(sample_lens) else np.zeros(0, np.int64)
    # labels can be large: count chunk by chunk from the memory map
    trained = sum(int(pc.sum(pc.not_equal(chunk.flatten(), IGNORE)).as_py() or 0) for chunk in table.column("labels").chunks)
    rows = len(row_tokens)
    return {
        "rows": rows,
        "samples": int(len(sample_lens)),
        "tokens": int(sample_lens.sum()),
        "trained_tokens": trained,
        "packing_efficiency": float(sample_lens.sum() / (rows * max_length)) if rows else 0.0,
        "sample_length": _summary(sample_lens),
        "row_length": _summary(row_tokens),
        "_sample_lens": sample_lens,
        "_row_tokens": row_tokens,
    }


def _summary(x: np.ndarray) -> dict[str, float]:
    if not len(x):
        return {}
    p = np.percentile(x, [50, 90, 99])
    return {"min": int(x.min()), "median": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "max": int(x.max()), "mean": float(x.mean())}


def plot_lengths(sample_lens: np.ndarray, row_tokens: np.ndarray, max_length: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cutegpt.io import atomic_file

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(0, max_length, 41)
    axes[0].hist(sample_lens, bins=bins, color="#4477aa")
    axes[0].set(title="sample length (tokens)", xlabel="tokens", ylabel="samples")
    axes[1].hist(row_tokens, bins=bins, color="#228833")
    axes[1].set(title=f"row fill (of {max_length})", xlabel="tokens", ylabel="rows")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def run_stats(cfg: StatsConfig) -> int:
    from cutegpt.data.manifest import DATA_DIR, MANIFEST
    from cutegpt.io import check_input, check_output

    folder = check_input(Path(cfg.dataset).expanduser(), flag="DATASET", kind="folder")
    if cfg.plot:
        check_output(Path(cfg.plot).expanduser(), flag="--plot", inputs=[folder / DATA_DIR, folder / MANIFEST],
                     overwrite=cfg.overwrite, kind="file")
    ds, m = load_dataset(folder)
    st = dataset_stats(ds, m["max_length"])
    c = m.get("counts", {})
    print(f"{folder}: {st['rows']:,} rows, {st['samples']:,} samples, L = {m['max_length']}, packing {m['packing']}, "
          f"template {m['template']}{' + pool' if m.get('template_pool') else ''}, tokenizer {m['tokenizer']['name_or_path']} "
          f"({m['tokenizer']['vocab_hash']})")
    print(f"records read {c.get('records_read', '?'):,}, skipped {c.get('records_skipped', 0):,}, conversations "
          f"{c.get('conversations', 0):,} ({c.get('turns', 0):,} turns)")
    print(f"truncated conversations {c.get('truncated_conversations', 0):,}, answers cut {c.get('truncated_answers', 0):,}, "
          f"prompts cut {c.get('truncated_prompts', 0):,}, continued in new samples {c.get('continued_samples', 0):,}, "
          f"turns dropped {c.get('dropped_turns', 0):,}"
          + (f", tail tokens dropped {c['dropped_tail_tokens']:,}" if c.get("dropped_tail_tokens") else ""))
    print(f"tokens {st['tokens']:,}, trained {st['trained_tokens']:,} ({st['trained_tokens'] / max(1, st['tokens']):.1%}); "
          f"packing efficiency {st['packing_efficiency']:.1%}")
    for name in ("sample_length", "row_length"):
        s = st[name]
        if s:
            print(f"{name.replace('_', ' ')}: min {s['min']}, median {s['median']:.0f}, p90 {s['p90']:.0f}, p99 {s['p99']:.0f}, "
                  f"max {s['max']}, mean {s['mean']:.1f}")
    plot = Path(cfg.plot).expanduser() if cfg.plot else folder / "lengths.png"
    plot_lengths(st["_sample_lens"], st["_row_tokens"], m["max_length"], plot, f"{folder.name} ({m['packing']})")
    print(f"histogram: {plot}")
    return 0


def render_row(tokenizer: Any, input_ids: list[int], labels: list[int], seq_lens: list[int], color: bool) -> str:
    """Decode a row sample by sample; trained-on spans in green or between [[ ]].

    A sample's first token never carries a loss (no loss across a sample
    boundary), so it is shown untrained even with --train-on-prompt.
    """
    on, off = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    out: list[str] = []
    start = 0
    for k, n in enumerate(seq_lens):
        ids, labs = input_ids[start:start + n], labels[start:start + n]
        trained = sum(1 for x in labs if x != IGNORE)
        out.append(f"--- sample {k + 1}/{len(seq_lens)}: {n} tokens, {trained} trained ---")
        text = []
        i = 0
        while i < n:  # decode runs of equal trained-ness at once (a character can span several byte tokens)
            j = i
            flag = labs[i] != IGNORE
            while j < n and (labs[j] != IGNORE) == flag:
                j += 1
            piece = tokenizer.decode(ids[i:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            text.append(f"{on}{piece}{off}" if flag else piece)
            i = j
        out.append("".join(text))
        start += n
    return "\n".join(out)


def run_show(cfg: ShowConfig) -> int:
    from cutegpt.data.convert import _tokenizer_dir
    from cutegpt.model.loading import load_tokenizer

    from cutegpt.data.manifest import read_manifest
    from cutegpt.io import check_input

    folder = check_input(Path(cfg.dataset).expanduser(), flag="DATASET", kind="folder")
    read_manifest(folder)  # a wrong folder is refused before the tokenizer loads
    tokenizer = load_tokenizer(_tokenizer_dir(cfg.model))
    ds, m = load_dataset(folder, tokenizer)
    if not 0 <= cfg.index < len(ds):
        raise CuteGPTError(f"{cfg.dataset} has {len(ds)} rows; row {cfg.index} does not exist.")
    row = ds[cfg.index]
    print(f"row {cfg.index} of {len(ds)} ({m['packing']}, L = {m['max_length']}): {len(row['input_ids'])} tokens, "
          f"{len(row['seq_lens'])} sample(s); trained-on text is {'green' if cfg.color else 'between [[ ]]'}")
    print(render_row(tokenizer, row["input_ids"], row["labels"], row["seq_lens"], cfg.color))
    return 0
