"""Experimental APIs: DpEvent factories for the mechanisms of DP training."""

from jax_privacy.experimental import accounting

__all__ = ['accounting']
