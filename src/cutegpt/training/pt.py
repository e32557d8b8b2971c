"""`cutegpt train pt`: continued pre-training on raw text.

    cutegpt train pt --data corpus/ --max-length 1024 --out runs/pt
    cutegpt train pt --data zh.jsonl --method lora --lora-targets all-linear \\
        --modules-to-save embed_tokens lm_head            # the usual recipe after a vocabulary extension

Each document (a .txt file, or the `text` field of a JSON Lines record) is
tokenized, ends with EOS, and the stream is cut into rows of --max-length
tokens; documents sharing a row do not attend to each other (see
training/data.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from cutegpt.config import arg
from cutegpt.templates import resolve_template_name
from cutegpt.training.args import TrainArgs
from cutegpt.training.run import run_training

if TYPE_CHECKING:
    from cutegpt.training.prepare import Prepared


@dataclass
class PTConfig(TrainArgs):
    data: list[str] = arg([], ".txt files, JSON Lines files or folders of them")
    text_field: str = arg("text", "field holding the text in JSON Lines records")
    out: str = arg("runs/pt", "output folder: checkpoint-N/, final/, summary.json, loss.png, tensorboard logs",
                   aliases=("--output", "--output-dir", "--output_dir"))

    def check_inputs(self) -> None:
        super().check_inputs()
        from cutegpt.io import check_input

        for path in self.data:
            check_input(path, flag="--data")


def run_pt(cfg: PTConfig) -> int:
    return run_training(cfg, prepare_pt, ".txt or .jsonl files (or folders of them)")


def prepare_pt(cfg: PTConfig, check_rows: Callable[[int], None] = lambda rows: None) -> Prepared:
    from cutegpt.training.data import pretraining_dataset
    from cutegpt.training.prepare import Prepared, base_model_path, load_for_training, training_tokenizer

    tokenizer = training_tokenizer(cfg, None)  # pre-training text has no stop marker to add
    val = None
    if cfg.val_ratio:
        dataset, val = pretraining_dataset(cfg.data, tokenizer, cfg.max_length, cfg.text_field,
                                           val_ratio=cfg.val_ratio, seed=cfg.seed)
    else:
        dataset = pretraining_dataset(cfg.data, tokenizer, cfg.max_length, cfg.text_field)
        if cfg.val_data:
            val = pretraining_dataset([cfg.val_data], tokenizer, cfg.max_length, cfg.text_field)
    check_rows(len(dataset))
    base = base_model_path(cfg)
    template = resolve_template_name(cfg.template, [base], tokenizer)
    model = load_for_training(cfg, tokenizer, template)
    return Prepared(model, tokenizer, dataset, template, val)
