"""merged, factored and auto paths: same outputs and gradients; the cost model's choices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vera_jax


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(40, name="query")(x))
        return nn.Dense(24, name="value")(x) @ jnp.ones((24, 2))


def _setup(method, tokens):
    model = Net()
    x = jax.random.normal(jax.random.key(0), (tokens // 8, 8, 16))
    params = model.init(jax.random.key(1), x)["params"]
    if method == "vera":
        adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=64))
    else:
        adapted = vera_jax.apply_lora(params, vera_jax.LoraConfig(r=2))
    leaves, treedef = jax.tree.flatten(adapted.adapter)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return model, x, adapted.replace(
        adapter=treedef.unflatten([v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]))


@pytest.mark.parametrize("method", ["vera", "lora"])
@pytest.mark.parametrize("tokens", [8, 4096])
def test_all_paths_agree_in_value_and_gradient(method, tokens):
    model, x, adapted = _setup(method, tokens)
    trainable, frozen = vera_jax.partition(adapted)
    outs, grads = {}, {}
    for path in ("merged", "factored", "auto"):
        loss = lambda t: jnp.mean(vera_jax.apply_adapted(model, vera_jax.combine(t, frozen), x, path=path) ** 2)  # noqa: B023,E731
        outs[path], grads[path] = jax.jit(jax.value_and_grad(loss))(trainable)
    for path in ("factored", "auto"):
        np.testing.assert_allclose(outs[path], outs["merged"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads[path]), jax.tree.leaves(grads["merged"])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_cost_model_picks_merged_for_vera_at_scale_and_factored_for_lora():
    # RoBERTa-base q/v, 4096 tokens: VeRA r=1024 merges, LoRA r=8 factors
    assert vera_jax.choose_path(4096, 768, 768, 1024, "vera") == "merged"
    assert vera_jax.choose_path(4096, 768, 768, 8, "lora") == "factored"
    # few tokens: factored even for VeRA; eval with many tokens: merged
    assert vera_jax.choose_path(16, 768, 768, 1024, "vera") == "factored"
    assert vera_jax.choose_path(4096, 768, 768, 8, "lora", train=False) == "merged"
    costs = vera_jax.layer_costs(4096, 768, 768, 1024, "vera")
    assert costs["merged"] == 4096 * 768 * 768 + 3 * 768 * 1024 * 768
    assert costs["factored"] == 4096 * 1024 * (2 * 768 + 3 * 768)


def test_auto_decides_per_layer_from_the_tokens_it_sees():
    model, x, adapted = _setup("vera", 4096)
    jaxpr = str(jax.make_jaxpr(lambda a: vera_jax.apply_adapted(model, a, x, path="auto"))(adapted))
    factored = str(jax.make_jaxpr(lambda a: vera_jax.apply_adapted(model, a, x, path="factored"))(adapted))
    # 4096 tokens, r=64, 16->40 and 40->24: merged for both layers (no (tokens, r) intermediate)
    assert "f32[512,8,64]" not in jaxpr and "f32[512,8,64]" in factored


def test_bad_path_and_dropout_forces_factored():
    model, x, adapted = _setup("vera", 8)
    with pytest.raises(ValueError, match=r"path: 'fast' is not one of"):
        vera_jax.apply_adapted(model, adapted, x, path="fast")
    dropped = adapted.replace(config=adapted.config.replace(dropout=0.5))
    a = vera_jax.apply_adapted(model, dropped, x, path="merged", dropout_rng=jax.random.key(0))
    b = vera_jax.apply_adapted(model, dropped, x, path="factored", dropout_rng=jax.random.key(0))
    np.testing.assert_array_equal(a, b)
