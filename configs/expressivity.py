"""Defaults of experiments/expressivity.py: a few CPU minutes."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.n = 128  # the target is n x n; LoRA rank k trains 2 n k numbers, VeRA rank r trains n + r
    c.lora_ranks = (1, 2, 4, 8, 16)  # LoRA ranks fitted
    c.vera_ranks = (16, 64, 256, 1024, 4096)  # VeRA ranks fitted (r may exceed n: A, B stay random)
    c.num_seeds = 3  # targets and adapter seeds per point; the table reports medians
    c.steps = 3000  # Adam steps per fit (cosine decay to 1% of the peak)
    c.lora_lr = 1e-2  # peak Adam learning rate for LoRA
    c.vera_lr = 1e-2  # peak Adam learning rate for VeRA's d and b
    c.d_initial = 0.1  # VeRA's d at the start
    return c
