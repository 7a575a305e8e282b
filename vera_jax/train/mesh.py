"""Multi-host start-up; the mesh and sharding helpers live in `vera_jax.sharding` (below models,
which place checkpoints with them) and are re-exported here for the trainer's callers."""

from __future__ import annotations

import jax

from vera_jax.sharding import (  # noqa: F401 - the trainer's mesh API
    AXES,
    batch_divisor,
    batch_sharding,
    global_batch,
    make_mesh,
    param_shardings,
    put,
    replicated,
)


def initialize_distributed(config) -> None:
    """Starts jax.distributed when `config.distributed.enabled`; call it before any JAX computation."""
    d = config.distributed
    if not d.enabled:
        return
    kwargs = {}
    if d.coordinator_address:
        kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes > 0:
        kwargs["num_processes"] = d.num_processes
    if d.process_id >= 0:
        kwargs["process_id"] = d.process_id
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
