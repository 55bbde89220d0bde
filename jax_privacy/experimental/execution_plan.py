"""Execution plans: one object that builds every piece of a DP mechanism.

A DP training run is private only if the batches are drawn, the gradients
clipped, the noise added and the privacy accounted for the *same*
mechanism. A :class:`DPExecutionPlan` holds the four pieces, built together
from one config, so that they cannot drift apart.

Example::

    config = DpsgdExecutionPlanConfig(
        iterations=1000, num_examples=60_000, expected_batch_size=256,
        epsilon=3.0, delta=1e-5, l2_clip_norm=1.0, noise_seed=42)
    plan = config.plan
    grad_fn = plan.clipped_grad(loss, batch_argnums=(1, 2))
    optimizer = optax.chain(plan.noise_addition_transform, optax.adam(1e-3))
    for indices in plan.batch_selection_strategy.batch_iterator(60_000, rng=7):
      ...
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable

import dp_accounting
import jax
import jax.numpy as jnp
import optax

from jax_privacy import batch_selection
from jax_privacy import clipping
from jax_privacy import noise_addition
from jax_privacy.accounting import accountants
from jax_privacy.experimental import accounting as dp_events
from jax_privacy.matrix_factorization import banded


@dataclasses.dataclass(frozen=True)
class DPExecutionPlan:
  """The four pieces of one DP mechanism, built together.

  Attributes:
    clipped_grad: ``clipping.clipped_grad`` with the mechanism's clipping
      settings bound (``l2_clip_norm``, ``rescale_to_unit_norm``,
      ``normalize_by``); call it with the loss and the batch layout.
    batch_selection_strategy: draws the batches the accountant assumes.
    noise_addition_transform: adds the mechanism's noise (an optax
      transformation to chain before the optimizer).
    dp_event: the whole run as a ``dp_accounting.DpEvent``.
  """

  clipped_grad: Callable[..., clipping.BoundedSensitivityCallable]
  batch_selection_strategy: batch_selection.BatchSelectionStrategy
  noise_addition_transform: optax.GradientTransformation
  dp_event: dp_accounting.DpEvent


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpsgdExecutionPlanConfig:
  """DP-SGD with Poisson sampling, calibrated or with a given noise.

  Exactly one of ``noise_multiplier`` and ``epsilon`` is given: with
  ``epsilon`` the noise multiplier is calibrated (with ``accountant``) so
  that ``iterations`` steps spend at most ``epsilon``.

  Attributes:
    iterations: number of training steps, ``>= 1``.
    num_examples: size of the training set, ``>= 1``.
    expected_batch_size: ``q * num_examples``, in ``[1, num_examples]``.
    delta: the delta of the guarantee, in (0, 1).
    epsilon: target epsilon (> 0), or None when ``noise_multiplier`` is set.
    noise_multiplier: noise stddev over sensitivity (>= 0), or None.
    l2_clip_norm: per-example clipping norm, > 0.
    rescale_to_unit_norm: divide clipped gradients by ``l2_clip_norm``.
    noise_seed: seed of the noise key (required: noise must be explicit).
    accountant: the accountant used for calibration and reporting.

  Privacy:
    Poisson sampling with ``q = expected_batch_size / num_examples`` under
    add/remove-one neighbours; the clipped sum is divided by the expected
    batch size and the noise stddev is ``noise_multiplier`` times its
    sensitivity.

  References:
    Abadi et al., "Deep Learning with Differential Privacy", 2016,
    arXiv:1607.00133.
  """

  iterations: int
  num_examples: int
  expected_batch_size: int
  delta: float
  noise_seed: int
  epsilon: float | None = None
  noise_multiplier: float | None = None
  l2_clip_norm: float = 1.0
  rescale_to_unit_norm: bool = False
  accountant: accountants.DpAccountantConfig = dataclasses.field(
      default_factory=accountants.PldAccountantConfig
  )

  def __post_init__(self):
    for name in ('iterations', 'num_examples', 'expected_batch_size'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
    if self.expected_batch_size > self.num_examples:
      raise ValueError(
          f'expected_batch_size must be <= num_examples ({self.num_examples}), '
          f'got {self.expected_batch_size}'
      )
    _check_real('delta', self.delta, lambda v: 0 < v < 1, '(0, 1)')
    if (self.epsilon is None) == (self.noise_multiplier is None):
      raise ValueError(
          'give exactly one of epsilon (to calibrate the noise) and '
          f'noise_multiplier, got epsilon={self.epsilon!r}, '
          f'noise_multiplier={self.noise_multiplier!r}'
      )
    if self.epsilon is not None:
      _check_real('epsilon', self.epsilon, lambda v: v > 0, '(0, inf)')
    if self.noise_multiplier is not None:
      _check_real(
          'noise_multiplier', self.noise_multiplier, lambda v: v >= 0, '[0, inf)'
      )
    _check_real('l2_clip_norm', self.l2_clip_norm, lambda v: v > 0, '(0, inf)')
    if isinstance(self.noise_seed, bool) or not isinstance(
        self.noise_seed, numbers.Integral
    ):
      raise ValueError(f'noise_seed must be an int, got {self.noise_seed!r}')

  @property
  def sampling_prob(self) -> float:
    return self.expected_batch_size / self.num_examples

  @property
  def sensitivity(self) -> float:
    """L2 sensitivity of the clipped sum over ``expected_batch_size``.

    Under add/remove-one neighbours, the relation Poisson sampling is
    accounted under; it equals ``plan.clipped_grad(...).sensitivity()``.
    """
    per_example = 1.0 if self.rescale_to_unit_norm else self.l2_clip_norm
    return per_example / self.expected_batch_size

  @functools.cached_property
  def calibrated_noise_multiplier(self) -> float:
    """The given noise multiplier, or the one calibrated to ``epsilon``."""
    if self.noise_multiplier is not None:
      return float(self.noise_multiplier)
    # Imported here: accounting.analysis imports this package's DpEvent
    # factories, so a module-level import would be circular.
    from jax_privacy.accounting import analysis  # pylint: disable=g-import-not-at-top
    from jax_privacy.accounting import calibrate  # pylint: disable=g-import-not-at-top

    return calibrate.calibrate_noise_multiplier(
        target_epsilon=self.epsilon,
        accountant=analysis.DpsgdTrainingAccountant(self.accountant),
        batch_sizes=self.expected_batch_size,
        num_updates=self.iterations,
        num_samples=self.num_examples,
        target_delta=self.delta,
    )

  def dp_event(self, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of the first ``steps`` steps of the plan."""
    return dp_events.dpsgd_event(
        self.calibrated_noise_multiplier,
        steps,
        sampling_prob=self.sampling_prob,
    )

  def epsilon_after(self, steps: int) -> float:
    """Epsilon spent by the first ``steps`` steps, at this config's delta."""
    if steps == 0:
      return 0.0
    accountant = self.accountant.create_accountant()
    accountant.compose(self.dp_event(steps))
    return float(accountant.get_epsilon(self.delta))

  @functools.cached_property
  def plan(self) -> DPExecutionPlan:
    """The mechanism's four pieces."""
    stddev = self.calibrated_noise_multiplier * self.sensitivity
    return DPExecutionPlan(
        clipped_grad=functools.partial(
            clipping.clipped_grad,
            l2_clip_norm=self.l2_clip_norm,
            rescale_to_unit_norm=self.rescale_to_unit_norm,
            normalize_by=self.expected_batch_size,
        ),
        batch_selection_strategy=batch_selection.CyclicPoissonSampling(
            sampling_prob=self.sampling_prob, iterations=self.iterations
        ),
        noise_addition_transform=noise_addition.gaussian_privatizer(
            stddev=stddev, prng_key=jax.random.key(self.noise_seed)
        ),
        dp_event=self.dp_event(self.iterations),
    )


def _check_real(name, value, accepts, accepted_range: str) -> None:
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Real)
      or not math.isfinite(value)
      or not accepts(value)
  ):
    raise ValueError(f'{name} must be in {accepted_range}, got {value!r}')


@dataclasses.dataclass(frozen=True, kw_only=True)
class BandMFExecutionPlanConfig:
  """Amplified banded matrix factorization (BandMF), built as one plan.

  The data is split into ``num_bands`` groups (``num_bands`` = the
  strategy's bands); step ``t`` Poisson-samples group ``t mod num_bands``
  with ``sampling_prob``, clips per example, and the noise is row ``t`` of
  ``stddev * C^{-1} Z`` for the column-normalised banded strategy ``C``.
  With ``num_bands=1`` this is exactly DP-SGD with Poisson sampling.

  Exactly one of ``noise_multiplier`` and ``epsilon`` decides the noise:
  with ``epsilon`` the noise multiplier is calibrated (bisection over
  ``dp_event``, verified with ``accountant``); if both are given, the noise
  multiplier must meet ``epsilon``.

  Attributes:
    iterations: number of steps, ``>= 1`` and ``<= strategy.n``.
    strategy: a ``matrix_factorization.banded.ColumnNormalizedBanded``.
    epsilon: target epsilon (> 0), or None.
    delta: the delta of the guarantee, in (0, 1).
    noise_multiplier: noise stddev over sensitivity, or None (calibrated).
    l2_clip_norm: per-example clipping norm, > 0.
    rescale_to_unit_norm: divide clipped gradients by ``l2_clip_norm``.
    normalize_by: the clipped sum is divided by this.
    sampling_prob: Poisson probability within the step's group, in (0, 1].
    truncated_batch_size: None, or the largest batch (truncated Poisson;
      needs ``num_examples``).
    num_examples: data set size (needed with truncation).
    partition_type: how the examples are split into groups.
    dtype: the noise dtype.
    accountant: accountant config used to verify the epsilon.
    noise_seed: seed of the noise key (required).

  Privacy:
    Each example belongs to one group and so takes part at most once every
    ``num_bands`` steps; under that min-separation the sensitivity of the
    column-normalised banded mechanism is that of DP-SGD on the group, and
    amplification by Poisson sampling within the group applies
    (``amplified_bandmf_event``). Add/remove-one neighbours.

  References:
    Choquette-Choo et al., "Amplified Banded Matrix Factorization: A unified
    approach to private training", 2023, arXiv:2306.08153.
  """

  iterations: int
  strategy: Any
  delta: float
  epsilon: float | None = None
  noise_multiplier: float | None = None
  l2_clip_norm: float = 1.0
  rescale_to_unit_norm: bool = True
  normalize_by: float = 1.0
  sampling_prob: float = 1.0
  truncated_batch_size: int | None = None
  num_examples: int | None = None
  partition_type: batch_selection.PartitionType = (
      batch_selection.PartitionType.EQUAL_SPLIT
  )
  dtype: Any = jnp.float32
  accountant: accountants.DpAccountantConfig = dataclasses.field(
      default_factory=accountants.PldAccountantConfig
  )
  noise_seed: int | None = None

  def __post_init__(self):
    if not isinstance(self.strategy, banded.ColumnNormalizedBanded):
      raise ValueError(
          'strategy must be a matrix_factorization.banded.'
          f'ColumnNormalizedBanded, got {type(self.strategy).__name__}'
      )
    if (
        isinstance(self.iterations, bool)
        or not isinstance(self.iterations, numbers.Integral)
        or not 1 <= self.iterations <= self.strategy.n
    ):
      raise ValueError(
          f'iterations must be an integer in [1, strategy.n={self.strategy.n}]'
          f', got {self.iterations!r}'
      )
    _check_real('delta', self.delta, lambda v: 0 < v < 1, '(0, 1)')
    if self.epsilon is None and self.noise_multiplier is None:
      raise ValueError('give epsilon or noise_multiplier (or both)')
    if self.epsilon is not None:
      _check_real('epsilon', self.epsilon, lambda v: v > 0, '(0, inf)')
    if self.noise_multiplier is not None:
      _check_real(
          'noise_multiplier', self.noise_multiplier, lambda v: v >= 0, '[0, inf)'
      )
    _check_real('l2_clip_norm', self.l2_clip_norm, lambda v: v > 0, '(0, inf)')
    _check_real('normalize_by', self.normalize_by, lambda v: v > 0, '(0, inf)')
    _check_real(
        'sampling_prob', self.sampling_prob, lambda v: 0 < v <= 1, '(0, 1]'
    )
    if self.truncated_batch_size is not None and self.num_examples is None:
      raise ValueError('truncated_batch_size needs num_examples')
    if self.num_examples is not None and (
        isinstance(self.num_examples, bool)
        or not isinstance(self.num_examples, numbers.Integral)
        or self.num_examples < self.num_bands
    ):
      raise ValueError(
          f'num_examples must be an integer >= num_bands ({self.num_bands}), '
          f'got {self.num_examples!r}'
      )
    if isinstance(self.noise_seed, bool) or not isinstance(
        self.noise_seed, numbers.Integral
    ):
      raise ValueError(
          'noise_seed must be an int: the noise must come from an explicit, '
          f'secret seed (a default one would be predictable), got '
          f'{self.noise_seed!r}'
      )
    if self.epsilon is not None and self.noise_multiplier is not None:
      spent = self._epsilon(float(self.noise_multiplier))
      if spent > self.epsilon:
        raise ValueError(
            f'noise_multiplier {self.noise_multiplier} spends epsilon '
            f'{spent:.4f} > the target epsilon {self.epsilon}; raise it or '
            'pass noise_multiplier=None to calibrate'
        )

  @classmethod
  def default(
      cls, num_bands: int, iterations: int, **kwargs
  ) -> 'BandMFExecutionPlanConfig':
    """A config with ``ColumnNormalizedBanded.default(iterations, num_bands)``."""
    return cls(
        iterations=iterations,
        strategy=banded.ColumnNormalizedBanded.default(iterations, num_bands),
        **kwargs,
    )

  @property
  def num_bands(self) -> int:
    return self.strategy.bands

  def dp_event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
    """The run's DpEvent at a given noise multiplier."""
    if self.truncated_batch_size is None:
      return dp_events.amplified_bandmf_event(
          noise_multiplier,
          self.iterations,
          num_bands=self.num_bands,
          sampling_prob=self.sampling_prob,
      )
    return dp_events.truncated_amplified_bandmf_event(
        noise_multiplier,
        self.iterations,
        num_bands=self.num_bands,
        sampling_prob=self.sampling_prob,
        largest_group_size=-(-self.num_examples // self.num_bands),
        truncated_batch_size=self.truncated_batch_size,
    )

  def _epsilon(self, noise_multiplier: float) -> float:
    accountant = self.accountant.create_accountant()
    accountant.compose(self.dp_event(noise_multiplier))
    return float(accountant.get_epsilon(self.delta))

  @functools.cached_property
  def calibrated_noise_multiplier(self) -> float:
    """The given noise multiplier, or the smallest found meeting epsilon."""
    if self.noise_multiplier is not None:
      return float(self.noise_multiplier)
    low, high = 0.0, 1.0
    while self._epsilon(high) > self.epsilon:
      low, high = high, 2.0 * high
      if high > 1e6:
        raise ValueError(f'epsilon {self.epsilon} is unreachable')
    while high - low > 1e-3 * high:
      middle = 0.5 * (low + high)
      if self._epsilon(middle) > self.epsilon:
        low = middle
      else:
        high = middle
    return high

  @functools.cached_property
  def plan(self) -> DPExecutionPlan:
    """The mechanism's four pieces."""
    per_example = 1.0 if self.rescale_to_unit_norm else self.l2_clip_norm
    stddev = self.calibrated_noise_multiplier * per_example / self.normalize_by
    return DPExecutionPlan(
        clipped_grad=functools.partial(
            clipping.clipped_grad,
            l2_clip_norm=self.l2_clip_norm,
            rescale_to_unit_norm=self.rescale_to_unit_norm,
            normalize_by=self.normalize_by,
        ),
        batch_selection_strategy=batch_selection.CyclicPoissonSampling(
            sampling_prob=self.sampling_prob,
            iterations=self.iterations,
            truncated_batch_size=self.truncated_batch_size,
            cycle_length=self.num_bands,
            partition_type=self.partition_type,
        ),
        noise_addition_transform=noise_addition.matrix_factorization_privatizer(
            self.strategy.inverse_as_streaming_matrix(),
            stddev=stddev,
            prng_key=jax.random.key(self.noise_seed),
            dtype=self.dtype,
        ),
        dp_event=self.dp_event(self.calibrated_noise_multiplier),
    )
