"""The PyTorch reference: transformers + HF PEFT on the same shapes and batches as the vera_jax rows.

On CUDA when available, else CPU with torch.set_num_threads(os.cpu_count()): the floor (a hook
adds a zero tensor to the embedding output, every weight frozen), PEFT VeRA and PEFT LoRA trained
with torch.optim.AdamW, in `eval()` mode (dropout off; autograd untouched). PEFT runs eagerly, so
its compile column is the first step's time; its memory is CUDA's max_memory_allocated (None on
CPU). GPT-2's HF attention is one fused c_attn, which PEFT can only adapt whole (query, key and
value), while vera_jax adapts query and value.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings

import numpy as np

from .shapes import FAMILY, make_batch


def run_peft(cfg: dict, batch: int, seq: int, iters: int, warmup: int, vera_r: int, lora_r: int,
             dtype: str) -> dict:
    """The floor, PEFT VeRA and PEFT LoRA in PyTorch; keys peft_floor, peft_vera, peft_lora, and
    `_device` (what torch ran on)."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    kind = cfg["model_type"]
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    architecture = getattr(transformers, cfg["architectures"][0])
    ids_np, labels_np = make_batch(cfg, batch, seq)
    ids = torch.from_numpy(ids_np.astype(np.int64)).to(device)
    labels = torch.from_numpy(labels_np.astype(np.int64)).to(device)
    targets = FAMILY[kind][1]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def build():
        torch.manual_seed(0)
        return architecture(hf_cfg)

    def loss_of(model):
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def time_steps(step) -> dict:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(warmup + iters):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
        timed = times[warmup:]
        return {"step_ms": 1e3 * statistics.median(timed), "first_step_s": times[0],
                "memory": {"device_peak": peak}}

    results = {}
    model = build().to(device=device, dtype=tdtype).eval()
    model.requires_grad_(False)
    embedding = {"roberta": lambda m: m.roberta.embeddings, "gpt2": lambda m: m.transformer.wte,
                 "llama": lambda m: m.model.embed_tokens}[kind](model)
    eps = torch.zeros(batch, seq, hf_cfg.hidden_size, dtype=tdtype, device=device, requires_grad=True)
    hook = embedding.register_forward_hook(lambda module, args, out: out + eps)

    def floor_step(model=model):
        eps.grad = None
        loss_of(model).backward()

    results["peft_floor"] = {**time_steps(floor_step), "trainable": 0}
    hook.remove()
    model = floor_step = None  # free the floor model (floor_step binds it too) before the PEFT ones

    adapters = {
        "peft_vera": peft.VeraConfig(r=vera_r, target_modules=targets, d_initial=0.1, vera_dropout=0.0,
                                     fan_in_fan_out=kind == "gpt2"),
        "peft_lora": peft.LoraConfig(r=lora_r, lora_alpha=lora_r, target_modules=targets, lora_dropout=0.0,
                                     fan_in_fan_out=kind == "gpt2"),
    }
    for name, adapter_config in adapters.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(build(), adapter_config).to(device=device, dtype=tdtype).eval()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss_of(model).backward()
            optimizer.step()

        results[name] = {**time_steps(step), "trainable": sum(p.numel() for p in trainable)}
        del model, optimizer
    results["_device"] = f"torch {torch.__version__} {device}, {torch.get_num_threads()} threads"
    return results
