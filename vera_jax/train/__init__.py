"""The one trainer for every benchmark family (DESIGN contract 4).

    config = vera_jax.train.default_config()      # every field documented there
    initialize_distributed(config)                # multi-host only, before any JAX computation
    result = train_and_evaluate(config, workdir, Task(adapted=..., loss_fn=..., train_data=..., ...))
"""

from .._lazy import lazy_exports

# each name imported from its module when first used: a config's `default_config` never starts JAX
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".checkpoint": ("CheckpointMismatchError",),
    ".config": ("default_config",),
    ".losses": ("chunked_token_losses", "token_losses_from_logits"),
    ".mesh": ("initialize_distributed", "make_mesh", "param_shardings"),
    ".optim": ("make_optimizer", "make_schedule"),
    ".trainer": ("PREEMPTED_EXIT_CODE", "Eval", "NonFiniteLossError", "Preempted", "Task", "TrainResult",
                 "TrainState", "call_model_fn", "cast_params", "make_train_step", "train_and_evaluate"),
})
