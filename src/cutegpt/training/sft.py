"""`cutegpt train sft`: instruction tuning (LoRA or full) on a packed dataset.

    cutegpt train sft --data DATASET_DIR --out runs/sft                    # from `cutegpt data convert`
    cutegpt train sft --data convs.pkl --max-length 512 --out runs/sft     # converted on the fly, cached
    cutegpt train sft --data DATASET_DIR --method full --deepspeed configs/ds_full_zero1_offload.json
    torchrun --nproc_per_node 2 -m cutegpt train sft --data DATASET_DIR --deepspeed configs/ds_zero1_cpu.json

The dataset's tokenizer fingerprint is checked against the model's tokenizer
before the model is loaded. With `--method full` and the cutegpt template,
`<end>` becomes one special token (the original's recipe), so the data must
have been converted with it as one token too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from cutegpt.config import arg
from cutegpt.errors import CuteGPTError
from cutegpt.templates import resolve_template_name
from cutegpt.training.args import TrainArgs
from cutegpt.training.run import run_training

if TYPE_CHECKING:
    from cutegpt.training.prepare import Prepared


@dataclass
class SFTConfig(TrainArgs):
    data: list[str] = arg([], "dataset folder made by `cutegpt data convert`, or conversation files converted on the fly")
    packing: Literal["bins", "pad", "concat"] = arg("bins", "layout for on-the-fly conversion (bins keeps samples apart)")
    out: str = arg("runs/sft", "output folder: checkpoint-N/, final/, summary.json, loss.png, tensorboard logs",
                   aliases=("--output", "--output-dir", "--output_dir"))

    def check_inputs(self) -> None:
        super().check_inputs()
        if not self.data:
            return
        if len(self.data) == 1 and Path(self.data[0]).is_dir() and (Path(self.data[0]) / "manifest.json").is_file():
            return  # a converted dataset
        from cutegpt.data.readers import source_files

        source_files(self.data, flag="--data")  # each file or folder exists; a dataset folder is never mixed in


def run_sft(cfg: SFTConfig) -> int:
    return run_training(cfg, prepare_sft, "a dataset folder from `cutegpt data convert` or conversation files")


def dataset_folder(cfg: SFTConfig) -> Path:
    """The converted dataset: the folder given, or a cached on-the-fly conversion of the files given."""
    first = Path(cfg.data[0])
    if len(cfg.data) == 1 and first.is_dir():
        return first
    return convert_cached(cfg)


def prepare_sft(cfg: SFTConfig, check_rows: Callable[[int], None] = lambda rows: None) -> Prepared:
    from cutegpt.data.manifest import read_manifest
    from cutegpt.training.data import load_packed_dataset
    from cutegpt.training.prepare import Prepared, load_for_training, training_tokenizer

    folder = dataset_folder(cfg)
    manifest = read_manifest(folder)
    template_name = resolve_template(cfg, manifest, folder)
    tokenizer = training_tokenizer(cfg, template_name)
    try:
        dataset, manifest = load_packed_dataset(folder, tokenizer)  # refuses another tokenizer before the model loads
    except CuteGPTError:
        if cfg.method == "full" and template_name == "cutegpt":
            plain = training_tokenizer(dataclasses.replace(cfg, method="lora"), template_name)
            from cutegpt.data.manifest import tokenizer_hash

            if tokenizer_hash(plain) == manifest["tokenizer"]["vocab_hash"] and len(plain) != len(tokenizer):
                raise CuteGPTError(
                    f"{folder} was tokenized with <end> as several tokens, but --method full makes <end> one special token "
                    "(as the original did); convert the data again with `cutegpt data convert --add-stop-token`, or train with --method lora."
                ) from None
        raise
    dataset, val = validation_split(cfg, dataset, manifest, tokenizer)
    check_rows(len(dataset))
    model = load_for_training(cfg, tokenizer, template_name)
    return Prepared(model, tokenizer, dataset, template_name, val)


def validation_split(cfg: SFTConfig, dataset: Any, manifest: dict[str, Any], tokenizer: Any) -> tuple[Any, Any]:
    """(training rows, validation rows or None): --val-data as given, or --val-ratio of whole conversations."""
    from cutegpt.training.data import load_packed_dataset
    from cutegpt.training.validation import split_packed

    if cfg.val_data:
        given = Path(cfg.val_data)
        if not given.exists():
            raise CuteGPTError(f"--val-data {given} does not exist.")
        folder = given if given.is_dir() else convert_cached(dataclasses.replace(cfg, data=[str(given)]))
        val, _ = load_packed_dataset(folder, tokenizer)
        return dataset, val
    if cfg.val_ratio:
        return split_packed(dataset, cfg.val_ratio, cfg.seed, int(manifest.get("max_length") or cfg.max_length))
    return dataset, None


def resolve_template(cfg: SFTConfig, manifest: dict[str, Any], folder: Path) -> str:
    made_with = manifest.get("template")
    if isinstance(made_with, dict):
        made_with = made_with.get("name")
    if cfg.template and made_with and cfg.template != made_with:
        raise CuteGPTError(f"{folder} was rendered with the '{made_with}' template, not '{cfg.template}'; drop --template or convert again.")
    if cfg.template or made_with:
        return str(cfg.template or made_with)
    from cutegpt.model.loading import load_tokenizer
    from cutegpt.training.prepare import base_model_path

    base = base_model_path(cfg)
    return resolve_template_name(None, [base], load_tokenizer(base))


# ---------------------------------------------------------------- on-the-fly conversion

def cache_root() -> Path:
    from cutegpt.model.embedded import cache_dir

    return cache_dir() / "datasets"


def conversion_key(cfg: SFTConfig) -> str:
    """A name from the data files' bytes, the tokenizer and the settings that change the rows."""
    from cutegpt.data.readers import source_files

    h = hashlib.sha256()
    for p, weight in source_files(cfg.data, flag="--data"):  # names a missing path or a dataset folder mixed in
        h.update(f"{p.name}:{weight}".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    from cutegpt.data.manifest import tokenizer_hash
    from cutegpt.training.prepare import training_tokenizer

    template = cfg.template or "default"
    tokenizer = training_tokenizer(cfg, cfg.template)
    settings = {"tokenizer": tokenizer_hash(tokenizer), "template": template, "max_length": cfg.max_length,
                "packing": cfg.packing, "seed": cfg.seed, "method": cfg.method}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def convert_cached(cfg: SFTConfig) -> Path:
    """Run `cutegpt data convert` once per (data, tokenizer, settings); other processes wait for it."""
    folder = cache_root() / conversion_key(cfg)
    if (folder / "manifest.json").is_file():
        return folder
    if os.environ.get("RANK", "0") != "0":
        for _ in range(3600):
            if (folder / "manifest.json").is_file():
                return folder
            time.sleep(1)
        raise CuteGPTError(f"gave up waiting for process 0 to convert the data into {folder}.")
    try:
        from cutegpt.data.convert import ConvertConfig, convert
    except ImportError:
        raise CuteGPTError("on-the-fly conversion needs `cutegpt data convert`, which this version lacks; pass a converted dataset folder.") from None
    wanted: dict[str, Any] = {"input": list(cfg.data), "out": str(folder), "model": cfg.model, "max_length": cfg.max_length,
                              "packing": cfg.packing, "seed": cfg.seed}
    if cfg.template:
        wanted["template"] = cfg.template
    fields = {f.name for f in dataclasses.fields(ConvertConfig)}
    if cfg.method == "full" and cfg.template in (None, "cutegpt") and "add_stop_token" in fields:
        wanted["add_stop_token"] = True  # <end> as one token, as --method full trains it
    return Path(convert(ConvertConfig(**{k: v for k, v in wanted.items() if k in fields})))
