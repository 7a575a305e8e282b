"""Adapter methods: the registry and one module per built-in method (see `registry.Method`).

The method modules import `..core`, so they are imported by `vera_jax.adapters` after it; this
package's own import pulls in only the registry."""
