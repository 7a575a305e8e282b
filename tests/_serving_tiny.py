"""Tiny GPT-2 / LLaMA / Gemma 3 models, random VeRA adapters and a word-level tokenizer for the serving tests."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers

import vera_jax
from vera_jax.models import generate, gpt2, llama
from vera_jax.serving import chat

EOS = 2
END_OF_TURN = 4   # gemma_tokenizer's <end_of_turn>
ALONE_TOKENS = 12
FAMILIES = {
    "gpt2": (gpt2, transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, initializer_range=0.3,
        bos_token_id=EOS, eos_token_id=EOS)),
    "llama": (llama, transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, initializer_range=0.3, rope_theta=500.0, max_position_embeddings=64,
        bos_token_id=EOS, eos_token_id=EOS)),
    # a sliding layer of 5 slots (prompts and answers run past it, slots at different lengths) and a global one
    "gemma3": (llama, transformers.Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=100, initializer_range=0.3, sliding_window=5, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=EOS, eos_token_id=EOS, pad_token_id=1,
        tie_word_embeddings=False)),  # a tied random head mostly repeats the last token
}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant"


def tiny(name):
    """(model, params, hf_config dict) of a 2-layer random model."""
    family, config = FAMILIES[name]
    model = family.build(config.to_dict())
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    if name == "gemma3":  # Gemma norms start at w = 0; random ones let the residual branches matter
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: 0.5 * jax.random.normal(jax.random.key(len(p)), x.shape) if p[-1].key == "scale" else x,
            params)
    return model, params, config.to_dict()


def random_vera(params, targets, seed, r, key, **fields):
    """A VeRA adapter with random d and b, so it changes the outputs (`fields`: more VeraConfig fields)."""
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=r, targets=targets, seed=seed, **fields))
    leaves, treedef = jax.tree.flatten(adapted.adapter)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return adapted.replace(adapter=jax.tree.unflatten(
        treedef, [x + jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


def _word_level(vocab, **specials):
    """A fast tokenizer that splits on whitespace and maps each word through `vocab`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", **specials)


def word_tokenizer():
    """A fast tokenizer over "<unk> <pad> </s> w3 ... w99" (one word per id), with a chat template."""
    tok = _word_level({"<unk>": 0, "<pad>": 1, "</s>": EOS, **{f"w{i}": i for i in range(3, 100)}},
                      pad_token="<pad>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def gemma_tokenizer():
    """Gemma's special tokens on a word-level vocabulary, "<unk> <pad> <eos> <start_of_turn> <end_of_turn>
    <bos> user model w8 ... w99", with Gemma's chat template (`chat.GEMMA`): a turn ends with
    <end_of_turn> (END_OF_TURN), which is not the eos (EOS), as in Gemma 3 (ids 106 and 1)."""
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": EOS, "<start_of_turn>": 3, "<end_of_turn>": END_OF_TURN, "<bos>": 5,
             "user": 6, "model": 7, **{f"w{i}": i for i in range(8, 100)}}
    tok = _word_level(vocab, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                      extra_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = chat.GEMMA
    return tok


def save_checkpoint(directory, name, params, hf_config, tokenizer=None) -> None:
    """An HF checkpoint directory (config.json, model.safetensors, and `tokenizer`, by default
    `word_tokenizer()`) that from_pretrained reads."""
    from safetensors.numpy import save_file

    family, _ = FAMILIES[name]
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in family.params_to_hf(params, hf_config).items()}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config))
    (tokenizer or word_tokenizer()).save_pretrained(str(directory))


def alone(model, params, prompt, max_tokens, eos=EOS):
    """Greedy tokens of one prompt by generate.greedy, cut after the first EOS. It decodes at least
    ALONE_TOKENS and keeps the first `max_tokens` (greedy's prefix does not depend on how far it
    goes), so the references compile once per prompt length, not per (length, max_tokens)."""
    steps = max(max_tokens, ALONE_TOKENS)
    out = np.asarray(generate.greedy(model, params, np.asarray([prompt]), None, steps, eos, 1))[0].tolist()
    out = out[:max_tokens]
    return out[: out.index(eos) + 1] if eos in out else out


@contextlib.contextmanager
def live_server(app):
    """Serves `app` with uvicorn on a free 127.0.0.1 port in a thread (lifespan included); yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
