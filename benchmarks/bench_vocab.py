"""Chinese vocabulary extension of the embedded SmolLM2-135M, side by side with the peers' way.

Corpus: the Chinese XieZhi questions and options in ../shared/data/xiezhi (train + test sets;
C-Eval is never read). English text for the "unchanged" check: XieZhi's English train set.

    ours           cutegpt vocab train (byte-level BPE on the CJK runs) + vocab extend
                   (merges kept only when their result is Chinese text; rows = decomposition mean)
    ours, mean     the same tokenizer, new rows = plain mean of all rows (--init mean)
    peer merge     the common recipe: a byte-level BPE trained on the raw corpus, all of its
                   merges appended after the base's (tokenizer only)
    peer init      our tokenizer, rows from transformers' resize_token_embeddings(mean_resizing=True)
                   (what peer scripts get by default: samples around the mean)

Measured: tokens per Chinese character and per English word, loss per Chinese character of the
model right after extension (no training) on held-out questions, `extend`'s conversion time.

    python benchmarks/bench_vocab.py --vocab-size 20000 --eval-docs 200 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "xiezhi"


def xiezhi_docs(folders: list[str], sep: str = "；") -> list[str]:
    docs = []
    for name in folders:
        for path in sorted((DATA / name).glob("*.json")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    r = json.loads(line)
                    docs.append((r["question"] + " " + sep.join(r["options"].split("\n"))).replace("\n", " "))
    return docs


def loss_per_han(model, tok, docs: list[str]) -> float:
    """Summed next-token loss over each document (after a shared EOS prefix) / its Chinese characters."""
    from cutegpt.vocab.text import count_han

    total, chars = 0.0, 0
    prefix = tok.eos_token_id
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([[prefix] + tok(d, add_special_tokens=False)["input_ids"]])
            logits = model(ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            chars += count_han(d)
    return total / chars


def peer_merge_tokenizer(base: Path, corpus: list[str], vocab_size: int, out: Path):
    """Peers' merge: BPE trained on the raw text, every merge appended (no CJK filter)."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    import cutegpt.vocab.merge as merge

    zh = Tokenizer.from_file(str(base / "tokenizer.json"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    zh.train_from_iterator(corpus, trainer)
    keep = merge.is_cjk_fragment
    merge.is_cjk_fragment = lambda raw: True
    try:
        merged = merge.merge_byte_bpe(merge.load_tokenizer_json(base / "tokenizer.json"), json.loads(zh.to_str()))
    finally:
        merge.is_cjk_fragment = keep
    out.mkdir(parents=True)
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        if (base / f).is_file():
            (out / f).write_bytes((base / f).read_bytes())
    (out / "tokenizer.json").write_text(json.dumps(merged.content, ensure_ascii=False), encoding="utf-8")
    return AutoTokenizer.from_pretrained(out), len(merged.added)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=20000)
    ap.add_argument("--eval-docs", type=int, default=200, help="held-out questions for the loss")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cutegpt.model.embedded import embedded_model_dir
    from cutegpt.vocab.extend import VocabExtendConfig, run_vocab_extend
    from cutegpt.vocab.text import read_corpus, token_stats
    from cutegpt.vocab.train import VocabTrainConfig, run_vocab_train

    base = embedded_model_dir()
    zh_docs = xiezhi_docs(["train/xiezhi_train_chn", "test/xiezhi_spec_chn", "test/xiezhi_inter_chn"])
    from cutegpt.vocab.text import count_words, has_cjk

    en_docs = [d for d in xiezhi_docs(["train/xiezhi_train_eng"], sep=" / ") if not has_cjk(d)][:3000]
    print(f"corpus: {len(zh_docs):,} XieZhi Chinese documents; English check: {len(en_docs):,} XieZhi English documents; "
          f"torch threads {args.threads}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vocab-"))
    (tmp / "corpus.txt").write_text("\n".join(zh_docs) + "\n", encoding="utf-8")

    t = time.perf_counter()
    run_vocab_train(VocabTrainConfig(out=str(tmp / "zh"), corpus=[str(tmp / "corpus.txt")], vocab_size=args.vocab_size, held_out=0.02))
    t_train = time.perf_counter() - t
    held = read_corpus([tmp / "zh" / "heldout.jsonl"])
    eval_docs = held[: args.eval_docs]
    train_docs = [d for d in zh_docs if d not in set(held)]

    times = {}
    for init in ("decomposition", "mean"):
        t = time.perf_counter()
        run_vocab_extend(VocabExtendConfig(pieces=str(tmp / "zh"), out=str(tmp / f"ext-{init}"), init=init))
        times[init] = time.perf_counter() - t

    base_tok = AutoTokenizer.from_pretrained(base)
    ours_tok = AutoTokenizer.from_pretrained(tmp / "ext-decomposition")
    peer_tok, peer_added = peer_merge_tokenizer(base, train_docs, args.vocab_size, tmp / "peer-merge")
    ours_added = json.loads((tmp / "ext-decomposition" / "vocab_report.json").read_text())["pieces_added"]

    rows = []
    for name, tok, added in (("base SmolLM2", base_tok, 0), ("ours", ours_tok, ours_added), ("peer merge (all merges)", peer_tok, peer_added)):
        zh = token_stats(tok, held)
        en_ids = tok(en_docs, add_special_tokens=False)["input_ids"]
        en_tokens = sum(map(len, en_ids))
        en_same = sum(a == b for a, b in zip(en_ids, base_tok(en_docs, add_special_tokens=False)["input_ids"]))
        rows.append((name, added, zh.per_han, en_tokens, en_tokens / sum(map(count_words, en_docs)), en_same))

    losses = {}
    model = AutoModelForCausalLM.from_pretrained(base)
    losses["base SmolLM2 (base tokenizer)"] = loss_per_han(model, base_tok, eval_docs)
    model.resize_token_embeddings(len(ours_tok), pad_to_multiple_of=64)  # mean_resizing=True is the default
    torch.manual_seed(0)
    losses["peer init: resize_token_embeddings(mean_resizing=True)"] = loss_per_han(model, ours_tok, eval_docs)
    del model
    for init in ("decomposition", "mean"):
        model = AutoModelForCausalLM.from_pretrained(tmp / f"ext-{init}")
        losses[f"ours, --init {init}"] = loss_per_han(model, ours_tok, eval_docs)
        del model

    b = rows[0]
    print(f"\n| tokenizer | tokens added | tokens / Chinese char (held-out) | vs base | English tokens ({len(en_docs):,} docs) | tokens / English word | English docs tokenized as before |")
    print("|---|---|---|---|---|---|---|")
    for name, added, per_han, en_tokens, per_word, same in rows:
        print(f"| {name} | {added:,} | {per_han:.3f} | {per_han / b[2]:.2f}x | {en_tokens:,} | {per_word:.3f} | {same:,} / {len(en_docs):,} |")
    base_loss = losses["base SmolLM2 (base tokenizer)"]
    print(f"\n| model right after extension ({len(eval_docs)} held-out questions) | loss (nats) per Chinese char | vs base |")
    print("|---|---|---|")
    for name, v in losses.items():
        print(f"| {name} | {v:.3f} | {v / base_loss:.2f}x |")
    print(f"\nvocab train: {t_train:.1f} s; vocab extend (load + merge + resize + save + checks): "
          f"decomposition {times['decomposition']:.1f} s, mean {times['mean']:.1f} s")
    print(f"(artefacts in {tmp}; delete when done)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
