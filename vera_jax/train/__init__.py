"""The one trainer for every benchmark family (DESIGN contract 4).

    config = vera_jax.train.default_config()      # every field documented there
    initialize_distributed(config)                # multi-host only, before any JAX computation
    result = train_and_evaluate(config, workdir, Task(adapted=..., loss_fn=..., train_data=..., ...))
"""

from .checkpoint import CheckpointMismatchError
from .config import default_config
from .mesh import initialize_distributed, make_mesh, param_shardings
from .optim import make_optimizer, make_schedule
from .trainer import (
    PREEMPTED_EXIT_CODE,
    Eval,
    NonFiniteLossError,
    Preempted,
    Task,
    TrainResult,
    TrainState,
    call_model_fn,
    cast_params,
    make_train_step,
    train_and_evaluate,
)

__all__ = [
    "PREEMPTED_EXIT_CODE", "CheckpointMismatchError", "Eval", "NonFiniteLossError", "Preempted", "Task",
    "TrainResult", "TrainState", "call_model_fn", "cast_params", "default_config", "initialize_distributed",
    "make_mesh", "make_optimizer", "make_train_step", "make_schedule", "param_shardings", "train_and_evaluate",
]
