"""The one-run f-DP audit of Mahloujifar, Melis and Chaudhuri (2024).

The game (as in Steinke, Nasr, Jagielski 2023): each of m canaries is
included in ONE training run independently with probability 1/2; after the
run an attacker guesses "in" or "out" for `num_guesses` = c' of them and
abstains on the rest; W is the number of correct guesses. If the run is
f-DP with respect to each canary (f a symmetric trade-off function), the
paper bounds P[W >= c] through a recursion on two sequences, for
i = c, c - 1, ..., 0:

  r_i = E[W 1{W >= i}] / m            (average mass of correct guesses)
  h_i = E[(c' - W) 1{W >= i}] / m     (average mass of wrong guesses)

Flipping one canary's membership turns a correct guess into a wrong one
and changes the output only as much as f allows, so the wrong mass one
level down is at least F(correct mass): h_{i-1} >= max(h_i, F(r_i)) with
F(x) = f(1 - x) (the smallest false positive rate at which a test reaches
true positive rate x, the inverse of the "blow-up" 1 - f). Every run makes
exactly c' guesses, so P[W = i - 1] = m (h_{i-1} - h_i) / (c' - i + 1) and
r_{i-1} = r_i + (i - 1) / (c' - i + 1) (h_{i-1} - h_i). Starting from
r_c = tau c / m and h_c = tau (c' - c) / m, i.e. assuming P[W >= c] = tau,
the recursion gives lower bounds on r_0 and h_0, whose true sum is c' / m;
if the computed r_0 + h_0 exceeds c' / m the assumption is impossible and
P[W >= c] < tau (the paper's theorem for membership inference, where each
guess is one of k = 2 values).

An audit at significance alpha rejects "the run is f-DP" when the recursion
with tau = alpha rejects; for the Gaussian family f_mu the empirical privacy
is the largest mu rejected, and its epsilon at a chosen delta.

Numerics: the recursion adds non-negative terms only (no cancellation); the
inverse blow-up is evaluated with `ndtri`/`ndtr`, whose underflow to 0 for
far tails only lowers the lower bounds, i.e. errs towards not rejecting; a
relative margin of 1e-9 on the final comparison absorbs rounding.

References:
  Mahloujifar, Melis, Chaudhuri, "Auditing f-Differential Privacy in One
  Run", 2024. arXiv:2410.22235.
  Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run",
  2023. arXiv:2305.08846.
  Dong, Roth, Su, "Gaussian Differential Privacy", 2019. arXiv:1905.02383.
  Kairouz, Oh, Viswanath, "The Composition Theorem for Differential
  Privacy", 2015. arXiv:1311.0776.
"""

from typing import Callable

import numpy as np
from scipy import special

from jax_privacy.auditing import _bounds

# F(x, parameter) = f_parameter(1 - x), elementwise over broadcast arrays.
InverseBlowUp = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Rounding margin: reject only if r_0 + h_0 > (c' / m) (1 + _MARGIN).
_MARGIN = 1e-9
# Gaussian mu searched in [0, _MU_MAX]; mu = 40 is epsilon > 800 at any
# delta >= 1e-300, far beyond what any number of canaries can certify.
_MU_MAX = 40.0
_POINTS_PER_ROUND = 15
_ROUNDS = 5


def gaussian_inverse_blow_up(x, mu):
  """F(x) = f_mu(1 - x) = Phi(Phi^-1(x) - mu) of mu-GDP (Dong et al., 2019).

  The smallest false positive rate at which a test can reach true positive
  rate x against a mu-GDP mechanism; elementwise, x in [0, 1], mu >= 0.
  """
  return special.ndtr(special.ndtri(np.minimum(x, 1.0)) - mu)


def epsilon_delta_inverse_blow_up(x, epsilon, delta=0.0):
  """F(x) = f(1 - x) for (epsilon, delta)-DP (Kairouz et al., 2015).

  f(a) = max(0, 1 - delta - e^eps a, e^-eps (1 - delta - a)), so
  F(x) = max(0, 1 - delta - e^eps (1 - x), e^-eps (x - delta)).
  """
  x = np.minimum(x, 1.0)
  with np.errstate(over='ignore'):
    steep = 1 - delta - np.exp(epsilon) * (1 - x)
  return np.maximum(np.maximum(steep, np.exp(-epsilon) * (x - delta)), 0.0)


def _check_counts(num_canaries, num_guesses, num_correct):
  arrays = []
  for name, value in (
      ('num_canaries', num_canaries), ('num_guesses', num_guesses),
      ('num_correct', num_correct),
  ):
    array = np.asarray(value, dtype=float)
    if not np.all(array == np.round(array)):
      raise ValueError(f'{name} must be integers, got {value}')
    arrays.append(array)
  m, guesses, correct = arrays
  if np.any(m < 1):
    raise ValueError(f'num_canaries must be >= 1, got {num_canaries}')
  if np.any(guesses < 1) or np.any(guesses > m):
    raise ValueError(
        f'num_guesses must be in [1, num_canaries], got {num_guesses}'
    )
  if np.any(correct < 0) or np.any(correct > guesses):
    raise ValueError(
        f'num_correct must be in [0, num_guesses], got {num_correct}'
    )
  return m, guesses, correct.astype(np.int64)


def rejects(
    num_canaries,
    num_guesses,
    num_correct,
    tau,
    inverse_blow_up: InverseBlowUp,
    parameter,
) -> np.ndarray:
  """Whether the paper's recursion proves P[W >= num_correct] < tau.

  All array arguments broadcast together, so many hypotheses (values of
  `parameter`), counts and levels are decided in one pass.

  Two facts keep the pass short. Both masses only grow as i falls, so an
  element that exceeds c' / m is rejected for good. And when
  F(r_i) <= h_i nothing changes at that step, hence at no later step
  either: the element is final. Only the elements still growing are
  carried from step to step.

  Args:
    num_canaries: m, canaries each included with probability 1/2.
    num_guesses: c', the guesses made (the rest are abstentions), <= m.
    num_correct: c, correct guesses observed, <= c'.
    tau: Probability level(s) in (0, 1].
    inverse_blow_up: F(x, parameter) = f(1 - x) of the trade-off family.
    parameter: The hypothesis (e.g. mu of `gaussian_inverse_blow_up`).

  Returns:
    A boolean array: True where f-DP implies P[W >= c] < tau.
  """
  m, guesses, correct = _check_counts(num_canaries, num_guesses, num_correct)
  tau = np.asarray(tau, dtype=float)
  if np.any(tau <= 0) or np.any(tau > 1):
    raise ValueError(f'tau must be in (0, 1], got {tau}')
  parameter = np.asarray(parameter, dtype=float)
  shape = np.broadcast_shapes(
      m.shape, guesses.shape, correct.shape, tau.shape, parameter.shape
  )
  m, guesses, correct, tau, parameter = (
      np.broadcast_to(a, shape).ravel()
      for a in (m, guesses, correct, tau, parameter)
  )
  limit = guesses / m * (1 + _MARGIN)
  rejected = tau * guesses / m > limit
  # Elements join when the descending index i reaches c - 1.
  order = np.argsort(-correct, kind='stable')
  joined = 0
  ids = np.zeros(0, np.int64)
  correct_mass, wrong_mass = np.zeros(0), np.zeros(0)
  i = int(correct[order[0]]) - 1 if order.size else -1
  while i >= 0:
    end = joined
    while end < order.size and correct[order[end]] > i:
      end += 1
    if end > joined:
      new = order[joined:end]
      joined = end
      ids = np.concatenate([ids, new])
      correct_mass = np.concatenate(
          [correct_mass, tau[new] * correct[new] / m[new]]
      )
      wrong_mass = np.concatenate(
          [wrong_mass, tau[new] * (guesses[new] - correct[new]) / m[new]]
      )
    if ids.size == 0:
      if joined == order.size:
        break
      i = int(correct[order[joined]]) - 1
      continue
    new_wrong = np.maximum(
        wrong_mass, inverse_blow_up(correct_mass, parameter[ids])
    )
    growing = new_wrong > wrong_mass
    correct_mass = correct_mass + i / (guesses[ids] - i) * (
        new_wrong - wrong_mass
    )
    wrong_mass = new_wrong
    over = correct_mass + wrong_mass > limit[ids]
    rejected[ids[over]] = True
    keep = growing & ~over
    if not np.all(keep):
      ids, correct_mass, wrong_mass = (
          ids[keep], correct_mass[keep], wrong_mass[keep]
      )
    i -= 1
  return rejected.reshape(shape)


def tail_bound(
    num_canaries,
    num_guesses,
    num_correct,
    inverse_blow_up: InverseBlowUp,
    parameter,
    iterations: int = 60,
):
  """The paper's upper bound on P[W >= num_correct] under f-DP.

  The smallest tau that `rejects` (bisection on log tau down to 1e-300,
  vectorised over the broadcast arguments); the value returned is always a
  rejected tau (or 1), so it never understates the bound.

  Args:
    num_canaries: m.
    num_guesses: c' <= m.
    num_correct: c <= c'.
    inverse_blow_up: F of the trade-off family, as in `rejects`.
    parameter: The hypothesis tested.
    iterations: Bisection steps.

  Returns:
    The bound in (0, 1]: a float, or an array for array arguments.
  """
  arguments = (num_canaries, num_guesses, num_correct, inverse_blow_up,
               parameter)
  shape = np.broadcast_shapes(*(np.shape(a) for a in arguments[:3]),
                              np.shape(parameter))
  low = np.full(shape, np.log(1e-300))
  high = np.zeros(shape)
  rejected_at_one = rejects(*arguments[:3], 1.0, *arguments[3:])
  high = np.where(
      rejects(*arguments[:3], np.exp(low), *arguments[3:]), low, high
  )
  for _ in range(iterations):
    mid = (low + high) / 2
    rejected = rejects(*arguments[:3], np.exp(mid), *arguments[3:])
    high = np.where(rejected, mid, high)
    low = np.where(rejected, low, mid)
  bound = np.where(rejected_at_one, np.exp(high), 1.0)
  return float(bound) if bound.ndim == 0 else bound


def largest_rejected_mu(
    num_canaries,
    num_guesses,
    num_correct,
    significance: float,
) -> np.ndarray:
  """The largest Gaussian mu whose f_mu-DP the counts reject.

  Vectorised over the broadcast shape of the counts (e.g. many simulated
  runs). The bracket [0, 40] is cut at 15 interior points per round and
  shrunk to the gap after the largest rejected point; five rounds leave a
  gap of 40 / 16^5 (about 4e-5).

  Privacy:
    The value returned is 0 or a mu the recursion rejected at
    `significance`. If the run is mu*-GDP it is also mu-GDP for every
    mu >= mu*, so the theorem applies to each rejected mu >= mu* and the
    returned mu exceeds mu* with probability < significance, whether or not
    rejection is monotone in mu. Each canary must be included independently
    with probability 1/2 and the number of guesses fixed in advance.

  Args:
    num_canaries: m.
    num_guesses: c'.
    num_correct: c.
    significance: The test level, in (0, 1).

  Returns:
    mu lower bounds, one per count (0 where nothing is rejected).
  """
  if not 0 < significance < 1:
    raise ValueError(
        f'significance must be in the open interval (0, 1), got {significance}'
    )
  shape = np.broadcast_shapes(
      np.shape(num_canaries), np.shape(num_guesses), np.shape(num_correct)
  )
  counts = [
      np.broadcast_to(np.asarray(a), shape)[..., None]
      for a in (num_canaries, num_guesses, num_correct)
  ]
  low, high = np.zeros(shape), np.full(shape, _MU_MAX)
  fractions = np.arange(1, _POINTS_PER_ROUND + 1) / (_POINTS_PER_ROUND + 1)
  for _ in range(_ROUNDS):
    grid = low[..., None] + (high - low)[..., None] * fractions
    rejected = rejects(
        *counts, significance, gaussian_inverse_blow_up, grid
    )
    last = _POINTS_PER_ROUND - 1 - np.argmax(rejected[..., ::-1], axis=-1)
    found = np.any(rejected, axis=-1)
    above = np.minimum(last + 1, _POINTS_PER_ROUND - 1)
    new_high = np.where(
        last < _POINTS_PER_ROUND - 1,
        np.take_along_axis(grid, above[..., None], axis=-1)[..., 0],
        high,
    )
    new_low = np.take_along_axis(grid, last[..., None], axis=-1)[..., 0]
    low = np.where(found, new_low, low)
    high = np.where(found, new_high, grid[..., 0])
  return low


def largest_rejected_mu_by_union(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    significance: float,
) -> float:
  """A simpler, looser alternative: Steinke et al.'s test over a union.

  mu-GDP implies (eps, delta_mu(eps))-DP for every eps, so mu is rejected
  when the one-run p-value of Steinke et al. at some (eps, delta_mu(eps))
  on a fixed grid is below `significance`. Valid, but each pair uses only
  one point of the trade-off curve and pays the 2 m delta term; kept to
  measure what the recursion gains.
  """
  eps_grid = np.concatenate(
      [np.linspace(0.0, 6.0, 31), np.linspace(7.0, 30.0, 12)]
  )

  def p_value(mu):
    deltas = _bounds.gdp_delta(mu, eps_grid)
    return float(np.min(_bounds.one_run_p_value(
        num_canaries, num_guesses, num_correct, eps_grid, deltas
    )))

  return _bounds.largest_rejected(p_value, significance, 20.0, iterations=30)
