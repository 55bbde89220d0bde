"""Empirical privacy from canary scores: `CanaryScoreAuditor`."""

from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats

from jax_privacy.auditing import _bounds
from jax_privacy.auditing import _fdp_one_run
from jax_privacy.auditing import _thresholds

_BONFERRONI = _thresholds.Bonferroni()
# Below this many guesses a one-run audit cannot certify anything useful.
_MIN_GUESSES = 10


def _check_scores(name: str, scores) -> np.ndarray:
  array = np.asarray(scores, dtype=float)
  if array.ndim != 1:
    raise ValueError(
        f'{name} must be a 1-D array of scores, got shape {array.shape}'
    )
  if array.size == 0:
    raise ValueError(f'{name} must not be empty')
  if not np.all(np.isfinite(array)):
    raise ValueError(
        f'{name} must be finite; found {int(np.sum(~np.isfinite(array)))}'
        ' NaN or infinite values'
    )
  return array


def _check_significance(significance) -> float:
  if not 0 < significance < 1:
    raise ValueError(
        f'significance must be in the open interval (0, 1), got {significance}'
    )
  return float(significance)


def _check_delta(delta) -> float:
  if not 0 <= delta < 1:
    raise ValueError(f'delta must be in [0, 1), got {delta}')
  return float(delta)


def _check_rate(name, value) -> float:
  if not 0 <= value <= 1:
    raise ValueError(f'{name} must be in [0, 1], got {value}')
  return float(value)


def _quantile_from_bootstrap(estimate, replicates, jackknife, params):
  """Percentile / BC / BCa quantiles of the bootstrap replicates."""
  z = stats.norm.ppf(np.asarray(params.quantiles))
  bias = 0.0
  if params.bias_correction:
    below = np.mean(replicates < estimate) + 0.5 * np.mean(
        replicates == estimate
    )
    bias = stats.norm.ppf(np.clip(below, 1e-12, 1 - 1e-12))
  accel = 0.0
  if params.acceleration:
    centred = np.mean(jackknife) - jackknife
    denominator = 6.0 * np.sum(centred**2) ** 1.5
    accel = float(np.sum(centred**3) / denominator) if denominator else 0.0
  adjusted = stats.norm.cdf(bias + (bias + z) / (1 - accel * (bias + z)))
  return np.quantile(replicates, adjusted)


class CanaryScoreAuditor:
  """Lower bounds on epsilon from the scores of included and held-out canaries.

  An audit inserts canaries into some training runs (or some canaries into
  one run) and scores each canary after training; a higher score means "more
  likely a member". The auditor turns the two samples of scores into
  attack metrics (ROC AUC, TPR at a low FPR, accuracy) and into epsilon lower
  bounds: if the mechanism really were (epsilon, delta)-DP, no attack could
  separate the scores this well except with probability `significance`.

  Privacy:
    A lower bound above the proven epsilon means the implementation or the
    analysis is wrong (or, with probability <= significance, bad luck). A
    bound below it proves nothing about the implementation: the attack may
    be weak. Each bound assumes that the scores of different canaries are
    independent given their membership (one canary per run, or canaries that
    do not interact), except the one-run bounds, which instead assume every
    canary was included independently with probability 1/2.

  References:
    Jagielski, Ullman, Oprea, "Auditing Differentially Private Machine
    Learning: How Private is Private SGD?", 2020. arXiv:2006.07709.
    Nasr et al., "Tight Auditing of Differentially Private Machine
    Learning", 2023. arXiv:2302.07956.
    Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run",
    2023. arXiv:2305.08846.
    Mahloujifar, Melis, Chaudhuri, "Auditing f-Differential Privacy in One
    Run", 2024. arXiv:2410.22235.
  """

  def __init__(self, in_canary_scores, out_canary_scores):
    """Checks and stores the scores.

    Args:
      in_canary_scores: 1-D scores of canaries included in training.
      out_canary_scores: 1-D scores of canaries left out.

    Raises:
      ValueError: If either is empty, not 1-D, or not finite.
    """
    self._in = _check_scores('in_canary_scores', in_canary_scores)
    self._out = _check_scores('out_canary_scores', out_canary_scores)

  @property
  def in_canary_scores(self) -> np.ndarray:
    return self._in.copy()

  @property
  def out_canary_scores(self) -> np.ndarray:
    return self._out.copy()

  def _bootstrap(self, statistic: Callable, params) -> np.ndarray:
    estimate = statistic(self._in, self._out)
    rng = np.random.default_rng(params.seed)
    num_in, num_out = len(self._in), len(self._out)
    replicates = np.array([
        statistic(
            self._in[rng.integers(0, num_in, num_in)],
            self._out[rng.integers(0, num_out, num_out)],
        )
        for _ in range(params.num_samples)
    ])
    jackknife = None
    if params.acceleration:
      jackknife = np.array(
          [statistic(np.delete(self._in, i), self._out) for i in range(num_in)]
          + [
              statistic(self._in, np.delete(self._out, i))
              for i in range(num_out)
          ]
      )
    return _quantile_from_bootstrap(estimate, replicates, jackknife, params)

  def epsilon_clopper_pearson(
      self,
      significance: float,
      delta: float = 0.0,
      one_sided: bool = True,
      *,
      threshold_strategy: _thresholds.ThresholdStrategy = _BONFERRONI,
  ) -> float:
    """A (1 - significance)-confidence lower bound on epsilon at `delta`.

    At each threshold the true positive rate gets a one-sided Clopper-Pearson
    lower bound and the false positive rate an upper bound, each at
    significance / 2 (after the strategy's correction); the rates then give
    epsilon through TPR <= e^eps FPR + delta.

    Args:
      significance: Probability, in (0, 1), that the bound exceeds the true
        epsilon.
      delta: The delta at which epsilon is bounded, in [0, 1).
      one_sided: Only the test "score >= threshold means member". If False,
        the complementary test (1 - FPR <= e^eps (1 - TPR) + delta) is used
        too; it needs no extra correction as it uses the same intervals.
      threshold_strategy: How the threshold is chosen (see `Bonferroni`).

    Returns:
      The lower bound, >= 0.
    """
    significance = _check_significance(significance)
    delta = _check_delta(delta)

    def bound_fn(tp, fp, num_in, num_out, alpha):
      tpr = _bounds.clopper_pearson_lower(tp, num_in, alpha / 2)
      fpr = _bounds.clopper_pearson_upper(fp, num_out, alpha / 2)
      return _bounds.epsilon_from_rates(tpr, fpr, delta, one_sided)

    return threshold_strategy.bound(self._in, self._out, bound_fn, significance)

  def _raw_counts(self, in_scores, out_scores, min_count, delta, one_sided):
    thresholds = _thresholds.candidate_thresholds(in_scores, out_scores)
    tp = _thresholds.counts_at(np.sort(in_scores), thresholds)
    fp = _thresholds.counts_at(np.sort(out_scores), thresholds)
    num_in, num_out = len(in_scores), len(out_scores)
    eps = np.where(
        fp >= min_count,
        _bounds.epsilon_from_rates(tp / num_in, fp / num_out, delta, True),
        0.0,
    )
    if not one_sided:
      reverse = _bounds.epsilon_from_rates(
          1 - fp / num_out, 1 - tp / num_in, delta, True
      )
      eps = np.maximum(eps, np.where(num_in - tp >= min_count, reverse, 0.0))
    return float(np.max(eps))

  def epsilon_raw_counts(
      self,
      min_count: int = 50,
      delta: float = 0.0,
      one_sided: bool = True,
      *,
      bootstrap_params: Optional[_thresholds.BootstrapParams] = None,
  ):
    """A point estimate of epsilon from the empirical rates (no confidence).

    The best epsilon over thresholds where the error being divided by (false
    positives; false negatives for the complementary test) counts at least
    `min_count` canaries, so that the ratio is not dominated by a handful.

    Args:
      min_count: Minimum count in the denominator, >= 1.
      delta: The delta at which epsilon is estimated, in [0, 1).
      one_sided: As in `epsilon_clopper_pearson`.
      bootstrap_params: If given, return the bootstrap quantiles instead.

    Returns:
      The estimate (a float), or an array of the requested quantiles.
    """
    if int(min_count) != min_count or min_count < 1:
      raise ValueError(f'min_count must be an integer >= 1, got {min_count}')
    delta = _check_delta(delta)

    def statistic(in_scores, out_scores):
      return self._raw_counts(in_scores, out_scores, min_count, delta,
                              one_sided)

    if bootstrap_params is None:
      return statistic(self._in, self._out)
    return self._bootstrap(statistic, bootstrap_params)

  def epsilon_from_gdp(
      self,
      significance: float,
      delta: float,
      eps_tol: float = 1e-6,
      *,
      threshold_strategy: _thresholds.ThresholdStrategy = _BONFERRONI,
  ) -> float:
    """A lower bound on epsilon assuming the mechanism is mu-GDP for some mu.

    The Clopper-Pearson rates at each threshold give a lower bound on mu
    (mu >= Phi^-1(1 - FPR) + Phi^-1(TPR)); the epsilon of that mu-GDP at
    `delta` is returned. Because one point of the ROC curve pins the whole
    Gaussian trade-off curve, this is much tighter than
    `epsilon_clopper_pearson` at small delta, and valid only if the
    mechanism's trade-off curve is (dominated by) a Gaussian one, as for the
    Gaussian mechanism and, asymptotically, DP-SGD.

    Args:
      significance: In (0, 1).
      delta: In (0, 1).
      eps_tol: Absolute tolerance of the epsilon returned, > 0.
      threshold_strategy: How the threshold is chosen.
    """
    significance = _check_significance(significance)
    if not 0 < delta < 1:
      raise ValueError(f'delta must be in the open interval (0, 1), got {delta}')
    if not eps_tol > 0:
      raise ValueError(f'eps_tol must be > 0, got {eps_tol}')

    def bound_fn(tp, fp, num_in, num_out, alpha):
      tpr = _bounds.clopper_pearson_lower(tp, num_in, alpha / 2)
      fpr = _bounds.clopper_pearson_upper(fp, num_out, alpha / 2)
      return _bounds.gdp_mu_from_rates(tpr, fpr)

    mu = threshold_strategy.bound(self._in, self._out, bound_fn, significance)
    return _bounds.gdp_epsilon(mu, delta, tol=eps_tol)

  def _guesses(self, num_guesses):
    """(number of guesses r, number correct v) for each r to try."""
    scores = np.concatenate([self._in, self._out])
    is_in = np.concatenate(
        [np.ones(len(self._in), bool), np.zeros(len(self._out), bool)]
    )
    # Ties are broken by a fixed random order so that neither side gains.
    tie_break = np.random.default_rng(0).permutation(len(scores))
    order = np.lexsort((tie_break, -scores))
    ranked = is_in[order]
    total = len(scores)
    if num_guesses is None:
      candidates = []
      r = total
      while r >= _MIN_GUESSES:
        candidates.append(r)
        r //= 2
      candidates = candidates or [total]
    else:
      candidates = [int(r) for r in np.atleast_1d(num_guesses)]
      if not candidates or any(r < 1 or r > total for r in candidates):
        raise ValueError(
            f'num_guesses must be integers in [1, {total}] (the number of'
            f' canaries), got {num_guesses}'
        )
    result = []
    for r in candidates:
      positives = (r + 1) // 2
      negatives = r - positives
      correct = int(np.sum(ranked[:positives])) + int(
          np.sum(~ranked[total - negatives:])
      )
      result.append((r, correct))
    return result

  def epsilon_one_run(
      self,
      significance: float,
      delta: float = 0.0,
      *,
      num_guesses: Optional[int | Sequence[int]] = None,
  ) -> float:
    """The one-run lower bound of Steinke, Nasr and Jagielski (2023).

    All canaries come from ONE training run in which each was included
    independently with probability 1/2. The attack guesses "in" for the
    ceil(r / 2) highest scores and "out" for the floor(r / 2) lowest, and
    the number of correct guesses is compared with what (epsilon,
    delta)-DP allows (Binomial(r, e^eps / (1 + e^eps)) plus a delta term).
    When several r are tried the significance is split between them
    (Bonferroni).

    Args:
      significance: In (0, 1).
      delta: In [0, 1).
      num_guesses: r, or several r to try; by default the number of
        canaries m, m / 2, m / 4, ... down to 10 guesses.

    Returns:
      The largest epsilon rejected at `significance`, >= 0.
    """
    significance = _check_significance(significance)
    delta = _check_delta(delta)
    total = len(self._in) + len(self._out)
    guesses = self._guesses(num_guesses)
    alpha = significance / len(guesses)
    best = 0.0
    for r, correct in guesses:
      p_fn = lambda e, r=r, c=correct: float(
          _bounds.one_run_p_value(total, r, c, e, delta)[0]
      )
      best = max(
          best, _bounds.largest_rejected(p_fn, alpha, _bounds.MAX_EPSILON)
      )
    return best

  def epsilon_one_run_fdp(
      self,
      significance: float,
      delta: float,
      *,
      num_guesses: Optional[int | Sequence[int]] = None,
  ) -> float:
    """The one-run f-DP audit of Mahloujifar, Melis and Chaudhuri (2024).

    Same game and guesses as `epsilon_one_run` (ceil(r / 2) "in" guesses on
    the highest scores, floor(r / 2) "out" on the lowest, abstention on the
    rest), but the null hypothesis is "the run is mu-GDP", tested with the
    paper's recursive bound on P[at least c correct guesses] under a
    trade-off function (here the Gaussian f_mu), which uses the whole curve
    instead of one (epsilon, delta) pair. The largest mu rejected at
    `significance` (Bonferroni over the r tried) is converted to epsilon at
    `delta`.

    Privacy:
      Valid when every canary was included independently with probability
      1/2. The rejected mu then exceeds the smallest mu for which the run
      is mu-GDP with respect to each canary with probability at most
      `significance`, whatever the mechanism; reading it as epsilon at
      `delta` assumes the run's trade-off curve is Gaussian (exact for the
      Gaussian mechanism and full-batch DP-SGD, an approximation for
      Poisson-subsampled DP-SGD, wrong for pure-DP mechanisms such as
      randomized response: use `epsilon_one_run` there).

    Args:
      significance: In (0, 1).
      delta: In (0, 1).
      num_guesses: As in `epsilon_one_run`.

    Returns:
      The epsilon at `delta` of the largest rejected mu, >= 0.

    References:
      Mahloujifar, Melis, Chaudhuri, "Auditing f-Differential Privacy in
      One Run", 2024. arXiv:2410.22235.
    """
    significance = _check_significance(significance)
    if not 0 < delta < 1:
      raise ValueError(
          f'delta must be in the open interval (0, 1), got {delta}'
      )
    total = len(self._in) + len(self._out)
    guesses = self._guesses(num_guesses)
    mu = _fdp_one_run.largest_rejected_mu(
        total,
        np.array([r for r, _ in guesses]),
        np.array([correct for _, correct in guesses]),
        significance / len(guesses),
    )
    return _bounds.gdp_epsilon(float(np.max(mu)), delta)

  def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates), from (0, 0) to (1, 1)."""
    thresholds = _thresholds.candidate_thresholds(self._in, self._out)[::-1]
    tpr = _thresholds.counts_at(np.sort(self._in), thresholds) / len(self._in)
    fpr = _thresholds.counts_at(np.sort(self._out), thresholds) / len(
        self._out
    )
    return fpr, tpr

  @staticmethod
  def _tpr_at_fpr(in_scores, out_scores, fpr):
    thresholds = _thresholds.candidate_thresholds(in_scores, out_scores)
    tpr = _thresholds.counts_at(np.sort(in_scores), thresholds) / len(in_scores)
    fprs = _thresholds.counts_at(np.sort(out_scores), thresholds) / len(
        out_scores
    )
    return float(np.max(np.where(fprs <= fpr, tpr, 0.0)))

  def tpr_at_given_fpr(
      self,
      fpr: float,
      *,
      bootstrap_params: Optional[_thresholds.BootstrapParams] = None,
  ):
    """The best empirical TPR among thresholds with empirical FPR <= `fpr`.

    Returns:
      A float, or the bootstrap quantiles if `bootstrap_params` is given.
    """
    fpr = _check_rate('fpr', fpr)
    statistic = lambda a, b: self._tpr_at_fpr(a, b, fpr)
    if bootstrap_params is None:
      return statistic(self._in, self._out)
    return self._bootstrap(statistic, bootstrap_params)

  @staticmethod
  def _auroc(in_scores, out_scores):
    ranks = stats.rankdata(np.concatenate([in_scores, out_scores]))
    num_in, num_out = len(in_scores), len(out_scores)
    rank_sum = np.sum(ranks[:num_in]) - num_in * (num_in + 1) / 2
    return float(rank_sum / (num_in * num_out))

  def attack_auroc(
      self,
      *,
      bootstrap_params: Optional[_thresholds.BootstrapParams] = None,
  ):
    """Area under the ROC curve (ties count one half): 0.5 is chance.

    Returns:
      A float, or the bootstrap quantiles if `bootstrap_params` is given.
    """
    if bootstrap_params is None:
      return self._auroc(self._in, self._out)
    return self._bootstrap(self._auroc, bootstrap_params)

  def max_accuracy(
      self,
      *,
      prevalence: Optional[float] = None,
      significance: Optional[float] = None,
  ) -> float:
    """The best accuracy of a threshold attack.

    Args:
      prevalence: Prior probability that a canary is a member, in (0, 1);
        by default the fraction of in-canaries.
      significance: If given, a (1 - significance)-confidence lower bound
        (Clopper-Pearson with Bonferroni over thresholds) instead of the
        empirical maximum.
    """
    if prevalence is None:
      prevalence = len(self._in) / (len(self._in) + len(self._out))
    elif not 0 < prevalence < 1:
      raise ValueError(f'prevalence must be in (0, 1), got {prevalence}')

    def bound_fn(tp, fp, num_in, num_out, alpha):
      if significance is None:
        tpr, fpr = tp / num_in, fp / num_out
      else:
        tpr = _bounds.clopper_pearson_lower(tp, num_in, alpha / 2)
        fpr = _bounds.clopper_pearson_upper(fp, num_out, alpha / 2)
      return prevalence * tpr + (1 - prevalence) * (1 - fpr)

    if significance is None:
      thresholds = _thresholds.candidate_thresholds(self._in, self._out)
      values = bound_fn(
          _thresholds.counts_at(np.sort(self._in), thresholds),
          _thresholds.counts_at(np.sort(self._out), thresholds),
          len(self._in), len(self._out), None,
      )
      return float(np.max(values))
    significance = _check_significance(significance)
    return _BONFERRONI.bound(self._in, self._out, bound_fn, significance)
