"""The gradient-computer API of the "JAX & Flax" guide.

* :mod:`~jax_privacy.dp_sgd.gradients`: ``DpsgdGradientComputer``.
* :mod:`~jax_privacy.dp_sgd.grad_clipping`: per-example gradient methods.
* :mod:`~jax_privacy.dp_sgd.typing`: ``Metrics`` and the loss-wrapper type.
"""

from jax_privacy.dp_sgd import grad_clipping
from jax_privacy.dp_sgd import gradients
from jax_privacy.dp_sgd import typing
