"""Experiments built on JAX Privacy (not imported by the library)."""
