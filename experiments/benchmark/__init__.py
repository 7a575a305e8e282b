"""Train-step cost of VeRA next to the frozen model's own forward + backward (the floor), LoRA,
full fine-tuning and, optionally, HF PEFT on the same shapes; and the measured crossover of the
merged/factored cost model. Run it as `python -m experiments.benchmark` (flags in `__main__`).

    shapes.py     models (bundled HF configs, depth/width overrides), random batches, the loss
    steps.py      the vera_jax rows: the floor and the trainer's own step per method
    peft_ref.py   the same shapes in PyTorch: transformers + HF PEFT
    timing.py     compile time, step time, memory, and the machine
    report.py     the record (ratios to the floor and to PEFT) and its markdown table
    crossover.py  one Dense layer, merged vs factored, against `vera_jax.choose_path`

Depth: the floor back-propagates through the lowest layer to the embeddings, while an adapter
step stops at the lowest adapted layer's weights, so with very few layers (--layers=1) the
adapters skip a larger share of the floor's work than in the full model. Use several layers
(the ratios then approach the full model's) when reporting.
"""
