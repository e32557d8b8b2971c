"""`cutegpt train dpo`: preference tuning (DPO, IPO, ORPO, SimPO, KTO) on trl, with SFT's engine and guarantees.

    cutegpt train dpo --data pairs.jsonl --lora runs/sft/final --out runs/dpo      # on top of an SFT adapter
    cutegpt train dpo --data pairs.jsonl --loss simpo --out runs/simpo              # reference-free
    cutegpt train dpo --data thumbs.jsonl --loss kto --out runs/kto                 # unpaired completion/label

The losses are trl's (DPOTrainer: dpo = its "sigmoid", ipo; experimental CPOTrainer: simpo; experimental
ORPOTrainer: orpo; KTOTrainer: kto); this file adds the data (data/pairs.py: our templates, our validation), the
reference model done right, and what `train sft` has (engine.py: atomic checkpoints, resume, validation, summary).

Reference model (the policy at step 0 always equals it, so the first loss is log 2 for DPO):

    --method lora, new adapter          the base with the adapter disabled (trl's peft path; no second model)
    --lora SFT_ADAPTER (or --resume-lora)   base + that adapter: trl keeps a frozen copy of the adapter as "ref",
                                        and the trained adapter starts from it
    --lora SFT_ADAPTER --merge-lora     the merged model (adapter disabled) under a new adapter
    --method full                       a frozen copy of the model, or --precompute-ref (log-probs computed once)
    --loss orpo | simpo                 none (reference-free losses)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from cutegpt.config import arg
from cutegpt.errors import CuteGPTError
from cutegpt.training.args import TrainArgs
from cutegpt.training.run import run_training

log = logging.getLogger("cutegpt.training")

Loss = Literal["dpo", "ipo", "orpo", "simpo", "kto"]


@dataclass(frozen=True)
class LossSpec:
    trainer: str  # which trl trainer computes it
    trl_loss: str | None  # its loss_type
    beta: float  # the paper's default
    beta_means: str
    reference: bool = True  # False: reference-free


# Paper defaults: DPO β 0.1 (Rafailov et al. 2023), IPO τ 0.1 (Azar et al. 2023, trl's default), ORPO λ 0.1
# (Hong et al. 2024), SimPO β 2.0 with γ 0.5 (Meng et al. 2024, trl's γ), KTO β 0.1 (Ethayarajh et al. 2024).
LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec("dpo", "sigmoid", 0.1, "β, the KL penalty"),
    "ipo": LossSpec("dpo", "ipo", 0.1, "τ, the regularisation"),
    "orpo": LossSpec("orpo", None, 0.1, "λ, the weight of the odds-ratio term", reference=False),
    "simpo": LossSpec("cpo", "simpo", 2.0, "β, the reward scale", reference=False),
    "kto": LossSpec("kto", "kto", 0.1, "β, the KL penalty"),
}
# Settings that belong to one loss: given with another one they would silently do nothing.
OWN_SETTINGS: dict[str, tuple[str, ...]] = {"simpo_gamma": ("simpo",), "desirable_weight": ("kto",),
                                            "undesirable_weight": ("kto",), "label_smoothing": ("dpo",)}
# Preference tuning moves a trained model a little: lower rates than SFT (LoRA: LLaMA-Factory's DPO example;
# full: Zephyr's DPO). Micro-batch 2 so that KTO's KL estimate has another answer in the batch.
PREF_DEFAULTS = {"lora": {"lr": 5e-6, "micro_batch": 2, "grad_accum": 8},
                 "full": {"lr": 5e-7, "micro_batch": 2, "grad_accum": 8}}
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@dataclass
class PrefConfig(TrainArgs):
    data: list[str] = arg([], "preference files (JSON / JSON Lines): chosen/rejected pairs, or completion/label for kto")
    out: str = arg("runs/dpo", "output folder: checkpoint-N/, final/, summary.json, loss.png, rewards.png",
                   aliases=("--output", "--output-dir", "--output_dir"))
    loss: Loss = arg("dpo", "dpo, ipo, orpo, simpo (reference-free) or kto (unpaired completion/label data)")
    beta: float | None = arg(None, "the loss's β (τ for ipo, λ for orpo)", gt=0,
                             absent="the paper's: 0.1, simpo 2.0")
    simpo_gamma: float | None = arg(None, "SimPO's target reward margin γ (--loss simpo only)", ge=0, absent="0.5")
    desirable_weight: float | None = arg(None, "KTO's weight of desirable answers (--loss kto only)", gt=0, absent="1.0")
    undesirable_weight: float | None = arg(None, "KTO's weight of undesirable answers (--loss kto only)", gt=0, absent="1.0")
    label_smoothing: float | None = arg(None, "conservative DPO: the share of pairs assumed mislabelled (--loss dpo only)",
                                        ge=0, lt=0.5, absent="0")
    max_length: int = arg(1024, "longest prompt + answer in tokens (a longer answer keeps its start; see docs/training.md)",
                          ge=2, aliases=("--cutoff_len",))
    max_prompt_length: int | None = arg(None, "a longer prompt keeps its last N tokens", ge=1,
                                        absent="no limit but --max-length")
    precompute_ref: bool = arg(False, "compute the reference log-probabilities once before training (no reference model in memory)")
    skip_invalid: bool = arg(False, "skip invalid records (counted) instead of stopping at the first")

    def check(self) -> None:
        super().check()
        spec = LOSSES[self.loss]
        for name, owners in OWN_SETTINGS.items():
            if getattr(self, name) is not None and self.loss not in owners:
                flag = "--" + name.replace("_", "-")
                raise CuteGPTError(f"{flag} is a setting of --loss {' / '.join(owners)}, not of --loss {self.loss}; drop it.")
        if self.precompute_ref and not spec.reference:
            raise CuteGPTError(f"--precompute-ref: --loss {self.loss} is reference-free, there is no reference to compute; drop it.")
        if self.lora and self.resume_lora:
            raise CuteGPTError("--lora and --resume-lora both name the adapter to start from; give one of them.")
        if self.max_prompt_length and self.max_prompt_length >= self.max_length:
            raise CuteGPTError(f"--max-prompt-length {self.max_prompt_length} leaves no room for an answer in --max-length {self.max_length}.")
        if self.loss == "kto" and self.micro_batch == 1:
            raise CuteGPTError("--loss kto needs --micro-batch 2 or more: its KL estimate pairs each prompt with another answer of the batch.")

    def check_inputs(self) -> None:
        super().check_inputs()
        from cutegpt.io import check_input

        for path in self.data:
            check_input(path, flag="--data", kind="file")
        check_adapter_base(self)
        if self.data:  # records are checked before the plan line and before anything loads (tokens come later)
            from cutegpt.data.pairs import check_kto_labels, read_prefs

            records, _ = read_prefs(self.data, skip_invalid=self.skip_invalid)
            check_kind(records[0], self.loss)
            if self.loss == "kto" and not self.val_ratio:
                check_kto_labels([{"label": r.label} for r in records], " ".join(self.data))

    def for_loading(self) -> "PrefConfig":
        """The settings as the shared loader reads them: an SFT adapter given as --lora is continued by a LoRA run
        (unless --merge-lora), and merged into the weights a full run trains (and copies as its reference)."""
        if self.lora and self.method == "lora" and not self.merge_lora:
            return dataclasses.replace(self, lora=None, resume_lora=self.lora)
        if self.lora and self.method == "full":
            return dataclasses.replace(self, merge_lora=True)
        return self

    def plan_fields(self) -> dict[str, Any]:
        """What the memory plan (training/plan.py) counts for preference tuning: two sequences per pair, the reference."""
        spec = LOSSES[self.loss]
        load_cfg = self.for_loading()
        if not spec.reference:
            reference = "none"
        elif self.precompute_ref:
            reference = "precomputed"
        elif self.method == "full":
            reference = "frozen-copy"
        else:
            reference = "adapter-copy" if load_cfg.resume_lora else "adapter-disabled"
        # KTO: one completion per row (its KL completions run without gradients); CPO/ORPO read full logits on a GPU
        return {"sequences": 1 if self.loss == "kto" else 2, "reference": reference, "loss_chunk": 512,
                "full_logits": spec.trainer in ("cpo", "orpo")}

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else LOSSES[self.loss].beta


def run_dpo(cfg: PrefConfig) -> int:
    if not cfg.deepspeed:  # with a DeepSpeed file its values come first, then the engine's defaults
        for key, value in PREF_DEFAULTS[cfg.method].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
    return run_training(cfg, prepare_pref, "preference files (JSON / JSON Lines)", stage=PrefStage(cfg))


# ---------------------------------------------------------------- data and model

def resolve_pref_template(cfg: PrefConfig) -> str:
    from cutegpt.model.loading import load_tokenizer
    from cutegpt.templates import resolve_template_name
    from cutegpt.training.prepare import base_model_path

    base = base_model_path(cfg)
    adapter = cfg.resume_lora or cfg.lora
    tok_dir = Path(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base
    return resolve_template_name(cfg.template, [adapter, base], load_tokenizer(tok_dir, cfg.trust_remote_code))


def pref_rows(cfg: PrefConfig, paths: list[str], tokenizer: Any, template_name: str, what: str) -> list[dict[str, Any]]:
    """Read, validate and tokenize preference files, or reuse their cached tokenization (data/pairs.py: a manifest
    with the files' hashes, tokenizer, template and lengths); prints what was cut or skipped either way."""
    from cutegpt.data.pairs import (Lengths, PrefEncoder, check_kto_labels, encode_prefs, load_pairs, pairs_key,
                                    pairs_settings, read_prefs, save_pairs)
    from cutegpt.templates import get_template
    from cutegpt.training.sft import cache_root

    lengths = Lengths(cfg.max_length, cfg.max_prompt_length)
    settings = pairs_settings(paths, tokenizer, template_name, lengths, cfg.skip_invalid)
    folder = cache_root() / pairs_key(settings)
    cached = load_pairs(folder, settings)
    if cached:
        rows, stats = cached
    else:
        records, stats = read_prefs(paths, skip_invalid=cfg.skip_invalid, flag="--data" if what == "training" else "--val-data")
        check_kind(records[0], cfg.loss)
        encoder = PrefEncoder(tokenizer, get_template(template_name, tokenizer), lengths)
        rows = encode_prefs(records, encoder, stats, cfg.skip_invalid)
        if os.environ.get("RANK", "0") == "0":  # one writer; the others tokenize for themselves (seconds)
            try:
                save_pairs(folder, rows, stats, settings)
            except (CuteGPTError, OSError) as e:
                log.warning("the tokenized pairs were not cached (%s); training goes on", str(e).rstrip("."))
    kto = "label" in rows[0]
    if kto != (cfg.loss == "kto"):
        check_kind(read_prefs(paths, flag="--data" if what == "training" else "--val-data")[0][0], cfg.loss)
    if kto and what == "training":
        check_kto_labels(rows, " ".join(paths))
    notes = [f"{n} {k.replace('_', ' ')}" for k, n in sorted(stats.counts.items()) if n]
    if stats.skipped:
        notes.append(f"{len(stats.skipped)} invalid record(s) skipped (first: {stats.skipped[0]})")
    log.info("%s data: %d %s from %d record(s)%s%s", what, len(rows), "answers" if kto else "pairs", stats.records,
             f" ({'; '.join(notes)})" if notes else "", f"; tokenized earlier, reused from {folder}" if cached else "")
    return rows


def check_kind(first: Any, loss: str) -> bool:
    """KTO reads completion/label records, the other losses chosen/rejected pairs; True for KTO records."""
    if first.kto != (loss == "kto"):
        raise CuteGPTError(f"{first.where}: --loss {loss} reads "
                           f"{'completion/label records' if loss == 'kto' else 'chosen/rejected pairs'}, and this file has "
                           f"{'completion/label records' if first.kto else 'chosen/rejected pairs'}.")
    return first.kto


def split_rows(rows: list[dict[str, Any]], ratio: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from cutegpt.training.validation import choose

    held = choose(len(rows), ratio, seed)
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def check_adapter_base(cfg: PrefConfig) -> None:
    """An SFT adapter must sit on the base it was trained on, or its reference log-probabilities mean nothing."""
    from cutegpt.model.adapter_base import check_base
    from cutegpt.training.prepare import base_model_path

    adapter = cfg.resume_lora or cfg.lora
    if adapter and Path(adapter).is_dir():
        check_base(Path(adapter), None, base_model_path(cfg), cfg.force, "--resume-lora" if cfg.resume_lora else "--lora")


def prepare_pref(cfg: PrefConfig, check_rows: Callable[[int], None] = lambda rows: None) -> Any:
    from datasets import Dataset

    from cutegpt.training.prepare import Prepared, load_for_training, training_tokenizer

    load_cfg = cfg.for_loading()
    template_name = resolve_pref_template(load_cfg)
    tokenizer = training_tokenizer(load_cfg, template_name)
    rows = pref_rows(cfg, cfg.data, tokenizer, template_name, "training")
    val_rows = None
    if cfg.val_data:
        val_rows = pref_rows(cfg, [cfg.val_data], tokenizer, template_name, "validation")
    elif cfg.val_ratio:
        rows, val_rows = split_rows(rows, cfg.val_ratio, cfg.seed)
        if cfg.loss == "kto":
            from cutegpt.data.pairs import check_kto_labels

            check_kto_labels(rows, "the training part of --data")
    check_rows(len(rows))
    model = load_for_training(load_cfg, tokenizer, template_name, attach=False)
    if cfg.method == "lora" and not load_cfg.resume_lora:
        model.requires_grad_(False)  # the base stays frozen (trl's peft path would freeze it too; the disk estimate reads it now)
    return Prepared(model=model, tokenizer=tokenizer, dataset=Dataset.from_list(rows), template_name=template_name,
                    val_dataset=Dataset.from_list(val_rows) if val_rows else None)


# ---------------------------------------------------------------- the stage: trl's trainers in our engine

def describe_reference(cfg: PrefConfig) -> str:
    load_cfg = cfg.for_loading()
    if not LOSSES[cfg.loss].reference:
        return f"none: --loss {cfg.loss} is reference-free"
    if cfg.method == "full":
        what = "the initial model" + (f" (with --lora {cfg.lora} merged)" if cfg.lora else "")
        return (f"log-probabilities of {what}, computed once before training (--precompute-ref)" if cfg.precompute_ref
                else f"a frozen copy of {what}")
    start = " (log-probabilities computed once before training)" if cfg.precompute_ref else ""
    if load_cfg.resume_lora:
        return f"the base model with the SFT adapter {load_cfg.resume_lora} (a frozen copy of the adapter; the trained adapter starts from it){start}"
    if cfg.lora:
        return f"the base model with {cfg.lora} merged, the new adapter disabled{start}"
    return f"the base model with the adapter disabled{start}"


def lora_config(cfg: PrefConfig) -> Any:
    from peft import LoraConfig

    targets: Any = "all-linear" if cfg.lora_targets == ["all-linear"] else list(cfg.lora_targets)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=targets, modules_to_save=cfg.modules_to_save or None, task_type="CAUSAL_LM")


def trainer_class(loss: str) -> Any:
    """CuteTrainer (atomic checkpoints, NaN guard, token count) on the trl trainer of `loss`, fed our own rows."""
    from cutegpt.training.trainer import make_trainer_class

    name = LOSSES[loss].trainer
    import datasets

    datasets.disable_progress_bars()  # the trainers' dataset maps take milliseconds here; our bar is the training's
    if name == "dpo":
        from trl import DPOTrainer as base
    elif name == "kto":
        from trl import KTOTrainer as base
    elif name == "cpo":
        from trl.experimental.cpo import CPOTrainer as base
    else:
        from trl.experimental.orpo import ORPOTrainer as base

    class PrefTrainer(make_trainer_class(base)):
        def __init__(self, *a: Any, **kw: Any):
            super().__init__(*a, **kw)
            self.install_head()

        def install_head(self) -> None:
            """Our answer-only log-prob head in place of trl's fused head (logprobs.py) where trl would score every
            position with torch tiles (no Triton: the CPU). Called again by the reference precomputation, which trl
            runs inside its __init__."""
            from cutegpt.training import logprobs

            if getattr(self, "answer_head", None) is not None or self.args.device.type in ("cuda", "xpu"):
                return
            if getattr(self, "is_deepspeed_enabled", False) and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                self.answer_head = False  # the output layer is sharded: trl's head gathers it, ours would not
                return
            lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            pairs = LOSSES[loss].trainer != "kto"  # [chosen; rejected] rows of the same prompts: one row per pair
            self.answer_head = logprobs.install(lm, pairs=pairs)
            if self.answer_head and getattr(self, "ref_model", None) is not None:
                logprobs.install(self.ref_model, pairs=pairs)

        def _precompute_ref_logps(self, *a: Any, **kw: Any) -> Any:
            self.install_head()
            return super()._precompute_ref_logps(*a, **kw)

        def concatenated_forward(self, model, batch):
            """CPO (SimPO) and ORPO on the answer-only head: the average answer log-probs from per-token log-probs, and
            ORPO's NLL of the chosen sequences (trl's: prompt tokens included) from the same call, which scores the
            chosen rows' prompt tokens too. trl's path computes full-vocabulary logits of every position."""
            if not getattr(self, "answer_head", False) or self.aux_loss_enabled:  # MoE: trl adds the router's loss
                return super().concatenated_forward(model, batch)
            import torch

            from cutegpt.training.loss import IGNORE

            pad = self.processing_class.pad_token_id or 0  # under the attention mask: any valid id
            cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=pad,
                                           device=self.accelerator.device)
            ids, mask, labels = cat["concatenated_input_ids"], cat["concatenated_attention_mask"], cat["concatenated_labels"]
            n = batch["chosen_labels"].shape[0]
            orpo = LOSSES[loss].trainer == "orpo"
            scored = torch.cat([ids[:n].masked_fill(mask[:n] == 0, IGNORE), labels[n:]]) if orpo else labels
            out = model(input_ids=ids, attention_mask=mask, labels=scored, fused_lm_head=True, pair_answers=labels != IGNORE)
            answer = labels[:, 1:] != IGNORE
            logps = (out.log_probs * answer).sum(-1) / answer.sum(-1)  # trl's average_log_prob (both: SimPO, ORPO)
            if orpo:
                whole = scored[:n, 1:] != IGNORE
                nll = -(out.log_probs[:n] * whole).sum() / whole.sum()  # nn.CrossEntropyLoss's mean over the tokens
            else:
                nll = torch.tensor(0.0, device=ids.device)  # cpo_alpha 0 (config): trl skips its NLL term
            # trl logs the mean of the full logits ("logits/chosen"); here the mean logit of the answer tokens
            means = out.mean_logits.detach()
            return (logps[:n], logps[n:], means[:n][answer[:n]], means[n:][answer[n:]], nll)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            """Rows come tokenized with our templates (data/pairs.py); KTO's mismatched KL answers added as trl does."""
            if getattr(self, "calculate_KL", False):
                def add_kl(examples):
                    examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
                    return examples

                dataset = dataset.map(add_kl, batched=True, batch_size=args.per_device_train_batch_size)
            return dataset

        def tokenize_row(self, feature, model=None):
            """CPO/ORPO's row layout from our ids (their own tokenizer path would re-render the text)."""
            p, c, r = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
            out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for key, ans in (("chosen", c), ("rejected", r)):
                out[f"{key}_input_ids"] = p + ans
                out[f"{key}_attention_mask"] = [1] * (len(p) + len(ans))
                out[f"{key}_labels"] = [-100] * len(p) + ans
            return out

        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            """peft saves every adapter: trl's frozen copy of the SFT adapter ("ref") would land in OUT/checkpoint-N/ref.
            It is not needed to resume (trl copies the starting adapter again) and is not the result: not written."""
            super()._save(output_dir, state_dict)
            model = self.accelerator.unwrap_model(self.model)
            if "ref" in getattr(model, "peft_config", {}):
                import shutil

                shutil.rmtree(Path(output_dir or self.args.output_dir) / "ref", ignore_errors=True)

        def create_model_card(self, *a: Any, **k: Any) -> None:
            pass  # trl writes a README into --out at each checkpoint; ours is cutegpt.json in final/

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            if mask is None:
                mask = inputs.get("chosen_attention_mask")
                extra = inputs.get("rejected_attention_mask")
                inputs["n_tokens"] = int(mask.sum() + extra.sum()) if mask is not None and extra is not None else 0
            else:
                inputs["n_tokens"] = int(mask.sum())
            return super().training_step(model, inputs, num_items_in_batch)

    return PrefTrainer


class PrefStage:
    """engine.Stage for preference tuning (duck-typed: importing engine here would load torch for --help)."""

    def __init__(self, cfg: PrefConfig):
        self.cfg = cfg
        self.reference = describe_reference(cfg)
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and SimPO live in trl.experimental; we pin trl

    def record(self, cfg: TrainArgs) -> dict[str, Any]:
        c = self.cfg
        return {"loss": c.loss, "beta": c.beta_value, "simpo_gamma": c.simpo_gamma, "desirable_weight": c.desirable_weight,
                "undesirable_weight": c.undesirable_weight, "label_smoothing": c.label_smoothing,
                "max_prompt_length": c.max_prompt_length, "precompute_ref": c.precompute_ref, "lora": c.lora}

    def arguments(self, cfg: TrainArgs, kwargs: dict[str, Any]) -> Any:
        with warnings.catch_warnings():  # transformers renamed the flag trl's configs set; not the user's to see
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*trl.experimental.*")
            return self._arguments(kwargs)

    def _arguments(self, kwargs: dict[str, Any]) -> Any:
        c = self.cfg
        spec = LOSSES[c.loss]
        kwargs.setdefault("gradient_checkpointing", False)  # trl's configs default it on; ours is the flag
        kwargs["per_device_eval_batch_size"] = kwargs["per_device_train_batch_size"]
        common = {"beta": c.beta_value, "max_length": None}  # data/pairs.py has already cut every row to --max-length
        if spec.trainer == "dpo":
            from trl import DPOConfig

            return DPOConfig(**kwargs, **common, loss_type=[spec.trl_loss], label_smoothing=c.label_smoothing or 0.0,
                             precompute_ref_log_probs=c.precompute_ref, pad_to_multiple_of=None)
        if spec.trainer == "kto":
            from trl import KTOConfig

            return KTOConfig(**kwargs, **common, loss_type=spec.trl_loss, precompute_ref_log_probs=c.precompute_ref,
                             desirable_weight=c.desirable_weight or 1.0, undesirable_weight=c.undesirable_weight or 1.0)
        if spec.trainer == "cpo":
            from trl.experimental.cpo import CPOConfig

            # cpo_alpha 0: SimPO alone, without CPO's added negative log-likelihood term
            return CPOConfig(**kwargs, beta=c.beta_value, loss_type="simpo", cpo_alpha=0.0,
                             simpo_gamma=0.5 if c.simpo_gamma is None else c.simpo_gamma,
                             max_length=c.max_length, max_completion_length=c.max_length)
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**kwargs, beta=c.beta_value, max_length=c.max_length, max_completion_length=c.max_length)

    def trainer(self, cfg: TrainArgs, prep: Any, args: Any, record: dict[str, Any]) -> Any:
        from peft import PeftModel

        from cutegpt.training.prepare import portable, trainable_in_fp32

        c = self.cfg
        spec = LOSSES[c.loss]
        model = prep.model
        kw: dict[str, Any] = {}
        load_cfg = c.for_loading()
        if c.method == "lora":
            # trl creates a new adapter, the reference being the base with it disabled; a continued adapter
            # (loaded by prepare_pref) is copied by trl as the frozen reference ("ref")
            if not load_cfg.resume_lora:
                kw["peft_config"] = lora_config(c)
        elif spec.reference and not c.precompute_ref:
            ref = copy.deepcopy(model).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            kw["ref_model"] = ref
        if not spec.reference:
            kw.pop("ref_model", None)
        try:
            trainer = trainer_class(c.loss)(
                model=model, args=args, train_dataset=prep.dataset, eval_dataset=prep.val_dataset,
                processing_class=prep.tokenizer, template_name=prep.template_name,
                keep_checkpoints=cfg.save_total_limit, run_record=record, fused_loss=False, **kw)
        except ValueError as e:
            if "target_modules" in str(e) or "Target modules" in str(e):
                raise CuteGPTError(f"--lora-targets {' '.join(c.lora_targets)}: {str(e).splitlines()[0][:300]}") from None
            raise
        if isinstance(trainer.model, PeftModel) and not load_cfg.resume_lora:
            # the adapter trl created records its base as SFT's do (by name, with the fingerprint): --lora alone finds it
            portable(trainer.model, load_cfg, getattr(model, "cutegpt_base_fingerprint", None))
        if isinstance(trainer.model, PeftModel):
            trainable_in_fp32(trainer.model)  # trl casts a quantized base's adapter to bf16; AdamW wants fp32 (prepare.py)
        return trainer

    def evaluator(self, trainer: Any, cfg: TrainArgs, prep: Any, micro_batch: int, precision: str) -> Any:
        """The preference loss and rewards on the validation pairs (trl's evaluate logs them), --keep-best on it."""
        from cutegpt.training.trainer import make_evaluator

        return make_evaluator(trainer, self.cfg, prep, precision, lambda: float(trainer.evaluate()["eval_loss"]))

    def before_final(self, trainer: Any) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" in getattr(model, "peft_config", {}):
            model.delete_adapter("ref")  # the frozen SFT copy: final/ holds only the trained adapter

    def finish(self, trainer: Any, cfg: TrainArgs, summary: dict[str, Any]) -> dict[str, Any]:
        from cutegpt.io import write_json

        c = self.cfg
        history = trainer.state.log_history
        curves = {key: [[h["step"], h[key]] for h in history if key in h] for key in REWARD_KEYS}
        val_curves = {key: [[h["step"], h["eval_" + key]] for h in history if "eval_" + key in h] for key in REWARD_KEYS}
        summary.update(loss=c.loss, beta=c.beta_value, reference=self.reference,
                       loss_path="trl, answer-only log-probabilities (training/logprobs.py)" if trainer.answer_head else "trl",
                       **{k.replace("/", "_") + "_curve": v for k, v in curves.items() if v},
                       **{"val_" + k.replace("/", "_") + "_curve": v for k, v in val_curves.items() if v})
        last = {k.replace("/", "_"): v[-1][1] for k, v in curves.items() if v}
        summary.update({"final_" + k: v for k, v in last.items()})
        if trainer.is_world_process_zero():
            write_json(Path(cfg.out) / "summary.json", summary)
            plot_rewards(curves, val_curves, Path(cfg.out) / "rewards.png", f"{Path(cfg.out).resolve().name} · {c.loss} β {c.beta_value:g}")
            if "rewards_accuracies" in last:
                print(f"rewards: chosen {last.get('rewards_chosen', 0):.4f}, rejected {last.get('rewards_rejected', 0):.4f}, "
                      f"margin {last.get('rewards_margins', 0):.4f}, accuracy {last['rewards_accuracies']:.3f}; reference: {self.reference}")
        return summary


def plot_rewards(curves: dict[str, list], val_curves: dict[str, list], path: Path, title: str) -> None:
    """Rewards of chosen and rejected answers and their margin (left), reward accuracy (right); validation as dots."""
    if not any(curves.values()):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cutegpt.io import atomic_file

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, ax in (("rewards/chosen", left), ("rewards/rejected", left), ("rewards/margins", left), ("rewards/accuracies", right)):
        label = key.split("/")[1]
        if curves.get(key):
            line, = ax.plot([c[0] for c in curves[key]], [c[1] for c in curves[key]], label=label)
            if val_curves.get(key):
                ax.plot([c[0] for c in val_curves[key]], [c[1] for c in val_curves[key]], "o", color=line.get_color(),
                        label=f"{label} (validation)")
    left.set_ylabel("reward (β · log-ratio)")
    right.set_ylabel("reward accuracy")
    right.set_ylim(-0.02, 1.02)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
