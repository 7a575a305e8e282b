"""experiments/analysis.py: |d| per layer and LoRA-vs-VeRA delta cosines with random baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vera_jax
from experiments import analysis


def _params(n_layers=3, width=48):
    rng = np.random.default_rng(0)
    dense = lambda: {"kernel": jnp.asarray(rng.standard_normal((width, width)), jnp.float32), "bias": jnp.zeros(width)}  # noqa: E731
    return {f"layer_{i}": {"attention": {"query": dense(), "value": dense()}} for i in range(n_layers)}


def _trained_vera(params):
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=16))
    leaves, treedef = jax.tree.flatten(adapted.adapter)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return adapted.replace(adapter=treedef.unflatten([v + jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]))


def _lora_equal_to(vera, params):
    """A LoRA adapter whose every delta equals VeRA's: A = diag(d) A_l, B = diag(b) B_l, alpha = r."""
    lora = vera_jax.apply_lora(params, vera_jax.LoraConfig(r=16, alpha=16))
    tree = jax.tree.map(lambda x: x, lora.adapter)
    for spec in vera.layers:
        vec = vera_jax.adapters.core.get_path(vera.adapter, spec.path)
        a, b = vera_jax.adapters.core.layer_projections(vera, spec)
        vera_jax.adapters.core.set_path(tree, spec.path, {"lora_A": a * vec["lambda_d"][:, None],
                                                          "lora_B": b * vec["lambda_b"][:, None]})
    return lora.replace(adapter=tree)


def test_identical_deltas_have_cosine_one_and_baselines_near_zero(tmp_path):
    params = _params()
    vera = _trained_vera(params)
    lora = _lora_equal_to(vera, params)
    rows = analysis.delta_cosines(vera, lora)
    assert len(rows) == 6 and {r["module"] for r in rows} == {"query", "value"}
    for r in rows:
        assert r["cos_lora_vera"] == pytest.approx(1.0, abs=1e-5)
        assert abs(r["cos_lora_gaussian"]) < 0.15
        assert abs(r["cos_lora_random_vera"]) < 0.5
    unrelated = vera_jax.apply_lora(params, vera_jax.LoraConfig(r=16, alpha=16))
    unrelated = unrelated.replace(adapter=jax.tree.map(lambda x: x + 1.0, unrelated.adapter))
    assert max(abs(r["cos_lora_vera"]) for r in analysis.delta_cosines(vera, unrelated)) < 0.5


def test_d_magnitudes_per_layer_and_module_and_files(tmp_path):
    params = _params()
    vera = _trained_vera(params)
    rows = analysis.d_magnitudes(vera)
    assert [(r["layer"], r["module"]) for r in rows] == [(i, m) for i in range(3) for m in ("query", "value")]
    first = vera.adapter["layer_0"]["attention"]["query"]["lambda_d"]
    assert rows[0]["mean_abs_d"] == pytest.approx(float(jnp.abs(first).mean()))
    written = analysis.analyse(vera, _lora_equal_to(vera, params), tmp_path)
    assert all(p.stat().st_size > 0 for p in written.values()) and len(written) == 5
    assert "| 0 | query | 1.0000 |" in (tmp_path / "delta_cosine.md").read_text()
    with pytest.raises(ValueError, match="expected a VeRA adapter"):
        analysis.d_magnitudes(vera_jax.apply_lora(params, vera_jax.LoraConfig()))
