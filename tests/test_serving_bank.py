"""Adapter bank and batched per-row forward: a mixed batch equals each adapter merged and run alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _serving_tiny import FAMILIES, random_vera, tiny

import vera_jax
from vera_jax.interop import save_peft_adapter
from vera_jax.models import generate
from vera_jax.serving import BASE, AdapterBank, AdapterRefused, BankDecoder, rows_for

PAD = 1
NEW = 6
# name -> (targets, seed, r): a and b share A/B (same seed, rank and shapes) with different layers,
# c has another seed and d another rank, so the bank holds three groups.
ADAPTERS = {"a": (("query", "value"), 0, 8), "b": (("query",), 0, 8), "c": (("query", "value"), 7, 8),
            "d": (("key", "value"), 0, 4)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory):
    """(model, params, {name: Adapted}, bank) with every adapter loaded from its directory."""
    model, params, hf_config = tiny(request.param)
    root = tmp_path_factory.mktemp(request.param)
    bank = AdapterBank(params, hf_config)
    adapters = {}
    for i, (name, (targets, seed, r)) in enumerate(ADAPTERS.items()):
        adapters[name] = random_vera(params, targets, seed, r, key=10 + i)
        if name == "c" and request.param == "llama":
            save_peft_adapter(root / name, adapters[name], hf_config)   # a PEFT VeRA directory
        else:
            vera_jax.save_adapter(root / name, adapters[name])
        bank.load(name, root / name)
    return model, params, adapters, bank, request.param


def prompts(batch, length=5):
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 100, (batch, length))
    mask = np.ones_like(ids)
    for row in range(batch):
        mask[row, : row % 3] = 0
    return ids, mask


def assert_rows_match_merged_alone(model, params, adapters, bank, names):
    """One batched greedy decode over `names` (adapters of `bank` or BASE) equals each row's adapter
    merged and decoded alone; returns the batched tokens."""
    ids, mask = prompts(len(names))
    structure, arrays = bank.snapshot()
    refs = [bank.pin(n) for n in names]
    got = np.asarray(generate.greedy(BankDecoder(model, structure), arrays, ids, mask, NEW, None, PAD,
                                     rows=rows_for(structure, refs)))
    for ref in refs:
        bank.unpin(ref)
    for i, name in enumerate(names):
        one = params if name == BASE else vera_jax.merge(adapters[name])
        alone = np.asarray(generate.greedy(model, one, ids[i:i + 1], mask[i:i + 1], NEW, None, PAD))
        np.testing.assert_array_equal(got[i], alone[0], err_msg=name)
    return got, ids, mask


def test_groups_follow_the_projection_fingerprint(served):
    _, _, adapters, bank, family = served
    groups = {n: bank.info(n).group for n in ADAPTERS}
    assert groups["a"] == groups["b"] and len(set(groups.values())) == 3
    assert bank.info("c").format == ("peft" if family == "llama" else "vera_jax")
    for name, adapted in adapters.items():
        expected = sum((adapted.config.r + s.out_features) * 4 for s in adapted.layers)
        assert bank.info(name).bytes == expected == bank.stats()["bytes_per_adapter"][name]
    structure, _ = bank.snapshot()
    union = next(layers for key, layers in structure if key == groups["a"])
    assert {s.path[-1] for s in union} == {"query", "value"}


def test_mixed_batch_is_token_identical_to_each_adapter_merged_alone(served):
    model, params, adapters, bank, _ = served
    names = ["a", BASE, "b", "c", "d", "a", BASE]
    got, ids, mask = assert_rows_match_merged_alone(model, params, adapters, bank, names)
    base = np.asarray(generate.greedy(model, params, ids, mask, NEW, None, PAD))
    assert sum(not np.array_equal(got[i], base[i]) for i, n in enumerate(names) if n != BASE) >= 3


def test_refuses_what_it_cannot_batch_with_the_reason(served, tmp_path):
    model, params, _, bank, family = served
    lora = vera_jax.apply_lora(params, vera_jax.LoraConfig(r=2, targets=("value",)))
    vera_jax.save_adapter(tmp_path / "lora", lora)
    with pytest.raises(AdapterRefused, match="method 'lora' is refused"):
        bank.load("lora", tmp_path / "lora")
    unshared = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=4, targets=("value",), share_projections=False))
    with pytest.raises(AdapterRefused, match="share_projections=False"):
        bank.add("unshared", unshared)
    _, other_params, _ = tiny("llama" if family == "gpt2" else "gpt2")   # layers of other names or shapes
    vera_jax.save_adapter(tmp_path / "other", vera_jax.apply_vera(other_params, vera_jax.VeraConfig(r=4)))
    with pytest.raises(ValueError, match="other layers or shapes|does not fit"):
        bank.load("other", tmp_path / "other")
    with pytest.raises(AdapterRefused, match="already loaded"):
        bank.load("a", tmp_path / "lora")
    with pytest.raises(AdapterRefused, match="not an adapter directory"):
        bank.load("missing", tmp_path / "nope")
    assert bank.names() == sorted(ADAPTERS)


def test_unload_waits_for_pinned_requests_and_capacity_grows(served):
    _, params, adapters, bank, _ = served
    ref = bank.pin("d")
    bank.unload("d")
    assert "d" not in bank.names()
    with pytest.raises(KeyError, match="known: \\['base', 'a', 'b', 'c'\\]"):
        bank.pin("d")
    structure, arrays = bank.snapshot()
    column = [k for k, _ in structure].index(ref[0])
    assert float(jnp.abs(next(iter(arrays["groups"][column]["b"].values()))[ref[1]]).sum()) > 0
    bank.unpin(ref)
    assert ref[0] not in [k for k, _ in bank.snapshot()[0]]   # its group was emptied and dropped
    for i in range(9):                                          # past the first capacity (8 rows)
        bank.add(f"extra{i}", adapters["a"])
    assert max(g["capacity"] for g in bank.stats()["groups"]) == 16
    for i in range(9):
        bank.unload(f"extra{i}")
    bank.add("d", adapters["d"])


def test_ten_thousand_adapters_are_resident_at_once_and_each_row_gets_its_own():
    model, params, _ = tiny("llama")
    bank = AdapterBank(params)
    template = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=4, targets=("value",)))
    rng = np.random.RandomState(0)
    adapters = {f"x{i}": template.replace(adapter=jax.tree.map(
        lambda x: rng.randn(*x.shape).astype(np.float32), template.adapter)) for i in range(10_000)}
    bank.add_many(adapters)
    stats = bank.stats()
    assert stats["adapters"] == 10_000 and len(stats["groups"]) == 1 and stats["groups"][0]["capacity"] == 16_384
    assert set(stats["bytes_per_adapter"].values()) == {2 * (4 + 16) * 4}      # 2 layers of value (16 wide)
    assert_rows_match_merged_alone(model, params, adapters, bank, ["x0", BASE, "x5000", "x9999"])


def test_per_shape_adapters_batch_in_their_own_group_and_match_each_merged_alone():
    """projections="per_shape": one A/B per kernel shape (query, value and down differ here); the
    group keeps those pairs once and every row still equals its adapter merged and run alone."""
    model, params, _ = tiny("llama")
    bank = AdapterBank(params)
    targets = ("query", "value", "down")
    adapters = {name: random_vera(params, targets, 0, 4, key=k, projections="per_shape")
                for name, k in (("p", 1), ("q", 2))}
    adapters["s"] = random_vera(params, targets, 0, 4, key=3)        # shared projections: another group
    bank.add_many(adapters)
    assert bank.info("p").group == bank.info("q").group != bank.info("s").group
    assert len(adapters["p"].projections) >= 2                          # several shapes, one pair each
    assert_rows_match_merged_alone(model, params, adapters, bank, ["p", BASE, "s", "q"])
