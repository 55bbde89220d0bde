"""Buffered-linear Toeplitz (BLT) strategies: Toeplitz matrices with d buffers.

A BLT with buffer decays ``theta`` and output scales ``omega`` (``d`` each)
is the lower-triangular Toeplitz matrix with coefficients ``c_0 = 1`` and
``c_k = sum_i omega_i theta_i^(k - 1)`` for ``k >= 1``. It multiplies a
stream with ``d`` buffers, whatever the number of steps::

    y_t = x_t + sum_i omega_i S_i;   S_i <- theta_i S_i + x_t

Its inverse is again a BLT with ``d`` buffers (or streams directly as
``y_t = x_t - sum_i omega_i S_i``, ``S_i <- theta_i S_i + y_t``), and the
max error for prefix sums has a closed form in ``O(d^2)``.

References:
  Dvijotham, McMahan, Pillutla, Steinke, Thakurta, "Efficient and
  Near-Optimal Noise Generation for Streaming Differential Privacy", 2024,
  arXiv:2404.16706.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_privacy.matrix_factorization import checks
from jax_privacy.matrix_factorization import optimization
from jax_privacy.matrix_factorization import streaming_matrix
from jax_privacy.matrix_factorization import toeplitz

__all__ = [
    'BufferedToeplitz',
    'limit_max_error',
    'max_error',
    'optimize',
    'sensitivity_squared',
]


@dataclasses.dataclass(frozen=True)
class BufferedToeplitz:
  """A BLT matrix ``c_0 = 1``, ``c_k = sum_i output_scale_i buf_decay_i^(k-1)``.

  Attributes:
    buf_decay: the ``d`` buffer decays ``theta``, each in ``[0, 1]``
      (the BLT returned by :meth:`inverse` may have negative or complex
      decays of modulus at most 1).
    output_scale: the ``d`` output scales ``omega``.
  """

  buf_decay: tuple
  output_scale: tuple

  def __post_init__(self):
    decay = np.atleast_1d(np.asarray(self.buf_decay))
    scale = np.atleast_1d(np.asarray(self.output_scale))
    if decay.ndim != 1 or decay.shape != scale.shape:
      raise ValueError(
          'buf_decay and output_scale must be 1-D of the same length, got '
          f'shapes {decay.shape} and {scale.shape}'
      )
    if not (np.all(np.isfinite(decay)) and np.all(np.isfinite(scale))):
      raise ValueError('buf_decay and output_scale must be finite')
    if np.iscomplexobj(decay) or np.any(decay < 0.0) or np.any(decay > 1.0):
      raise ValueError(f'buf_decay must be real and in [0, 1], got {decay!r}')
    object.__setattr__(self, 'buf_decay', tuple(decay.tolist()))
    object.__setattr__(self, 'output_scale', tuple(scale.tolist()))

  @classmethod
  def _from_inverse(cls, decay, scale) -> 'BufferedToeplitz':
    """An inverse BLT: decays may be negative or complex (modulus <= 1)."""
    if np.any(np.abs(decay) > 1.0 + 1e-12):
      raise ValueError(f'the inverse has buf_decay of modulus > 1: {decay!r}')
    blt = object.__new__(cls)
    object.__setattr__(blt, 'buf_decay', tuple(np.asarray(decay).tolist()))
    object.__setattr__(blt, 'output_scale', tuple(np.asarray(scale).tolist()))
    return blt

  @property
  def _decay(self) -> np.ndarray:
    return np.asarray(self.buf_decay)

  @property
  def _scale(self) -> np.ndarray:
    return np.asarray(self.output_scale)

  def toeplitz_coefs(self, n: int) -> np.ndarray:
    """The first ``n`` Toeplitz coefficients (float64; real part)."""
    n = checks.check_positive_int('n', n)
    powers = self._decay[None, :] ** np.arange(max(n - 1, 0))[:, None]
    tail = powers @ self._scale
    return np.real(np.concatenate([[1.0], tail]))

  def materialize(self, n: int) -> np.ndarray:
    """The ``n x n`` lower-triangular Toeplitz matrix."""
    return _materialize(self.toeplitz_coefs(n))

  def inverse(self) -> 'BufferedToeplitz':
    """The BLT of ``C^{-1}``, by diagonalising its state-transition matrix.

    ``C^{-1}`` streams with state update ``S <- (diag(theta) - 1 omega^T) S
    + x``, so its coefficients are ``-omega^T M^(k-1) 1``; with ``M = V
    diag(theta') V^{-1}`` they are ``sum_i omega'_i theta'_i^(k-1)`` for
    ``omega' = -(omega^T V) * (V^{-1} 1)``. Imaginary parts below 1e-9 are
    dropped (they are zero for optimised BLTs). Note ``C^{-1}(C^{-1}) = C``
    up to rounding: inverting twice recovers the strategy.
    """
    decay, scale = self._decay, self._scale
    transition = np.diag(decay) - np.outer(np.ones_like(decay), scale)
    eigenvalues, vectors = np.linalg.eig(transition)
    new_scale = -(scale @ vectors) * np.linalg.solve(
        vectors, np.ones_like(decay)
    )
    if (
        np.max(np.abs(np.imag(eigenvalues)), initial=0.0) < 1e-9
        and np.max(np.abs(np.imag(new_scale)), initial=0.0) < 1e-9
    ):
      eigenvalues, new_scale = np.real(eigenvalues), np.real(new_scale)
    return BufferedToeplitz._from_inverse(eigenvalues, new_scale)

  def as_streaming_matrix(self) -> streaming_matrix.StreamingMatrix:
    """``C`` as a streaming matrix with ``d`` model-sized buffers."""
    return _blt_streaming(self._decay, self._scale, inverse=False)

  def inverse_as_streaming_matrix(self) -> streaming_matrix.StreamingMatrix:
    """``C^{-1}`` as a streaming matrix with ``d`` buffers (real arithmetic)."""
    return _blt_streaming(self._decay, self._scale, inverse=True)


def _materialize(coef: np.ndarray) -> np.ndarray:
  n = coef.shape[0]
  lag = np.arange(n)[:, None] - np.arange(n)[None, :]
  return np.where(lag >= 0, coef[np.clip(lag, 0, n - 1)], 0.0)


def _blt_streaming(decay, scale, inverse: bool):
  if np.iscomplexobj(decay) or np.iscomplexobj(scale):
    raise ValueError(
        'streaming needs a real BLT (real buf_decay, output_scale)'
    )
  num_buffers = decay.shape[0]

  def init_multiply(example):
    # One array per buffer (not one stacked array): every update is then
    # elementwise and XLA fuses the whole step into one pass over memory.
    return jax.tree.map(
        lambda x: tuple(
            jnp.zeros(x.shape, x.dtype) for _ in range(num_buffers)
        ),
        example,
    )

  def leaf(x, buffers):
    correction = sum(
        (float(w) * b for w, b in zip(scale, buffers)), jnp.zeros_like(x)
    )
    y = (x - correction) if inverse else (x + correction)
    y = jax.lax.optimization_barrier(y)
    feed = y if inverse else x
    buffers = tuple(
        (float(d) * b + feed).astype(x.dtype) for d, b in zip(decay, buffers)
    )
    return y.astype(x.dtype), buffers

  def multiply_next(x, state):
    return streaming_matrix.map_with_state(leaf, x, state)

  return streaming_matrix.StreamingMatrix(init_multiply, multiply_next)


def _geometric_sum(ratio, n):
  """``sum_{k<n} ratio^k`` elementwise, stable at ``ratio = 1``."""
  ratio = np.asarray(ratio)
  safe = np.where(np.abs(1 - ratio) < 1e-12, 0.5, ratio)
  return np.where(np.abs(1 - ratio) < 1e-12, n, (1 - safe**n) / (1 - safe))


def _prefix_noise_terms(noising: BufferedToeplitz):
  """``alpha, beta``: ``sum_{j<=k} b_j = alpha + sum_i beta_i theta_i^k``."""
  decay, scale = np.asarray(noising.buf_decay), np.asarray(noising.output_scale)
  if np.any(np.abs(1 - decay) < 1e-12):
    raise ValueError(
        'the noising BLT has a buffer decay of 1: compute the max error '
        'by materialisation'
    )
  beta = -scale / (1 - decay)
  return 1.0 - np.sum(beta), beta


def max_error(
    strategy: BufferedToeplitz,
    n: int,
    *,
    min_sep: int = 1,
    max_participations: int | None = 1,
) -> float:
  """Squared sensitivity times the max prefix-sum error, in closed form.

  With ``C^{-1}`` a BLT with decays ``theta'`` and scales ``omega'``, the
  noise of prefix sum ``k`` has coefficients ``s_j = alpha + sum_i beta_i
  theta'_i^j`` (``beta_i = -omega'_i / (1 - theta'_i)``, ``alpha = 1 -
  sum beta``), and its variance ``sum_{j<=k} s_j^2`` grows with ``k``, so
  the max over queries is at ``k = n - 1``: ``n alpha^2 + 2 alpha sum_i
  beta_i G(theta'_i) + sum_ij beta_i beta_j G(theta'_i theta'_j)`` with
  ``G(r) = (1 - r^n) / (1 - r)``. ``O(d^2)``, no materialisation.

  Returns:
    The expected squared error of the worst prefix sum per unit noise
    multiplier (``sensitivity_squared * max variance``).
  """
  n = checks.check_positive_int('n', n)
  noising = strategy.inverse()
  alpha, beta = _prefix_noise_terms(noising)
  decay = np.asarray(noising.buf_decay)
  variance = (
      n * alpha**2
      + 2 * alpha * np.sum(beta * _geometric_sum(decay, n))
      + np.sum(np.outer(beta, beta) * _geometric_sum(np.outer(decay, decay), n))
  )
  sens = sensitivity_squared(
      strategy, n, min_sep=min_sep, max_participations=max_participations
  )
  return float(np.real(variance)) * sens


def limit_max_error(strategy: BufferedToeplitz) -> float:
  """``lim_{n -> inf} max_error(n) / n`` under single participation.

  Equal to ``alpha^2 (1 + omega^T K omega)`` with ``K_ij = 1 / (1 -
  theta_i theta_j)``: the squared norm of the infinite first column times
  the per-step growth of the worst query's variance. Needs all decays < 1.
  """
  decay, scale = np.asarray(strategy.buf_decay), np.asarray(
      strategy.output_scale
  )
  if np.any(decay >= 1.0):
    raise ValueError('limit_max_error needs every buf_decay < 1')
  alpha, _ = _prefix_noise_terms(strategy.inverse())
  column = 1.0 + scale @ (1.0 / (1.0 - np.outer(decay, decay))) @ scale
  return float(np.real(alpha**2 * column))


def sensitivity_squared(
    strategy: BufferedToeplitz,
    n: int,
    *,
    min_sep: int = 1,
    max_participations: int | None = 1,
) -> float:
  """Squared sensitivity of the first ``n`` steps under min-separation.

  Privacy:
    Exact when ``output_scale >= 0`` and ``sum(output_scale) <= 1`` with
    decays in ``[0, 1]`` (non-negative, non-increasing coefficients, see
    :func:`toeplitz.minsep_sensitivity_squared`); otherwise raises.
  """
  return float(
      toeplitz.minsep_sensitivity_squared(
          np.asarray(strategy.toeplitz_coefs(n)),
          min_sep=min_sep,
          max_participations=max_participations,
      )
  )


def _from_params(params):
  """Parameters -> (decay in (0, 1), scale > 0 with sum < 1)."""
  decay = jax.nn.sigmoid(params['decay_logits'])
  exp = jnp.exp(params['scale_logits'])
  return decay, exp / (1.0 + jnp.sum(exp))


def _loss(params, n, min_sep, count, error):
  decay, scale = _from_params(params)
  powers = decay[None, :] ** jnp.arange(n - 1)[:, None]
  coef = jnp.concatenate([jnp.ones(1, decay.dtype), powers @ scale])
  transition = jnp.diag(decay) - jnp.outer(jnp.ones_like(decay), scale)

  def inverse_step(state, _):
    return transition @ state, -scale @ state

  _, tail = jax.lax.scan(inverse_step, jnp.ones_like(decay), None, length=n - 1)
  noising = jnp.concatenate([jnp.ones(1, decay.dtype), tail])
  errors = toeplitz.per_query_error(noising_coef=noising)
  sens = toeplitz.minsep_sensitivity_squared(
      coef, min_sep=min_sep, max_participations=count, skip_checks=True
  )
  return sens * (errors[-1] if error == 'max' else jnp.mean(errors))


def optimize(
    *,
    n: int,
    min_sep: int = 1,
    max_participations: int | None = 1,
    error: str = 'max',
    num_buffers: int = 3,
    max_optimizer_steps: int = 200,
) -> BufferedToeplitz:
  """A BLT strategy minimising squared sensitivity times max or mean error.

  The parametrisation keeps decays in ``(0, 1)`` and scales positive with
  sum below 1, so the coefficients are positive and non-increasing and the
  min-separation sensitivity is exact. L-BFGS in float64 from decays with
  geometrically spread time scales.

  Args:
    n: number of steps.
    min_sep: minimum separation of one example's participations.
    max_participations: at most this many (``None``: as ``min_sep`` allows).
    error: ``'max'`` or ``'mean'`` prefix-sum error.
    num_buffers: ``d``, the number of buffers (model copies in memory).
    max_optimizer_steps: L-BFGS steps.

  Returns:
    The optimised :class:`BufferedToeplitz` strategy ``C``.
  """
  n = checks.check_positive_int('n', n)
  num_buffers = checks.check_positive_int('num_buffers', num_buffers)
  count = toeplitz.num_participations(n, min_sep, max_participations)
  if error not in ('max', 'mean'):
    raise ValueError(f"error must be 'max' or 'mean', got {error!r}")
  timescales = np.geomspace(2.0, max(n, 4), num_buffers)
  decay = 1.0 - 1.0 / timescales
  init = {
      'decay_logits': np.log(decay / (1 - decay)),
      'scale_logits': np.full(num_buffers, np.log(0.5 / num_buffers)),
  }
  params = optimization.optimize(
      lambda p: _loss(p, n, min_sep, count, error),
      init,
      max_optimizer_steps=max_optimizer_steps,
  )
  with jax.enable_x64(True):
    decay, scale = _from_params(params)
    decay, scale = np.asarray(decay), np.asarray(scale)
  return BufferedToeplitz(buf_decay=decay, output_scale=scale)
