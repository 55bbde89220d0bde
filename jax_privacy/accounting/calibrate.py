"""Calibration: the noise, number of updates or batch size meeting a budget.

Fix two of (noise multiplier, number of updates, batch size) and the budget
(target_epsilon, target_delta); each function here finds the third by a
search on the training accountant's epsilon (a bisection for the integers, a
secant-guided bracket for the noise):

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

Speed: with a `DpTrainingAccountant`, the answer is first located with fast,
coarse versions of its accountant (PLD on a coarser grid; RDP on fewer
orders), each stage seeding the next, and only the last stage, a few
evaluations, uses the exact accountant. The coarse stages only choose where
to look: the result is decided, and its guarantee checked, by the exact
accountant alone (it meets the target, the next value toward less privacy
does not). The noise search predicts the answer from epsilon values (a
secant in log sigma, log epsilon) rather than bisecting, so its exact stage
usually takes two evaluations, one on each side of the answer; and noise
multipliers calibrated with the library's own training accountants are
remembered in-process, keyed by every input, so calibrating the same
settings again is free.

Privacy:
  The guarantee is the accountant's (see `analysis.DpsgdTrainingAccountant`:
  Poisson sampling with add-or-remove-one neighbours by default). Epsilon is
  assumed to decrease with the noise and to increase with the number of
  updates and the batch size, which holds for the mechanisms accounted here.
"""

import math
import numbers
from typing import Callable, Optional

from jax_privacy.accounting import _memo
from jax_privacy.accounting import _noise_search
from jax_privacy.accounting import accountants
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


class _Unreachable(Exception):
  """No value in the allowed range meets the target."""

  def __init__(self, value, epsilon):
    super().__init__(value, epsilon)
    self.value = value
    self.epsilon = epsilon


def _search(
    ok: Callable[[float], bool],
    *,
    seed: float,
    step: float,
    lower: float,
    upper: float,
    tol: float,
    integer: bool,
) -> float:
  """Smallest x in [lower, upper] with ok(x), for ok monotone (False, True).

  Starts at `seed`, walks away from it with doubling steps until the answer
  is bracketed, then bisects the bracket down to width `tol`.

  Returns:
    hi with ok(hi), and either hi == lower or ok(lo) False for some
    lo >= hi - tol.

  Raises:
    _Unreachable: If not ok(upper).
  """
  hi = min(max(seed, lower), upper)
  if ok(hi):
    while hi > lower:
      candidate = max(hi - step, lower)
      if not ok(candidate):
        lo = candidate
        break
      hi, step = candidate, 2 * step
    else:
      return hi
  else:
    lo = hi
    while True:
      if lo >= upper:
        raise _Unreachable(upper, None)
      candidate = min(lo + step, upper)
      if ok(candidate):
        hi = candidate
        break
      lo, step = candidate, 2 * step
  while hi - lo > tol:
    middle = (lo + hi) // 2 if integer else (lo + hi) / 2
    if ok(middle):
      hi = middle
    else:
      lo = middle
  return hi


_PLD_PROXY_INTERVALS = (1e-2, 1e-3)
# Proxy evaluations are cheap: a narrower bracket there seeds the exact stage
# close enough to its answer to finish in two evaluations.
_PROXY_TOL_FRACTION = 0.25
_RDP_PROXY_MAX_ORDERS = 24


def _proxies(accountant) -> list[analysis.TrainingAccountant]:
  """Fast, coarse versions of `accountant`, coarsest first (maybe none)."""
  if not isinstance(accountant, analysis.DpTrainingAccountant):
    return []
  config = accountant.dp_accountant_config
  if isinstance(config, accountants.PldAccountantConfig):
    return [
        accountant.with_dp_accountant_config(
            accountants.PldAccountantConfig(value_discretization_interval=v)
        )
        for v in _PLD_PROXY_INTERVALS
        if v >= 5 * config.value_discretization_interval
    ]
  if (
      isinstance(config, accountants.RdpAccountantConfig)
      and len(config.orders) > 2 * _RDP_PROXY_MAX_ORDERS
  ):
    orders = sorted(config.orders)
    stride = len(orders) // _RDP_PROXY_MAX_ORDERS
    sparse = orders[::stride] + [orders[-1]]
    return [
        accountant.with_dp_accountant_config(
            accountants.RdpAccountantConfig(orders=sparse)
        )
    ]
  return []


def _cascade(
    accountant,
    ok_for: Callable[[analysis.TrainingAccountant], Callable[[float], bool]],
    *,
    seed: float,
    step: float,
    fine_step: float,
    **search_kwargs,
) -> float:
  """Runs `_search` with the proxies of `accountant`, then with it.

  Each stage starts from the previous stage's answer; a proxy stage that
  fails (e.g. finds no answer) is skipped. Only the last stage, with the
  exact accountant, decides the result.
  """
  for proxy in _proxies(accountant):
    try:
      seed = _search(ok_for(proxy), seed=seed, step=step, **search_kwargs)
      step = fine_step
    except (_Unreachable, ValueError):
      continue
  return _search(ok_for(accountant), seed=seed, step=step, **search_kwargs)


def _noise_cascade(
    accountant,
    epsilon_for: Callable[[analysis.TrainingAccountant, float], float],
    *,
    target: float,
    seed: float,
    lower: float,
    tol: float,
) -> float:
  """`_noise_search.search_noise` with the proxies of `accountant`, then it.

  Each proxy stage starts from the previous stage's answer and slope; one
  that fails is skipped. Only the last stage, with `accountant` itself,
  decides the result.
  """
  log_slope = None
  for index, proxy in enumerate(_proxies(accountant)):
    try:
      result = _noise_search.search_noise(
          lambda sigma, proxy=proxy: epsilon_for(proxy, sigma),
          target=target, seed=seed, lower=lower, upper=_MAX_NOISE_MULTIPLIER,
          tol=tol * _PROXY_TOL_FRACTION, log_slope=log_slope,
          # The first stage brackets the answer from anywhere; later ones
          # start near it and only refine the estimate.
          settle=index > 0)
    except (_noise_search.Unreachable, ValueError):
      continue
    # The finer accountant's answer is usually a little smaller: start just
    # above the estimate, where the next stage can close its bracket with
    # one more evaluation.
    seed = result.estimate + tol * _PROXY_TOL_FRACTION
    log_slope = result.log_slope
  return float(_noise_search.search_noise(
      lambda sigma: epsilon_for(accountant, sigma),
      target=target, seed=seed, lower=lower, upper=_MAX_NOISE_MULTIPLIER,
      tol=tol, log_slope=log_slope).noise_multiplier)


def _largest_integer_within(
    accountant,
    epsilon_for: Callable[[analysis.TrainingAccountant, int], float],
    target_epsilon: float,
    *,
    name: str,
    low: int,
    high: int,
    limit: int,
) -> int:
  """Largest n in [low, limit] with epsilon(n) <= target (epsilon increasing).

  Searches over x = -n, for which meeting the target is monotone (False,
  True) as `_search` expects.

  Raises:
    ValueError: If epsilon(low) already exceeds the target.
  """

  def ok_for(training_accountant):
    return lambda x: epsilon_for(training_accountant, -int(x)) <= target_epsilon

  try:
    return -int(_cascade(
        accountant,
        ok_for,
        seed=-min(max(high, low), limit),
        step=max(high, 1),
        fine_step=1,
        lower=-limit,
        upper=-low,
        tol=1,
        integer=True,
    ))
  except _Unreachable:
    low_epsilon = epsilon_for(accountant, low)
    raise ValueError(
        f'target_epsilon={target_epsilon} is unreachable: the smallest'
        f' epsilon reachable, at {name}={low}, is {low_epsilon:.4g}. Add'
        ' noise, or lower the other settings.'
    ) from None


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

  A bracket search on the noise multiplier sigma, starting at
  `initial_max_noise`: the secant through the epsilon values nearest the
  target (in log sigma, log epsilon) predicts the answer, and a pair of
  points `tol` apart around the prediction closes the bracket; moves are
  bounded by growing steps, and a bisection takes over when the predictions
  stall, so the worst case stays logarithmic like the bisection's. It runs
  first with coarse versions of the accountant, then with `accountant`
  itself from their answer (see the module docstring). The upper end of the
  final bracket is returned, so epsilon(result) <= target_epsilon (computed
  by `accountant`), and epsilon(result - tol) > target_epsilon unless
  result - tol is below `initial_min_noise`. Any two answers with these
  properties differ by less than `tol` (epsilon decreasing in sigma).
  Results with the library's own training accountants are remembered
  in-process, keyed by every input.

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

  memo_key = _memo.key(
      accountant, target_epsilon=target_epsilon, batch_sizes=batch_sizes,
      num_updates=num_updates, num_samples=num_samples,
      target_delta=target_delta, examples_per_user=examples_per_user,
      cycle_length=cycle_length, truncated_batch_size=truncated_batch_size,
      initial_max_noise=initial_max_noise,
      initial_min_noise=initial_min_noise, tol=tol)
  remembered = _memo.get(memo_key)
  if remembered is not None:
    return remembered

  def epsilon_for(training_accountant, noise_multiplier: float) -> float:
    dp_params = analysis.DpParams(
        noise_multipliers=noise_multiplier,
        num_samples=num_samples,
        delta=target_delta,
        batch_sizes=batch_sizes,
        examples_per_user=examples_per_user,
        cycle_length=cycle_length,
        truncated_batch_size=truncated_batch_size,
    )
    return training_accountant.compute_epsilon(num_updates, dp_params)

  try:
    noise_multiplier = _noise_cascade(
        accountant,
        epsilon_for,
        target=target_epsilon,
        seed=float(initial_max_noise),
        lower=float(initial_min_noise),
        tol=float(tol),
    )
    _memo.put(memo_key, noise_multiplier)
    return noise_multiplier
  except _noise_search.Unreachable:
    epsilon = epsilon_for(accountant, _MAX_NOISE_MULTIPLIER)
    raise ValueError(
        f'target_epsilon={target_epsilon} is unreachable: even'
        f' noise_multiplier={_MAX_NOISE_MULTIPLIER:g} gives'
        f' epsilon={epsilon:.4g}, the smallest reachable with these'
        " settings (the accountant's resolution). Use a finer accountant or"
        ' a larger target.'
    ) from None


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

  Integer bracketing from `initial_max_updates` by doubling steps, then
  bisection down to one step (coarse accountants first, then `accountant`).
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
      accountant,
      lambda acc, num_updates: acc.compute_epsilon(num_updates, dp_params),
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

  Integer bracketing from `initial_max_batch_size` by doubling steps (up to
  `num_samples`, or num_samples // cycle_length with cyclic sampling), then
  bisection down to one example (coarse accountants first, then
  `accountant`). The result b satisfies epsilon(b) <=
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

  def epsilon_for(training_accountant, batch_size: int) -> float:
    dp_params = analysis.DpParams(
        noise_multipliers=noise_multipliers,
        num_samples=num_samples,
        delta=target_delta,
        batch_sizes=batch_size,
        examples_per_user=examples_per_user,
        cycle_length=cycle_length,
        truncated_batch_size=truncated_batch_size,
    )
    return training_accountant.compute_epsilon(num_updates, dp_params)

  return _largest_integer_within(
      accountant,
      epsilon_for,
      target_epsilon,
      name='batch_size',
      low=initial_min_batch_size,
      high=initial_max_batch_size,
      # Cyclic Poisson sampling draws from groups of num_samples / k.
      limit=max(num_samples // (cycle_length or 1), initial_min_batch_size),
  )
