"""Calibration: the noise, number of updates or batch size meeting a budget.

Fix two of (noise multiplier, number of updates, batch size) and the budget
(target_epsilon, target_delta); each function here finds the third by
bisection on the training accountant's epsilon:

>>> from jax_privacy.accounting import accountants, analysis, calibrate
>>> accountant = analysis.DpsgdTrainingAccountant(
...     dp_accountant_config=accountants.PldAccountantConfig())
>>> sigma = calibrate.calibrate_noise_multiplier(
...     target_epsilon=1.0, accountant=accountant, batch_sizes=256,
...     num_updates=1_000, num_samples=60_000, target_delta=1e-5)

Every result meets the target: its epsilon, as computed by `accountant`, is
at most `target_epsilon`. None is ever returned whose epsilon exceeds the
target. Initial brackets are only starting points: they are grown until they
contain the answer.

Privacy:
  The guarantee is the accountant's (see `analysis.DpsgdTrainingAccountant`:
  Poisson sampling with add-or-remove-one neighbours by default). Epsilon is
  assumed to decrease with the noise and to increase with the number of
  updates and the batch size, which holds for the mechanisms accounted here.
"""

import math
import numbers
from typing import Callable, Optional

from jax_privacy.accounting import analysis

# Beyond these the target is treated as unreachable: epsilon is then below the
# resolution of the accountant, or the budget is effectively unlimited.
_MAX_NOISE_MULTIPLIER = 1e9
_MAX_NUM_UPDATES = 2**40


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_budget(target_epsilon, target_delta) -> None:
  if not (
      _is_real(target_epsilon)
      and math.isfinite(target_epsilon)
      and target_epsilon > 0
  ):
    raise ValueError(
        f'target_epsilon must be finite and > 0, got {target_epsilon!r}.'
    )
  if not (_is_real(target_delta) and 0 < target_delta < 1):
    raise ValueError(f'target_delta must be in (0, 1), got {target_delta!r}.')


def _check_accountant(accountant, capability: str) -> None:
  if not isinstance(accountant, analysis.TrainingAccountant):
    raise TypeError(
        'accountant must be a TrainingAccountant such as'
        f' analysis.DpsgdTrainingAccountant, got {accountant!r}.'
    )
  if not getattr(accountant, capability, True):
    raise ValueError(
        f'{type(accountant).__name__} cannot be calibrated this way'
        f' ({capability} is False).'
    )


def _check_positive(name: str, value) -> None:
  if not (_is_real(value) and math.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be finite and > 0, got {value!r}.')


def _check_int(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  if value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value}.')


def _largest_integer_within(
    epsilon: Callable[[int], float],
    target_epsilon: float,
    *,
    name: str,
    low: int,
    high: int,
    limit: int,
) -> int:
  """Largest n in [low, limit] with epsilon(n) <= target (epsilon increasing).

  Raises:
    ValueError: If epsilon(low) already exceeds the target.
  """
  low_epsilon = epsilon(low)
  if low_epsilon > target_epsilon:
    raise ValueError(
        f'target_epsilon={target_epsilon} is unreachable: the smallest'
        f' epsilon reachable, at {name}={low}, is {low_epsilon:.4g}. Add'
        ' noise, or lower the other settings.'
    )
  high = min(max(high, low + 1), limit)
  # Invariant: epsilon(low) <= target; grow `high` until epsilon(high) exceeds
  # it (or `limit` is reached, which then is the answer).
  while epsilon(high) <= target_epsilon:
    if high >= limit:
      return limit
    low, high = high, min(2 * high, limit)
  while high - low > 1:
    middle = (low + high) // 2
    if epsilon(middle) <= target_epsilon:
      low = middle
    else:
      high = middle
  return low


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    accountant: analysis.TrainingAccountant,
    batch_sizes: analysis.Schedule,
    num_updates: int,
    num_samples: int,
    target_delta: float,
    examples_per_user: Optional[int] = None,
    cycle_length: Optional[int] = None,
    truncated_batch_size: Optional[int] = None,
    initial_max_noise: float = 1.0,
    initial_min_noise: float = 0.0,
    tol: float = 0.01,
) -> float:
  """Returns the smallest noise multiplier found that meets the budget.

  Bisection on the noise multiplier sigma: the upper end of the bracket is
  doubled until its epsilon meets the target, then the bracket is halved
  until it is narrower than `tol`. The upper end is returned, so
  epsilon(result) <= target_epsilon, and epsilon(result - tol) >
  target_epsilon unless result - tol is below `initial_min_noise`.

  Args:
    target_epsilon: Epsilon to meet, finite and > 0.
    accountant: The training accountant, e.g. a DpsgdTrainingAccountant.
    batch_sizes: Batch size, a number or a schedule [(start_step, size)].
    num_updates: Number of training steps, an integer >= 1.
    num_samples: Number of examples in the data set, an integer >= 1.
    target_delta: Delta of the guarantee, in (0, 1).
    examples_per_user: Passed to `DpParams` (user-level accounting).
    cycle_length: Passed to `DpParams` (cyclic Poisson sampling).
    truncated_batch_size: Passed to `DpParams` (truncated batches).
    initial_max_noise: Initial upper end of the bracket, > 0.
    initial_min_noise: Lower end of the bracket, in [0, initial_max_noise).
    tol: Width of the final bracket in noise multiplier, > 0.

  Returns:
    A noise multiplier, within `tol` of the smallest one that meets the
    target, and never one that misses it.

  Raises:
    ValueError: If an argument is invalid, or if no noise multiplier up to
      1e9 meets the target (it is below the accountant's resolution).
  """
  _check_budget(target_epsilon, target_delta)
  _check_accountant(accountant, 'can_calibrate_noise_multipliers')
  _check_int('num_updates', num_updates, 1)
  _check_positive('initial_max_noise', initial_max_noise)
  _check_positive('tol', tol)
  if not (
      _is_real(initial_min_noise) and 0 <= initial_min_noise < initial_max_noise
  ):
    raise ValueError(
        'initial_min_noise must be in [0, initial_max_noise='
        f'{initial_max_noise}), got {initial_min_noise!r}.'
    )

  def epsilon(noise_multiplier: float) -> float:
    dp_params = analysis.DpParams(
        noise_multipliers=noise_multiplier,
        num_samples=num_samples,
        delta=target_delta,
        batch_sizes=batch_sizes,
        examples_per_user=examples_per_user,
        cycle_length=cycle_length,
        truncated_batch_size=truncated_batch_size,
    )
    return accountant.compute_epsilon(num_updates, dp_params)

  low, high = float(initial_min_noise), float(initial_max_noise)
  if low > 0 and epsilon(low) <= target_epsilon:
    return low
  # Invariant: epsilon(high) <= target < epsilon(low) (epsilon(0) is inf).
  while (high_epsilon := epsilon(high)) > target_epsilon:
    if high >= _MAX_NOISE_MULTIPLIER:
      raise ValueError(
          f'target_epsilon={target_epsilon} is unreachable: even'
          f' noise_multiplier={high:g} gives epsilon={high_epsilon:.4g}, below'
          " the accountant's resolution. Use a finer accountant or a larger"
          ' target.'
      )
    low, high = high, 2 * high
  while high - low > tol:
    middle = (low + high) / 2
    if epsilon(middle) <= target_epsilon:
      high = middle
    else:
      low = middle
  return high


def calibrate_num_updates(
    *,
    target_epsilon: float,
    accountant: analysis.TrainingAccountant,
    noise_multipliers: analysis.Schedule,
    batch_sizes: analysis.Schedule,
    num_samples: int,
    target_delta: float,
    examples_per_user: Optional[int] = None,
    cycle_length: Optional[int] = None,
    truncated_batch_size: Optional[int] = None,
    initial_max_updates: int = 4,
    initial_min_updates: int = 1,
    tol: float = 0.1,
) -> int:
  """Returns the largest number of updates that meets the budget.

  Integer bisection: the upper end of the bracket is doubled until its
  epsilon exceeds the target, then the bracket is halved down to one step.
  The result n satisfies epsilon(n) <= target_epsilon < epsilon(n + 1).

  Args:
    target_epsilon: Epsilon to meet, finite and > 0.
    accountant: The training accountant, e.g. a DpsgdTrainingAccountant.
    noise_multipliers: A number or a schedule [(start_step, sigma), ...].
    batch_sizes: Batch size, a number or a schedule [(start_step, size)].
    num_samples: Number of examples in the data set, an integer >= 1.
    target_delta: Delta of the guarantee, in (0, 1).
    examples_per_user: Passed to `DpParams` (user-level accounting).
    cycle_length: Passed to `DpParams` (cyclic Poisson sampling).
    truncated_batch_size: Passed to `DpParams` (truncated batches).
    initial_max_updates: Initial upper end of the bracket, an integer.
    initial_min_updates: Smallest number of updates allowed, an integer >= 1.
    tol: Accepted for compatibility and checked to be > 0. The search over
      integers is exact, so it never loosens the result.

  Returns:
    The number of updates, an int.

  Raises:
    ValueError: If an argument is invalid, or if even `initial_min_updates`
      updates exceed the target.
  """
  _check_budget(target_epsilon, target_delta)
  _check_accountant(accountant, 'can_calibrate_steps')
  _check_int('initial_min_updates', initial_min_updates, 1)
  _check_int('initial_max_updates', initial_max_updates, initial_min_updates)
  _check_positive('tol', tol)
  dp_params = analysis.DpParams(
      noise_multipliers=noise_multipliers,
      num_samples=num_samples,
      delta=target_delta,
      batch_sizes=batch_sizes,
      examples_per_user=examples_per_user,
      cycle_length=cycle_length,
      truncated_batch_size=truncated_batch_size,
  )
  return _largest_integer_within(
      lambda num_updates: accountant.compute_epsilon(num_updates, dp_params),
      target_epsilon,
      name='num_updates',
      low=initial_min_updates,
      high=initial_max_updates,
      limit=_MAX_NUM_UPDATES,
  )


def calibrate_batch_size(
    *,
    target_epsilon: float,
    accountant: analysis.TrainingAccountant,
    noise_multipliers: analysis.Schedule,
    num_updates: int,
    num_samples: int,
    target_delta: float,
    examples_per_user: Optional[int] = None,
    cycle_length: Optional[int] = None,
    truncated_batch_size: Optional[int] = None,
    initial_max_batch_size: int = 8,
    initial_min_batch_size: int = 1,
    tol: float = 0.01,
) -> int:
  """Returns the largest batch size that meets the budget.

  Integer bisection: the upper end of the bracket is doubled (up to
  `num_samples`) until its epsilon exceeds the target, then the bracket is
  halved down to one example. The result b satisfies epsilon(b) <=
  target_epsilon, and epsilon(b + 1) > target_epsilon unless b is
  `num_samples`.

  Args:
    target_epsilon: Epsilon to meet, finite and > 0.
    accountant: The training accountant, e.g. a DpsgdTrainingAccountant.
    noise_multipliers: A number or a schedule [(start_step, sigma), ...].
    num_updates: Number of training steps, an integer >= 1.
    num_samples: Number of examples in the data set, an integer >= 1.
    target_delta: Delta of the guarantee, in (0, 1).
    examples_per_user: Passed to `DpParams` (user-level accounting).
    cycle_length: Passed to `DpParams` (cyclic Poisson sampling).
    truncated_batch_size: Passed to `DpParams` (truncated batches).
    initial_max_batch_size: Initial upper end of the bracket, an integer.
    initial_min_batch_size: Smallest batch size allowed, an integer in
      [1, num_samples].
    tol: Accepted for compatibility and checked to be > 0. The search over
      integers is exact, so it never loosens the result.

  Returns:
    The batch size (expected batch size with Poisson sampling), an int.

  Raises:
    ValueError: If an argument is invalid, or if even
      `initial_min_batch_size` exceeds the target.
  """
  _check_budget(target_epsilon, target_delta)
  _check_accountant(accountant, 'can_calibrate_batch_size')
  _check_int('num_updates', num_updates, 1)
  _check_int('num_samples', num_samples, 1)
  _check_int('initial_min_batch_size', initial_min_batch_size, 1)
  if initial_min_batch_size > num_samples:
    raise ValueError(
        f'initial_min_batch_size must be in [1, num_samples={num_samples}],'
        f' got {initial_min_batch_size}.'
    )
  _check_int(
      'initial_max_batch_size', initial_max_batch_size, initial_min_batch_size
  )
  _check_positive('tol', tol)

  def epsilon(batch_size: int) -> float:
    dp_params = analysis.DpParams(
        noise_multipliers=noise_multipliers,
        num_samples=num_samples,
        delta=target_delta,
        batch_sizes=batch_size,
        examples_per_user=examples_per_user,
        cycle_length=cycle_length,
        truncated_batch_size=truncated_batch_size,
    )
    return accountant.compute_epsilon(num_updates, dp_params)

  return _largest_integer_within(
      epsilon,
      target_epsilon,
      name='batch_size',
      low=initial_min_batch_size,
      high=initial_max_batch_size,
      limit=num_samples,
  )
