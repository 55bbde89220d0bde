"""Experimental APIs: DpEvent factories and compilation planning."""

from jax_privacy.experimental import accounting
from jax_privacy.experimental import compilation_utils

__all__ = ['accounting', 'compilation_utils']
