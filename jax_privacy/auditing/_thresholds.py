"""How the auditor picks the decision threshold(s), and bootstrap settings.

A threshold attack says "member" when a canary's score is >= the threshold.
Its true and false positive rates at a threshold chosen after looking at the
scores are not binomial any more, so every strategy here pays for the choice
in a way that keeps the final confidence bound valid:

* `Bonferroni` tries every distinct score and divides the significance by the
  number of thresholds tried.
* `Explicit` uses a threshold fixed in advance and pays nothing.
* `Split` chooses the threshold on one random part of the scores and bounds
  on the other part.
* `MultiSplit` repeats `Split` and reports the median bound, each at half
  the significance (by Markov's inequality the median exceeds the truth with
  probability at most twice each bound's error rate).
"""

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

# bound_fn(true_positives, false_positives, num_in, num_out, alpha) -> values,
# one per threshold; larger is a stronger statement.
BoundFn = Callable[..., np.ndarray]


def candidate_thresholds(in_scores, out_scores) -> np.ndarray:
  """Every distinct score, plus +inf (the attack that never says member)."""
  return np.append(np.unique(np.concatenate([in_scores, out_scores])), np.inf)


def counts_at(sorted_scores: np.ndarray, thresholds) -> np.ndarray:
  """How many of `sorted_scores` are >= each threshold."""
  return len(sorted_scores) - np.searchsorted(
      sorted_scores, thresholds, side='left'
  )


def _bound_at(in_scores, out_scores, thresholds, bound_fn, alpha):
  in_sorted, out_sorted = np.sort(in_scores), np.sort(out_scores)
  return bound_fn(
      counts_at(in_sorted, thresholds),
      counts_at(out_sorted, thresholds),
      len(in_scores),
      len(out_scores),
      alpha,
  )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bonferroni:
  """Every distinct score is a threshold; significance / (number tried)."""

  def bound(self, in_scores, out_scores, bound_fn: BoundFn, significance):
    thresholds = candidate_thresholds(in_scores, out_scores)
    values = _bound_at(
        in_scores, out_scores, thresholds, bound_fn,
        significance / len(thresholds),
    )
    return float(np.max(values))


@dataclasses.dataclass(frozen=True)
class Explicit:
  """A threshold fixed before the scores were seen.

  Attributes:
    threshold: The attack says "member" when score >= threshold.
  """

  threshold: float

  def __post_init__(self):
    if not np.isfinite(self.threshold):
      raise ValueError(f'threshold must be finite, got {self.threshold}')

  def bound(self, in_scores, out_scores, bound_fn: BoundFn, significance):
    values = _bound_at(
        in_scores, out_scores, np.array([self.threshold]), bound_fn,
        significance,
    )
    return float(values[0])


def _check_fraction(value):
  if not 0 < value < 1:
    raise ValueError(
        f'threshold_estimation_frac must be in (0, 1), got {value}'
    )


def _split_bound(in_scores, out_scores, bound_fn, significance, frac, rng):
  """Chooses the threshold on a random `frac` of each side, bounds on the rest."""
  num_in = int(np.floor(frac * len(in_scores)))
  num_out = int(np.floor(frac * len(out_scores)))
  if min(num_in, num_out) < 1 or num_in == len(in_scores) or num_out == len(
      out_scores
  ):
    raise ValueError(
        'threshold_estimation_frac leaves an empty part: with'
        f' {len(in_scores)} in and {len(out_scores)} out scores, frac={frac}'
        ' gives no score to estimate on or none to bound on'
    )
  in_perm = rng.permutation(in_scores)
  out_perm = rng.permutation(out_scores)
  est_in, held_in = in_perm[:num_in], in_perm[num_in:]
  est_out, held_out = out_perm[:num_out], out_perm[num_out:]
  thresholds = candidate_thresholds(est_in, est_out)
  values = _bound_at(est_in, est_out, thresholds, bound_fn, significance)
  best = thresholds[int(np.argmax(values))]
  return float(
      _bound_at(held_in, held_out, np.array([best]), bound_fn, significance)[0]
  )


@dataclasses.dataclass(frozen=True)
class Split:
  """Choose the threshold on a random part, bound on the held-out rest.

  Attributes:
    threshold_estimation_frac: Fraction of the in and of the out scores used
      to choose the threshold, in (0, 1).
    seed: Seed of the random split.
  """

  threshold_estimation_frac: float = 0.5
  seed: Optional[int] = 0

  def __post_init__(self):
    _check_fraction(self.threshold_estimation_frac)

  def bound(self, in_scores, out_scores, bound_fn: BoundFn, significance):
    return _split_bound(
        in_scores, out_scores, bound_fn, significance,
        self.threshold_estimation_frac, np.random.default_rng(self.seed),
    )


@dataclasses.dataclass(frozen=True)
class MultiSplit:
  """The median over `num_samples` random splits, each at significance / 2.

  Attributes:
    num_samples: Number of independent splits, >= 1.
    threshold_estimation_frac: As in `Split`.
    seed: Seed of the splits.
  """

  num_samples: int = 11
  threshold_estimation_frac: float = 0.5
  seed: Optional[int] = 0

  def __post_init__(self):
    if int(self.num_samples) != self.num_samples or self.num_samples < 1:
      raise ValueError(
          f'num_samples must be an integer >= 1, got {self.num_samples}'
      )
    _check_fraction(self.threshold_estimation_frac)

  def bound(self, in_scores, out_scores, bound_fn: BoundFn, significance):
    rng = np.random.default_rng(self.seed)
    values = np.sort([
        _split_bound(
            in_scores, out_scores, bound_fn, significance / 2,
            self.threshold_estimation_frac, rng,
        )
        for _ in range(self.num_samples)
    ])
    # The lower median exceeds the truth only if at least half of the bounds
    # do; each does with probability <= significance / 2.
    return float(values[(self.num_samples - 1) // 2])


ThresholdStrategy = Bonferroni | Explicit | Split | MultiSplit


@dataclasses.dataclass(frozen=True)
class BootstrapParams:
  """A bootstrap confidence interval for a point estimate.

  The in and out scores are resampled with replacement separately (their
  numbers are fixed by the experiment). Without corrections the interval is
  the percentile bootstrap; `bias_correction` and `acceleration` give the
  BC / BCa intervals of Efron (1987), the acceleration estimated by the
  jackknife.

  Attributes:
    num_samples: Number of bootstrap resamples, >= 2.
    quantiles: The quantiles of the estimate's distribution to report, each
      in (0, 1).
    bias_correction: Correct for the median bias of the bootstrap
      distribution.
    acceleration: Correct for skew (jackknife acceleration; costs one
      evaluation per score).
    seed: Seed of the resampling.

  References:
    Efron, "Better Bootstrap Confidence Intervals", JASA 1987.
  """

  num_samples: int = 1000
  quantiles: Sequence[float] = (0.025, 0.975)
  bias_correction: bool = False
  acceleration: bool = False
  seed: Optional[int] = 0

  def __post_init__(self):
    if int(self.num_samples) != self.num_samples or self.num_samples < 2:
      raise ValueError(
          f'num_samples must be an integer >= 2, got {self.num_samples}'
      )
    quantiles = np.asarray(self.quantiles, dtype=float)
    if quantiles.ndim != 1 or not quantiles.size or not np.all(
        (quantiles > 0) & (quantiles < 1)
    ):
      raise ValueError(
          f'quantiles must be a non-empty sequence of numbers in (0, 1), got'
          f' {self.quantiles}'
      )
    object.__setattr__(self, 'quantiles', tuple(float(q) for q in quantiles))
