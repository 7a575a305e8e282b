"""Which adapter path is cheaper for one layer: a cost model in multiply-adds. Each method's
counts are its registry record's `cost` (methods/vera.py, lora.py, dvora.py); VeRA's and LoRA's:

For a layer with `tokens` rows of input, kernel (n_in, n_out) and rank r:

  training   merged   = tokens*n_in*n_out      (the weight gradient dW = x.T @ g, which the
                                                frozen model never computes)
                      + 3*n_in*r*n_out         (form the delta, then the two products that take
                                                dW back to the factors)
             factored = LoRA: 3*tokens*r*(n_in+n_out) (forward x@A.T@B.T, the same again for the
                                                input gradient, and the factors' gradients)
                        VeRA: tokens*r*(2*n_in+3*n_out) (forward x@A.T and h@(b*B).T, backward
                                                g@(b*B), g.T@h for b's gradient, and @A for the
                                                input's; d's gradient is an elementwise sum)
  inference  merged   = n_in*r*n_out           (form W0 + delta once; the matmul is the base's)
             factored = tokens*r*(n_in+n_out)

The merged path is cheaper when the factored products outweigh n_in*n_out*(tokens + 3r), which
is VeRA's usual regime (large r), while LoRA's small r favours the factored path. Both are the
minimum the implementation reaches: the merged delta's backward is hand-written
(`methods.vera.vera_delta`), and the factored VeRA term keeps only (tokens, r) activations.
Memory, reported but not used to choose: merged holds W_eff and dW (2*n_in*n_out numbers),
factored keeps the (tokens, r) activation for the backward pass.
"""

from __future__ import annotations

from typing import Literal

from .methods import registry

Path = Literal["merged", "factored"]


def layer_costs(tokens: int, n_in: int, n_out: int, r: int, method: str = "vera", train: bool = True,
                layers: int = 1) -> dict:
    """Multiply-adds (the registered method's `cost`) and extra activation/weight memory (in
    numbers) of both paths for one layer, or for `layers` stacked layers (an nn.scan's L: each
    layer sees `tokens` rows)."""
    cost = registry.get(method).cost
    if cost is None:
        raise ValueError(f"method {method!r} has no cost model (its auto path always factors)")
    ops = cost(tokens, n_in, n_out, r, train)
    return {"merged": layers * ops["merged"], "factored": layers * ops["factored"],
            "merged_memory": layers * (2 if train else 1) * n_in * n_out, "factored_memory": layers * tokens * r}


def choose_path(tokens: int, n_in: int, n_out: int, r: int, method: str = "vera", train: bool = True,
                layers: int = 1) -> Path:
    """The path with fewer multiply-adds (merged on a tie)."""
    costs = layer_costs(tokens, n_in, n_out, r, method, train, layers)
    return "merged" if costs["merged"] <= costs["factored"] else "factored"
