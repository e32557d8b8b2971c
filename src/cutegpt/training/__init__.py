"""Training: `train sft` (sft.py) and `train pt` (pt.py); the merged-model export lives in cutegpt.export.

    args.py         settings shared by both commands (flags and YAML keys); nothing else
    run.py          the command: --plan (plan.py, config.json only) or checks then engine.train
    data.py         packed rows, raw-text packing, the collator (samples never see each other)
    ds_config.py    DeepSpeed files reconciled with our settings; one process without a launcher
    checkpoints.py  complete checkpoints, safe and intact files for --resume, same-run checks
    prepare.py      tokenizer, base model (16-bit or 4-/8-bit), LoRA or full training on top
    outputs.py      final/ (and best/), summary.json, loss.png
    trainer.py      the Trainer subclass (atomic checkpoints, NaN guard, tokens/s) and callbacks
    engine.py       wires the parts together: train()
    loss.py, validation.py, plan.py   chunked loss, validation loss, memory plan
"""
