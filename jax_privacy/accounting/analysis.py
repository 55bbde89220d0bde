"""Privacy analysis of a training run: its settings and its epsilon.

`DpParams` holds the privacy-relevant settings of a run (noise, data set size,
batch sizes, delta, sampling); a training accountant turns those settings and
a number of updates into a `dp_accounting.DpEvent` and composes it into the
run's epsilon:

>>> from jax_privacy.accounting import accountants, analysis
>>> accountant = analysis.DpsgdTrainingAccountant(
...     dp_accountant_config=accountants.RdpAccountantConfig())
>>> params = analysis.DpParams(
...     noise_multipliers=1.1, num_samples=60_000, delta=1e-5, batch_size=256)
>>> epsilon = accountant.compute_epsilon(num_updates=14_000, dp_params=params)

Noise multipliers and batch sizes are either one number for the whole run or
a piecewise-constant schedule `[(start_step, value), ...]` whose first start
step is 0 and whose start steps increase strictly; the value of a piece holds
from its start step until the next piece starts (the last piece holds
forever). Steps are counted from 0.

Accountants:

* `DpsgdTrainingAccountant`: example-level DP-SGD with Poisson, cyclic
  Poisson, truncated Poisson, fixed-size or shuffled batches.
* `DpsgdTrainingUserLevelAccountant`: user-level DP of example-level DP-SGD
  when a user owns up to `examples_per_user` examples.
* `SingleReleaseTrainingAccountant`: the whole run is one Gaussian release
  (e.g. DP-FTRL / matrix factorization without amplification).
* `CachedExperimentAccountant`: a cache of epsilon against steps for fast,
  pessimistic look-ups during training.

References:
  Abadi et al., "Deep Learning with Differential Privacy", 2016.
  arXiv:1607.00133.
  Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian
  Mechanism", 2019. arXiv:1908.10530.
"""

import abc
import copy
import logging
import math
from typing import Optional, Protocol, runtime_checkable

import dp_accounting
import numpy as np
from scipy import stats

from jax_privacy.accounting import accountants
from jax_privacy.accounting._cached import CachedExperimentAccountant
from jax_privacy.accounting._params import DpParams
from jax_privacy.accounting._params import SamplingMethod
from jax_privacy.accounting._params import Schedule
from jax_privacy.accounting._params import _check_num_updates
from jax_privacy.accounting._params import _compose
from jax_privacy.accounting._params import _pieces
from jax_privacy.accounting._params import _segments
from jax_privacy.experimental import accounting as dp_events

NeighboringRelation = dp_accounting.NeighboringRelation

__all__ = [
    'CachedExperimentAccountant',
    'DpParams',
    'DpTrainingAccountant',
    'DpsgdTrainingAccountant',
    'DpsgdTrainingUserLevelAccountant',
    'NeighboringRelation',
    'SamplingMethod',
    'Schedule',
    'SingleReleaseTrainingAccountant',
    'TrainingAccountant',
]


@runtime_checkable
class TrainingAccountant(Protocol):
  """Anything that computes the epsilon of a training run."""

  def compute_epsilon(
      self,
      num_updates: int,
      dp_params: DpParams,
      allow_approximate_cache: bool = False,
  ) -> float:
    """Returns epsilon after `num_updates` steps with these settings."""
    ...


class DpTrainingAccountant(abc.ABC):
  """A training accountant that composes a DpEvent with dp_accounting.

  Subclasses say which mechanism a run is (`_compute_dp_event`), under which
  neighbouring relation (`neighboring_relation`), and which settings a
  calibrator may vary (`can_calibrate_*`).

  Args:
    dp_accountant_config: Which accounting mathematics to use (RDP or PLD).
  """

  def __init__(self, dp_accountant_config: accountants.DpAccountantConfig):
    if not isinstance(dp_accountant_config, accountants.DpAccountantConfig):
      raise TypeError(
          'dp_accountant_config must be a DpAccountantConfig, such as'
          ' accountants.PldAccountantConfig(), got'
          f' {dp_accountant_config!r}.'
      )
    self._dp_accountant_config = dp_accountant_config

  @property
  def dp_accountant_config(self) -> accountants.DpAccountantConfig:
    return self._dp_accountant_config

  def with_dp_accountant_config(
      self, dp_accountant_config: accountants.DpAccountantConfig
  ) -> 'DpTrainingAccountant':
    """Returns the same accountant with other accounting mathematics.

    Calibration uses this to bracket its answer with a fast, coarse
    accountant before it checks the answer with the exact one.
    """
    clone = copy.copy(self)
    clone._dp_accountant_config = dp_accountant_config
    return clone

  @property
  @abc.abstractmethod
  def can_calibrate_steps(self) -> bool:
    """Whether calibrate_num_updates may vary the number of updates."""

  @property
  @abc.abstractmethod
  def can_calibrate_batch_size(self) -> bool:
    """Whether calibrate_batch_size may vary the batch size."""

  @property
  @abc.abstractmethod
  def can_calibrate_noise_multipliers(self) -> bool:
    """Whether calibrate_noise_multiplier may vary the noise."""

  def neighboring_relation(self, dp_params: DpParams) -> NeighboringRelation:
    """Returns the neighbouring relation the guarantee is stated for."""
    del dp_params  # The same relation for every setting, unless overridden.
    return NeighboringRelation.ADD_OR_REMOVE_ONE

  def _accounting_relation(self, dp_params: DpParams) -> NeighboringRelation:
    """The relation handed to dp_accounting for the event of `dp_event`.

    Usually `neighboring_relation`. It differs when the event already
    carries the relation's sensitivity: dp_accounting's accountants disagree
    on what a bare `GaussianDpEvent` means under REPLACE_ONE (RDP:
    sensitivity 1; PLD: sensitivity 2), so such events are stated with the
    sensitivity built in and composed as ADD_OR_REMOVE_ONE.
    """
    return self.neighboring_relation(dp_params)

  @abc.abstractmethod
  def _compute_dp_event(
      self, num_updates: int, dp_params: DpParams
  ) -> dp_accounting.DpEvent:
    """Returns the DpEvent of the run; arguments are already validated."""

  def dp_event(
      self, num_updates: int, dp_params: DpParams
  ) -> dp_accounting.DpEvent:
    """Returns the mechanism of `num_updates` steps as a DpEvent.

    Args:
      num_updates: Number of training steps, an integer >= 0.
      dp_params: The privacy settings of the run.

    Raises:
      ValueError: If the arguments are invalid or the settings are not
        supported by this accountant.
    """
    num_updates = _check_num_updates(num_updates)
    if not isinstance(dp_params, DpParams):
      raise TypeError(f'dp_params must be a DpParams, got {dp_params!r}.')
    return self._compute_dp_event(num_updates, dp_params)

  def compute_epsilon(
      self,
      num_updates: int,
      dp_params: DpParams,
      allow_approximate_cache: bool = False,
  ) -> float:
    """Returns the epsilon of `num_updates` steps at `dp_params.delta`.

    Args:
      num_updates: Number of training steps, an integer >= 0.
      dp_params: The privacy settings of the run.
      allow_approximate_cache: Accepted for the `TrainingAccountant`
        protocol. This accountant always computes the exact value, so it has
        no effect.

    Returns:
      Epsilon, an upper bound on the privacy loss; 0 for no updates and
      `inf` if a step adds no noise.

    Raises:
      ValueError: If the arguments are invalid or the configured accountant
        cannot compose this mechanism.
    """
    del allow_approximate_cache  # Always exact.
    return self._epsilon_of(self.dp_event(num_updates, dp_params), dp_params)

  def _epsilon_of(
      self, event: dp_accounting.DpEvent, dp_params: DpParams
  ) -> float:
    relation = self._accounting_relation(dp_params)
    accountant = self._dp_accountant_config.create_accountant(relation)
    if not accountant.supports(event):
      raise ValueError(
          f'{type(self._dp_accountant_config).__name__} cannot account for'
          f' this mechanism: dp_accounting\'s {type(accountant).__name__}'
          f' does not support {event} under {relation.name}.'
      )
    return float(accountant.compose(event).get_epsilon(dp_params.delta))


def _cyclic_sampling_prob(
    dp_params: DpParams, batch_size: float, cycle_length: int
) -> float:
  """The probability that a step samples a given example of its group."""
  sampling_prob = batch_size * cycle_length / dp_params.num_samples
  if sampling_prob > 1:
    raise ValueError(
        'batch_size * cycle_length must be <= num_samples (each of the'
        f' cycle_length={cycle_length} groups of about'
        f' {dp_params.num_samples / cycle_length:g} examples is Poisson'
        f' sampled), got batch size {batch_size:g}.'
    )
  return sampling_prob


def _participations(num_steps: int, cycle_length: int) -> int:
  """Most steps of a piece that sample one group of a cyclic partition."""
  return -(-num_steps // cycle_length)


def _reject(accountant, dp_params: DpParams, reasons: dict[str, str]) -> None:
  for name, reason in reasons.items():
    value = getattr(dp_params, name)
    if value is not None and not (name == 'cycle_length' and value == 1):
      raise ValueError(
          f'{type(accountant).__name__} does not support {name} with'
          f' sampling_method={dp_params.sampling_method.name}, got'
          f' {name}={value!r}: {reason}'
      )


def _require_pld(accountant, what: str) -> None:
  if not isinstance(accountant.dp_accountant_config,
                    accountants.PldAccountantConfig):
    raise ValueError(
        f'{what} needs PldAccountantConfig, got'
        f' {type(accountant.dp_accountant_config).__name__}: dp_accounting\'s'
        ' RDP accountant does not support this mechanism.'
    )


class DpsgdTrainingAccountant(DpTrainingAccountant):
  """Example-level accountant of DP-SGD.

  Each step samples a batch, sums the gradients of its examples clipped to
  norm C, and adds Gaussian noise of stddev noise_multiplier * C. The run is
  composed piece by piece of the schedules:

  * POISSON: step t includes each example independently with probability
    q_t = batch_size(t) / num_samples:
    `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)),
    steps)`.
  * POISSON with `cycle_length` k > 1 (cyclic Poisson sampling, as
    `batch_selection.CyclicPoissonSampling` draws it): the data is split into
    k groups and step t samples group t mod k with probability
    q = batch_size * k / num_samples. An example is exposed only in the steps
    of its group, at most ceil(steps / k) of each piece; k with q = 1 is
    fixed-order epochs (each epoch one unamplified Gaussian release).
  * POISSON with `truncated_batch_size`: batches larger than it keep a
    uniformly random subset (`experimental.accounting.
    truncated_dpsgd_event`, PLD only). With cycle_length the data set of a
    step is one group; when groups differ in size the larger epsilon of the
    two sizes is reported (the truncated analysis is not monotone in it).
  * FIXED_BATCH_SIZE: each batch is exactly batch_size(t) examples drawn
    without replacement (`fixed_dpsgd_event`, replace-one, RDP only).
  * SHUFFLED: shuffled fixed-size batches, an example in at most one batch
    per epoch of floor(num_samples / batch_size) steps, accounted for
    without amplification (proven): each epoch touched is one Gaussian
    release of sensitivity 2C under replace-one neighbours, at the smallest
    noise multiplier of that epoch. The batch size must be constant.
  * SHUFFLED_POISSON_HEURISTIC: shuffled batches accounted for as Poisson;
    a heuristic, not a proven bound (a warning is logged).

  Privacy:
    Example-level. POISSON: add-or-remove-one neighbours; the batches must
    really be Poisson samples (random size). FIXED_BATCH_SIZE and SHUFFLED:
    replace-one neighbours. `examples_per_user` is rejected: the guarantee
    here protects one example, for users use
    `DpsgdTrainingUserLevelAccountant`.

  References:
    Abadi et al., 2016. arXiv:1607.00133.
    Mironov, Talwar, Zhang, 2019. arXiv:1908.10530.
    Wang, Balle, Kasiviswanathan, 2019. arXiv:1808.00087.
    Choquette-Choo et al., "(Amplified) Banded Matrix Factorization", 2023.
    arXiv:2306.08153 (cyclic Poisson sampling).
    Chua et al., "How Private are DP-SGD Implementations?", 2024.
    arXiv:2403.17673 (shuffling versus Poisson sampling).
  """

  @property
  def can_calibrate_steps(self) -> bool:
    return True

  @property
  def can_calibrate_batch_size(self) -> bool:
    return True

  @property
  def can_calibrate_noise_multipliers(self) -> bool:
    return True

  def neighboring_relation(self, dp_params: DpParams) -> NeighboringRelation:
    if dp_params.sampling_method in (
        SamplingMethod.FIXED_BATCH_SIZE, SamplingMethod.SHUFFLED
    ):
      return NeighboringRelation.REPLACE_ONE
    return NeighboringRelation.ADD_OR_REMOVE_ONE

  def _accounting_relation(self, dp_params: DpParams) -> NeighboringRelation:
    if dp_params.sampling_method is SamplingMethod.SHUFFLED:
      # The event is GaussianDpEvent(sigma / 2): replace-one's sensitivity 2C
      # is built in (see the base class).
      return NeighboringRelation.ADD_OR_REMOVE_ONE
    return self.neighboring_relation(dp_params)

  def _compute_dp_event(
      self, num_updates: int, dp_params: DpParams
  ) -> dp_accounting.DpEvent:
    if dp_params.examples_per_user is not None:
      raise ValueError(
          'DpsgdTrainingAccountant is example-level and does not support'
          f' examples_per_user, got {dp_params.examples_per_user!r}; use'
          ' DpsgdTrainingUserLevelAccountant for a user-level guarantee.'
      )
    method = dp_params.sampling_method
    if method is SamplingMethod.POISSON:
      return self._poisson_event(num_updates, dp_params)
    not_with = 'it applies to Poisson sampling only.'
    _reject(self, dp_params, {
        'cycle_length': not_with, 'truncated_batch_size': not_with})
    if method is SamplingMethod.SHUFFLED_POISSON_HEURISTIC:
      logging.warning(
          'Accounting for shuffled batches as if they were Poisson samples:'
          ' a HEURISTIC, not a proven guarantee (arXiv:2403.17673).'
      )
      return self._poisson_event(num_updates, dp_params)
    if method is SamplingMethod.SHUFFLED:
      return _shuffled_event(num_updates, dp_params)
    if not isinstance(self.dp_accountant_config,
                      accountants.RdpAccountantConfig):
      raise ValueError(
          'sampling_method=FIXED_BATCH_SIZE needs RdpAccountantConfig, got'
          f' {type(self.dp_accountant_config).__name__}: dp_accounting\'s'
          ' PLD accountant does not support sampling without replacement.'
      )
    return _compose([
        dp_events.fixed_dpsgd_event(
            noise,
            num_steps,
            dataset_size=dp_params.num_samples,
            batch_size=int(batch_size),
        )
        for num_steps, noise, batch_size in _segments(dp_params, num_updates)
    ])

  def compute_epsilon(
      self,
      num_updates: int,
      dp_params: DpParams,
      allow_approximate_cache: bool = False,
  ) -> float:
    epsilon = super().compute_epsilon(
        num_updates, dp_params, allow_approximate_cache)
    cycle_length = dp_params.cycle_length or 1
    if (
        dp_params.truncated_batch_size is not None
        and dp_params.num_samples % cycle_length
    ):
      # Groups of an uneven split differ by one example, and the truncated
      # analysis is not monotone in the data set size: take the worse group.
      smaller = self._poisson_event(
          num_updates, dp_params,
          group_size=dp_params.num_samples // cycle_length)
      epsilon = max(epsilon, self._epsilon_of(smaller, dp_params))
    return epsilon

  def _poisson_event(
      self, num_updates: int, dp_params: DpParams,
      group_size: Optional[int] = None,
  ):
    cycle_length = dp_params.cycle_length or 1
    if group_size is None:
      group_size = -(-dp_params.num_samples // cycle_length)
    truncated = dp_params.truncated_batch_size
    if truncated is not None:
      _require_pld(self, 'truncated_batch_size')
    events = []
    for num_steps, noise, batch_size in _segments(dp_params, num_updates):
      sampling_prob = _cyclic_sampling_prob(dp_params, batch_size, cycle_length)
      steps = _participations(num_steps, cycle_length)
      if truncated is None:
        events.append(
            dp_events.dpsgd_event(noise, steps, sampling_prob=sampling_prob)
        )
      else:
        events.append(
            dp_events.truncated_dpsgd_event(
                noise,
                steps,
                sampling_prob=sampling_prob,
                num_examples=group_size,
                truncated_batch_size=truncated,
            )
        )
    return _compose(events)


def _shuffled_event(num_updates: int, dp_params: DpParams):
  """Unamplified shuffled epochs: one Gaussian release per epoch touched."""
  batch_pieces = _pieces(dp_params.batch_schedule())
  scale = dp_params.batch_size_scale_schedule
  if len(batch_pieces) > 1 or (scale is not None and len(_pieces(scale)) > 1):
    raise ValueError(
        'sampling_method=SHUFFLED needs a constant batch size (epochs are'
        f' then well defined), got batch_sizes={dp_params.batch_schedule()!r}.'
    )
  batch_size = dp_params.schedule_pieces()[0][1][1]
  steps_per_epoch = int(dp_params.num_samples // batch_size)
  noise_pieces = _pieces(dp_params.noise_multipliers)
  epochs = {}  # Smallest noise of an epoch -> number of such epochs.
  for epoch_start in range(0, num_updates, steps_per_epoch):
    epoch_end = min(epoch_start + steps_per_epoch, num_updates)
    noises = [
        noise
        for i, (start, noise) in enumerate(noise_pieces)
        if start < epoch_end
        and (i + 1 == len(noise_pieces) or noise_pieces[i + 1][0] > epoch_start)
    ]
    epochs[min(noises)] = epochs.get(min(noises), 0) + 1
  events = []
  for noise, count in sorted(epochs.items()):
    if noise == 0:
      events.append(dp_accounting.NonPrivateDpEvent())
    else:
      # Replace-one changes a sum of norm-C gradients by up to 2C.
      events.append(dp_accounting.SelfComposedDpEvent(
          dp_accounting.GaussianDpEvent(noise / 2.0), count))
  return _compose(events)


class DpsgdTrainingUserLevelAccountant(DpsgdTrainingAccountant):
  """User-level accountant of example-level DP-SGD with Poisson sampling.

  The batches are drawn as for `DpsgdTrainingAccountant` (Poisson, or cyclic
  Poisson with `cycle_length`) and gradients are clipped per example, but
  the guarantee protects a whole user, who owns up to `examples_per_user`
  = k examples of the data set. At a step with sampling probability q the
  number of the user's examples in the batch is Binomial(k, q), so the
  step is the mixture of Gaussians that shifts the noise by i * C with
  probability Binomial(k, q)(i), i = 0..k:
  `MixtureOfGaussiansDpEvent(sigma, [0..k], binomial pmf)`.

  Privacy:
    Add-or-remove-one-user neighbours: the neighbouring data set lacks (or
    has) all k examples of one user. The mixture takes the user's clipped
    gradients to point the same way, which is the worst case for an
    adversary aligning them (Choquette-Choo et al. 2023). PLD accounting
    only (dp_accounting's RDP accountant has no mixture of Gaussians).
    With `examples_per_user=1` this is `DpsgdTrainingAccountant`.
    When users (not examples) are sampled and each user's gradient is
    clipped as a whole, use `DpsgdTrainingAccountant` with num_samples
    counting users instead.

  References:
    Choquette-Choo, Ganesh, Steinke, Thakurta, "Privacy Amplification for
    Matrix Mechanisms", 2023. arXiv:2310.15526.
    Charles et al., "Fine-Tuning Large Language Models with User-Level
    Differential Privacy", 2024. arXiv:2407.07737.
  """

  def neighboring_relation(self, dp_params: DpParams) -> NeighboringRelation:
    del dp_params  # Always add or remove one user.
    return NeighboringRelation.ADD_OR_REMOVE_ONE

  def _compute_dp_event(
      self, num_updates: int, dp_params: DpParams
  ) -> dp_accounting.DpEvent:
    if dp_params.examples_per_user is None:
      raise ValueError(
          'DpsgdTrainingUserLevelAccountant needs examples_per_user, an'
          ' integer >= 1, got None.'
      )
    if dp_params.sampling_method is not SamplingMethod.POISSON:
      raise ValueError(
          'DpsgdTrainingUserLevelAccountant supports'
          ' sampling_method=POISSON only, got'
          f' {dp_params.sampling_method.name}.'
      )
    _reject(self, dp_params, {
        'truncated_batch_size': 'truncation of user-level batches is not'
        ' analysed here.'})
    _require_pld(self, 'DpsgdTrainingUserLevelAccountant')
    users_examples = dp_params.examples_per_user
    cycle_length = dp_params.cycle_length or 1
    events = []
    for num_steps, noise, batch_size in _segments(dp_params, num_updates):
      sampling_prob = _cyclic_sampling_prob(dp_params, batch_size, cycle_length)
      steps = _participations(num_steps, cycle_length)
      if steps == 0:
        continue
      if noise == 0:
        events.append(dp_accounting.NonPrivateDpEvent())
        continue
      counts = np.arange(users_examples + 1)
      probs = stats.binom.pmf(counts, users_examples, sampling_prob)
      keep = probs > 0  # Components of probability 0 change nothing.
      events.append(dp_accounting.SelfComposedDpEvent(
          dp_accounting.dp_event.MixtureOfGaussiansDpEvent(
              standard_deviation=float(noise),
              sensitivities=[float(c) for c in counts[keep]],
              sampling_probs=[float(p) for p in probs[keep] / probs.sum()],
          ),
          steps,
      ))
    return _compose(events)


class SingleReleaseTrainingAccountant(DpTrainingAccountant):
  """The whole run is a single Gaussian release.

  For mechanisms without amplification by sampling whose whole output is
  one linear map of the data plus Gaussian noise, e.g. DP-FTRL / matrix
  factorization with every example in every epoch: the noise multiplier is
  then the noise standard deviation divided by the L2 sensitivity of the
  whole run (for a factorization A = BC, clip norm times the sensitivity of
  C over all participations). Epsilon does not depend on the number of
  updates (0 updates release nothing) nor on batch sizes.

  Privacy:
    Add-or-remove-one neighbours, with the sensitivity computed for that
    relation: `GaussianDpEvent(noise_multiplier)`. The noise multiplier must
    be one number.

  References:
    Kairouz et al., "Practical and Private (Deep) Learning without Sampling
    or Shuffling", 2021. arXiv:2103.00039.
    Balle, Wang, "Improving the Gaussian Mechanism for Differential
    Privacy", 2018. arXiv:1805.06530.
  """

  @property
  def can_calibrate_steps(self) -> bool:
    return False

  @property
  def can_calibrate_batch_size(self) -> bool:
    return False

  @property
  def can_calibrate_noise_multipliers(self) -> bool:
    return True

  def _compute_dp_event(
      self, num_updates: int, dp_params: DpParams
  ) -> dp_accounting.DpEvent:
    pieces = _pieces(dp_params.noise_multipliers)
    if len(pieces) > 1:
      raise ValueError(
          'SingleReleaseTrainingAccountant needs one noise multiplier for'
          f' the whole release, got noise_multipliers={pieces!r}.'
      )
    if num_updates == 0:
      return dp_accounting.NoOpDpEvent()
    if pieces[0][1] == 0:
      return dp_accounting.NonPrivateDpEvent()
    return dp_accounting.GaussianDpEvent(pieces[0][1])

