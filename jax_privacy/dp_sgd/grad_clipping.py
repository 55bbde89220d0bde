"""How the gradient computer obtains per-example gradients.

Both methods give the same clipped gradients (to floating-point summation
order); they differ in speed and memory only, never in the guarantee.
"""

import enum


class PerExampleGradMethod(enum.Enum):
  """The per-example gradient algorithm of a gradient computer.

  Attributes:
    VECTORIZED: all examples of the batch at once with ``jax.vmap``: fastest,
      memory proportional to batch size times parameters.
    UNROLLED: one example at a time in a ``lax.scan``, accumulating the
      clipped sum: memory of one gradient, slower.
  """

  VECTORIZED = 'vectorized'
  UNROLLED = 'unrolled'


VECTORIZED = PerExampleGradMethod.VECTORIZED
UNROLLED = PerExampleGradMethod.UNROLLED
