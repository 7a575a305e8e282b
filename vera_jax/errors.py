"""Errors shared across layers (no JAX here: config code raises them too)."""


class ConfigError(ValueError):
    """A config field has a value the run cannot use; the message names the field."""
