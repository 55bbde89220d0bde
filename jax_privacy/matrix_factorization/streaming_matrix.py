"""Lower-triangular matrices applied to a stream of vectors in O(state) memory.

A mechanism of correlated noise multiplies the stream of per-step noise
vectors ``z_0, z_1, ...`` (each a pytree the size of the model) by a
lower-triangular matrix ``M``: step ``t`` releases ``y_t = sum_{s<=t} M[t, s]
z_s``. Storing all past ``z_s`` costs ``t`` model copies; a
:class:`StreamingMatrix` instead keeps a small state (a few model-sized
buffers for banded, BLT or tree matrices) and produces ``y_t`` from
``z_t`` and that state::

    state = matrix.init_multiply(example)        # example: a pytree
    for z in stream:
      y, state = matrix.multiply_next(z, state)

Both functions are pure JAX, so they run under ``jit`` and inside optax
transformations. Coefficients of steps past the end of a finite table are
NaN, so running a finite matrix for too many steps fails loudly instead of
silently reusing coefficients.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_privacy.matrix_factorization import checks

__all__ = [
    'StreamingMatrix',
    'diagonal',
    'identity',
    'map_with_state',
    'momentum_sgd_matrix',
    'multiply_array',
    'multiply_streaming_matrices',
    'prefix_sum',
    'scale_rows_and_columns',
]

PyTree = Any
State = Any


@dataclasses.dataclass(frozen=True)
class StreamingMatrix:
  """A lower-triangular matrix given by its action on a stream.

  Attributes:
    init_multiply: ``example -> state``. ``example`` is a pytree of arrays
      (or ``jax.ShapeDtypeStruct``) shaped like one element of the stream;
      the state holds whatever the matrix needs from past elements.
    multiply_next: ``(x_t, state) -> (y_t, new_state)`` with ``y_t = sum_{s
      <= t} M[t, s] x_s``, where ``t`` is the number of earlier calls.
  """

  init_multiply: Callable[[PyTree], State]
  multiply_next: Callable[[PyTree, State], tuple[PyTree, State]]

  def __post_init__(self):
    for name in ('init_multiply', 'multiply_next'):
      if not callable(getattr(self, name)):
        raise ValueError(
            f'{name} must be callable, got {getattr(self, name)!r}'
        )

  def materialize(self, n: int) -> jax.Array:
    """The leading ``n x n`` block of the matrix, as a dense array.

    Streams the rows of the identity: element ``t`` of the stream is the
    unit vector ``e_t``, so output ``t`` is row ``t`` of the matrix.
    """
    n = checks.check_positive_int('n', n)
    eye = jnp.eye(n, dtype=jnp.result_type(float))
    return multiply_array(self, eye)

  def row_norms_squared(self, n: int) -> jax.Array:
    """Squared L2 norms of the first ``n`` rows (per-step noise variance)."""
    return jnp.sum(jnp.square(self.materialize(n)), axis=1)

  def __matmul__(self, other: 'StreamingMatrix') -> 'StreamingMatrix':
    return multiply_streaming_matrices(self, other)


def map_with_state(fn, tree: PyTree, state: PyTree) -> tuple[PyTree, PyTree]:
  """Applies ``fn(leaf, leaf_state) -> (out, new_leaf_state)`` leafwise.

  ``state`` has one entry (any pytree) per leaf of ``tree``, in the
  structure of ``tree``; returns the outputs and the new states, each in
  that structure. Safe for trees whose containers are tuples.
  """
  leaves, treedef = jax.tree.flatten(tree)
  states = treedef.flatten_up_to(state)
  results = [fn(leaf, leaf_state) for leaf, leaf_state in zip(leaves, states)]
  return (
      jax.tree.unflatten(treedef, [out for out, _ in results]),
      jax.tree.unflatten(treedef, [new for _, new in results]),
  )


def _zeros_like(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def _scale(coefficient, tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: (coefficient * x).astype(x.dtype), tree)


def _add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def _table_lookup(table: np.ndarray, step: jax.Array) -> jax.Array:
  """``table[step]``, or NaN once ``step`` is past the end of the table."""
  table = jnp.asarray(table)
  value = table[jnp.minimum(step, table.shape[0] - 1)]
  return jnp.where(step < table.shape[0], value, jnp.nan)


def _as_table(name: str, values) -> np.ndarray:
  array = checks.check_finite(name, values)
  if array.ndim != 1 or array.shape[0] == 0:
    raise ValueError(
        f'{name} must be a non-empty 1-D array, got shape {array.shape}'
    )
  return array


def identity() -> StreamingMatrix:
  """The identity matrix: ``y_t = x_t`` with no state (DP-SGD noise)."""
  return StreamingMatrix(
      init_multiply=lambda example: (),
      multiply_next=lambda x, state: (x, state),
  )


def prefix_sum() -> StreamingMatrix:
  """The all-ones lower-triangular matrix: ``y_t = x_0 + ... + x_t``."""

  def multiply_next(x, running_sum):
    total = _add(running_sum, x)
    return total, total

  return StreamingMatrix(init_multiply=_zeros_like, multiply_next=multiply_next)


def diagonal(diag) -> StreamingMatrix:
  """The diagonal matrix ``diag(d)``: ``y_t = d[t] x_t``.

  Args:
    diag: 1-D array of the ``n`` diagonal entries; steps past ``n`` give NaN.

  Returns:
    The streaming matrix.
  """
  table = _as_table('diag', diag)

  def multiply_next(x, step):
    return _scale(_table_lookup(table, step), x), step + 1

  return StreamingMatrix(
      init_multiply=lambda example: jnp.zeros([], jnp.int32),
      multiply_next=multiply_next,
  )


def momentum_sgd_matrix(
    momentum: float = 0.0, learning_rates=None
) -> StreamingMatrix:
  """The map from gradients to the total parameter change of momentum SGD.

  With ``m_t = momentum * m_{t-1} + g_t`` and ``theta_t = theta_{t-1} -
  lr_t m_t``, ``theta_0 - theta_t`` is row ``t`` of this matrix times the
  gradient stream: ``M[t, s] = sum_{r=s}^{t} lr_r momentum^(r - s)``. It is
  the workload ``A`` of matrix-factorization DP-FTRL with momentum.

  Args:
    momentum: in ``[0, 1)``.
    learning_rates: ``None`` (all ones) or a 1-D array of per-step rates.

  Returns:
    The streaming matrix.

  References:
    Denisov et al., "Improved Differential Privacy for SGD via Optimal
    Private Linear Operators on Adaptive Streams", 2022, arXiv:2202.08312.
  """
  if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
    raise ValueError(f'momentum must be in [0, 1), got {momentum!r}')
  table = (
      None
      if learning_rates is None
      else _as_table('learning_rates', learning_rates)
  )

  def init_multiply(example):
    return _zeros_like(example), _zeros_like(example), jnp.zeros([], jnp.int32)

  def multiply_next(x, state):
    velocity, total, step = state
    velocity = _add(_scale(momentum, velocity), x)
    rate = 1.0 if table is None else _table_lookup(table, step)
    total = _add(total, _scale(rate, velocity))
    return total, (velocity, total, step + 1)

  return StreamingMatrix(
      init_multiply=init_multiply, multiply_next=multiply_next
  )


def scale_rows_and_columns(
    matrix: StreamingMatrix, row_scale=None, col_scale=None
) -> StreamingMatrix:
  """``diag(row_scale) @ matrix @ diag(col_scale)`` as a streaming matrix.

  Args:
    matrix: the streaming matrix to scale.
    row_scale: ``None`` (ones) or a 1-D array, one entry per output step.
    col_scale: ``None`` (ones) or a 1-D array, one entry per input step.

  Returns:
    The scaled streaming matrix; steps past a given table give NaN.
  """
  rows = None if row_scale is None else _as_table('row_scale', row_scale)
  cols = None if col_scale is None else _as_table('col_scale', col_scale)

  def init_multiply(example):
    return matrix.init_multiply(example), jnp.zeros([], jnp.int32)

  def multiply_next(x, state):
    inner, step = state
    if cols is not None:
      x = _scale(_table_lookup(cols, step), x)
    y, inner = matrix.multiply_next(x, inner)
    if rows is not None:
      y = _scale(_table_lookup(rows, step), y)
    return y, (inner, step + 1)

  return StreamingMatrix(
      init_multiply=init_multiply, multiply_next=multiply_next
  )


def multiply_streaming_matrices(
    first: StreamingMatrix, second: StreamingMatrix
) -> StreamingMatrix:
  """The product ``first @ second``: the stream enters ``second`` first."""

  def init_multiply(example):
    return first.init_multiply(example), second.init_multiply(example)

  def multiply_next(x, state):
    first_state, second_state = state
    middle, second_state = second.multiply_next(x, second_state)
    y, first_state = first.multiply_next(middle, first_state)
    return y, (first_state, second_state)

  return StreamingMatrix(
      init_multiply=init_multiply, multiply_next=multiply_next
  )


def multiply_array(
    matrix: StreamingMatrix, array: jax.typing.ArrayLike
) -> jax.Array:
  """``matrix[:n, :n] @ array`` for an array of ``n`` stacked stream elements.

  Args:
    matrix: the streaming matrix.
    array: shape ``(n, ...)``; ``array[t]`` is the stream element of step t.

  Returns:
    An array of the shape of ``array``: row ``t`` is output ``t``.
  """
  array = jnp.asarray(array)
  if array.ndim == 0 or array.shape[0] == 0:
    raise ValueError(
        f'array must have a non-empty leading axis, got shape {array.shape}'
    )

  def step(state, x):
    y, state = matrix.multiply_next(x, state)
    return state, y

  _, outputs = jax.lax.scan(step, matrix.init_multiply(array[0]), array)
  return outputs
