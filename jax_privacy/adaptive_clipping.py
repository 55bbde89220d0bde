"""Adaptive clipping: a clip norm that tracks a quantile of gradient norms.

Instead of a hand-tuned clip norm ``C``, the clip norm follows a target
quantile ``gamma`` of the per-example gradient norms (Andrew et al. 2021).
Each step releases, besides the noisy sum of clipped gradients, a noisy count
of the examples that were not clipped, and moves ``C`` geometrically:

    b_t = (sum_i (1[||g_i|| <= C_t] - 1/2) + N(0, sigma_b^2)) / m + 1/2
    C_{t+1} = C_t * exp(-eta_C * (b_t - gamma))

where ``m`` is the expected batch size. If fewer than a fraction ``gamma``
of the examples are unclipped, ``C`` grows, otherwise it shrinks; the fixed
point is the ``gamma`` quantile of the norms.

The pieces:

* :class:`AdaptiveClippingConfig`: the mechanism's settings, validated on
  construction, with the gradient noise multiplier and the DpEvent.
* :func:`adaptive_clipped_grad`: per-example clipping at a clip norm that is
  a traced value (``jax_privacy.clipping.clipped_grad`` needs a concrete
  one), so a jitted step compiles once for all values of ``C``.
* :func:`adaptive_clipping_privatizer`: an optax transformation whose state
  (:class:`AdaptiveClippingState`) holds ``C``; it adds the gradient noise and
  updates ``C`` from the noisy count.

Example::

    config = AdaptiveClippingConfig(
        initial_clip_norm=1.0, noise_multiplier=1.1, expected_batch_size=256)
    grad_fn = adaptive_clipped_grad(loss, batch_argnums=(1, 2))
    optimizer = optax.chain(
        adaptive_clipping_privatizer(config, prng_key=jax.random.key(seed)),
        optax.scale(1 / 256), optax.sgd(0.1))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y, is_padding):
      clip_norm = current_clip_norm(opt_state)
      grads, norms = grad_fn(clip_norm, params, x, y,
                             is_padding_example=is_padding)
      updates, opt_state = optimizer.update(
          grads, opt_state, params, grad_norms=norms,
          is_padding_example=is_padding)
      return optax.apply_updates(params, updates), opt_state

Privacy:
  Under add/remove-one neighbours with Poisson sampling, one step releases
  two Gaussian mechanisms on the same batch: the clipped-gradient sum
  (sensitivity ``C_t``, noise ``z_grad * C_t``) and the centred count
  ``sum_i (b_i - 1/2)`` with ``b_i`` in {0, 1} (sensitivity ``1/2``: adding
  or removing one example moves it by exactly ``+-1/2``; noise ``sigma_b``).
  Scaling each release by its noise makes both unit-variance; the pair is
  then a Gaussian mechanism with L2 sensitivity
  ``sqrt(z_grad^-2 + (2 sigma_b)^-2)``, which equals ``1 / z`` exactly when
  ``z_grad = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al., Theorem 1).
  So a step of adaptive clipping has the privacy of one DP-SGD step with
  noise multiplier ``z``, for every neighbouring pair, and the run composes
  like DP-SGD with ``z`` (the sampling is shared by the two releases, so the
  amplification applies to the pair). ``C_t`` depends on the data only
  through earlier private releases. Without the centring the count would
  have sensitivity 1 and ``z_grad = (z^-2 - sigma_b^-2)^(-1/2)``. Under
  replace-one both sensitivities double, so the ratio, and ``z_grad``, are
  the same. Padding examples must be flagged (``is_padding_example``) so
  that they are neither counted nor summed.

References:
  Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
  Adaptive Clipping", NeurIPS 2021. arXiv:1905.03871.
  Abadi et al., "Deep Learning with Differential Privacy", 2016.
  arXiv:1607.00133.
"""

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import dp_accounting
import jax
import jax.numpy as jnp
import optax

from jax_privacy import clipping
from jax_privacy import noise_addition
from jax_privacy.accounting import accountants
from jax_privacy.experimental import accounting as dp_events

__all__ = [
    'AdaptiveClippingConfig',
    'AdaptiveClippingState',
    'adaptive_clipped_grad',
    'adaptive_clipping_event',
    'adaptive_clipping_privatizer',
    'compute_epsilon',
    'current_clip_norm',
    'gradient_noise_multiplier',
]


def _check_real(name: str, value, *, low: float, high: float = math.inf,
                low_open: bool = True, high_open: bool = True) -> float:
  """Returns ``value`` as a float, or raises ValueError naming ``name``."""
  left = '(' if low_open else '['
  right = ')' if high_open else ']'
  message = f'{name} must be a number in {left}{low}, {high}{right}'
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f'{message}, got {value!r}')
  value = float(value)
  too_low = value <= low if low_open else value < low
  too_high = value >= high if high_open else value > high
  if math.isnan(value) or too_low or too_high:
    raise ValueError(f'{message}, got {value!r}')
  return value


def gradient_noise_multiplier(
    noise_multiplier: float, count_noise_stddev: float
) -> float:
  """The gradient noise multiplier that keeps the pair at ``noise_multiplier``.

  Returns ``z_grad = (z^-2 - (2 sigma_b)^-2)^(-1/2)``: a Gaussian release of
  the clipped-gradient sum with noise ``z_grad * C`` together with a release
  of the centred unclipped count (sensitivity 1/2) with noise ``sigma_b``
  has exactly the privacy of one Gaussian release with noise multiplier
  ``z`` (see the module docstring).

  Args:
    noise_multiplier: the requested multiplier ``z`` of the pair, > 0.
    count_noise_stddev: ``sigma_b``, the stddev of the count noise; must be
      > ``z / 2``, else the count alone would cost more than ``z``.

  Returns:
    ``z_grad``, always > ``z``.

  Raises:
    ValueError: naming the field that is out of range.
  """
  z = _check_real('noise_multiplier', noise_multiplier, low=0.0)
  sigma_b = _check_real('count_noise_stddev', count_noise_stddev, low=0.0)
  remaining = z**-2 - (2.0 * sigma_b) ** -2
  if remaining <= 0:
    raise ValueError(
        f'count_noise_stddev must be > noise_multiplier / 2 = '
        f'{0.5 * z:.6g} for noise_multiplier={z}, got {sigma_b}: the '
        'unclipped-count release alone would spend the whole privacy '
        'budget. Use a larger count_noise_stddev (the paper suggests '
        'expected_batch_size / 20) or a larger noise_multiplier.'
    )
  return remaining**-0.5


def adaptive_clipping_event(
    noise_multiplier: float,
    count_noise_stddev: float,
    iterations: int,
    *,
    sampling_prob: float,
) -> dp_accounting.DpEvent:
  """DP-SGD with adaptive clipping and Poisson sampling, as a DpEvent.

  Each of ``iterations`` steps Poisson-samples a batch (probability
  ``sampling_prob`` per example) and makes two Gaussian releases on it: the
  clipped-gradient sum with noise multiplier ``z_grad`` (see
  :func:`gradient_noise_multiplier`) and the centred unclipped count, whose
  Gaussian event has multiplier ``sigma_b / (1/2) = 2 sigma_b``.

  Privacy:
    For add/remove-one neighbours (``NeighboringRelation.ADD_OR_REMOVE_ONE``,
    the accountants' default). dp_accounting's RDP accountant composes this
    event; its PLD accountant does not support a composed event inside
    Poisson sampling, use :func:`compute_epsilon`, which then composes the
    equivalent ``dpsgd_event(noise_multiplier, ...)``.

  Args:
    noise_multiplier: the requested multiplier ``z`` of each step, > 0.
    count_noise_stddev: ``sigma_b`` > ``z / 2``.
    iterations: number of steps, an integer >= 0.
    sampling_prob: probability that an example is in a batch, in (0, 1].

  Returns:
    ``SelfComposedDpEvent(PoissonSampledDpEvent(sampling_prob,
    ComposedDpEvent([GaussianDpEvent(z_grad), GaussianDpEvent(2 sigma_b)])),
    iterations)``, or a ``NoOpDpEvent`` for 0 iterations.

  Raises:
    ValueError: naming the field that is out of range.

  References:
    Andrew et al., 2021. arXiv:1905.03871.
  """
  z_grad = gradient_noise_multiplier(noise_multiplier, count_noise_stddev)
  if isinstance(iterations, bool) or not isinstance(
      iterations, numbers.Integral) or iterations < 0:
    raise ValueError(f'iterations must be an integer >= 0, got {iterations!r}')
  sampling_prob = _check_real(
      'sampling_prob', sampling_prob, low=0.0, high=1.0, high_open=False)
  if iterations == 0:
    return dp_accounting.NoOpDpEvent()
  pair = dp_accounting.ComposedDpEvent([
      dp_accounting.GaussianDpEvent(z_grad),
      dp_accounting.GaussianDpEvent(2.0 * float(count_noise_stddev)),
  ])
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(sampling_prob, pair), int(iterations)
  )


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptiveClippingConfig:
  """Settings of adaptive clipping (Andrew et al., arXiv:1905.03871).

  Attributes:
    initial_clip_norm: ``C_0``, > 0 and finite.
    noise_multiplier: ``z``, the noise multiplier the pair of releases is
      worth (what the accountant is told), > 0.
    expected_batch_size: ``m``, the expected number of (real) examples per
      batch, e.g. ``sampling_prob * num_examples``; > 0. It normalises the
      count, so it must not depend on the batch actually drawn.
    target_quantile: ``gamma`` in (0, 1): the fraction of examples that
      should be unclipped.
    clip_learning_rate: ``eta_C`` > 0, the step size of the geometric update
      (the paper uses 0.2).
    count_noise_stddev: ``sigma_b``, stddev of the noise on the unclipped
      count; ``None`` means ``expected_batch_size / 20`` (the paper's
      choice). Must be > ``z / 2``.
  """

  initial_clip_norm: float
  noise_multiplier: float
  expected_batch_size: float
  target_quantile: float = 0.5
  clip_learning_rate: float = 0.2
  count_noise_stddev: float | None = None

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_('initial_clip_norm', _check_real(
        'initial_clip_norm', self.initial_clip_norm, low=0.0))
    set_('noise_multiplier', _check_real(
        'noise_multiplier', self.noise_multiplier, low=0.0))
    set_('expected_batch_size', _check_real(
        'expected_batch_size', self.expected_batch_size, low=0.0))
    set_('target_quantile', _check_real(
        'target_quantile', self.target_quantile, low=0.0, high=1.0))
    set_('clip_learning_rate', _check_real(
        'clip_learning_rate', self.clip_learning_rate, low=0.0))
    if self.count_noise_stddev is None:
      set_('count_noise_stddev', self.expected_batch_size / 20.0)
    set_('count_noise_stddev', _check_real(
        'count_noise_stddev', self.count_noise_stddev, low=0.0))
    gradient_noise_multiplier(self.noise_multiplier, self.count_noise_stddev)

  @property
  def gradient_noise_multiplier(self) -> float:
    """``z_grad``: the gradient noise is ``z_grad * C_t`` on the sum."""
    return gradient_noise_multiplier(
        self.noise_multiplier, self.count_noise_stddev)

  def dp_event(
      self, iterations: int, *, sampling_prob: float
  ) -> dp_accounting.DpEvent:
    """The DpEvent of ``iterations`` Poisson-sampled steps (see
    :func:`adaptive_clipping_event`)."""
    return adaptive_clipping_event(
        self.noise_multiplier, self.count_noise_stddev, iterations,
        sampling_prob=sampling_prob)


def compute_epsilon(
    config: AdaptiveClippingConfig,
    *,
    iterations: int,
    sampling_prob: float,
    delta: float,
    accountant_config: accountants.DpAccountantConfig | None = None,
) -> float:
  """Epsilon of ``iterations`` steps of adaptive clipping at ``delta``.

  Composes :meth:`AdaptiveClippingConfig.dp_event` with the accountant of
  ``accountant_config`` (RDP by default) under add/remove-one neighbours.
  An accountant that cannot compose the pair inside Poisson sampling (PLD)
  composes the equivalent ``dpsgd_event(config.noise_multiplier, ...)``;
  the module docstring shows the two are the same mechanism.

  Args:
    config: the adaptive clipping settings.
    iterations: number of steps, >= 0.
    sampling_prob: Poisson sampling probability, in (0, 1].
    delta: target delta, in (0, 1).
    accountant_config: a ``jax_privacy.accounting.accountants`` config;
      ``None`` means ``RdpAccountantConfig()``.

  Returns:
    Epsilon (0 for no steps).

  Raises:
    ValueError: naming the field that is out of range.
  """
  if not isinstance(config, AdaptiveClippingConfig):
    raise ValueError(
        f'config must be an AdaptiveClippingConfig, got {config!r}')
  delta = _check_real('delta', delta, low=0.0, high=1.0)
  if accountant_config is None:
    accountant_config = accountants.RdpAccountantConfig()
  event = config.dp_event(iterations, sampling_prob=sampling_prob)
  accountant = accountant_config.create_accountant()
  if not accountant.supports(event):
    event = dp_events.dpsgd_event(
        config.noise_multiplier, iterations, sampling_prob=sampling_prob)
  return float(accountant.compose(event).get_epsilon(delta))


def adaptive_clipped_grad(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    batch_argnums: int | Sequence[int] = 1,
    **clipping_kwargs,
) -> Callable[..., tuple[Any, jax.Array]]:
  """Clipped-gradient sums at a clip norm given at call time (may be traced).

  ``jax_privacy.clipping.clipped_grad`` fixes its clip norm on the host. This
  wraps it so that the clip norm is an argument: since
  ``clip(g, C) = C * clip(g / C, 1)`` and ``g / C`` is the gradient of
  ``fun / C``, the loss is divided by ``C``, clipped at norm 1, and the sum
  multiplied by ``C``. ``C`` is an ordinary (non-batched, non-differentiated)
  argument, so under ``jit`` one compilation serves every clip norm.

  Args:
    fun: the per-example loss, as for ``clipping.clipped_grad``.
    argnums: as for ``clipping.clipped_grad``.
    has_aux: as for ``clipping.clipped_grad``.
    batch_argnums: as for ``clipping.clipped_grad``.
    **clipping_kwargs: passed on to ``clipping.clipped_grad``; one of
      ``keep_batch_dim``, ``microbatch_size``, ``nan_safe``, ``dtype``,
      ``prng_argnum``, ``spmd_axis_name``, ``method``. (A
      ``pre_clipping_transform`` would see ``g / C`` and is not accepted;
      ``normalize_by``: scale the result instead.)

  Returns:
    ``grad_fn(clip_norm, *args, is_padding_example=None)`` returning
    ``(clipped_sum, grad_norms)``: the sum over examples of each gradient
    clipped to ``clip_norm``, and each example's gradient norm before
    clipping (``float32[batch]``). With ``has_aux``, ``(clipped_sum,
    grad_norms, aux)``.

  Raises:
    ValueError: for a keyword that is not accepted, or any error of
      ``clipping.clipped_grad``.

  Privacy:
    Each example contributes at most ``clip_norm`` in L2 norm to the sum
    (padding examples contribute zero), as with a fixed clip norm.
  """
  allowed = {'keep_batch_dim', 'microbatch_size', 'nan_safe', 'dtype',
             'prng_argnum', 'spmd_axis_name', 'method'}
  unknown = sorted(set(clipping_kwargs) - allowed)
  if unknown:
    raise ValueError(
        f'adaptive_clipped_grad does not accept {unknown}; accepted keyword '
        f'arguments: {sorted(allowed)}')

  def scaled_fun(*args):
    *real_args, clip_norm = args
    out = fun(*real_args)
    if has_aux:
      loss, aux = out
      return loss / clip_norm, aux
    return out / clip_norm

  inner = clipping.clipped_grad(
      scaled_fun, argnums, has_aux, l2_clip_norm=1.0,
      batch_argnums=batch_argnums, return_grad_norms=True, **clipping_kwargs)

  def grad_fn(clip_norm, *args, is_padding_example=None):
    clip_norm = jnp.asarray(clip_norm, jnp.float32)
    summed, aux = inner(*args, clip_norm, is_padding_example=is_padding_example)
    summed = jax.tree.map(lambda g: (g * clip_norm).astype(g.dtype), summed)
    norms = aux.grad_norms * clip_norm
    if has_aux:
      return summed, norms, aux.aux
    return summed, norms

  return grad_fn


class AdaptiveClippingState(NamedTuple):
  """State of :func:`adaptive_clipping_privatizer`.

  Attributes:
    clip_norm: ``C_t``, the clip norm of the next step (``float32`` scalar).
      Clip the next batch with it (see :func:`current_clip_norm`).
    count: the number of steps taken (``int32`` scalar).
    key: the base PRNG key; step ``t`` draws from ``fold_in(key, t)``.
  """

  clip_norm: jax.Array
  count: jax.Array
  key: jax.Array


def current_clip_norm(opt_state) -> jax.Array:
  """The clip norm ``C_t`` held by an adaptive-clipping state.

  Args:
    opt_state: an :class:`AdaptiveClippingState`, or an optimizer state
      (e.g. of ``optax.chain``) containing exactly one.

  Returns:
    The ``float32`` scalar clip norm to clip the next batch with.
  """
  if isinstance(opt_state, AdaptiveClippingState):
    return opt_state.clip_norm
  return optax.tree_utils.tree_get(opt_state, 'clip_norm')


def _check_key(prng_key) -> jax.Array:
  if prng_key is None:
    raise ValueError(
        'prng_key is required: pass prng_key=jax.random.key(seed) with a '
        'secret seed (see noise_addition.gaussian_privatizer).')
  key = prng_key
  if not jax.dtypes.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    if jnp.result_type(key) != jnp.uint32 or jnp.shape(key) != (2,):
      raise ValueError(
          'prng_key must be a single PRNG key (jax.random.key(seed)), got '
          f'an array of dtype {jnp.result_type(key)} and shape '
          f'{jnp.shape(key)}')
    key = jax.random.wrap_key_data(key)
  if key.shape != ():
    raise ValueError(
        f'prng_key must be a single key, got a batch of shape {key.shape}')
  return key


def adaptive_clipping_privatizer(
    config: AdaptiveClippingConfig, *, prng_key: jax.Array
) -> optax.GradientTransformationExtraArgs:
  """Adds the gradient noise and moves the clip norm toward the quantile.

  ``update(clipped_sum, state, params=None, *, grad_norms,
  is_padding_example=None)`` takes the sum of per-example gradients clipped
  at ``state.clip_norm`` (:func:`adaptive_clipped_grad`) and the per-example
  norms before clipping, and returns ``clipped_sum + N(0, (z_grad C_t)^2)``
  per coordinate and the state with ``C_{t+1}``. In ``optax.chain`` the
  keyword arguments reach this transformation through ``update``'s extra
  arguments.

  Privacy:
    See the module docstring: the noisy sum and the noisy count together
    are worth one Gaussian release with ``config.noise_multiplier``; account
    with :func:`compute_epsilon` or :meth:`AdaptiveClippingConfig.dp_event`.
    This assumes the input was clipped at ``state.clip_norm`` of the same
    step, ``grad_norms`` are the norms of the same examples, padding is
    flagged, the batch is Poisson sampled, and the key is secret and used
    for nothing else.

  Args:
    config: the settings.
    prng_key: the key all noise (gradient and count) is derived from.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`AdaptiveClippingState`.

  Raises:
    ValueError: if ``config`` is not an :class:`AdaptiveClippingConfig` or
      ``prng_key`` is not a single key. At trace time, if ``grad_norms`` is
      not 1-D or ``is_padding_example`` does not match it.

  References:
    Andrew et al., 2021. arXiv:1905.03871.
  """
  if not isinstance(config, AdaptiveClippingConfig):
    raise ValueError(
        f'config must be an AdaptiveClippingConfig, got {config!r}')
  key = _check_key(prng_key)
  z_grad = config.gradient_noise_multiplier

  def init_fn(params):
    del params
    return AdaptiveClippingState(
        clip_norm=jnp.asarray(config.initial_clip_norm, jnp.float32),
        count=jnp.zeros([], jnp.int32), key=key)

  def update_fn(updates, state, params=None, *, grad_norms,
                is_padding_example=None):
    del params
    grad_norms = jnp.asarray(grad_norms)
    if grad_norms.ndim != 1:
      raise ValueError(
          'grad_norms must be the 1-D per-example norms, got shape '
          f'{grad_norms.shape}')
    if is_padding_example is None:
      real = jnp.ones(grad_norms.shape, bool)
    else:
      padding = jnp.asarray(is_padding_example)
      if padding.shape != grad_norms.shape:
        raise ValueError(
            f'is_padding_example must have shape {grad_norms.shape} like '
            f'grad_norms, got {padding.shape}')
      real = ~padding.astype(bool)
    clip_norm = state.clip_norm
    grad_key, count_key = jax.random.split(
        jax.random.fold_in(state.key, state.count))
    noise = noise_addition.gaussian_noise_like(
        updates, grad_key, z_grad * clip_norm)
    noisy = jax.tree.map(
        lambda g, z: (g.astype(z.dtype) + z).astype(g.dtype), updates, noise)
    unclipped = real & (grad_norms <= clip_norm)
    centred = jnp.sum(unclipped, dtype=jnp.float32) - 0.5 * jnp.sum(
        real, dtype=jnp.float32)
    noisy_count = centred + config.count_noise_stddev * jax.random.normal(
        count_key, (), jnp.float32)
    unclipped_fraction = noisy_count / config.expected_batch_size + 0.5
    new_clip_norm = clip_norm * jnp.exp(
        -config.clip_learning_rate
        * (unclipped_fraction - config.target_quantile))
    new_state = AdaptiveClippingState(
        clip_norm=new_clip_norm.astype(jnp.float32),
        count=state.count + 1, key=state.key)
    return noisy, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
