"""The fast noise calibration agrees with a plain bisection, and is fast.

`calibrate.calibrate_noise_multiplier` predicts the answer from epsilon
values (a secant in log-log) instead of bisecting on "meets the target".
These tests check it against a plain bisection written here, which only asks
the authoritative accountant (PLD at its default 1e-4 grid) whether a sigma
meets the target: both must agree to within `tol`, the result must meet the
target and `result - tol` must miss it, and far fewer evaluations of the
authoritative accountant must be needed. The search itself
(`_noise_search.search_noise`) is also run on synthetic epsilon curves,
smooth and not, to check its bracket and its worst case.
"""

import logging
import math
import random

import pytest

from jax_privacy.accounting import _memo
from jax_privacy.accounting import _noise_search
from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate
from jax_privacy.experimental import execution_plan
from _counting_accountant import CountingAccountant  # pylint: disable=g-import-not-at-top

logging.getLogger('absl').setLevel(logging.ERROR)

_EXACT = accountants.PldAccountantConfig()  # The default 1e-4 grid.
_TOL = 0.01  # The default tol of calibrate_noise_multiplier.


def _counting():
  return CountingAccountant(_EXACT)


def _epsilon(sigma, *, batch_size, steps, num_samples, delta):
  params = analysis.DpParams(noise_multipliers=sigma, num_samples=num_samples,
                             delta=delta, batch_size=batch_size)
  return analysis.DpsgdTrainingAccountant(_EXACT).compute_epsilon(
      steps, params)


def _plain_bisection(meets, low, high, tol):
  """The old algorithm's core: bisect on a yes/no answer down to tol."""
  assert (low == 0 or not meets(low)) and meets(high)
  calls = 2
  while high - low > tol:
    middle = (low + high) / 2
    calls += 1
    if meets(middle):
      high = middle
    else:
      low = middle
  return high, calls


# Small cases: sigma of 2.5 to 8 and few steps, so each 1e-4 evaluation
# takes a fraction of a second (they grow costly as sigma falls below 2).
_CASES = [
    # (batch_size, num_samples, steps, target_epsilon, delta)
    (5000, 50_000, 100, 0.5, 1e-5),
    (4096, 50_000, 200, 1.0, 1e-5),
    (10_000, 50_000, 30, 1.0, 1e-5),
    pytest.param(2000, 20_000, 100, 2.0, 1e-6, marks=pytest.mark.slow),
]


@pytest.mark.parametrize('batch_size, num_samples, steps, target, delta',
                         _CASES)
def test_matches_plain_bisection_with_the_exact_accountant(
    batch_size, num_samples, steps, target, delta):
  kwargs = dict(batch_size=batch_size, steps=steps, num_samples=num_samples,
                delta=delta)
  accountant = _counting()
  sigma = calibrate.calibrate_noise_multiplier(
      target_epsilon=target, accountant=accountant, batch_sizes=batch_size,
      num_updates=steps, num_samples=num_samples, target_delta=delta)

  # The guarantee, at the authoritative discretization, and tightness.
  assert _epsilon(sigma, **kwargs) <= target
  assert _epsilon(sigma - _TOL, **kwargs) > target
  # Within tol of the reference (both lie in [sigma*, sigma* + tol)).
  reference, reference_calls = _plain_bisection(
      lambda s: _epsilon(s, **kwargs) <= target, 2.0, 16.0, _TOL)
  assert abs(sigma - reference) <= _TOL
  # The exact accountant is asked a few times only.
  assert accountant.calls[1e-4] <= 3
  assert accountant.calls[1e-4] < reference_calls / 3


def test_plan_config_spends_at_most_its_epsilon():
  config = execution_plan.DpsgdExecutionPlanConfig(
      iterations=100, num_examples=50_000, expected_batch_size=5000,
      epsilon=0.5, delta=1e-5, noise_seed=0)
  sigma = config.calibrated_noise_multiplier
  assert config.epsilon_after(100) <= 0.5
  assert _epsilon(sigma - _TOL, batch_size=5000, steps=100,
                  num_samples=50_000, delta=1e-5) > 0.5


def test_initial_min_noise_meeting_the_target_is_returned():
  sigma = calibrate.calibrate_noise_multiplier(
      target_epsilon=4.0, accountant=_counting(), batch_sizes=100,
      num_updates=10, num_samples=10_000, target_delta=1e-5,
      initial_min_noise=3.0, initial_max_noise=5.0)
  assert sigma == 3.0


class _Floor(analysis.DpsgdTrainingAccountant):
  """PLD epsilon, but never below 0.7 whatever the noise."""

  calls = 0

  def compute_epsilon(self, num_updates, dp_params,
                      allow_approximate_cache=False):
    type(self).calls += 1
    return max(0.7, super().compute_epsilon(num_updates, dp_params))


def test_unreachable_target_gives_the_same_error_as_before():
  # The message of the bisection this search replaced, word for word.
  message = (
      'target_epsilon=0.5 is unreachable: even noise_multiplier=1e+09 gives'
      ' epsilon=0.7, the smallest reachable with these settings (the'
      " accountant's resolution). Use a finer accountant or a larger target."
  )
  _Floor.calls = 0
  with pytest.raises(ValueError) as error:
    calibrate.calibrate_noise_multiplier(
        target_epsilon=0.5, accountant=_Floor(_EXACT), batch_sizes=100,
        num_updates=10, num_samples=10_000, target_delta=1e-5)
  assert str(error.value) == message
  # Three stages (1e-2, 1e-3, 1e-4) of a geometric walk up to 1e9.
  assert _Floor.calls <= 3 * 15


_RDP = analysis.DpsgdTrainingAccountant(accountants.RdpAccountantConfig(
    orders=[1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256]))


def _random_cases(count, seed=0):
  rng = random.Random(seed)
  for _ in range(count):
    num_samples = rng.choice([1000, 10_000, 60_000])
    yield dict(
        num_samples=num_samples,
        batch_size=max(1, int(num_samples * 10 ** rng.uniform(-3, -0.5))),
        steps=int(10 ** rng.uniform(0, 3.5)),
        target=10 ** rng.uniform(-0.7, 1.2),
        delta=10 ** rng.uniform(-8, -4),
        tol=rng.choice([0.001, 0.01, 0.05]),
        initial_max_noise=10 ** rng.uniform(-1, 2),
    )


@pytest.mark.parametrize('case', list(_random_cases(12)))
def test_random_settings_agree_with_plain_bisection(case):
  def epsilon(sigma):
    params = analysis.DpParams(
        noise_multipliers=sigma, num_samples=case['num_samples'],
        delta=case['delta'], batch_size=case['batch_size'])
    return _RDP.compute_epsilon(case['steps'], params)

  tol = case['tol']
  sigma = calibrate.calibrate_noise_multiplier(
      target_epsilon=case['target'], accountant=_RDP,
      batch_sizes=case['batch_size'], num_updates=case['steps'],
      num_samples=case['num_samples'], target_delta=case['delta'], tol=tol,
      initial_max_noise=case['initial_max_noise'])
  assert epsilon(sigma) <= case['target'] < epsilon(sigma - tol)
  high = 1.0
  while epsilon(high) > case['target']:
    high *= 2
  reference, _ = _plain_bisection(
      lambda s: epsilon(s) <= case['target'], 0.0, high, tol)
  assert abs(sigma - reference) <= tol


# The in-process memo ----------------------------------------------------------


@pytest.fixture
def exact_evaluations(monkeypatch):
  """Counts the epsilon computations of every training accountant."""
  _memo.clear()
  calls = []
  original = analysis.DpTrainingAccountant._epsilon_of

  def counted(self, event, dp_params):
    calls.append(dp_params.noise_multipliers)
    return original(self, event, dp_params)

  monkeypatch.setattr(analysis.DpTrainingAccountant, '_epsilon_of', counted)
  yield calls
  _memo.clear()


_MEMO_ARGS = dict(target_epsilon=0.5, batch_sizes=5000, num_updates=100,
                  num_samples=50_000, target_delta=1e-5)


def test_memo_returns_the_same_value_without_recomputing(exact_evaluations):
  accountant = analysis.DpsgdTrainingAccountant(_EXACT)
  first = calibrate.calibrate_noise_multiplier(accountant=accountant,
                                               **_MEMO_ARGS)
  computed = len(exact_evaluations)
  assert computed > 0
  # A new but equal accountant hits the memo too: the key is its state.
  again = calibrate.calibrate_noise_multiplier(
      accountant=analysis.DpsgdTrainingAccountant(
          accountants.PldAccountantConfig()),
      **_MEMO_ARGS)
  assert again == first
  assert len(exact_evaluations) == computed


@pytest.mark.parametrize('change', [
    dict(num_updates=101),
    dict(target_epsilon=0.51),
    dict(target_delta=2e-5),
    dict(batch_sizes=[(0, 5000), (50, 4000)]),
    dict(tol=0.02),
    dict(accountant=analysis.DpsgdTrainingAccountant(
        accountants.PldAccountantConfig(value_discretization_interval=2e-4))),
])
def test_memo_is_keyed_by_every_input(exact_evaluations, change):
  args = dict(accountant=analysis.DpsgdTrainingAccountant(_EXACT),
              **_MEMO_ARGS)
  calibrate.calibrate_noise_multiplier(**args)
  computed = len(exact_evaluations)
  calibrate.calibrate_noise_multiplier(**(args | change))
  assert len(exact_evaluations) > computed


def test_memo_skips_subclasses(exact_evaluations):
  accountant = _counting()
  calibrate.calibrate_noise_multiplier(accountant=accountant, **_MEMO_ARGS)
  calibrate.calibrate_noise_multiplier(accountant=accountant, **_MEMO_ARGS)
  assert accountant.calls[1e-4] >= 2  # Both calls reached the accountant.


# The search on synthetic curves ----------------------------------------------


def _search(epsilon_of, target, **kwargs):
  calls = []

  def counted(sigma):
    calls.append(sigma)
    return epsilon_of(sigma)

  args = dict(seed=1.0, lower=0.0, upper=1e9, tol=_TOL) | kwargs
  result = _noise_search.search_noise(counted, target=target, **args)
  return result, calls


def _check_bracket(epsilon_of, target, result, calls, lower=0.0):
  sigma = result.noise_multiplier
  assert sigma in calls and epsilon_of(sigma) <= target
  missing = [s for s in calls if s < sigma and not epsilon_of(s) <= target]
  assert sigma == lower or (
      missing and sigma - max(missing) <= _TOL * (1 + 1e-9))
  assert min(s for s in calls if epsilon_of(s) <= target) == sigma


@pytest.mark.parametrize('scale, power, target', [
    (10.0, 1.0, 0.3),     # Gaussian-like: epsilon ~ 1 / sigma.
    (50.0, 2.5, 3.0),     # Steep, as at small sigma.
    (1.0, 0.5, 0.05),     # Shallow: the answer is far above the seed.
    (0.01, 1.0, 1.0),     # The answer is far below the seed.
])
def test_search_on_power_laws_is_fast_and_bracketed(scale, power, target):
  epsilon_of = lambda s: scale / s**power
  result, calls = _search(epsilon_of, target)
  _check_bracket(epsilon_of, target, result, calls)
  exact = (scale / target) ** (1 / power)
  assert exact <= result.noise_multiplier < exact + _TOL
  assert len(calls) <= 12
  assert result.log_slope == pytest.approx(-power, rel=1e-6)


def test_search_on_a_step_function_is_no_slower_than_bisection():
  # No slope to follow: the walk and the bisection safeguard must cope.
  epsilon_of = lambda s: 5.0 if s < 3.217 else 1.0
  result, calls = _search(epsilon_of, 2.0)
  _check_bracket(epsilon_of, 2.0, result, calls)
  assert 3.217 <= result.noise_multiplier < 3.217 + _TOL
  assert len(calls) <= 2 * math.ceil(math.log2(16 / _TOL)) + 4


def test_search_on_a_kinked_curve():
  # Flat until 2, then falling: the secant over the kink misleads.
  epsilon_of = lambda s: 8.0 if s < 2 else 8.0 * (2 / s) ** 3
  result, calls = _search(epsilon_of, 1.0, seed=0.5)
  _check_bracket(epsilon_of, 1.0, result, calls)
  assert 4.0 <= result.noise_multiplier < 4.0 + _TOL
  assert len(calls) <= 20


def test_settled_search_estimates_without_closing_the_bracket():
  epsilon_of = lambda s: 10.0 / s**1.5
  exact = (10.0 / 0.7) ** (1 / 1.5)
  full, full_calls = _search(epsilon_of, 0.7, seed=exact * 1.01)
  settled, settled_calls = _search(epsilon_of, 0.7, seed=exact * 1.01,
                                   settle=True)
  assert settled.estimate == pytest.approx(exact, abs=_TOL / 4)
  assert len(settled_calls) < len(full_calls)
  assert full.noise_multiplier is not None


def test_search_returns_lower_end_when_it_meets_the_target():
  result, calls = _search(lambda s: 1 / s, 1.0, seed=8.0, lower=2.0)
  assert result.noise_multiplier == 2.0
  assert len(calls) <= 4


def test_search_never_evaluates_zero_or_outside_the_range():
  result, calls = _search(lambda s: 10 / s, 0.01, seed=0.0, lower=0.0,
                          upper=5000.0)
  _check_bracket(lambda s: 10 / s, 0.01, result, calls)
  assert all(0 < s <= 5000.0 for s in calls)


def test_search_unreachable_raises():
  with pytest.raises(_noise_search.Unreachable):
    _search(lambda s: 1.0 + 1 / s, 0.5)
