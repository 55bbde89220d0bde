"""A cache of epsilon against the number of updates, for fast look-ups.

Private: `CachedExperimentAccountant` is public as
`jax_privacy.accounting.analysis.CachedExperimentAccountant`.
"""

import bisect
import logging
import numbers

import numpy as np

from jax_privacy.accounting._params import DpParams
from jax_privacy.accounting._params import _check_num_updates


class CachedExperimentAccountant:
  """Caches a training accountant's epsilon curve for one experiment.

  Training loops ask for epsilon at every step; an exact PLD computation
  takes a fraction of a second each time. This accountant computes epsilon
  exactly at `num_cached_points` numbers of updates spread evenly over
  [0, max_num_updates] (once per `DpParams`), and answers
  `compute_epsilon(n, dp_params, allow_approximate_cache=True)` with the
  exact epsilon at the smallest cached point >= n. Epsilon grows with the
  number of updates, so the answer is never below the exact epsilon at n: a
  pessimistic step interpolation, never a linear one (epsilon is concave in
  the number of steps, so a chord would under-report it).

  `epsilon_upper_bound` says whether an answer is exact; without
  `allow_approximate_cache`, or beyond `max_num_updates`, the value is
  computed exactly.

  Args:
    training_accountant: The accountant whose values are cached (e.g. a
      `DpsgdTrainingAccountant`).
    max_num_updates: Largest number of updates cached, an integer >= 1.
    num_cached_points: Number of cached points, an integer >= 2 (the first
      is 0 updates, the last `max_num_updates`).
  """

  def __init__(self, training_accountant, max_num_updates: int,
               num_cached_points: int = 100):
    if not hasattr(training_accountant, 'compute_epsilon'):
      raise TypeError(
          'training_accountant must be a TrainingAccountant, got'
          f' {training_accountant!r}.'
      )
    for name, value, minimum in (
        ('max_num_updates', max_num_updates, 1),
        ('num_cached_points', num_cached_points, 2),
    ):
      if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
          or value < minimum):
        raise ValueError(
            f'{name} must be an integer >= {minimum}, got {value!r}.'
        )
    self._accountant = training_accountant
    self._max_num_updates = int(max_num_updates)
    points = np.linspace(0, max_num_updates, num_cached_points)
    self._points = sorted({int(np.ceil(p)) for p in points})
    self._cache: dict[DpParams, list[float]] = {}

  @property
  def training_accountant(self):
    return self._accountant

  @property
  def cached_points(self) -> tuple[int, ...]:
    """The numbers of updates at which epsilon is cached."""
    return tuple(self._points)

  @property
  def can_calibrate_steps(self) -> bool:
    return getattr(self._accountant, 'can_calibrate_steps', True)

  @property
  def can_calibrate_batch_size(self) -> bool:
    return getattr(self._accountant, 'can_calibrate_batch_size', True)

  @property
  def can_calibrate_noise_multipliers(self) -> bool:
    return getattr(self._accountant, 'can_calibrate_noise_multipliers', True)

  def _curve(self, dp_params: DpParams) -> list[float]:
    if dp_params not in self._cache:
      self._cache[dp_params] = [
          self._accountant.compute_epsilon(n, dp_params) for n in self._points
      ]
    return self._cache[dp_params]

  def epsilon_upper_bound(
      self, num_updates: int, dp_params: DpParams
  ) -> tuple[float, bool]:
    """Returns `(epsilon, is_exact)` from the cache when possible.

    Args:
      num_updates: Number of updates, an integer >= 0.
      dp_params: The privacy settings of the run.

    Returns:
      The exact epsilon at the smallest cached point >= num_updates, and
      whether that point is num_updates itself (then the value is exact).
      Beyond `max_num_updates` the exact value, computed now.
    """
    num_updates = _check_num_updates(num_updates)
    if not isinstance(dp_params, DpParams):
      raise TypeError(f'dp_params must be a DpParams, got {dp_params!r}.')
    if num_updates > self._max_num_updates:
      return self._accountant.compute_epsilon(num_updates, dp_params), True
    index = bisect.bisect_left(self._points, num_updates)
    epsilon = self._curve(dp_params)[index]
    is_exact = self._points[index] == num_updates
    if not is_exact:
      logging.debug(
          'Cached epsilon for %d updates is the exact value at %d updates,'
          ' an upper bound.', num_updates, self._points[index]
      )
    return epsilon, is_exact

  def compute_epsilon(
      self,
      num_updates: int,
      dp_params: DpParams,
      allow_approximate_cache: bool = False,
  ) -> float:
    """Returns epsilon after `num_updates` updates.

    Args:
      num_updates: Number of updates, an integer >= 0.
      dp_params: The privacy settings of the run.
      allow_approximate_cache: If True, answer from the cache: an upper
        bound that is exact at the cached points (see
        `epsilon_upper_bound`). If False, compute the exact value.
    """
    if allow_approximate_cache:
      return self.epsilon_upper_bound(num_updates, dp_params)[0]
    return self._accountant.compute_epsilon(num_updates, dp_params)
