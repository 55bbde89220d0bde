"""Tests of CanaryScoreAuditor: exact values, statistical validity, errors."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import optimize
from scipy import stats
from sklearn import metrics

from jax_privacy import auditing
from jax_privacy.auditing import _bounds


def _cp_lower(k, n, alpha):
  """Clopper-Pearson lower bound by root finding on the binomial tail."""
  if k == 0:
    return 0.0
  return optimize.brentq(lambda p: stats.binom.sf(k - 1, n, p) - alpha, 0, 1)


def _cp_upper(k, n, alpha):
  if k == n:
    return 1.0
  return optimize.brentq(lambda p: stats.binom.cdf(k, n, p) - alpha, 0, 1)


def _eps_at_threshold(in_scores, out_scores, t, alpha, delta, one_sided):
  tp, fp = int(np.sum(in_scores >= t)), int(np.sum(out_scores >= t))
  tpr = _cp_lower(tp, len(in_scores), alpha / 2)
  fpr = _cp_upper(fp, len(out_scores), alpha / 2)
  values = [0.0]
  if tpr - delta > 0:
    values.append(math.log((tpr - delta) / fpr))
  if not one_sided and 1 - fpr - delta > 0:
    values.append(math.log((1 - fpr - delta) / (1 - tpr)))
  return max(values)


def _randomized_response(epsilon, num, rng):
  """Scores of an epsilon-DP randomized response: the test at 1 is tight."""
  p = math.exp(epsilon) / (1 + math.exp(epsilon))
  return (rng.random(num) < p).astype(float), (rng.random(num) < 1 - p).astype(
      float
  )


def _gdp_epsilon_by_pld(mu, delta):
  """epsilon of a sensitivity-1 Gaussian with sigma = 1/mu (exactly mu-GDP)."""
  accountant = dp_accounting.pld.PLDAccountant(
      value_discretization_interval=1e-4
  )
  accountant.compose(dp_accounting.GaussianDpEvent(1.0 / mu))
  return accountant.get_epsilon(delta)


@pytest.mark.parametrize('one_sided', [True, False])
@pytest.mark.parametrize('delta', [0.0, 0.01])
def test_explicit_threshold_matches_independent_clopper_pearson(
    one_sided, delta
):
  rng = np.random.default_rng(0)
  in_scores, out_scores = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
  auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
  got = auditor.epsilon_clopper_pearson(
      0.1, delta, one_sided, threshold_strategy=auditing.Explicit(0.7)
  )
  want = _eps_at_threshold(in_scores, out_scores, 0.7, 0.1, delta, one_sided)
  assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
  assert got > 0


def test_bonferroni_is_the_max_over_thresholds_at_corrected_level():
  rng = np.random.default_rng(1)
  in_scores, out_scores = rng.normal(2, 1, 25), rng.normal(0, 1, 30)
  auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
  thresholds = np.unique(np.concatenate([in_scores, out_scores]))
  alpha = 0.05 / (len(thresholds) + 1)  # +1: the never-member threshold
  want = max(
      _eps_at_threshold(in_scores, out_scores, t, alpha, 0.0, True)
      for t in thresholds
  )
  assert auditor.epsilon_clopper_pearson(0.05) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize('mu,delta', [(0.5, 1e-5), (1.0, 1e-3), (2.0, 1e-6)])
def test_gdp_epsilon_matches_pld_accounting(mu, delta):
  got = _bounds.gdp_epsilon(mu, delta)
  want = _gdp_epsilon_by_pld(mu, delta)
  assert got == pytest.approx(want, abs=2e-3)
  assert _bounds.gdp_delta(mu, got) == pytest.approx(delta, rel=1e-4)


def test_one_run_p_value_matches_direct_formula():
  num_canaries, r, v, eps, delta = 200, 60, 45, 1.0, 1e-4
  q = math.exp(eps) / (1 + math.exp(eps))
  ratio = max(
      sum(stats.binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i
      for i in range(1, v + 1)
  )
  want = stats.binom.sf(v - 1, r, q) + 2 * num_canaries * delta * ratio
  got = _bounds.one_run_p_value(num_canaries, r, v, eps, delta)[0]
  assert got == pytest.approx(want, rel=1e-9)


def _direct_one_run_p_value(m, r, v, eps, delta):
  q = math.exp(eps) / (1 + math.exp(eps))
  ratio = max(
      sum(stats.binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i
      for i in range(1, v + 1)
  )
  return min(1.0, stats.binom.sf(v - 1, r, q) + 2 * m * delta * ratio)


@pytest.mark.parametrize('delta', [0.0, 1e-4])
def test_one_run_bound_is_where_the_p_value_crosses_significance(delta):
  # 30 canaries, 15 in. Top 10 scores: 9 in, 1 out; bottom 10: 9 out, 1 in;
  # so 20 guesses with 18 correct.
  in_scores = np.r_[np.arange(21, 30), [5.0], np.arange(10, 15)]
  out_scores = np.r_[[20.0], np.arange(0, 5) - 0.5, [4.6, 4.7, 4.8, 4.9],
                     np.arange(15, 20) + 0.5]
  auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
  bound = auditor.epsilon_one_run(0.05, delta, num_guesses=20)
  assert bound > 0.3
  assert _direct_one_run_p_value(30, 20, 18, bound, delta) < 0.05
  assert _direct_one_run_p_value(30, 20, 18, bound + 1e-6, delta) >= 0.05
  # Trying two guess counts halves the significance of each; with all 30
  # guesses only 18 are right, so the 20-guess attack still decides.
  both = auditor.epsilon_one_run(0.05, delta, num_guesses=[20, 30])
  assert 0 < both < bound
  assert _direct_one_run_p_value(30, 20, 18, both, delta) < 0.025
  assert _direct_one_run_p_value(30, 20, 18, both + 1e-6, delta) >= 0.025


def _violation_limit(trials, significance):
  """Largest violation count consistent with rate <= significance (1e-3)."""
  return stats.binom.ppf(1 - 1e-3, trials, significance)


def test_clopper_pearson_explicit_is_valid_and_tight_on_randomized_response():
  rng = np.random.default_rng(2)
  epsilon, significance, trials = 1.0, 0.1, 300
  bounds = []
  for _ in range(trials):
    in_scores, out_scores = _randomized_response(epsilon, 500, rng)
    auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
    bounds.append(
        auditor.epsilon_clopper_pearson(
            significance, threshold_strategy=auditing.Explicit(1.0)
        )
    )
  bounds = np.array(bounds)
  assert np.sum(bounds > epsilon) <= _violation_limit(trials, significance)
  # The test at the threshold is optimal, so the bound is close: with 500
  # canaries per side the median is within 25% of the truth.
  assert np.median(bounds) > 0.75 * epsilon


def test_clopper_pearson_gets_close_with_many_canaries():
  rng = np.random.default_rng(3)
  in_scores, out_scores = _randomized_response(1.0, 20000, rng)
  auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
  assert 0.9 < auditor.epsilon_clopper_pearson(0.05, one_sided=False) <= 1.0


_STRATEGIES = [
    auditing.Bonferroni(),
    auditing.Split(threshold_estimation_frac=0.5, seed=None),
    auditing.MultiSplit(num_samples=5, seed=None),
]


@pytest.mark.parametrize('strategy', _STRATEGIES, ids=lambda s: type(s).__name__)
def test_bounds_stay_below_true_epsilon_of_gaussian_mechanism(strategy):
  rng = np.random.default_rng(4)
  mu, delta, significance, trials = 1.5, 1e-3, 0.1, 60
  true_eps = _bounds.gdp_epsilon(mu, delta)
  cp, gdp = [], []
  for _ in range(trials):
    auditor = auditing.CanaryScoreAuditor(
        rng.normal(mu, 1, 400), rng.normal(0, 1, 400)
    )
    cp.append(
        auditor.epsilon_clopper_pearson(
            significance, delta, threshold_strategy=strategy
        )
    )
    gdp.append(
        auditor.epsilon_from_gdp(
            significance, delta, threshold_strategy=strategy
        )
    )
  limit = _violation_limit(trials, significance)
  assert np.sum(np.array(cp) > true_eps) <= limit
  assert np.sum(np.array(gdp) > true_eps) <= limit
  # The GDP bound uses the right family, so it gets within a factor 2.
  assert np.median(gdp) > 0.5 * true_eps
  assert np.median(gdp) > np.median(cp)


def _one_run_scores(mu, num, rng):
  included = rng.random(num) < 0.5
  scores = rng.normal(0, 1, num) + mu * included
  return scores[included], scores[~included]


def test_one_run_is_valid_for_randomized_response():
  rng = np.random.default_rng(5)
  epsilon, significance, trials = 1.0, 0.1, 100
  bounds = []
  for _ in range(trials):
    included = rng.random(400) < 0.5
    in_s, out_s = _randomized_response(epsilon, 400, rng)
    scores = np.where(included, in_s, out_s)
    auditor = auditing.CanaryScoreAuditor(scores[included], scores[~included])
    bounds.append(auditor.epsilon_one_run(significance, 0.0, num_guesses=400))
  bounds = np.array(bounds)
  assert np.sum(bounds > epsilon) <= _violation_limit(trials, significance)
  assert np.median(bounds) > 0.5 * epsilon


def test_one_run_bounds_stay_below_gaussian_epsilon():
  rng = np.random.default_rng(6)
  mu, delta, significance, trials = 2.0, 1e-5, 0.1, 30
  true_eps = _bounds.gdp_epsilon(mu, delta)
  plain, fdp = [], []
  for _ in range(trials):
    auditor = auditing.CanaryScoreAuditor(*_one_run_scores(mu, 1000, rng))
    plain.append(auditor.epsilon_one_run(significance, delta))
    fdp.append(
        auditor.epsilon_one_run_fdp(significance, delta, num_guesses=[200])
    )
  limit = _violation_limit(trials, significance)
  assert np.sum(np.array(plain) > true_eps) <= limit
  assert np.sum(np.array(fdp) > true_eps) <= limit
  assert np.median(plain) > 1.0
  # The f-DP analysis (Mahloujifar et al. 2024) is the tighter one here.
  assert np.median(fdp) > np.median(plain)


def test_attack_metrics_match_brute_force():
  rng = np.random.default_rng(7)
  in_scores = np.round(rng.normal(1, 1, 150), 1)  # ties on purpose
  out_scores = np.round(rng.normal(0, 1, 120), 1)
  auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
  labels = np.r_[np.ones(150), np.zeros(120)]
  scores = np.r_[in_scores, out_scores]
  assert auditor.attack_auroc() == pytest.approx(
      metrics.roc_auc_score(labels, scores)
  )
  best_tpr, best_acc = 0.0, 0.0
  for t in np.r_[np.unique(scores), np.inf]:
    tpr, fpr = np.mean(in_scores >= t), np.mean(out_scores >= t)
    if fpr <= 0.05:
      best_tpr = max(best_tpr, tpr)
    best_acc = max(best_acc, 0.3 * tpr + 0.7 * (1 - fpr))
  assert auditor.tpr_at_given_fpr(0.05) == pytest.approx(best_tpr)
  assert auditor.max_accuracy(prevalence=0.3) == pytest.approx(best_acc)
  assert auditor.max_accuracy(prevalence=0.3, significance=0.05) < best_acc
  fpr, tpr = auditor.roc_curve()
  assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_raw_counts_estimates_randomized_response():
  rng = np.random.default_rng(8)
  auditor = auditing.CanaryScoreAuditor(*_randomized_response(1.0, 5000, rng))
  assert auditor.epsilon_raw_counts() == pytest.approx(1.0, abs=0.1)
  # No threshold has 5000 false positives: nothing is estimated.
  assert auditor.epsilon_raw_counts(min_count=5000) == 0.0


@pytest.mark.parametrize(
    'params',
    [
        auditing.BootstrapParams(num_samples=200, seed=1),
        auditing.BootstrapParams(
            num_samples=200, quantiles=(0.05, 0.5, 0.95), bias_correction=True,
            acceleration=True, seed=1,
        ),
    ],
)
def test_bootstrap_interval_brackets_the_estimate(params):
  rng = np.random.default_rng(9)
  auditor = auditing.CanaryScoreAuditor(
      rng.normal(1, 1, 200), rng.normal(0, 1, 200)
  )
  auc = auditor.attack_auroc()
  interval = auditor.attack_auroc(bootstrap_params=params)
  assert len(interval) == len(params.quantiles)
  assert interval[0] < auc < interval[-1]
  assert interval[-1] - interval[0] < 0.15
  np.testing.assert_array_equal(
      interval, auditor.attack_auroc(bootstrap_params=params)
  )
  tpr = auditor.tpr_at_given_fpr(0.1, bootstrap_params=params)
  assert tpr[0] <= auditor.tpr_at_given_fpr(0.1) <= tpr[-1]


@pytest.mark.parametrize(
    'in_scores,out_scores,field',
    [
        ([], [1.0], 'in_canary_scores'),
        ([1.0], [], 'out_canary_scores'),
        ([1.0, np.nan], [0.0], 'in_canary_scores'),
        ([1.0], [np.inf], 'out_canary_scores'),
        ([[1.0]], [0.0], 'in_canary_scores'),
    ],
)
def test_bad_scores_are_rejected(in_scores, out_scores, field):
  with pytest.raises(ValueError, match=field):
    auditing.CanaryScoreAuditor(in_scores, out_scores)


@pytest.mark.parametrize('significance', [0.0, 1.0, -0.1, 1.5])
def test_significance_outside_unit_interval_is_rejected(significance):
  auditor = auditing.CanaryScoreAuditor([1.0, 2.0], [0.0, 0.5])
  for method in (
      lambda: auditor.epsilon_clopper_pearson(significance),
      lambda: auditor.epsilon_from_gdp(significance, 1e-5),
      lambda: auditor.epsilon_one_run(significance, 0.0),
      lambda: auditor.epsilon_one_run_fdp(significance, 1e-5),
      lambda: auditor.max_accuracy(significance=significance),
  ):
    with pytest.raises(ValueError, match='significance'):
      method()


def test_other_bad_arguments_name_the_field():
  auditor = auditing.CanaryScoreAuditor([1.0, 2.0, 3.0], [0.0, 0.5])
  with pytest.raises(ValueError, match='delta'):
    auditor.epsilon_clopper_pearson(0.05, delta=1.0)
  with pytest.raises(ValueError, match='delta'):
    auditor.epsilon_from_gdp(0.05, delta=0.0)
  with pytest.raises(ValueError, match='min_count'):
    auditor.epsilon_raw_counts(min_count=0)
  with pytest.raises(ValueError, match='fpr'):
    auditor.tpr_at_given_fpr(1.5)
  with pytest.raises(ValueError, match='num_guesses'):
    auditor.epsilon_one_run(0.05, num_guesses=6)
  with pytest.raises(ValueError, match='prevalence'):
    auditor.max_accuracy(prevalence=1.0)
  with pytest.raises(ValueError, match='threshold_estimation_frac'):
    auditing.Split(threshold_estimation_frac=1.0)
  with pytest.raises(ValueError, match='num_samples'):
    auditing.MultiSplit(num_samples=0)
  with pytest.raises(ValueError, match='quantiles'):
    auditing.BootstrapParams(quantiles=(0.0, 0.5))
  with pytest.raises(ValueError, match='threshold'):
    auditing.Explicit(float('nan'))
  with pytest.raises(ValueError, match='threshold_estimation_frac'):
    auditor.epsilon_clopper_pearson(
        0.05, threshold_strategy=auditing.Split(threshold_estimation_frac=0.1)
    )


@pytest.mark.slow
def test_bounds_get_close_with_many_canaries():
  rng = np.random.default_rng(10)
  mu, delta, significance = 1.0, 1e-5, 0.05
  true_eps = _bounds.gdp_epsilon(mu, delta)
  gdp, cp, one_run = [], [], []
  for _ in range(10):
    auditor = auditing.CanaryScoreAuditor(
        rng.normal(mu, 1, 10000), rng.normal(0, 1, 10000)
    )
    gdp.append(auditor.epsilon_from_gdp(significance, delta))
    cp.append(auditor.epsilon_clopper_pearson(significance, delta))
    one_run.append(
        auditing.CanaryScoreAuditor(*_one_run_scores(mu, 10000, rng))
        .epsilon_one_run(significance, delta)
    )
  # Measured: medians 88%, 41% and 45% of the true epsilon (4.38).
  assert 0.8 * true_eps < np.median(gdp) <= true_eps
  assert 0.3 * true_eps < np.median(cp) <= true_eps
  assert 0.3 * true_eps < np.median(one_run) <= true_eps
  assert max(gdp + cp + one_run) <= true_eps


def test_split_strategies_are_reproducible_and_use_held_out_scores():
  rng = np.random.default_rng(11)
  auditor = auditing.CanaryScoreAuditor(
      rng.normal(2, 1, 300), rng.normal(0, 1, 300)
  )
  for strategy in (auditing.Split(seed=3), auditing.MultiSplit(seed=3)):
    first = auditor.epsilon_clopper_pearson(0.05, threshold_strategy=strategy)
    again = auditor.epsilon_clopper_pearson(0.05, threshold_strategy=strategy)
    assert first == again > 0
  # Bounding on 30% of the scores is weaker than on 70% of them.
  small = auditor.epsilon_clopper_pearson(
      0.05, threshold_strategy=auditing.Split(0.7, seed=3)
  )
  large = auditor.epsilon_clopper_pearson(
      0.05, threshold_strategy=auditing.Split(0.3, seed=3)
  )
  assert small < large
