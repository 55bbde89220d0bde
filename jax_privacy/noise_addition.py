"""Noise addition: Gaussian privatizers as optax gradient transformations.

The privatizer is the step of DP-SGD that turns a sum of clipped per-example
gradients (a query of bounded L2 sensitivity) into a differentially private
release by adding Gaussian noise. It composes with any optax optimizer::

    privatizer = noise_addition.gaussian_privatizer(
        stddev=noise_multiplier * l2_clip_norm,
        prng_key=jax.random.key(seed),
    )
    optimizer = optax.chain(privatizer, optax.adam(1e-3))

Everything the optimizer does after the privatizer is post-processing and
costs no privacy.
"""

import enum
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy import _discrete_gaussian
from jax_privacy import _gaussian_draws
from jax_privacy.matrix_factorization import checks
from jax_privacy.matrix_factorization import streaming_matrix

__all__ = [
    'GaussianPrivatizerState',
    'MatrixFactorizationPrivatizerState',
    'SupportedStrategies',
    'gaussian_noise_like',
    'gaussian_privatizer',
    'matrix_factorization_privatizer',
]

_ZERO_AXIS = 'zero_redundancy'


class SupportedStrategies(enum.Enum):
  """How the noise draw is laid out over devices.

  With Threefry keys (JAX's default) both strategies produce bitwise the same
  noise for the same key, step and tree, so the choice changes speed and
  memory, never the mechanism.

  Attributes:
    DEFAULT: each leaf's noise is drawn wherever the compiler places it.
      With replicated gradients every device draws the full noise; with
      sharded gradients the compiler usually draws only the local shard.
    ZERO: zero-redundancy generation. Each leaf's noise is drawn as a flat
      vector sharded evenly over all devices (``jax.devices()``), so every
      device draws only ``1 / num_devices`` of it, and the compiler then
      moves it to the gradient's layout. Worth it when gradients are
      replicated and drawing noise costs more than gathering it.
  """

  DEFAULT = 'default'
  ZERO = 'zero'


class GaussianPrivatizerState(NamedTuple):
  """State of :func:`gaussian_privatizer`.

  The noise of step ``t`` is a pure function of ``(key, t)``, so a run
  restored from a checkpoint of this state draws exactly the noise the
  uninterrupted run would have drawn.

  Attributes:
    key: the base PRNG key (a typed key, ``jax.random.key`` style).
    count: number of updates made so far (``int32`` scalar); the next
      update draws its noise from ``jax.random.fold_in(key, count)``.
  """

  key: jax.Array
  count: jax.Array


def gaussian_privatizer(
    *,
    stddev: float,
    prng_key: jax.Array | None = None,
    dtype: Any = None,
    intermediate_strategy: SupportedStrategies = SupportedStrategies.DEFAULT,
    secure: bool = False,
) -> optax.GradientTransformation:
  """Adds i.i.d. Gaussian noise N(0, stddev^2) to every gradient coordinate.

  ``update(sum_of_clipped_grads, state)`` returns the gradients plus fresh
  noise for every coordinate of every leaf: the leaves get independent
  keys and each step folds the step counter into the base key, so the
  noise is independent across coordinates, leaves and steps, and
  reproducible from ``prng_key``. Exactly: with
  ``keys = jax.random.split(jax.random.fold_in(prng_key, t), L)``, step
  ``t`` adds to leaf ``i`` of ``L`` the noise
  ``stddev * Phi^-1((k + 1/2) / 2^24)`` elementwise, where ``Phi`` is the
  standard normal CDF and the 24-bit integers ``k`` are formed from the top
  bit and the low 23 bits of ``jax.random.bits(keys[i], leaf.shape)``
  (for float32 noise; float64 noise is ``jax.random.normal(keys[i], ...)``
  scaled by ``stddev``).

  Example::

      >>> import jax, jax.numpy as jnp, optax
      >>> privatizer = gaussian_privatizer(
      ...     stddev=1.0, prng_key=jax.random.key(0))
      >>> grads = {'w': jnp.zeros((2, 3))}
      >>> state = privatizer.init(grads)
      >>> noisy, state = privatizer.update(grads, state)
      >>> noisy['w'].shape, int(state.count)
      ((2, 3), 1)

  Privacy:
    This is the Gaussian mechanism. The guarantee assumes that the input is
    a query of L2 sensitivity ``Delta`` under the chosen neighbouring
    relation (e.g. a sum of per-example gradients clipped to norm
    ``Delta``, see ``clipping.BoundedSensitivityCallable.sensitivity``),
    that ``stddev = noise_multiplier * Delta``, that the key is secret
    from the adversary and used for nothing else, and that the accountant
    is told the same noise multiplier and the sampling the batches really
    had. ``stddev=0`` adds no noise and gives NO privacy; it is allowed for
    non-private baselines. Like every floating-point sampler, float32 noise
    only approximates the real Gaussian: it is inverse-CDF sampled at
    ``2^-24`` quantile resolution, so its tails end at 5.42 standard
    deviations; see Mironov 2012 on such gaps.

  Args:
    stddev: standard deviation of the noise added to every coordinate. A
      finite number ``>= 0``, known on the host.
    prng_key: the key all noise is derived from, e.g.
      ``jax.random.key(seed)`` or a legacy ``jax.random.PRNGKey(seed)``.
      Required: ``None`` raises (see Raises).
    dtype: dtype of the returned gradients. ``None`` keeps each leaf's
      dtype. The noise is drawn and added in ``dtype`` (or the leaf's
      dtype) if that is at least ``float32``; for narrower types
      (``bfloat16``, ``float16``) it is drawn and added in ``float32`` and
      only the noisy sum is rounded: noise drawn in those types is far from
      Gaussian (``jax.random.normal`` in bfloat16 takes 128 distinct values,
      none beyond 2.9 standard deviations), while rounding after the
      addition is post-processing.
    intermediate_strategy: how the draw is laid out over devices; see
      :class:`SupportedStrategies`. Never changes the noise values.
    secure: draw discrete Gaussian noise on a grid from ``os.urandom``
      instead (``prng_key`` must be ``None``); see docs/secure_noise.md and
      ``jax_privacy._discrete_gaussian`` for its threat model and accounting.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`GaussianPrivatizerState`.

  Raises:
    ValueError: if ``stddev`` is negative, NaN or infinite (or 0 with
      ``secure``); if ``prng_key`` is ``None`` or not a single PRNG key (with
      ``secure``: if it is not ``None``); if ``dtype`` is not a
      floating-point type; or if ``intermediate_strategy`` is not a
      :class:`SupportedStrategies`. Raised when the factory is called,
      before anything is traced.

  References:
    Abadi et al., "Deep Learning with Differential Privacy", 2016,
    arXiv:1607.00133.
    Mironov, "On Significance of the Least Significant Bits for
    Differential Privacy", CCS 2012.
  """
  if secure:
    _strategy_sharding(intermediate_strategy)
    return _discrete_gaussian.secure_gaussian_privatizer(
        stddev=stddev, prng_key=prng_key, dtype=dtype)
  stddev = _check_stddev(stddev)
  key = _check_prng_key(prng_key)
  out_dtype = _check_dtype(dtype)
  sharding = _strategy_sharding(intermediate_strategy)

  def init_fn(params):
    del params
    return GaussianPrivatizerState(key=key, count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    new_state = GaussianPrivatizerState(key=state.key, count=state.count + 1)
    if stddev == 0.0:
      if out_dtype is None:
        return updates, new_state
      return jax.tree.map(lambda g: g.astype(out_dtype), updates), new_state
    step_key = jax.random.fold_in(state.key, state.count)
    noise = _scaled_noise(step_key, updates, stddev, out_dtype, sharding)

    def add_noise(g, z):
      noisy = g.astype(z.dtype) + z
      return noisy.astype(g.dtype if out_dtype is None else out_dtype)

    return jax.tree.map(add_noise, updates, noise), new_state

  return optax.GradientTransformation(init_fn, update_fn)


class MatrixFactorizationPrivatizerState(NamedTuple):
  """State of :func:`matrix_factorization_privatizer`.

  Attributes:
    key: the base PRNG key; ``Z_t`` is drawn from ``fold_in(key, t)``.
    count: number of updates made so far (``int32`` scalar).
    matrix_state: the streaming matrix's state (``()`` for a dense matrix,
      which regenerates ``Z_0 .. Z_t`` from the key instead of storing them).
  """

  key: jax.Array
  count: jax.Array
  matrix_state: Any


def matrix_factorization_privatizer(
    noising_matrix,
    *,
    stddev: float,
    prng_key: jax.Array | None = None,
    dtype: Any = None,
    intermediate_strategy: SupportedStrategies = SupportedStrategies.DEFAULT,
) -> optax.GradientTransformation:
  """Adds correlated noise: row ``t`` of ``stddev * C^{-1} Z`` at step ``t``.

  ``Z_t`` is the same i.i.d. N(0, 1) tree the Gaussian privatizer draws at
  step ``t`` (``_standard_normal_tree(jax.random.fold_in(prng_key, t))``),
  so with ``C^{-1} = I`` both privatizers add bitwise the same noise.
  ``noising_matrix`` is ``C^{-1}``, lower-triangular:

  * a ``StreamingMatrix`` (``matrix_factorization``: ``BufferedToeplitz.
    inverse_as_streaming_matrix()``, ``toeplitz.inverse_as_streaming_matrix
    (coef)``, ``tree_aggregation.inverse_as_streaming_matrix(n)``, ...):
    memory is its state (a few model copies), time O(state) per step;
  * a dense ``n x n`` array: no extra memory, but step ``t`` regenerates
    all ``n`` draws ``Z_s`` (weights past ``t`` are zero), so time is
    ``O(n)`` draws per step: for small ``n`` and testing. Steps ``>= n``
    return NaN gradients, so an over-long run fails loudly.

  Example::

      >>> import jax, jax.numpy as jnp
      >>> from jax_privacy.matrix_factorization import buffered_toeplitz
      >>> blt = buffered_toeplitz.BufferedToeplitz(
      ...     buf_decay=(0.9,), output_scale=(0.5,))
      >>> privatizer = matrix_factorization_privatizer(
      ...     blt.inverse_as_streaming_matrix(), stddev=1.0,
      ...     prng_key=jax.random.key(0))
      >>> state = privatizer.init({'w': jnp.zeros(3)})
      >>> noisy, state = privatizer.update({'w': jnp.zeros(3)}, state)

  Privacy:
    The released stream is ``B (C x + stddev Z)`` post-processed, where
    ``x`` is the stream of clipped-gradient sums. The guarantee assumes
    ``stddev = noise_multiplier * clip_norm * sens(C)``, with ``sens(C)``
    the sensitivity of the strategy ``C`` (the inverse of the matrix given
    here) under the participation pattern the batch selection really
    enforces (``matrix_factorization.sensitivity``), or a noise multiplier
    calibrated by a DpEvent for that pattern (e.g. amplified BandMF),
    a secret key used for nothing else, and that the noise is not reset
    mid-run. ``stddev=0`` gives no privacy.

  Args:
    noising_matrix: ``C^{-1}`` as a ``StreamingMatrix`` or a dense square
      lower-triangular array with a nonzero diagonal.
    stddev: the noise scale of ``Z``; finite and ``>= 0``.
    prng_key: the key (required, see :func:`gaussian_privatizer`).
    dtype: as for :func:`gaussian_privatizer`.
    intermediate_strategy: layout of each draw of ``Z_t`` over devices.

  Returns:
    An ``optax.GradientTransformation`` with
    :class:`MatrixFactorizationPrivatizerState`.

  Raises:
    ValueError: for a bad ``stddev``, ``prng_key``, ``dtype`` or strategy,
      or a dense matrix that is not square, finite, lower-triangular and
      invertible.

  References:
    Denisov et al., "Improved Differential Privacy for SGD via Optimal
    Private Linear Operators on Adaptive Streams", 2022, arXiv:2202.08312.
    Choquette-Choo et al., "Multi-Epoch Matrix Factorization Mechanisms
    for Private Machine Learning", 2023, arXiv:2211.06530.
  """
  stddev = _check_stddev(stddev)
  key = _check_prng_key(prng_key)
  out_dtype = _check_dtype(dtype)
  sharding = _strategy_sharding(intermediate_strategy)
  streaming = isinstance(noising_matrix, streaming_matrix.StreamingMatrix)
  if not streaming:
    dense = checks.check_invertible_lower_triangular(
        'noising_matrix', noising_matrix
    )

  def specs_of(tree):
    return jax.tree.map(
        lambda g: jax.ShapeDtypeStruct(g.shape, _noise_dtype(g, out_dtype)),
        tree,
    )

  def init_fn(params):
    matrix_state = ()
    if streaming:
      specs = specs_of(params)
      matrix_state = noising_matrix.init_multiply(
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), specs)
      )
    return MatrixFactorizationPrivatizerState(
        key=key, count=jnp.zeros([], jnp.int32), matrix_state=matrix_state
    )

  def dense_noise(base_key, count, specs):
    weights = jnp.asarray(dense)[jnp.minimum(count, dense.shape[0] - 1)]
    weights = jnp.where(count < dense.shape[0], weights, jnp.nan)

    def body(s, total):
      z = _standard_normal_tree(
          jax.random.fold_in(base_key, s), specs, sharding
      )
      return jax.tree.map(
          lambda acc, zs: acc + weights[s].astype(zs.dtype) * zs, total, z
      )

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), specs)
    return jax.lax.fori_loop(0, dense.shape[0], body, zeros)

  def update_fn(updates, state, params=None):
    del params
    specs = specs_of(updates)
    if streaming:
      z = _standard_normal_tree(
          jax.random.fold_in(state.key, state.count), specs, sharding
      )
      # Materialise the draw once: the matrix reads it from several outputs
      # (its buffers), and XLA would otherwise recompute the draw for each.
      z = jax.lax.optimization_barrier(z)
      correlated, matrix_state = noising_matrix.multiply_next(
          z, state.matrix_state
      )
    else:
      correlated, matrix_state = dense_noise(state.key, state.count, specs), ()
    new_state = MatrixFactorizationPrivatizerState(
        key=state.key, count=state.count + 1, matrix_state=matrix_state
    )

    def add_noise(g, z):
      noisy = g.astype(z.dtype) + (stddev * z).astype(z.dtype)
      return noisy.astype(g.dtype if out_dtype is None else out_dtype)

    return jax.tree.map(add_noise, updates, correlated), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def gaussian_noise_like(tree, prng_key: jax.Array, stddev) -> Any:
  """I.i.d. N(0, stddev^2) noise with the structure and shapes of ``tree``.

  The stateless core of :func:`gaussian_privatizer`, for callers that manage
  their own per-step keys (e.g. ``dp_sgd.gradients``). Every leaf gets its
  own key derived from ``prng_key``.

  Privacy:
    As for :func:`gaussian_privatizer`: a fresh, secret key per release,
    never reused; ``stddev`` is the noise multiplier times the L2
    sensitivity of the quantity the noise is added to.

  Args:
    tree: a pytree of floating-point arrays (or ``jax.ShapeDtypeStruct``).
    prng_key: a typed key (``jax.random.key``) or a legacy uint32 key.
    stddev: the standard deviation; a number, or a traced scalar inside
      ``jit`` (only a concrete value can be checked).

  Returns:
    The noise, one leaf per leaf of ``tree``, in the leaf's dtype if that
    is at least ``float32`` and in ``float32`` otherwise: add it to the
    gradient in that dtype and round only the sum (see the ``dtype``
    argument of :func:`gaussian_privatizer`).

  Raises:
    ValueError: for a concrete ``stddev`` that is negative, NaN or
      infinite, or a ``prng_key`` that is not a single PRNG key.
  """
  _check_stddev(stddev, allow_traced=True)
  return _scaled_noise(_check_prng_key(prng_key), tree, stddev, None, None)


def _check_stddev(stddev, allow_traced: bool = False) -> float | None:
  """Returns ``stddev`` as a float; ``None`` if traced and ``allow_traced``."""
  message = f'stddev must be a finite number >= 0, got {stddev!r}'
  if isinstance(stddev, bool) or not isinstance(
      stddev, (numbers.Real, np.ndarray, jax.Array)
  ):
    raise ValueError(message)
  try:
    value = float(stddev)
  except jax.errors.ConcretizationTypeError as e:
    if allow_traced:
      return None
    raise ValueError(f'{message}; it must be known on the host') from e
  except TypeError as e:
    raise ValueError(message) from e
  if not (math.isfinite(value) and value >= 0.0):
    raise ValueError(message)
  return value


def _check_prng_key(prng_key) -> jax.Array:
  """Returns ``prng_key`` as a single typed key, or raises ValueError."""
  if prng_key is None:
    raise ValueError(
        'prng_key is required: pass an explicit key, e.g. '
        'prng_key=jax.random.key(seed) with a secret seed. A built-in '
        'default seed would make the noise predictable to anyone who '
        'knows it (predictable noise gives no privacy), and silently '
        'drawing a seed from the operating system would make runs '
        'impossible to reproduce or resume.'
    )
  key = prng_key
  if not jax.dtypes.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    if jnp.result_type(key) != jnp.uint32:
      raise ValueError(
          'prng_key must be a PRNG key (jax.random.key(seed)) or a '
          'legacy uint32 key (jax.random.PRNGKey(seed)), got an array '
          f'of dtype {jnp.result_type(key)}'
      )
    key = jax.random.wrap_key_data(key)
  if key.shape != ():
    raise ValueError(
        'prng_key must be a single key, got a batch of keys of shape '
        f'{key.shape}'
    )
  return key


def _check_dtype(dtype):
  if dtype is None:
    return None
  canonical = jax.dtypes.canonicalize_dtype(dtype)
  if not jnp.issubdtype(canonical, jnp.floating):
    raise ValueError(f'dtype must be a floating-point type, got {dtype!r}')
  return canonical


def _strategy_sharding(strategy) -> jax.sharding.NamedSharding | None:
  if not isinstance(strategy, SupportedStrategies):
    raise ValueError(
        'intermediate_strategy must be a SupportedStrategies member '
        f"({', '.join(s.name for s in SupportedStrategies)}), got "
        f'{strategy!r}'
    )
  if strategy is SupportedStrategies.DEFAULT:
    return None
  mesh = jax.sharding.Mesh(np.array(jax.devices()), (_ZERO_AXIS,))
  return jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(_ZERO_AXIS)
  )


def _noise_dtype(leaf, out_dtype) -> np.dtype:
  """The dtype the noise for ``leaf`` is drawn and added in (>= float32)."""
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise ValueError(
        'Gaussian noise is added to floating-point gradients only, got a '
        f'leaf of dtype {leaf.dtype} and shape {leaf.shape}'
    )
  target = leaf.dtype if out_dtype is None else out_dtype
  return jax.dtypes.canonicalize_dtype(jnp.promote_types(target, jnp.float32))


def _scaled_noise(key, tree, stddev, out_dtype, sharding):
  """``stddev`` times an i.i.d. N(0, 1) tree, each leaf in its noise dtype."""
  specs = jax.tree.map(
      lambda g: jax.ShapeDtypeStruct(g.shape, _noise_dtype(g, out_dtype)), tree
  )
  noise = _standard_normal_tree(key, specs, sharding)
  return jax.tree.map(lambda z: (stddev * z).astype(z.dtype), noise)


# The Gaussian draws live in _gaussian_draws; these names are used here.
_standard_normal_tree = _gaussian_draws.standard_normal_tree
_standard_normal = _gaussian_draws.standard_normal
_standard_normal_from_bits = _gaussian_draws.standard_normal_from_bits
_random_bits = _gaussian_draws.random_bits
_threefry2x32 = _gaussian_draws.threefry2x32
