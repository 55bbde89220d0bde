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
from typing import Callable

import dp_accounting
import jax
import optax

from jax_privacy import batch_selection
from jax_privacy import clipping
from jax_privacy import noise_addition
from jax_privacy.accounting import accountants
from jax_privacy.experimental import accounting as dp_events


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
