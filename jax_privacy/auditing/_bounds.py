"""The statistics behind the auditor: binomial confidence bounds, the
hypothesis-test characterisation of (epsilon, delta)-DP and of Gaussian DP,
and the one-run p-values.

Everything here is vectorised NumPy over arrays of thresholds.

References:
  Kairouz, Oh, Viswanath, "The Composition Theorem for Differential
  Privacy", 2015. arXiv:1311.0776.
  Dong, Roth, Su, "Gaussian Differential Privacy", 2019. arXiv:1905.02383.
  Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run",
  2023. arXiv:2305.08846.
"""

import math

import numpy as np
from scipy import optimize
from scipy import special
from scipy import stats

# Above this an empirical lower bound is meaningless for any realistic number
# of canaries; it only bounds the bisections.
MAX_EPSILON = 50.0


def clopper_pearson_lower(successes, trials, alpha):
  """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial p."""
  successes = np.asarray(successes, dtype=float)
  trials = np.asarray(trials, dtype=float)
  with np.errstate(invalid='ignore'):
    bound = stats.beta.ppf(alpha, successes, trials - successes + 1)
  return np.where(successes <= 0, 0.0, bound)


def clopper_pearson_upper(successes, trials, alpha):
  """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial p."""
  successes = np.asarray(successes, dtype=float)
  trials = np.asarray(trials, dtype=float)
  with np.errstate(invalid='ignore'):
    bound = stats.beta.ppf(1 - alpha, successes + 1, trials - successes)
  return np.where(successes >= trials, 1.0, bound)


def epsilon_from_rates(tpr, fpr, delta, one_sided):
  """The epsilon an attack with these rates certifies at `delta`.

  (epsilon, delta)-DP bounds every test by TPR <= e^eps FPR + delta and,
  for the complementary test, 1 - FPR <= e^eps (1 - TPR) + delta
  (Kairouz et al., 2015). Solving for epsilon gives the largest value the
  rates rule out; 0 where they rule out nothing.
  """
  tpr = np.asarray(tpr, dtype=float)
  fpr = np.asarray(fpr, dtype=float)
  with np.errstate(divide='ignore', invalid='ignore'):
    eps = np.log((tpr - delta) / fpr)
    if not one_sided:
      eps = np.maximum(eps, np.log((1 - fpr - delta) / (1 - tpr)))
  eps = np.where(np.isnan(eps), 0.0, eps)
  return np.clip(eps, 0.0, np.inf)


def gdp_mu_from_rates(tpr, fpr):
  """The smallest mu for which mu-GDP allows an attack with these rates.

  mu-GDP means every test has 1 - TPR >= Phi(Phi^-1(1 - FPR) - mu) (Dong et
  al., 2019), i.e. mu >= Phi^-1(1 - FPR) + Phi^-1(TPR). The bound is
  symmetric in the two kinds of error, so one formula covers both tests.
  """
  with np.errstate(divide='ignore', invalid='ignore'):
    mu = special.ndtri(1 - np.asarray(fpr)) + special.ndtri(np.asarray(tpr))
  mu = np.where(np.isnan(mu), 0.0, mu)
  return np.clip(mu, 0.0, np.inf)


def gdp_delta(mu: float, epsilon):
  """delta(epsilon) of mu-GDP (Dong et al., 2019, Corollary 2.13)."""
  epsilon = np.asarray(epsilon, dtype=float)
  if mu <= 0:
    return np.zeros_like(epsilon)
  with np.errstate(over='ignore', invalid='ignore'):
    value = stats.norm.cdf(-epsilon / mu + mu / 2) - np.exp(
        epsilon
    ) * stats.norm.cdf(-epsilon / mu - mu / 2)
  return np.clip(np.nan_to_num(value, nan=0.0), 0.0, 1.0)


def gdp_epsilon(mu: float, delta: float, tol: float = 1e-9) -> float:
  """The smallest epsilon >= 0 with delta_mu(epsilon) <= delta."""
  if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
    return 0.0
  if delta <= 0:
    return math.inf
  upper = 1.0
  while gdp_delta(mu, upper) > delta:
    upper *= 2
  return float(
      optimize.brentq(
          lambda e: gdp_delta(mu, e) - delta, 0.0, upper, xtol=tol
      )
  )


def one_run_p_value(num_canaries, num_guesses, num_correct, epsilon, delta):
  """P[at least `num_correct` of `num_guesses` are right] under (eps, delta).

  Steinke, Nasr and Jagielski (2023) show that when each of `num_canaries`
  canaries is included independently with probability 1/2 in an
  (epsilon, delta)-DP run, the number of correct guesses W satisfies
  P[W >= v] <= P[B >= v] + 2 m delta max_{1<=i<=v} P[v > B >= v - i] / i
  with B ~ Binomial(r, e^eps / (1 + e^eps)).

  `epsilon` and `delta` may be arrays of the same shape (evaluated
  elementwise); the result has their shape.
  """
  epsilon = np.atleast_1d(np.asarray(epsilon, dtype=float))
  delta = np.broadcast_to(np.asarray(delta, dtype=float), epsilon.shape)
  v, r = int(num_correct), int(num_guesses)
  if v == 0:
    return np.ones_like(epsilon)
  success = special.expit(epsilon)
  tail = special.bdtrc(v - 1, r, success)
  if not np.any(delta > 0):
    return np.minimum(tail, 1.0)
  # log pmf of B at v-1, v-2, ..., 0; cumulated: P[v > B >= v - i].
  k = v - np.arange(1, v + 1)
  log_choose = (
      special.gammaln(r + 1) - special.gammaln(k + 1) - special.gammaln(r - k + 1)
  )
  with np.errstate(divide='ignore'):
    log_pmf = (
        log_choose[None, :]
        + k[None, :] * np.log(success)[:, None]
        + (r - k)[None, :] * np.log1p(-success)[:, None]
    )
  ratio = np.cumsum(np.exp(log_pmf), axis=1) / np.arange(1, v + 1)[None, :]
  p = tail + 2 * num_canaries * delta * ratio.max(axis=1)
  return np.minimum(p, 1.0)


def largest_rejected(
    p_value_fn, significance: float, upper: float, iterations: int = 50
) -> float:
  """sup{x in [0, upper]: p_value_fn(x) < significance} for increasing p.

  Bisection; the answer returned is always a rejected value (never above
  the supremum), so rounding errs on the side of a smaller lower bound.
  """
  if p_value_fn(0.0) >= significance:
    return 0.0
  if p_value_fn(upper) < significance:
    return upper
  low, high = 0.0, upper
  for _ in range(iterations):
    mid = (low + high) / 2
    if p_value_fn(mid) < significance:
      low = mid
    else:
      high = mid
  return low
