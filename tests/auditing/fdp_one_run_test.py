"""Tests of the one-run f-DP audit (Mahloujifar, Melis, Chaudhuri 2024)."""

import math
import statistics

import numpy as np
import pytest
from scipy import stats

from jax_privacy import auditing
from jax_privacy.auditing import _bounds
from jax_privacy.auditing import _fdp_one_run

_GAUSS = _fdp_one_run.gaussian_inverse_blow_up
_EPS = _fdp_one_run.epsilon_delta_inverse_blow_up
_NORMAL = statistics.NormalDist()


def _brute_force_final_mass(m, guesses, correct, tau, mu):
  """The paper's recursion in plain Python floats (stdlib normal, no scipy).

  r_c = tau c / m, h_c = tau (c' - c) / m; for i = c - 1, ..., 0:
  h_i = max(h_{i+1}, F(r_{i+1})), r_i = r_{i+1} + i / (c' - i) (h_i - h_{i+1}),
  with F(x) = Phi(Phi^-1(x) - mu). Returns r_0 + h_0.
  """
  r = tau * correct / m
  h = tau * (guesses - correct) / m
  for i in range(correct - 1, -1, -1):
    if r <= 0:
      blow = 0.0
    elif r >= 1:
      blow = 1.0
    else:
      blow = _NORMAL.cdf(_NORMAL.inv_cdf(r) - mu)
    new_h = max(h, blow)
    r += i / (guesses - i) * (new_h - h)
    h = new_h
  return r + h


def _brute_force_tail_bound(m, guesses, correct, mu):
  """Smallest tau the recursion rejects, by bisection on a linear scale."""
  rejected = lambda tau: _brute_force_final_mass(
      m, guesses, correct, tau, mu
  ) > guesses / m
  if not rejected(1.0):
    return 1.0
  low, high = 0.0, 1.0
  for _ in range(60):
    mid = (low + high) / 2
    low, high = (low, mid) if rejected(mid) else (mid, high)
  return high


def _one_run_counts(mu, num_canaries, num_guesses, trials, rng):
  """Correct guesses of the top/bottom attack on a mu-GDP one-run game.

  Canary j is included with probability 1/2; its score is N(0, 1) plus mu
  if included: releasing the scores is exactly mu-GDP for each canary.
  """
  included = rng.random((trials, num_canaries)) < 0.5
  scores = rng.normal(size=(trials, num_canaries)) + mu * included
  ranked = np.take_along_axis(
      included, np.argsort(-scores, axis=1), axis=1
  )
  positives = (num_guesses + 1) // 2
  negatives = num_guesses - positives
  correct = ranked[:, :positives].sum(1) + (
      ~ranked[:, num_canaries - negatives:]
  ).sum(1)
  return correct, included, scores


def _violation_limit(trials, significance):
  """Largest violation count consistent with rate <= significance (1e-3)."""
  return stats.binom.ppf(1 - 1e-3, trials, significance)


@pytest.mark.parametrize('mu', [0.3, 1.0, 2.5])
def test_single_canary_bound_is_the_best_balanced_accuracy(mu):
  # One canary, one guess: the best test against mu-GDP with a fair coin
  # for membership is right with probability Phi(mu / 2), and the bound
  # must be exactly that (it is attained by the Gaussian mechanism).
  got = _fdp_one_run.tail_bound(1, 1, 1, _GAUSS, mu)
  assert got == pytest.approx(_NORMAL.cdf(mu / 2), rel=1e-9)
  epsilon = mu
  got = _fdp_one_run.tail_bound(1, 1, 1, _EPS, epsilon)
  assert got == pytest.approx(1 / (1 + math.exp(-epsilon)), rel=1e-9)


@pytest.mark.parametrize(
    'm,guesses,correct,mu',
    [(10, 10, 8, 1.0), (12, 6, 6, 2.0), (30, 20, 16, 0.5), (8, 8, 7, 0.7)],
)
def test_matches_brute_force_recursion(m, guesses, correct, mu):
  want = _brute_force_tail_bound(m, guesses, correct, mu)
  got = _fdp_one_run.tail_bound(m, guesses, correct, _GAUSS, mu)
  assert got == pytest.approx(want, rel=1e-6)
  assert want < 1.0
  for tau in (0.02, 0.1, 0.3, 0.9):
    brute = _brute_force_final_mass(m, guesses, correct, tau, mu)
    if abs(brute - guesses / m) > 1e-6:
      assert _fdp_one_run.rejects(
          m, guesses, correct, tau, _GAUSS, mu
      ) == (brute > guesses / m)


@pytest.mark.parametrize('epsilon', [0.5, 1.0, 2.0])
@pytest.mark.parametrize('m,guesses', [(20, 20), (100, 50)])
def test_bound_holds_for_randomized_response_and_is_tight_at_all_correct(
    epsilon, m, guesses
):
  # epsilon-randomized response is the worst epsilon-DP mechanism: each
  # guess is right independently with probability q = e^eps / (1 + e^eps),
  # so P[W >= c] is a binomial tail that the bound must dominate.
  q = 1 / (1 + math.exp(-epsilon))
  correct = np.arange(guesses // 2, guesses + 1)
  exact = stats.binom.sf(correct - 1, guesses, q)
  bound = _fdp_one_run.tail_bound(m, guesses, correct, _EPS, epsilon)
  assert np.all(bound >= exact * (1 - 1e-9))
  assert bound[-1] == pytest.approx(exact[-1], rel=1e-6)
  # Near-tight in the tail too: within 10% where the tail is below 1e-2.
  small = exact < 1e-2
  assert np.all(bound[small] < 1.1 * exact[small])


@pytest.mark.parametrize(
    'mu,m,guesses', [(1.0, 10, 10), (1.0, 10, 4), (2.0, 12, 6)]
)
def test_bound_holds_for_gaussian_mechanism_by_monte_carlo(mu, m, guesses):
  rng = np.random.default_rng(0)
  trials = 40000
  correct, _, _ = _one_run_counts(mu, m, guesses, trials, rng)
  levels = np.arange(guesses // 2, guesses + 1)
  frequency = np.mean(correct[:, None] >= levels, axis=0)
  error = 4 * np.sqrt(frequency * (1 - frequency) / trials) + 1e-4
  bound = _fdp_one_run.tail_bound(m, guesses, levels, _GAUSS, mu)
  assert np.all(frequency <= bound + error)
  assert np.any(bound < 1)


def test_rejection_is_monotone_in_mu_and_tau():
  mus = np.linspace(0.0, 6.0, 301)
  taus = np.array([1e-4, 1e-3, 0.01, 0.1, 1.0])[:, None]
  for m, guesses in ((50, 50), (1000, 100)):
    for correct in range(guesses // 2, guesses + 1, 5):
      rejected = _fdp_one_run.rejects(
          m, guesses, correct, taus, _GAUSS, mus
      ).astype(int)
      assert np.all(np.diff(rejected, axis=1) <= 0)  # rejects small mu
      assert np.all(np.diff(rejected, axis=0) >= 0)  # and large tau


@pytest.mark.parametrize('mu,guesses', [(1.0, 1000), (2.0, 200)])
def test_valid_by_simulation(mu, guesses):
  rng = np.random.default_rng(1)
  m, significance, trials = 1000, 0.1, 300
  correct, _, _ = _one_run_counts(mu, m, guesses, trials, rng)
  mu_hat = _fdp_one_run.largest_rejected_mu(m, guesses, correct, significance)
  assert np.sum(mu_hat > mu) <= _violation_limit(trials, significance)
  # Measured: medians 0.39 (mu 1, all guessed) and 1.38 (mu 2, 200 guesses),
  # no violation.
  assert np.median(mu_hat) > 0.25 * mu


def test_largest_rejected_mu_is_a_rejected_point_and_nearly_the_largest():
  correct = np.array([600, 640, 700, 150])
  guesses = np.array([1000, 1000, 1000, 200])
  mu = _fdp_one_run.largest_rejected_mu(1000, guesses, correct, 0.05)
  assert np.all(mu > 0)
  assert np.all(_fdp_one_run.rejects(1000, guesses, correct, 0.05, _GAUSS, mu))
  assert not np.any(
      _fdp_one_run.rejects(1000, guesses, correct, 0.05, _GAUSS, mu + 1e-4)
  )
  assert np.all(np.diff(mu[:3]) > 0)  # more correct guesses, larger mu


def test_auditor_uses_the_counts_of_its_guesses():
  rng = np.random.default_rng(2)
  _, included, scores = _one_run_counts(1.5, 500, 500, 3, rng)
  for trial in range(3):
    auditor = auditing.CanaryScoreAuditor(
        scores[trial][included[trial]], scores[trial][~included[trial]]
    )
    (r, correct), = auditor._guesses(200)  # pylint: disable=protected-access
    mu = _fdp_one_run.largest_rejected_mu(500, r, correct, 0.05)
    want = _bounds.gdp_epsilon(float(mu), 1e-5)
    assert auditor.epsilon_one_run_fdp(
        0.05, 1e-5, num_guesses=200
    ) == pytest.approx(want)
    assert want > 0


def test_tighter_than_steinke_and_union_bound_on_same_scores():
  rng = np.random.default_rng(3)
  mu, m, delta, significance = 2.0, 1000, 1e-5, 0.05
  fdp, steinke = [], []
  for _ in range(10):
    correct, included, scores = _one_run_counts(mu, m, m, 1, rng)
    auditor = auditing.CanaryScoreAuditor(
        scores[0][included[0]], scores[0][~included[0]]
    )
    fdp.append(auditor.epsilon_one_run_fdp(significance, delta))
    steinke.append(auditor.epsilon_one_run(significance, delta))
    exact_mu = _fdp_one_run.largest_rejected_mu(
        m, m, int(correct[0]), significance
    )
    union_mu = _fdp_one_run.largest_rejected_mu_by_union(
        m, m, int(correct[0]), significance
    )
    assert exact_mu >= union_mu
  true_eps = _bounds.gdp_epsilon(mu, delta)
  assert np.all(np.array(fdp) >= np.array(steinke))
  # Measured: medians 4.72 vs 3.13 (true epsilon 10.0); as mu, the
  # recursion's 0.67 vs 0.53 for the union argument (all m guesses).
  assert np.median(fdp) > 1.3 * np.median(steinke)
  assert max(fdp) <= true_eps


def test_gets_close_with_many_canaries():
  rng = np.random.default_rng(4)
  mu, m, guesses, delta, significance = 2.0, 10000, 2000, 1e-5, 0.05
  correct, _, _ = _one_run_counts(mu, m, guesses, 10, rng)
  mu_hat = _fdp_one_run.largest_rejected_mu(m, guesses, correct, significance)
  eps = [_bounds.gdp_epsilon(x, delta) for x in mu_hat]
  true_eps = _bounds.gdp_epsilon(mu, delta)
  # Measured: median 6.29 of 10.0 (Steinke et al. on this game: about 4.2).
  assert 0.55 * true_eps < np.median(eps) <= true_eps


@pytest.mark.slow
def test_valid_and_close_at_scale():
  rng = np.random.default_rng(5)
  mu, delta, significance = 2.0, 1e-5, 0.05
  true_eps = _bounds.gdp_epsilon(mu, delta)
  violations, trials = 0, 0
  for m, guesses, num in ((1000, 1000, 2000), (1000, 100, 2000),
                          (100000, 10000, 10)):
    correct, _, _ = _one_run_counts(mu, m, guesses, num, rng)
    mu_hat = _fdp_one_run.largest_rejected_mu(
        m, guesses, correct, significance
    )
    violations += int(np.sum(mu_hat > mu))
    trials += num
  assert violations <= _violation_limit(trials, significance)
  # Measured: no violation in 4010 trials; in the last setting the median
  # is 6.80, 68% of the true epsilon 10.0.
  assert _bounds.gdp_epsilon(float(np.median(mu_hat)), delta) > 0.6 * true_eps


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match='in_canary_scores'):
    auditing.CanaryScoreAuditor([], [1.0])
  with pytest.raises(ValueError, match='out_canary_scores'):
    auditing.CanaryScoreAuditor([1.0], [np.nan])
  auditor = auditing.CanaryScoreAuditor(
      np.arange(20.0) + 10, np.arange(20.0)
  )
  for significance in (0.0, 1.0, -0.5, 2.0, np.nan):
    with pytest.raises(ValueError, match='significance'):
      auditor.epsilon_one_run_fdp(significance, 1e-5)
    with pytest.raises(ValueError, match='significance'):
      _fdp_one_run.largest_rejected_mu(40, 40, 30, significance)
  for delta in (0.0, 1.0):
    with pytest.raises(ValueError, match='delta'):
      auditor.epsilon_one_run_fdp(0.05, delta)
  with pytest.raises(ValueError, match='num_guesses'):
    auditor.epsilon_one_run_fdp(0.05, 1e-5, num_guesses=41)
  with pytest.raises(ValueError, match='num_guesses'):
    _fdp_one_run.rejects(10, 11, 5, 0.05, _GAUSS, 1.0)
  with pytest.raises(ValueError, match='num_correct'):
    _fdp_one_run.rejects(10, 10, 11, 0.05, _GAUSS, 1.0)
  with pytest.raises(ValueError, match='num_correct'):
    _fdp_one_run.rejects(10, 10, 2.5, 0.05, _GAUSS, 1.0)
  with pytest.raises(ValueError, match='tau'):
    _fdp_one_run.rejects(10, 10, 5, 0.0, _GAUSS, 1.0)
  with pytest.raises(ValueError):  # counts of mismatched lengths
    _fdp_one_run.largest_rejected_mu(100, [50, 60, 70], [30, 40], 0.05)
