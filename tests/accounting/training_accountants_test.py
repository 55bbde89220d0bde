"""Tests of the cyclic, truncated, shuffled, user-level, single-release and
cached accountants of jax_privacy.accounting.analysis.

Independent values come from dp_accounting events built here by hand, and
from the closed form of the Gaussian mechanism's privacy profile (Balle and
Wang 2018, arXiv:1805.06530), solved here with scipy.
"""

import logging
import math

import dp_accounting
import numpy as np
import pytest
from scipy import optimize, stats

from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis

# A short grid of orders keeps these tests fast (results are compared with
# dp_accounting at the same orders).
RDP = accountants.RdpAccountantConfig(
    orders=[1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256])
PLD = accountants.PldAccountantConfig(value_discretization_interval=1e-3)
Sampling = analysis.SamplingMethod


def _gaussian_epsilon(mu: float, delta: float) -> float:
  """Exact epsilon of a Gaussian mechanism with sensitivity / sigma = mu."""

  def excess(eps):
    return (stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta)

  if excess(0.0) <= 0:
    return 0.0
  return optimize.brentq(excess, 0.0, 500.0, xtol=1e-12)


def _pld_epsilon(event, delta, relation=None, interval=1e-3):
  accountant = dp_accounting.pld.PLDAccountant(
      relation or dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
      value_discretization_interval=interval)
  return accountant.compose(event).get_epsilon(delta)


def _params(**kwargs):
  defaults = dict(noise_multipliers=1.0, num_samples=10_000, delta=1e-5,
                  batch_size=100)
  return analysis.DpParams(**(defaults | kwargs))


# Cyclic Poisson sampling ------------------------------------------------------


@pytest.mark.parametrize('config', [RDP, PLD], ids=['rdp', 'pld'])
@pytest.mark.parametrize('cycle_length, steps', [(4, 100), (3, 10), (7, 50)])
def test_cyclic_poisson_equals_hand_built_event(config, cycle_length, steps):
  params = _params(cycle_length=cycle_length, batch_size=200)
  epsilon = analysis.DpsgdTrainingAccountant(config).compute_epsilon(
      steps, params)
  q = 200 * cycle_length / 10_000
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(1.0)),
      math.ceil(steps / cycle_length))
  accountant = config.create_accountant()
  assert epsilon == pytest.approx(
      accountant.compose(event).get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize('cycle_length, steps', [(4, 8), (5, 23)])
def test_fixed_order_epochs_equal_closed_form_gaussian(cycle_length, steps):
  # batch_size * cycle_length = num_samples: q = 1, every epoch touches an
  # example exactly once, with no amplification.
  sigma = 3.0
  params = _params(noise_multipliers=sigma, cycle_length=cycle_length,
                   batch_size=10_000 // cycle_length)
  epochs = math.ceil(steps / cycle_length)
  exact = _gaussian_epsilon(math.sqrt(epochs) / sigma, 1e-5)
  pld = analysis.DpsgdTrainingAccountant(
      accountants.PldAccountantConfig(1e-4)).compute_epsilon(steps, params)
  rdp = analysis.DpsgdTrainingAccountant(RDP).compute_epsilon(steps, params)
  assert exact <= pld <= exact + 2e-3
  assert rdp >= exact


def test_cyclic_sampling_prob_above_one_is_rejected():
  with pytest.raises(ValueError, match='batch_size \\* cycle_length'):
    analysis.DpsgdTrainingAccountant(RDP).compute_epsilon(
        10, _params(cycle_length=3, batch_size=4000))


# Truncated Poisson sampling ---------------------------------------------------


def test_truncated_equals_hand_built_event_at_the_worse_group_size():
  params = _params(truncated_batch_size=120, cycle_length=3, batch_size=100)
  epsilon = analysis.DpsgdTrainingAccountant(PLD).compute_epsilon(50, params)
  by_size = [
      _pld_epsilon(dp_accounting.SelfComposedDpEvent(
          dp_accounting.TruncatedSubsampledGaussianDpEvent(
              dataset_size=size, sampling_probability=0.03,
              truncated_batch_size=120, noise_multiplier=1.0),
          17), 1e-5)
      for size in (3333, 3334)  # 10_000 examples in 3 groups.
  ]
  assert epsilon == pytest.approx(max(by_size), rel=1e-12)


def test_truncated_analysis_is_not_monotone_in_group_size():
  # Why both group sizes are evaluated: a larger group is not always worse.
  epsilon = lambda size: _pld_epsilon(dp_accounting.SelfComposedDpEvent(
      dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=size, sampling_probability=0.05,
          truncated_batch_size=12, noise_multiplier=1.0), 50), 1e-5)
  assert epsilon(400) > epsilon(200) and epsilon(400) > epsilon(1000)


def test_truncation_far_above_the_batch_is_plain_poisson():
  plain = analysis.DpsgdTrainingAccountant(PLD).compute_epsilon(
      100, _params())
  truncated = analysis.DpsgdTrainingAccountant(PLD).compute_epsilon(
      100, _params(truncated_batch_size=1000))
  assert truncated == pytest.approx(plain, rel=1e-3)
  assert truncated >= plain - 1e-9


def test_truncation_with_rdp_is_rejected():
  with pytest.raises(ValueError, match='PldAccountantConfig'):
    analysis.DpsgdTrainingAccountant(RDP).compute_epsilon(
        10, _params(truncated_batch_size=50))


# Shuffled batches -------------------------------------------------------------


@pytest.mark.parametrize('steps, sigma', [(1, 4.0), (250, 8.0), (1000, 20.0)])
def test_shuffled_is_unamplified_gaussian_per_epoch(steps, sigma):
  params = _params(noise_multipliers=sigma, batch_size=100,
                   sampling_method=Sampling.SHUFFLED)
  epochs = math.ceil(steps / 100)  # 10_000 // 100 steps per epoch.
  exact = _gaussian_epsilon(2 * math.sqrt(epochs) / sigma, 1e-5)
  accountant = analysis.DpsgdTrainingAccountant(
      accountants.PldAccountantConfig(1e-4))
  assert accountant.neighboring_relation(params) is (
      dp_accounting.NeighboringRelation.REPLACE_ONE)
  assert exact <= accountant.compute_epsilon(steps, params) <= exact + 2e-3
  assert analysis.DpsgdTrainingAccountant(RDP).compute_epsilon(
      steps, params) >= exact


def test_shuffled_uses_smallest_noise_of_each_epoch():
  params = _params(noise_multipliers=[(0, 8.0), (150, 4.0)], batch_size=100,
                   sampling_method=Sampling.SHUFFLED)
  # Epoch 0 (steps 0-99) has sigma 8; epoch 1 (100-199) contains sigma 4.
  event = dp_accounting.ComposedDpEvent([
      dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 1),
      dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(4.0), 1),
  ])
  epsilon = analysis.DpsgdTrainingAccountant(PLD).compute_epsilon(200, params)
  # The sensitivity 2C of replace-one is in the events (sigma / 2).
  assert epsilon == pytest.approx(_pld_epsilon(event, 1e-5), rel=1e-12)


def test_shuffled_is_far_above_the_poisson_heuristic_which_is_labelled(caplog):
  shuffled = _params(noise_multipliers=1.0, sampling_method=Sampling.SHUFFLED)
  heuristic = _params(noise_multipliers=1.0,
                      sampling_method=Sampling.SHUFFLED_POISSON_HEURISTIC)
  accountant = analysis.DpsgdTrainingAccountant(PLD)
  with caplog.at_level(logging.WARNING):
    heuristic_epsilon = accountant.compute_epsilon(1000, heuristic)
  assert 'HEURISTIC' in caplog.text
  assert Sampling.SHUFFLED_POISSON_HEURISTIC.is_heuristic
  assert not Sampling.SHUFFLED.is_heuristic
  assert heuristic_epsilon == accountant.compute_epsilon(1000, _params())
  assert accountant.compute_epsilon(1000, shuffled) > 5 * heuristic_epsilon


def test_shuffled_needs_constant_batch_size():
  with pytest.raises(ValueError, match='constant batch size'):
    analysis.DpsgdTrainingAccountant(RDP).compute_epsilon(10, _params(
        batch_size=None, batch_sizes=[(0, 10), (5, 20)],
        sampling_method=Sampling.SHUFFLED))


# User level -------------------------------------------------------------------


def test_user_level_with_one_example_is_example_level():
  user = analysis.DpsgdTrainingUserLevelAccountant(PLD).compute_epsilon(
      200, _params(examples_per_user=1))
  example = analysis.DpsgdTrainingAccountant(PLD).compute_epsilon(
      200, _params())
  assert user == pytest.approx(example, rel=2e-3)


@pytest.mark.parametrize('examples_per_user, steps', [
    (2, 5), pytest.param(4, 20, marks=pytest.mark.slow)])
def test_user_level_full_batch_is_gaussian_with_sensitivity_k(
    examples_per_user, steps):
  sigma = 10.0
  params = _params(noise_multipliers=sigma, batch_size=10_000,
                   examples_per_user=examples_per_user)
  exact = _gaussian_epsilon(examples_per_user * math.sqrt(steps) / sigma, 1e-5)
  epsilon = analysis.DpsgdTrainingUserLevelAccountant(PLD).compute_epsilon(
      steps, params)
  assert exact <= epsilon <= exact + 2e-2


def test_user_level_grows_with_examples_per_user():
  accountant = analysis.DpsgdTrainingUserLevelAccountant(
      accountants.PldAccountantConfig(1e-2))
  values = [accountant.compute_epsilon(20, _params(examples_per_user=k))
            for k in (1, 2, 3)]
  assert values[0] < values[1] < values[2]


@pytest.mark.parametrize('kwargs, message', [
    (dict(), 'examples_per_user'),
    (dict(examples_per_user=2,
          sampling_method=Sampling.FIXED_BATCH_SIZE), 'POISSON'),
    (dict(examples_per_user=2, truncated_batch_size=5),
     'truncated_batch_size'),
])
def test_user_level_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    analysis.DpsgdTrainingUserLevelAccountant(PLD).compute_epsilon(
        10, _params(**kwargs))


def test_user_level_needs_pld_and_example_level_points_to_it():
  with pytest.raises(ValueError, match='PldAccountantConfig'):
    analysis.DpsgdTrainingUserLevelAccountant(RDP).compute_epsilon(
        10, _params(examples_per_user=2))
  with pytest.raises(ValueError, match='DpsgdTrainingUserLevelAccountant'):
    analysis.DpsgdTrainingAccountant(PLD).compute_epsilon(
        10, _params(examples_per_user=2))


# Single release ---------------------------------------------------------------


@pytest.mark.parametrize('sigma, delta', [(0.8, 1e-5), (3.0, 1e-8),
                                          (20.0, 1e-3)])
def test_single_release_is_one_gaussian(sigma, delta):
  accountant = analysis.SingleReleaseTrainingAccountant(
      accountants.PldAccountantConfig(1e-4))
  params = _params(noise_multipliers=sigma, delta=delta)
  exact = _gaussian_epsilon(1 / sigma, delta)
  epsilon = accountant.compute_epsilon(1000, params)
  assert exact <= epsilon <= exact + 2e-3
  assert accountant.compute_epsilon(1, params) == epsilon
  assert accountant.compute_epsilon(0, params) == 0
  assert accountant.can_calibrate_noise_multipliers
  assert not accountant.can_calibrate_steps
  assert not accountant.can_calibrate_batch_size


def test_single_release_rejects_noise_schedules():
  with pytest.raises(ValueError, match='one noise multiplier'):
    analysis.SingleReleaseTrainingAccountant(RDP).compute_epsilon(
        5, _params(noise_multipliers=[(0, 1.0), (3, 2.0)]))


# Cached -----------------------------------------------------------------------


def test_cached_never_below_exact_and_exact_at_cached_points():
  inner = analysis.DpsgdTrainingAccountant(RDP)
  cached = analysis.CachedExperimentAccountant(inner, 1000,
                                               num_cached_points=11)
  params = _params()
  assert cached.cached_points == tuple(range(0, 1001, 100))
  for n in (0, 1, 57, 100, 101, 555, 999, 1000):
    exact = inner.compute_epsilon(n, params)
    bound, is_exact = cached.epsilon_upper_bound(n, params)
    assert bound >= exact
    assert is_exact == (n % 100 == 0)
    if is_exact:
      assert bound == exact
    assert cached.compute_epsilon(n, params, allow_approximate_cache=True) == (
        bound)
    assert cached.compute_epsilon(n, params) == exact


def test_cached_beyond_max_is_exact_and_flags_delegate():
  inner = analysis.SingleReleaseTrainingAccountant(RDP)
  cached = analysis.CachedExperimentAccountant(inner, 10, num_cached_points=3)
  params = _params()
  assert cached.epsilon_upper_bound(50, params) == (
      inner.compute_epsilon(50, params), True)
  assert not cached.can_calibrate_steps
  assert isinstance(cached, analysis.TrainingAccountant)


@pytest.mark.parametrize('kwargs, field', [
    (dict(max_num_updates=0), 'max_num_updates'),
    (dict(max_num_updates=10, num_cached_points=1), 'num_cached_points'),
    (dict(max_num_updates=2.5), 'max_num_updates'),
])
def test_cached_bad_input(kwargs, field):
  with pytest.raises(ValueError, match=field):
    analysis.CachedExperimentAccountant(
        analysis.DpsgdTrainingAccountant(RDP), **kwargs)


def test_with_dp_accountant_config_swaps_only_the_config():
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  other = accountant.with_dp_accountant_config(PLD)
  assert other.dp_accountant_config is PLD
  assert accountant.dp_accountant_config is RDP
  assert type(other) is type(accountant)
  assert np.isfinite(other.compute_epsilon(10, _params()))
