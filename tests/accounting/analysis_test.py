"""Tests for jax_privacy.accounting.analysis."""

import dataclasses
import itertools
import math

import dp_accounting
import numpy as np
import pytest

from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis

NeighboringRelation = dp_accounting.NeighboringRelation
RDP = accountants.RdpAccountantConfig()
PLD = accountants.PldAccountantConfig(value_discretization_interval=1e-3)


def _poisson_gaussian(q, sigma, steps):
  """The DP-SGD event, built here by hand from dp_accounting."""
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma)
      ),
      steps,
  )


def _reference_epsilon(config, event, delta):
  """Epsilon of `event` with a dp_accounting accountant built by hand."""
  if isinstance(config, accountants.RdpAccountantConfig):
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(config.orders))
  else:
    accountant = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=config.value_discretization_interval
    )
  return accountant.compose(event).get_epsilon(delta)


def _params(**kwargs):
  defaults = dict(
      noise_multipliers=1.0, num_samples=10_000, delta=1e-5, batch_size=100
  )
  return analysis.DpParams(**(defaults | kwargs))


# (q, sigma, steps) on a product grid; delta cycles through four values.
_GRID = [
    (q, sigma, steps, delta)
    for (q, sigma, steps), delta in zip(
        itertools.product(
            [1e-3, 0.01, 0.1, 1.0], [0.8, 2.0, 8.0], [1, 100, 3000]
        ),
        itertools.cycle([1e-8, 1e-5, 1e-3, 1e-6]),
    )
]


# The default suite checks a wider 48-setting grid in epsilon_grid_test.py;
# this one (with the dense default orders) runs with -m slow.
@pytest.mark.slow
@pytest.mark.parametrize('q, sigma, steps, delta', _GRID)
def test_rdp_epsilon_equals_independent_dp_accounting(q, sigma, steps, delta):
  num_samples = 10_000
  params = analysis.DpParams(
      noise_multipliers=sigma,
      num_samples=num_samples,
      delta=delta,
      batch_size=round(q * num_samples),
  )
  accountant = analysis.DpsgdTrainingAccountant(dp_accountant_config=RDP)
  epsilon = accountant.compute_epsilon(steps, params)
  event = _poisson_gaussian(q, sigma, steps)
  assert epsilon == pytest.approx(
      _reference_epsilon(RDP, event, delta), rel=1e-12
  )
  default_orders = dp_accounting.rdp.RdpAccountant().compose(event)
  assert epsilon <= default_orders.get_epsilon(delta) + 1e-12


@pytest.mark.slow
@pytest.mark.parametrize(
    'q, sigma, steps, delta',
    # PLD is slow for heavy composition at small noise: skip the settings with
    # epsilon in the hundreds or thousands, which nobody trains with.
    [g for g in _GRID if not (g[1] == 0.8 and g[0] >= 0.1 and g[2] == 3000)],
)
def test_pld_epsilon_equals_independent_dp_accounting(q, sigma, steps, delta):
  num_samples = 10_000
  params = analysis.DpParams(
      noise_multipliers=sigma,
      num_samples=num_samples,
      delta=delta,
      batch_size=round(q * num_samples),
  )
  accountant = analysis.DpsgdTrainingAccountant(dp_accountant_config=PLD)
  epsilon = accountant.compute_epsilon(steps, params)
  expected = _reference_epsilon(PLD, _poisson_gaussian(q, sigma, steps), delta)
  assert epsilon == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('q, sigma, steps', [(0.01, 1.0, 500), (0.1, 2.0, 50)])
def test_pld_is_tighter_than_rdp_but_close(q, sigma, steps):
  params = _params(noise_multipliers=sigma, batch_size=round(q * 10_000))
  rdp = analysis.DpsgdTrainingAccountant(RDP).compute_epsilon(steps, params)
  pld = analysis.DpsgdTrainingAccountant(PLD).compute_epsilon(steps, params)
  assert 0.7 * rdp < pld < rdp


# Published values -------------------------------------------------------------


def _moments_accountant_epsilon(q, sigma, steps, delta, orders):
  """Epsilon by Mironov's basic RDP conversion, as the moments accountant."""
  params = analysis.DpParams(
      noise_multipliers=sigma, num_samples=60_000, delta=delta,
      batch_size=q * 60_000,
  )
  config = accountants.RdpAccountantConfig(orders=orders)
  event = analysis.DpsgdTrainingAccountant(config).dp_event(steps, params)
  rdp = config.create_accountant().compose(event).rdp
  orders = np.asarray(orders)
  return float(np.min(rdp - math.log(delta) / (orders - 1)))


def test_abadi_et_al_2016_moments_accountant():
  # Abadi et al. 2016, arXiv:1607.00133, Section 3.1: q = 0.01, sigma = 4,
  # T = 10000, delta = 1e-5 gives epsilon ~ 1.26 with the moments accountant
  # (integer moments up to 256 and the tail bound exp(alpha*rdp) / delta).
  params = analysis.DpParams(
      noise_multipliers=4.0, num_samples=60_000, delta=1e-5, batch_size=600
  )
  moments = _moments_accountant_epsilon(
      0.01, 4.0, 10_000, 1e-5, orders=list(range(2, 257))
  )
  assert moments == pytest.approx(1.26, abs=0.005)
  # The tighter conversion and PLD can only improve on it, and not by much.
  rdp = analysis.DpsgdTrainingAccountant(RDP).compute_epsilon(10_000, params)
  pld = analysis.DpsgdTrainingAccountant(PLD).compute_epsilon(10_000, params)
  assert 0.9 < pld < rdp < 1.26


def test_bu_dong_long_su_2020_mnist_moments_accountant():
  # Bu, Dong, Long, Su 2020 (Harvard Data Science Review; arXiv:1911.11607),
  # Figure 4: p = 256/60000, sigma = 0.7, 70 epochs, delta = 1e-5 gives
  # (8.68, 1e-5)-DP by the moments accountant of TensorFlow Privacy, whose
  # orders were 1.1, 1.2, ..., 10.9 and 12, ..., 63.
  orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
  steps = math.ceil(70 * 60_000 / 256)
  moments = _moments_accountant_epsilon(
      256 / 60_000, 0.7, steps, 1e-5, orders=orders
  )
  assert moments == pytest.approx(8.68, abs=0.005)


# Schedules --------------------------------------------------------------------


@pytest.mark.parametrize('config', [RDP, PLD], ids=['rdp', 'pld'])
def test_piecewise_schedules_equal_hand_composed_events(config):
  params = _params(
      noise_multipliers=[(0, 1.0), (50, 2.0)],
      num_samples=1000,
      batch_sizes=[(0, 10), (20, 40)],
      batch_size=None,
  )
  accountant = analysis.DpsgdTrainingAccountant(config)
  expected_event = dp_accounting.ComposedDpEvent([
      _poisson_gaussian(0.01, 1.0, 20),
      _poisson_gaussian(0.04, 1.0, 30),
      _poisson_gaussian(0.04, 2.0, 70),
  ])
  assert accountant.dp_event(120, params) == expected_event
  assert accountant.compute_epsilon(120, params) == pytest.approx(
      _reference_epsilon(config, expected_event, 1e-5), rel=1e-12
  )


def test_schedule_is_cut_at_num_updates():
  params = _params(noise_multipliers=[(0, 1.0), (50, 2.0)], batch_size=100)
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  assert accountant.dp_event(30, params) == _poisson_gaussian(0.01, 1.0, 30)
  assert accountant.dp_event(50, params) == _poisson_gaussian(0.01, 1.0, 50)
  assert accountant.dp_event(51, params) == dp_accounting.ComposedDpEvent(
      [_poisson_gaussian(0.01, 1.0, 50), _poisson_gaussian(0.01, 2.0, 1)]
  )


@pytest.mark.parametrize(
    'schedule', [[(0, 1.3)], ((0, 1.3),), {0: 1.3}, [(0, 1.3), (10, 1.3)]]
)
def test_single_piece_schedule_equals_constant(schedule):
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  constant = _params(noise_multipliers=1.3)
  scheduled = _params(noise_multipliers=schedule)
  assert accountant.dp_event(100, scheduled) == accountant.dp_event(
      100, constant
  )
  assert accountant.compute_epsilon(100, scheduled) == (
      accountant.compute_epsilon(100, constant)
  )


def test_batch_sizes_number_equals_batch_size():
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  assert accountant.dp_event(
      10, _params(batch_size=None, batch_sizes=100)
  ) == accountant.dp_event(10, _params(batch_size=100))


def test_batch_size_scale_schedule_scales_batch_size():
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  scaled = _params(batch_size=100, batch_size_scale_schedule=[(0, 1), (40, 4)])
  explicit = _params(batch_size=None, batch_sizes=[(0, 100), (40, 400)])
  assert accountant.dp_event(90, scaled) == accountant.dp_event(90, explicit)
  assert accountant.dp_event(90, scaled) == dp_accounting.ComposedDpEvent(
      [_poisson_gaussian(0.01, 1.0, 40), _poisson_gaussian(0.04, 1.0, 50)]
  )


# Monotonicity and edge cases --------------------------------------------------


@pytest.mark.parametrize('config', [RDP, PLD], ids=['rdp', 'pld'])
def test_more_steps_more_epsilon(config):
  accountant = analysis.DpsgdTrainingAccountant(config)
  epsilons = [
      accountant.compute_epsilon(steps, _params())
      for steps in [1, 10, 100, 1000]
  ]
  assert all(a < b for a, b in zip(epsilons, epsilons[1:]))


@pytest.mark.parametrize('config', [RDP, PLD], ids=['rdp', 'pld'])
def test_more_noise_less_epsilon(config):
  accountant = analysis.DpsgdTrainingAccountant(config)
  epsilons = [
      accountant.compute_epsilon(100, _params(noise_multipliers=sigma))
      for sigma in [0.6, 1.0, 2.0, 8.0]
  ]
  assert all(a > b for a, b in zip(epsilons, epsilons[1:]))


def test_larger_batch_more_epsilon():
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  epsilons = [
      accountant.compute_epsilon(100, _params(batch_size=b))
      for b in [10, 100, 1000, 10_000]
  ]
  assert all(a < b for a, b in zip(epsilons, epsilons[1:]))


@pytest.mark.parametrize('config', [RDP, PLD], ids=['rdp', 'pld'])
def test_zero_updates_zero_epsilon(config):
  accountant = analysis.DpsgdTrainingAccountant(config)
  assert accountant.compute_epsilon(0, _params()) == 0
  assert accountant.dp_event(0, _params()) == dp_accounting.NoOpDpEvent()


@pytest.mark.parametrize('config', [RDP, PLD], ids=['rdp', 'pld'])
@pytest.mark.parametrize(
    'noise', [0.0, [(0, 1.0), (5, 0.0)]], ids=['constant', 'schedule']
)
def test_zero_noise_gives_infinite_epsilon(config, noise):
  accountant = analysis.DpsgdTrainingAccountant(config)
  params = _params(noise_multipliers=noise, is_finite_guarantee=False)
  assert accountant.compute_epsilon(10, params) == math.inf
  # Noiseless steps after the end of training do not count.
  if not isinstance(noise, float):
    assert accountant.compute_epsilon(5, params) < math.inf


@pytest.mark.parametrize('noise', [0.0, [(0, 1.0), (5, 0.0)]])
def test_zero_noise_rejected_when_finite_guarantee_required(noise):
  with pytest.raises(
      ValueError, match='noise_multipliers.*is_finite_guarantee'
  ):
    _params(noise_multipliers=noise)


# Fixed batch size -------------------------------------------------------------


def test_fixed_batch_size_uses_replace_one_and_sampling_without_replacement():
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  params = _params(
      noise_multipliers=2.0,
      batch_size=100,
      sampling_method=analysis.SamplingMethod.FIXED_BATCH_SIZE,
  )
  assert accountant.neighboring_relation(params) is (
      NeighboringRelation.REPLACE_ONE
  )
  expected = dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(
          10_000, 100, dp_accounting.GaussianDpEvent(1.0)
      ),
      50,
  )
  assert accountant.dp_event(50, params) == expected
  reference = dp_accounting.rdp.RdpAccountant(
      orders=list(RDP.orders),
      neighboring_relation=NeighboringRelation.REPLACE_ONE,
  )
  assert accountant.compute_epsilon(50, params) == pytest.approx(
      reference.compose(expected).get_epsilon(1e-5), rel=1e-12
  )


def test_fixed_batch_size_with_pld_is_rejected():
  accountant = analysis.DpsgdTrainingAccountant(PLD)
  params = _params(sampling_method=analysis.SamplingMethod.FIXED_BATCH_SIZE)
  with pytest.raises(ValueError, match='FIXED_BATCH_SIZE.*RdpAccountantConfig'):
    accountant.compute_epsilon(10, params)


def test_poisson_uses_add_or_remove():
  accountant = analysis.DpsgdTrainingAccountant(PLD)
  assert accountant.neighboring_relation(_params()) is (
      NeighboringRelation.ADD_OR_REMOVE_ONE
  )


# Accountant API ---------------------------------------------------------------


def test_accountant_protocol_and_flags():
  accountant = analysis.DpsgdTrainingAccountant(dp_accountant_config=PLD)
  assert isinstance(accountant, analysis.TrainingAccountant)
  assert accountant.dp_accountant_config is PLD
  assert accountant.can_calibrate_steps
  assert accountant.can_calibrate_batch_size
  assert accountant.can_calibrate_noise_multipliers


def test_allow_approximate_cache_does_not_change_exact_result():
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  assert accountant.compute_epsilon(
      100, _params(), allow_approximate_cache=True
  ) == accountant.compute_epsilon(100, _params())


def test_base_accountant_is_abstract():
  with pytest.raises(TypeError):
    analysis.DpTrainingAccountant(RDP)  # pytype: disable=not-instantiable


def test_accountant_rejects_non_config():
  with pytest.raises(TypeError, match='dp_accountant_config'):
    analysis.DpsgdTrainingAccountant(dp_accountant_config='pld')


@pytest.mark.parametrize(
    'kwargs, field',
    [
        (dict(examples_per_user=2), 'examples_per_user'),
        # dp_accounting's RDP accountant has no truncated Poisson analysis.
        (dict(truncated_batch_size=50), 'truncated_batch_size'),
        (dict(cycle_length=4, batch_size=3000), 'cycle_length'),
        (
            dict(cycle_length=4,
                 sampling_method=analysis.SamplingMethod.FIXED_BATCH_SIZE),
            'cycle_length',
        ),
    ],
)
def test_unsupported_settings_are_rejected_not_ignored(kwargs, field):
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  with pytest.raises(ValueError, match=field):
    accountant.compute_epsilon(10, _params(**kwargs))


def test_cycle_length_one_is_plain_poisson():
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  assert accountant.dp_event(10, _params(cycle_length=1)) == (
      accountant.dp_event(10, _params())
  )


def test_missing_batch_size_is_rejected():
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  with pytest.raises(ValueError, match='batch_size or batch_sizes'):
    accountant.compute_epsilon(10, _params(batch_size=None))


@pytest.mark.parametrize('num_updates', [-1, 2.5, True, '10'])
def test_bad_num_updates(num_updates):
  accountant = analysis.DpsgdTrainingAccountant(RDP)
  with pytest.raises(ValueError, match='num_updates'):
    accountant.compute_epsilon(num_updates, _params())


# DpParams validation ----------------------------------------------------------


def test_dp_params_is_frozen_and_normalizes_schedules():
  params = _params(
      noise_multipliers=[[0, 1], [10, np.float32(2.0)]],
      num_samples=np.int64(1000),
      batch_size=None,
      batch_sizes={0: 10, 5: 20.0},
  )
  assert params.noise_multipliers == ((0, 1.0), (10, 2.0))
  assert params.batch_sizes == ((0, 10), (5, 20))
  assert params.num_samples == 1000 and isinstance(params.num_samples, int)
  with pytest.raises(dataclasses.FrozenInstanceError):
    params.delta = 0.1


def test_dp_params_accepts_numpy_arrays():
  params = _params(
      noise_multipliers=np.float32(1.5),
      batch_size=None,
      batch_sizes=np.array([[0, 10], [5, 20]]),
  )
  assert params.noise_multipliers == 1.5
  assert params.batch_sizes == ((0, 10), (5, 20))


def test_dp_params_positional_fields():
  params = analysis.DpParams(1.1, 60_000, 1e-5, 256)
  assert (params.noise_multipliers, params.num_samples, params.delta) == (
      1.1,
      60_000,
      1e-5,
  )
  assert params.batch_size == 256
  assert params.sampling_method is analysis.SamplingMethod.POISSON
  assert params.is_finite_guarantee


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(noise_multipliers=-1.0), r'noise_multipliers must be .*>= 0'),
        (dict(noise_multipliers=math.nan), 'noise_multipliers'),
        (dict(noise_multipliers=math.inf), 'noise_multipliers'),
        (dict(noise_multipliers='1.0'), 'noise_multipliers'),
        (dict(noise_multipliers=[(0, 1.0), (5, -2.0)]), 'noise_multipliers'),
        (dict(noise_multipliers=[(1, 1.0)]), 'noise_multipliers.*step 0'),
        (
            dict(noise_multipliers=[(0, 1.0), (0, 2.0)]),
            'noise_multipliers.*increase strictly',
        ),
        (dict(noise_multipliers=[]), 'noise_multipliers'),
        (dict(noise_multipliers=[(0, 1.0, 2)]), 'noise_multipliers'),
        (dict(noise_multipliers=[(-1, 1.0)]), 'noise_multipliers'),
        (dict(delta=0.0), r'delta must be in \(0, 1\), got 0.0'),
        (dict(delta=1.0), r'delta must be in \(0, 1\)'),
        (dict(delta=1.5), r'delta must be in \(0, 1\), got 1.5'),
        (dict(delta=-1e-5), 'delta'),
        (dict(delta=math.nan), 'delta'),
        (dict(num_samples=0), 'num_samples must be an integer >= 1, got 0'),
        (dict(num_samples=-5), 'num_samples'),
        (dict(num_samples=10.5), 'num_samples'),
        (dict(batch_size=0), 'batch_size must be an integer >= 1'),
        (dict(batch_size=10_001), r'batch_size must be in \[1, num_samples'),
        (dict(batch_size=2.5), 'batch_size'),
        (dict(batch_size=[(0, 10)]), 'batch_size must be a single integer'),
        (
            dict(batch_size=None, batch_sizes=[(0, 10), (5, 20_000)]),
            r'batch_sizes must be in \[1, num_samples=10000\]',
        ),
        (dict(batch_sizes=10), 'batch_size or batch_sizes, not both'),
        (dict(batch_size_scale_schedule=0.0), 'batch_size_scale_schedule'),
        (
            dict(batch_size_scale_schedule=[(0, 1.0), (3, -1.0)]),
            'batch_size_scale_schedule',
        ),
        (
            dict(batch_size_scale_schedule=[(0, 1.0), (3, 200.0)]),
            r'batch_size \* batch_size_scale_schedule must be in \[1,',
        ),
        (
            dict(batch_size=None, batch_size_scale_schedule=2.0),
            'batch_size_scale_schedule needs batch_size',
        ),
        (
            dict(
                batch_size_scale_schedule=1.5,
                batch_size=101,
                sampling_method=analysis.SamplingMethod.FIXED_BATCH_SIZE,
            ),
            'whole number',
        ),
        (dict(examples_per_user=0), 'examples_per_user'),
        (dict(cycle_length=0), 'cycle_length'),
        (dict(truncated_batch_size=0), 'truncated_batch_size'),
        (dict(sampling_method='poisson'), 'sampling_method'),
        (dict(is_finite_guarantee='yes'), 'is_finite_guarantee'),
    ],
)
def test_dp_params_bad_input(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _params(**kwargs)
