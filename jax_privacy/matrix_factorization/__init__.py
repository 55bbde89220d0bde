"""Matrix-factorization mechanisms: correlated noise for DP training.

A workload ``A`` (e.g. prefix sums of gradients) is factored as ``A = B C``;
the mechanism releases ``C x + Z`` privately and post-processes with ``B``,
which amounts to adding ``C^{-1} Z`` to each step's gradient
(``noise_addition.matrix_factorization_privatizer``). Strategies: Toeplitz
(``toeplitz``), buffered-linear Toeplitz (``buffered_toeplitz``, BLT),
banded (``banded``), dense (``dense``) and the binary tree of DP-FTRL
(``tree_aggregation``); ``sensitivity`` computes their sensitivity under a
participation pattern, ``optimization`` runs L-BFGS in float64, and
``streaming_matrix`` applies them step by step in O(state) memory.
"""

from jax_privacy.matrix_factorization import banded
from jax_privacy.matrix_factorization import buffered_toeplitz
from jax_privacy.matrix_factorization import checks
from jax_privacy.matrix_factorization import dense
from jax_privacy.matrix_factorization import optimization
from jax_privacy.matrix_factorization import sensitivity
from jax_privacy.matrix_factorization import streaming_matrix
from jax_privacy.matrix_factorization import toeplitz
from jax_privacy.matrix_factorization import tree_aggregation

__all__ = [
    'banded',
    'buffered_toeplitz',
    'checks',
    'dense',
    'optimization',
    'sensitivity',
    'streaming_matrix',
    'toeplitz',
    'tree_aggregation',
]
