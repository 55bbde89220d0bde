"""How the gradient computer obtains per-example gradients.

Every method gives the same clipped gradients (to floating-point summation
order); they differ in speed and memory only, never in the guarantee.

References:
  Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", 2021, arXiv:2110.05679 (ghost clipping).
  Bu et al., "Differentially Private Optimization on Large Model at Small
  Cost", 2022, arXiv:2210.00038 (book-keeping).
"""

import enum


class PerExampleGradMethod(enum.Enum):
  """The per-example gradient algorithm of a gradient computer.

  Attributes:
    VECTORIZED: all examples of the batch at once with ``jax.vmap``: memory
      proportional to batch size times parameters.
    UNROLLED: one example at a time in a ``lax.scan``, accumulating the
      clipped sum: memory of one gradient, slower.
    GHOST: ghost norms and book-keeping (``clipped_grad(method='ghost')``):
      per-example gradient norms of dense, convolution and embedding weights
      from activations and output gradients, without materialising their
      per-example gradients; other parameters are materialised. Needs the
      default ``global_norm_fn``.
    AUTO: GHOST when some weight can be tapped and ``global_norm_fn`` is the
      default, else VECTORIZED.
  """

  VECTORIZED = 'vectorized'
  UNROLLED = 'unrolled'
  GHOST = 'ghost'
  AUTO = 'auto'


VECTORIZED = PerExampleGradMethod.VECTORIZED
UNROLLED = PerExampleGradMethod.UNROLLED
GHOST = PerExampleGradMethod.GHOST
AUTO = PerExampleGradMethod.AUTO
