"""Tests for jax_privacy._discrete_gaussian: exact sampler and accounting."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from jax_privacy import _discrete_gaussian as dg

P_REJECT = 1e-4


def _exact_pmf(sigma_squared, width):
  """The discrete Gaussian's pmf on [-width, width], computed here."""
  support = np.arange(-width, width + 1)
  weights = np.exp(-(support.astype(np.float64) ** 2) / (2.0 * sigma_squared))
  return support, weights / weights.sum()


# --- exact building blocks ---


def test_uniform_below_rejects_the_incomplete_range():
  # 2^64 = 1 (mod 3): the single word 0 must be rejected, every other word
  # u is accepted as u mod 3.
  words = iter([np.array([0, 4], np.uint64), np.array([5], np.uint64)])
  out = dg._uniform_below(np.array([3, 3]), lambda n: next(words)[:n])
  np.testing.assert_array_equal(out, [2, 1])  # 5 % 3 for the redrawn one


@pytest.mark.parametrize('gamma_num, gamma_den', [(3, 10), (27, 10), (0, 1)])
def test_bernoulli_exp_frequency(gamma_num, gamma_den):
  n = 100_000
  whole, frac = divmod(gamma_num, gamma_den)
  draws = dg._bernoulli_exp(
      np.full(n, whole, np.int64), np.full(n, frac, np.int64),
      np.full(n, gamma_den, np.int64), dg._urandom_words)
  p = math.exp(-gamma_num / gamma_den)
  assert stats.binomtest(int(draws.sum()), n, p).pvalue > P_REJECT


def test_discrete_laplace_matches_pmf():
  scale, n = 3, 60_000
  samples = dg._discrete_laplace(scale, n, dg._urandom_words)
  support = np.arange(-12, 13)
  pmf = np.exp(-np.abs(support) / scale)
  pmf /= np.sum(np.exp(-np.abs(np.arange(-400, 401)) / scale))
  observed = np.array([np.sum(samples == k) for k in support])
  # Pool both tails into one bin.
  observed = np.append(observed, n - observed.sum())
  expected = np.append(pmf, 1 - pmf.sum()) * n
  assert stats.chisquare(observed, expected).pvalue > P_REJECT


# --- the discrete Gaussian sampler ---


@pytest.mark.parametrize('sigma_squared', [1, 10, 1000])
def test_sampler_chi_square_and_ks_against_exact_pmf(sigma_squared):
  n = 100_000
  samples = dg.sample_discrete_gaussian(sigma_squared, (n,))
  assert samples.dtype == np.int64
  support, pmf = _exact_pmf(sigma_squared, int(60 * math.sqrt(sigma_squared)))
  counts = np.bincount(samples - support[0], minlength=support.size)
  assert counts.sum() == n  # nothing beyond 60 sigma
  expected = pmf * n
  # Pool the tails (expected < 5) into one bin each side.
  body = expected >= 5
  lo, hi = np.flatnonzero(body)[[0, -1]]
  observed = np.concatenate(
      [[counts[:lo].sum()], counts[lo:hi + 1], [counts[hi + 1:].sum()]])
  expect = np.concatenate(
      [[expected[:lo].sum()], expected[lo:hi + 1], [expected[hi + 1:].sum()]])
  keep = expect > 0
  assert stats.chisquare(observed[keep], expect[keep]).pvalue > P_REJECT
  # Kolmogorov-Smirnov distance to the exact CDF (conservative for a
  # discrete law): sup |F_n - F| < sqrt(log(2 / p) / (2 n)).
  distance = np.max(np.abs(np.cumsum(counts) / n - np.cumsum(pmf)))
  assert distance < math.sqrt(math.log(2 / P_REJECT) / (2 * n))


@pytest.mark.parametrize('sigma_squared', [4, 2**30])
def test_sampler_moments(sigma_squared):
  n = 200_000
  samples = dg.sample_discrete_gaussian(sigma_squared, (n,)).astype(np.float64)
  if sigma_squared < 100:
    support, pmf = _exact_pmf(sigma_squared, 200)
    variance = float(np.sum(support**2 * pmf))
    fourth = float(np.sum(support**4 * pmf))
  else:  # Discrete and continuous moments differ by ~exp(-2 pi^2 s2).
    variance, fourth = float(sigma_squared), 3.0 * sigma_squared**2
  assert variance <= sigma_squared
  z = 4.5  # |N(0,1)| > 4.5 has probability 7e-6
  assert abs(samples.mean()) < z * math.sqrt(variance / n)
  sample_var = np.mean(samples**2)
  assert abs(sample_var - variance) < z * math.sqrt(
      (fourth - variance**2) / n)


def test_small_sigma_variance_is_below_sigma_squared():
  _, pmf = _exact_pmf(1, 50)
  support = np.arange(-50, 51)
  assert np.sum(support**2 * pmf) < 1.0
  np.testing.assert_allclose(dg.discrete_gaussian_pmf(1, support), pmf,
                             rtol=1e-12)


def test_two_draws_differ():
  a = dg.sample_discrete_gaussian(2**20, (1000,))
  b = dg.sample_discrete_gaussian(2**20, (1000,))
  assert not np.array_equal(a, b)


@pytest.mark.parametrize('bad', [0, -3, 2**30 + 1, 2.5, True, None])
def test_bad_sigma_squared(bad):
  with pytest.raises(ValueError, match='sigma_squared'):
    dg.sample_discrete_gaussian(bad, (3,))


# --- accounting ---


def _delta_of_zcdp(rho, epsilon):
  """The CKS zCDP-to-DP bound on a dense grid of orders, computed here."""
  alphas = 1.0 + np.logspace(-6, 6, 200_001)
  log_delta = ((alphas - 1) * (alphas * rho - epsilon) - np.log(alphas - 1)
               + alphas * np.log1p(-1 / alphas))
  return float(np.exp(np.min(log_delta)))


@pytest.mark.parametrize('rho, delta', [(1 / 32, 1e-3), (0.5, 1e-5),
                                        (10.0, 1e-6), (1e-4, 1e-8)])
def test_zcdp_epsilon_solves_the_published_bound(rho, delta):
  epsilon = dg.zcdp_epsilon(rho, delta)
  assert _delta_of_zcdp(rho, epsilon) == pytest.approx(delta, rel=1e-4)
  assert _delta_of_zcdp(rho, epsilon * 0.999) > delta


def test_zcdp_epsilon_known_value():
  # rho = (1/4)^2 / 2, delta = 1e-3: 0.6880024554878086 as computed by
  # OpenDP's implementation of the same bound.
  assert dg.zcdp_epsilon(1 / 32, 1e-3) == pytest.approx(
      0.6880024554878086, rel=1e-9)


def test_zcdp_epsilon_not_above_dp_accounting_on_a_grid():
  rho, delta = 0.3, 1e-6
  accountant = dp_accounting.rdp.RdpAccountant(
      orders=list(np.linspace(1.01, 200, 5000)))
  theirs = accountant.compose(dp_accounting.ZCDpEvent(rho)).get_epsilon(delta)
  ours = dg.zcdp_epsilon(rho, delta)
  assert ours <= theirs + 1e-9
  assert ours == pytest.approx(theirs, rel=1e-3)


@pytest.mark.parametrize('sigma_squared, sensitivity', [(4, 1), (25, 3)])
def test_discrete_gaussian_epsilon_bounds_the_exact_1d_loss(
    sigma_squared, sensitivity):
  delta = 1e-5
  epsilon = dg.discrete_gaussian_epsilon(
      sigma_squared=sigma_squared, l2_sensitivity=sensitivity, delta=delta)
  assert epsilon == dg.zcdp_epsilon(sensitivity**2 / (2 * sigma_squared),
                                    delta)
  # The exact hockey-stick divergence of N_Z(0) vs N_Z(sensitivity), both
  # directions equal by symmetry.
  support, pmf = _exact_pmf(sigma_squared, 400)
  shifted = np.roll(pmf, sensitivity)
  exact = np.sum(np.maximum(0.0, pmf - math.exp(epsilon) * shifted))
  assert exact <= delta
  assert epsilon > 0


def test_discrete_gaussian_epsilon_composition():
  once = dg.discrete_gaussian_epsilon(
      sigma_squared=100.0, l2_sensitivity=5.0, delta=1e-6, num_compositions=4)
  assert once == dg.zcdp_epsilon(4 * 25 / 200, 1e-6)


def test_rounded_sensitivity_holds_and_is_nearly_tight():
  rng = np.random.default_rng(0)
  d, grid, bound = 50, 0.1, 1.0
  limit = dg.rounded_sensitivity(bound, grid, d)
  assert limit == pytest.approx(bound / grid + math.sqrt(d))
  worst = 0.0
  for _ in range(2000):
    x = rng.normal(size=d) * 3
    step = rng.normal(size=d)
    step *= bound * rng.uniform() / np.linalg.norm(step)
    moved = np.linalg.norm(np.rint(x / grid) - np.rint((x + step) / grid))
    worst = max(worst, moved)
  assert worst <= limit
  # Points just either side of half-grid boundaries move every coordinate.
  x = np.full(d, 0.5 * grid - 1e-9)
  moved = np.linalg.norm(np.rint(x / grid) - np.rint((x + 2e-9) / grid))
  assert moved == pytest.approx(math.sqrt(d))


def test_effective_noise_multiplier():
  z_eff = dg.effective_noise_multiplier(1.0, 10**6, sigma_squared=2**30)
  assert z_eff == pytest.approx(1 / (1 + 1000 / 2**15), rel=1e-6)
  assert dg.effective_noise_multiplier(2.0, 1, sigma_squared=4) == (
      pytest.approx(1 / (0.5 + 0.5), rel=1e-6))


@pytest.mark.parametrize('kwargs, field', [
    (dict(sigma_squared=0.0, l2_sensitivity=1.0, delta=1e-5), 'sigma_squared'),
    (dict(sigma_squared=1.0, l2_sensitivity=-1.0, delta=1e-5),
     'l2_sensitivity'),
    (dict(sigma_squared=1.0, l2_sensitivity=1.0, delta=1.0), 'delta'),
    (dict(sigma_squared=1.0, l2_sensitivity=1.0, delta=1e-5,
          num_compositions=0), 'num_compositions'),
])
def test_accounting_bad_input(kwargs, field):
  with pytest.raises(ValueError, match=field):
    dg.discrete_gaussian_epsilon(**kwargs)
