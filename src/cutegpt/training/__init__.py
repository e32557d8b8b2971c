"""Training: `train sft` (sft.py), `train pt` (pt.py), `export` (export.py).

    args.py       settings shared by both commands (flags and YAML keys)
    data.py       packed rows, raw-text packing, the collator (samples never see each other)
    ds_config.py  DeepSpeed files reconciled with our settings; one process without a launcher
    engine.py     Trainer + peft + deepspeed: atomic checkpoints, NaN guard, progress, summary
"""
