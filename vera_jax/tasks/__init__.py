"""The family layer: one generic runner (`runner.run`) and one small module per benchmark family.

    from vera_jax.tasks import glue, runner
    summary = runner.run(glue.FAMILY, config, workdir)
"""

from .._lazy import lazy_exports

# imported from the runner when first used: a config's `vera_jax.tasks.config` alone stays light
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".runner": ("ConfigError", "Family", "Model", "Parts", "build", "load_model", "run"),
})
