"""The family layer: one generic runner (`runner.run`) and one small module per benchmark family.

    from vera_jax.tasks import glue, runner
    summary = runner.run(glue.FAMILY, config, workdir)
"""

from .runner import ConfigError, Family, Model, Parts, build, load_model, run

__all__ = ["ConfigError", "Family", "Model", "Parts", "build", "load_model", "run"]
