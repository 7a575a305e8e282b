"""The batched per-row VeRA forward: one base, a different adapter (or none) in every row.

For each targeted layer and each group of the bank (adapters sharing A/B):

    y = x @ W0 + sum_g ((x @ A_l.T) * d_g[ids_g]) @ B_l.T * b_g[ids_g]

where `ids_g` (batch,) holds each row's row in group g (0, the zero row, for rows that do not use
the group). The two matmuls use the group's one A_l and B_l for every row; each row gathers only
its own d (r,) and b (out,). Cost is therefore independent of how many distinct adapters the batch
holds (contract 7). The term is computed in float32 (as `merge` adds its delta), so a small update
is not rounded away by a low-precision base.

The model is not rewritten: as `factored.call_adapted` does, `adapters.hooks.layer_hooks` adds the
term to the output of each targeted Dense call, found by the module's scope path. A quantized base
(`vera_jax.quant`) runs dequantized per layer.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from vera_jax.adapters.hooks import LayerCall, layer_hooks
from vera_jax.adapters.projections import shape_key
from vera_jax.quant import maybe_dequantized


def per_row_term(x, a, b_proj, d, b, ids):
    """((x @ A.T) * d[ids]) @ B.T * b[ids] for x (batch, ..., in), ids (batch,); float32."""
    x = x.astype(jnp.float32)
    lead = x.shape[1:-1]
    rows_d = d[ids].reshape((ids.shape[0],) + (1,) * len(lead) + (d.shape[-1],))
    rows_b = b[ids].reshape((ids.shape[0],) + (1,) * len(lead) + (b.shape[-1],))
    return ((x @ a.T) * rows_d) @ b_proj.T * rows_b


def _layer_pair(projections: dict, spec) -> tuple:
    """A_l (r, in), B_l (out, r) from a group's projections: the shared pair sliced to the layer,
    or the pair of the layer's kernel shape (`projections="per_shape"`)."""
    if "A" in projections:
        return projections["A"][:, : spec.in_features], projections["B"][: spec.out_features, :]
    own = projections[shape_key(spec)]
    return own["A"], own["B"]


@dataclasses.dataclass(frozen=True)
class BankDecoder:
    """A `generate.Decoder` over an `AdapterBank` snapshot.

    model: the linen causal LM. structure: `AdapterBank.snapshot()[0]`, a tuple of (group key,
    layers) (static: a new group or layer recompiles; loading adapters into existing capacity does
    not). params: the snapshot's arrays. rows: (batch, groups) int32 from `bank.rows_for`.
    """

    model: nn.Module
    structure: tuple

    def init_cache(self, batch_size: int, max_length: int):
        return self.model.init_cache(batch_size, max_length)

    def prepare(self, params, tokens: int):
        return params

    def apply(self, prepared, input_ids, attention_mask, cache, rows):
        terms = self._layer_terms(prepared["groups"], rows, input_ids.shape[0])

        def hook(call: LayerCall):
            return call.add(sum(per_row_term(call.x, *operands) for _, *operands in terms[call.spec.path]))

        # the hooks run outermost, then a quantized base's dequantization
        with layer_hooks([fns[0][0] for fns in terms.values()], hook), maybe_dequantized(prepared["base"]):
            return self.model.apply({"params": prepared["base"]}, input_ids, attention_mask=attention_mask,
                                    cache=cache)

    def _layer_terms(self, groups, rows, batch: int) -> dict:
        """layer path -> [(spec, A_l, B_l, d stack, b stack, ids)], one entry per group adapting it."""
        if len(groups) != len(self.structure):
            raise ValueError(f"params: {len(groups)} groups, but the decoder was built for {len(self.structure)}")
        if self.structure and (rows is None or rows.shape != (batch, len(self.structure))):
            got = None if rows is None else rows.shape
            raise ValueError(f"rows: expected (batch, groups) = {(batch, len(self.structure))} int32, got {got}")
        terms: dict = {}
        for g, ((_, layers), arrays) in enumerate(zip(self.structure, groups)):
            ids = rows[:, g]
            for spec in layers:
                terms.setdefault(spec.path, []).append((
                    spec, *_layer_pair(arrays["projections"], spec), arrays["d"][spec.name], arrays["b"][spec.name],
                    ids))
        return terms

