"""The search behind `calibrate.calibrate_noise_multiplier`.

Private: the public entry point is `calibrate.calibrate_noise_multiplier`.

Epsilon is a smooth, decreasing function of the noise multiplier sigma, close
to a straight line in (log sigma, log epsilon). A bisection on "epsilon <=
target" ignores that and costs about log2(bracket / tol) evaluations of the
accountant; this search uses the epsilon values themselves. It predicts the
sigma meeting the target by a secant in (log sigma, log epsilon) and then
evaluates a pair of points tol apart on either side of the prediction, so a
stage usually ends after two or three evaluations near the answer.

Each stage ends, as the bisection did, with a bracket of evaluated points
lo < hi, hi - lo <= tol, where hi meets the target and lo does not (or hi is
the lower end of the allowed range): the prediction only chooses where to
evaluate, the bracket decides the result. A bisection step replaces the
secant whenever the bracket fails to halve, and after two closing steps that
failed to close, so the worst case stays logarithmic. A coarse stage whose
only use is its estimate may `settle` instead: stop once the prediction lies
within tol of an evaluated point, without the confirming evaluation.

Privacy:
  The search only chooses where to evaluate. The sigma it returns was itself
  evaluated with `epsilon_of` and met the target there, so the guarantee is
  exactly that of the accountant behind `epsilon_of`; a wrong prediction
  costs evaluations, never privacy.
"""

import dataclasses
import math
from typing import Callable, Optional

# d log(epsilon) / d log(sigma) assumed before two points give an estimate:
# epsilon is about proportional to 1 / sigma for a Gaussian release, and
# falls faster than that at small sigma, so this overestimates the answer
# when going up and underestimates it when going down (both safe).
_DEFAULT_LOG_SLOPE = -1.0
# Largest factor by which one step may move away from the evaluated points.
_MAX_FACTOR = 8.0
# A point predicted within this fraction of tol of a bound closes the bracket
# at once (the other end is evaluated at exactly tol from the bound).
_CLOSE_FRACTION = 0.75
_MAX_EVALUATIONS = 200
# After this many closing steps that did not close, the stage stops trusting
# its predictions and bisects (epsilon is then not smooth, e.g. at a floor).
_MAX_FAILED_CLOSES = 2
# hi - tol, computed in floating point, may lie a rounding error more than tol
# below hi; such a bracket is as narrow as asked.
_ROUNDING = 1 + 1e-9


class Unreachable(Exception):
  """Even the upper end of the allowed range misses the target."""


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Where a stage ended.

  Attributes:
    noise_multiplier: The smallest evaluated sigma meeting the target; the
      largest evaluated one missing it is at most tol below, unless this is
      the lower end of the range. None if the search settled on its
      estimate before it closed the bracket.
    estimate: The secant's estimate of the exact answer, within the final
      bracket (the answer itself when the bracket is at `lower`).
    log_slope: The last estimate of d log(epsilon) / d log(sigma) near the
      answer (negative), or None if there was none.
  """

  noise_multiplier: Optional[float]
  estimate: float
  log_slope: Optional[float]


def _log(epsilon: float) -> float:
  return math.log(max(epsilon, 1e-300))


def _secant_slope(x0, e0, x1, e1) -> Optional[float]:
  """Slope in (log sigma, log epsilon) between two points, if decreasing."""
  if not (math.isfinite(e0) and math.isfinite(e1)) or x0 <= 0 or x1 <= 0:
    return None
  if x0 == x1:
    return None
  slope = (_log(e1) - _log(e0)) / (math.log(x1) - math.log(x0))
  return slope if slope < 0 and math.isfinite(slope) else None


def _predict(anchor: tuple[float, float, float], slope: float) -> float:
  """Sigma where the line through (sigma, epsilon) with `slope` meets target.

  Args:
    anchor: (sigma, epsilon, target).
    slope: d log(epsilon) / d log(sigma), < 0.
  """
  sigma, epsilon, target = anchor
  if not math.isfinite(epsilon) or sigma <= 0:
    return math.inf
  exponent = (math.log(target) - _log(epsilon)) / slope
  return sigma * math.exp(min(exponent, 700.0))


class _Stage:
  """The evaluated points of one stage and the next point to evaluate."""

  def __init__(self, epsilon_of, *, target, lower, upper, tol, log_slope):
    self._epsilon_of = epsilon_of
    self._target = target
    self._lower = lower
    self._upper = upper
    self._tol = tol
    self.log_slope = log_slope
    self.points: dict[float, float] = {}
    # Doubling steps when walking away from one-sided evidence, so that a
    # misleading slope cannot make the walk slower than the bisection's.
    self._walk = tol
    self._gaps: list[float] = []
    self._closed_last = False
    self._failed_closes = 0

  def evaluate(self, sigma: float) -> None:
    epsilon = math.inf if sigma <= 0 else float(self._epsilon_of(sigma))
    self.points[sigma] = math.nan if epsilon != epsilon else epsilon

  def _meets(self, sigma: float) -> bool:
    return self.points[sigma] <= self._target  # False for nan.

  def bounds(self) -> tuple[Optional[float], Optional[float]]:
    """(lo, hi): largest missing sigma below hi, smallest meeting sigma."""
    meeting = [s for s in self.points if self._meets(s)]
    hi = min(meeting) if meeting else None
    missing = [
        s for s in self.points if not self._meets(s) and (hi is None or s < hi)
    ]
    if self._lower == 0:
      missing.append(0.0)  # No noise: epsilon is infinite.
    lo = max(missing) if missing else None
    return lo, hi

  def _nearest(self) -> list[float]:
    """Evaluated sigmas, those with epsilon closest to the target first."""
    log_target = math.log(self._target)
    finite = [
        s for s in self.points if s > 0 and math.isfinite(self.points[s])
    ]
    return sorted(finite, key=lambda s: abs(_log(self.points[s]) - log_target))

  def _guess(self) -> Optional[float]:
    """The secant method's next estimate of the answer (unclamped).

    The line in (log sigma, log epsilon) through the two points whose epsilon
    is closest to the target; with one point, the line through it with the
    last known slope. None if those two points do not decrease.
    """
    nearest = self._nearest()
    if not nearest:
      return math.inf
    if len(nearest) >= 2:
      first, second = nearest[:2]
      slope = _secant_slope(first, self.points[first], second,
                            self.points[second])
      if slope is None:
        return None  # Flat or rising: no line to follow.
      self.log_slope = slope
    anchor = nearest[0]
    return _predict((anchor, self.points[anchor], self._target),
                    self.log_slope or _DEFAULT_LOG_SLOPE)

  def estimate(self, lo, hi) -> float:
    """The secant's estimate of the answer inside the final bracket."""
    guess = self._guess()
    if lo is None or hi <= self._lower or guess is None:
      return hi
    return min(max(guess, lo), hi)

  def next_point(self, lo, hi) -> float:
    """Where to evaluate next, given the bracket so far."""
    tol = self._tol
    if lo not in self.points:
      lo = None  # Sigma 0, never evaluated: no evidence to predict from.
    if self._closed_last:
      self._failed_closes += 1  # The stage went on: the close did not close.
      self._closed_last = False
    guess = self._guess()
    if guess is None or self._failed_closes >= _MAX_FAILED_CLOSES:
      return self._fallback(lo, hi)
    if lo is not None and hi is not None:
      guess = min(max(guess, lo), hi)
      closing = None
      if hi - guess <= _CLOSE_FRACTION * tol:
        closing = hi - tol
      elif guess - lo <= _CLOSE_FRACTION * tol:
        closing = lo + tol
      if closing is not None:
        return self._close(closing)
      self._gaps.append(hi - lo)
      if len(self._gaps) >= 3 and self._gaps[-1] > self._gaps[-3] / 2:
        return (lo + hi) / 2  # The secant is stalling: bisect.
      return guess + tol / 2
    if hi is not None:  # Every evaluated point meets the target: go down.
      if hi - guess <= _CLOSE_FRACTION * tol:
        return self._close(max(hi - tol, self._lower))
      return self._walk_down(hi, guess + tol / 2)
    # Every evaluated point misses the target: go up.
    if guess - lo <= _CLOSE_FRACTION * tol:
      return self._close(min(lo + tol, self._upper))
    return self._walk_up(lo, guess + tol / 2)

  @property
  def closing(self) -> bool:
    """Whether the last `next_point` expects to close the bracket."""
    return self._closed_last

  def _close(self, point: float) -> float:
    """Evaluates tol from a bound, expecting the bracket to close."""
    self._closed_last = True
    return point

  def _walk_down(self, hi: float, point: float) -> float:
    point = min(point, hi - self._walk)
    self._walk *= 2
    return max(point, hi / _MAX_FACTOR, self._lower)

  def _walk_up(self, lo: float, point: float) -> float:
    point = max(point, lo + self._walk)
    self._walk *= 2
    if lo > 0:
      point = min(point, lo * _MAX_FACTOR)
    return min(max(point, lo + self._tol), self._upper)

  def _fallback(self, lo, hi) -> float:
    """Without a usable prediction: bisect, or move by the largest factor."""
    if lo is not None and hi is not None:
      return (lo + hi) / 2
    if hi is not None:
      return self._walk_down(hi, -math.inf)
    return self._walk_up(lo, math.inf)


def search_noise(
    epsilon_of: Callable[[float], float],
    *,
    target: float,
    seed: float,
    lower: float,
    upper: float,
    tol: float,
    log_slope: Optional[float] = None,
    settle: bool = False,
) -> SearchResult:
  """Smallest sigma in [lower, upper] (to within tol) with epsilon <= target.

  Args:
    epsilon_of: Epsilon of a noise multiplier > 0, decreasing in it.
    target: The epsilon to meet, > 0.
    seed: Where to evaluate first (clipped to [lower, upper]).
    lower: Smallest sigma allowed, >= 0. Sigma 0 is never evaluated: its
      epsilon is infinite.
    upper: Largest sigma allowed.
    tol: Width of the final bracket, > 0.
    log_slope: d log(epsilon) / d log(sigma) near the answer, if known (e.g.
      from a coarser accountant); it only guides the first steps.
    settle: Stop once the prediction is within tol of an evaluated point on
      one side, before evaluating the other side: for a coarse stage whose
      only use is its estimate. Its `noise_multiplier` may then be None.

  Returns:
    The result, whose `noise_multiplier` meets the target according to
    `epsilon_of`, with a missing point at most tol below it or equal to
    `lower`.

  Raises:
    Unreachable: If `upper` misses the target.
  """
  stage = _Stage(epsilon_of, target=target, lower=lower, upper=upper,
                 tol=tol, log_slope=log_slope)
  point = min(max(seed, lower), upper)
  if point <= 0:
    point = min(tol, upper)
  for _ in range(_MAX_EVALUATIONS):
    stage.evaluate(point)
    lo, hi = stage.bounds()
    if hi is not None and (
        hi <= lower or (lo is not None and hi - lo <= tol * _ROUNDING)
    ):
      return SearchResult(hi, stage.estimate(lo, hi), stage.log_slope)
    if hi is None and lo is not None and lo >= upper:
      raise Unreachable()
    point = stage.next_point(lo, hi)
    if settle and stage.closing:
      # The prediction is within tol of an evaluated bound: enough for an
      # estimate, and the closing evaluation would only confirm it.
      return SearchResult(None, stage.estimate(lo, hi), stage.log_slope)
    if point in stage.points and lo is not None and hi is not None:
      point = (lo + hi) / 2  # Rounding at a huge sigma: bisect instead.
  raise RuntimeError(  # pragma: no cover - the steps shrink geometrically.
      f'noise search did not converge in {_MAX_EVALUATIONS} evaluations.'
  )
