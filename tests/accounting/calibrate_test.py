"""Tests for jax_privacy.accounting.calibrate."""

import math

import pytest

from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate

# A short grid of orders keeps these tests fast; calibration does not depend on
# which orders the accountant uses.
RDP = analysis.DpsgdTrainingAccountant(
    accountants.RdpAccountantConfig(
        orders=[1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48]
        + [64, 128, 256]
    )
)
DENSE_RDP = analysis.DpsgdTrainingAccountant(accountants.RdpAccountantConfig())
PLD = analysis.DpsgdTrainingAccountant(
    accountants.PldAccountantConfig(value_discretization_interval=1e-3)
)


def _epsilon(accountant, num_updates, noise, batch_sizes, num_samples, delta):
  params = analysis.DpParams(
      noise_multipliers=noise,
      num_samples=num_samples,
      delta=delta,
      batch_sizes=batch_sizes,
  )
  return accountant.compute_epsilon(num_updates, params)


class _ConstantAccountant:
  """A TrainingAccountant whose epsilon never changes."""

  def __init__(self, epsilon, **flags):
    self._epsilon = epsilon
    self.calls = 0
    for name, value in flags.items():
      setattr(self, name, value)

  def compute_epsilon(
      self, num_updates, dp_params, allow_approximate_cache=False
  ):
    del num_updates, dp_params, allow_approximate_cache
    self.calls += 1
    return self._epsilon


# Noise multiplier -------------------------------------------------------------


@pytest.mark.parametrize(
    'accountant, target, batch_sizes, num_updates, tol',
    [
        (DENSE_RDP, 1.0, 256, 1000, 0.01),
        (RDP, 8.0, 4096, 2500, 0.01),
        (RDP, 0.5, 100, 100, 0.05),
        (RDP, 3.0, [(0, 100), (200, 400)], 500, 0.01),
        (PLD, 2.0, 256, 500, 0.01),
    ],
    ids=['dense-rdp', 'rdp-eps8', 'rdp-tol0.05', 'rdp-schedule', 'pld'],
)
def test_noise_meets_target_and_is_within_tol(
    accountant, target, batch_sizes, num_updates, tol
):
  kwargs = dict(num_samples=50_000, delta=1e-5)
  sigma = calibrate.calibrate_noise_multiplier(
      target_epsilon=target,
      accountant=accountant,
      batch_sizes=batch_sizes,
      num_updates=num_updates,
      num_samples=kwargs['num_samples'],
      target_delta=kwargs['delta'],
      tol=tol,
  )
  assert _epsilon(accountant, num_updates, sigma, batch_sizes, **kwargs) <= (
      target
  )
  assert _epsilon(
      accountant, num_updates, sigma - tol, batch_sizes, **kwargs
  ) > target


def test_noise_bracket_grows_when_initial_max_is_too_small():
  kwargs = dict(
      target_epsilon=0.5,
      accountant=RDP,
      batch_sizes=1000,
      num_updates=1000,
      num_samples=10_000,
      target_delta=1e-5,
  )
  sigma = calibrate.calibrate_noise_multiplier(initial_max_noise=0.1, **kwargs)
  assert sigma > 2.0  # Far above the initial bracket [0, 0.1].
  assert _epsilon(RDP, 1000, sigma, 1000, 10_000, 1e-5) <= 0.5
  assert _epsilon(RDP, 1000, sigma - 0.01, 1000, 10_000, 1e-5) > 0.5
  assert calibrate.calibrate_noise_multiplier(
      initial_max_noise=100.0, **kwargs
  ) == pytest.approx(sigma, abs=0.01)


def test_noise_returns_initial_min_when_it_already_meets_target():
  sigma = calibrate.calibrate_noise_multiplier(
      target_epsilon=10.0,
      accountant=RDP,
      batch_sizes=10,
      num_updates=10,
      num_samples=10_000,
      target_delta=1e-5,
      initial_min_noise=2.0,
      initial_max_noise=4.0,
  )
  assert sigma == 2.0


def test_noise_unreachable_target_says_so():
  accountant = _ConstantAccountant(1.0)
  with pytest.raises(ValueError, match='target_epsilon=0.5 is unreachable'):
    calibrate.calibrate_noise_multiplier(
        target_epsilon=0.5,
        accountant=accountant,
        batch_sizes=10,
        num_updates=10,
        num_samples=100,
        target_delta=1e-5,
    )
  assert accountant.calls < 40  # The bracket grows geometrically.


# Number of updates ------------------------------------------------------------


@pytest.mark.parametrize(
    'accountant, target, noise, batch_sizes, initial_max',
    [
        (RDP, 1.0, 1.0, 256, 4),
        (RDP, 4.0, [(0, 0.8), (100, 1.5)], 512, 4),
        (RDP, 2.0, 1.2, [(0, 100), (50, 300)], 10_000),
        (PLD, 1.5, 1.0, 256, 4),
    ],
    ids=['rdp', 'rdp-noise-schedule', 'rdp-batch-schedule', 'pld'],
)
def test_num_updates_is_largest_meeting_target(
    accountant, target, noise, batch_sizes, initial_max
):
  num_updates = calibrate.calibrate_num_updates(
      target_epsilon=target,
      accountant=accountant,
      noise_multipliers=noise,
      batch_sizes=batch_sizes,
      num_samples=50_000,
      target_delta=1e-5,
      initial_max_updates=initial_max,
  )
  assert isinstance(num_updates, int)
  assert num_updates > initial_max or initial_max == 10_000
  epsilon = lambda n: _epsilon(accountant, n, noise, batch_sizes, 50_000, 1e-5)
  assert epsilon(num_updates) <= target < epsilon(num_updates + 1)


def test_num_updates_unreachable_target_says_so():
  with pytest.raises(ValueError, match='unreachable.*at num_updates=1, is'):
    calibrate.calibrate_num_updates(
        target_epsilon=0.01,
        accountant=RDP,
        noise_multipliers=0.5,
        batch_sizes=1000,
        num_samples=1000,
        target_delta=1e-5,
    )


# Batch size -------------------------------------------------------------------


@pytest.mark.parametrize(
    'accountant, target, noise, num_updates',
    [
        (RDP, 1.0, 1.0, 1000),
        (RDP, 3.0, [(0, 2.0), (10, 0.9)], 100),
        (PLD, 2.0, 1.0, 200),
    ],
    ids=['rdp', 'rdp-noise-schedule', 'pld'],
)
def test_batch_size_is_largest_meeting_target(
    accountant, target, noise, num_updates
):
  batch_size = calibrate.calibrate_batch_size(
      target_epsilon=target,
      accountant=accountant,
      noise_multipliers=noise,
      num_updates=num_updates,
      num_samples=50_000,
      target_delta=1e-5,
  )
  assert isinstance(batch_size, int) and batch_size > 8
  epsilon = lambda b: _epsilon(accountant, num_updates, noise, b, 50_000, 1e-5)
  assert epsilon(batch_size) <= target < epsilon(batch_size + 1)


def test_batch_size_is_capped_at_num_samples():
  batch_size = calibrate.calibrate_batch_size(
      target_epsilon=50.0,
      accountant=RDP,
      noise_multipliers=10.0,
      num_updates=10,
      num_samples=1000,
      target_delta=1e-5,
  )
  assert batch_size == 1000


def test_batch_size_unreachable_target_says_so():
  with pytest.raises(ValueError, match='unreachable.*at batch_size=1, is'):
    calibrate.calibrate_batch_size(
        target_epsilon=0.01,
        accountant=RDP,
        noise_multipliers=0.5,
        num_updates=10_000,
        num_samples=1000,
        target_delta=1e-5,
    )


# Bad input --------------------------------------------------------------------

_NOISE_ARGS = dict(
    target_epsilon=1.0,
    accountant=RDP,
    batch_sizes=100,
    num_updates=100,
    num_samples=1000,
    target_delta=1e-5,
)
_STEPS_ARGS = dict(
    target_epsilon=1.0,
    accountant=RDP,
    noise_multipliers=1.0,
    batch_sizes=100,
    num_samples=1000,
    target_delta=1e-5,
)
_BATCH_ARGS = dict(
    target_epsilon=1.0,
    accountant=RDP,
    noise_multipliers=1.0,
    num_updates=100,
    num_samples=1000,
    target_delta=1e-5,
)
_CALIBRATORS = [
    (calibrate.calibrate_noise_multiplier, _NOISE_ARGS),
    (calibrate.calibrate_num_updates, _STEPS_ARGS),
    (calibrate.calibrate_batch_size, _BATCH_ARGS),
]
_IDS = ['noise', 'num_updates', 'batch_size']


@pytest.mark.parametrize('calibrator, args', _CALIBRATORS, ids=_IDS)
@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(target_epsilon=0.0), 'target_epsilon must be finite and > 0'),
        (dict(target_epsilon=-1.0), 'target_epsilon'),
        (dict(target_epsilon=math.nan), 'target_epsilon'),
        (dict(target_epsilon=math.inf), 'target_epsilon'),
        (dict(target_delta=0.0), r'target_delta must be in \(0, 1\)'),
        (dict(target_delta=1.0), 'target_delta'),
        (dict(target_delta=1.5), 'target_delta'),
        (dict(num_samples=0), 'num_samples'),
        (dict(tol=0.0), 'tol'),
        (dict(tol=math.nan), 'tol'),
    ],
)
def test_bad_input_is_rejected(calibrator, args, kwargs, message):
  with pytest.raises(ValueError, match=message):
    calibrator(**(args | kwargs))


@pytest.mark.parametrize(
    'calibrator, kwargs, message',
    [
        (
            calibrate.calibrate_noise_multiplier,
            dict(num_updates=0),
            'num_updates',
        ),
        (
            calibrate.calibrate_noise_multiplier,
            dict(batch_sizes=1001),
            r'batch_sizes must be in \[1, num_samples=1000\]',
        ),
        (
            calibrate.calibrate_noise_multiplier,
            dict(initial_min_noise=-1.0),
            'initial_min_noise',
        ),
        (
            calibrate.calibrate_noise_multiplier,
            dict(initial_min_noise=2.0),
            'initial_min_noise',
        ),
        (
            calibrate.calibrate_noise_multiplier,
            dict(initial_max_noise=0.0),
            'initial_max_noise',
        ),
        (
            calibrate.calibrate_num_updates,
            dict(noise_multipliers=-1.0),
            'noise_multipliers',
        ),
        (
            calibrate.calibrate_num_updates,
            dict(noise_multipliers=0.0),
            'noise_multipliers',
        ),
        (
            calibrate.calibrate_num_updates,
            dict(initial_min_updates=0),
            'initial_min_updates',
        ),
        (
            calibrate.calibrate_num_updates,
            dict(initial_min_updates=5, initial_max_updates=4),
            'initial_max_updates',
        ),
        (calibrate.calibrate_batch_size, dict(num_updates=0), 'num_updates'),
        (
            calibrate.calibrate_batch_size,
            dict(initial_min_batch_size=1001),
            'initial_min_batch_size',
        ),
        (
            calibrate.calibrate_batch_size,
            dict(noise_multipliers=math.nan),
            'noise_multipliers',
        ),
    ],
)
def test_bad_specific_input_is_rejected(calibrator, kwargs, message):
  args = {
      calibrate.calibrate_noise_multiplier: _NOISE_ARGS,
      calibrate.calibrate_num_updates: _STEPS_ARGS,
      calibrate.calibrate_batch_size: _BATCH_ARGS,
  }[calibrator]
  with pytest.raises(ValueError, match=message):
    calibrator(**(args | kwargs))


@pytest.mark.parametrize('calibrator, args', _CALIBRATORS, ids=_IDS)
def test_accountant_must_be_a_training_accountant(calibrator, args):
  with pytest.raises(TypeError, match='accountant'):
    calibrator(**(args | dict(accountant='rdp')))


@pytest.mark.parametrize(
    'calibrator, args, flag',
    [
        (*_CALIBRATORS[0], 'can_calibrate_noise_multipliers'),
        (*_CALIBRATORS[1], 'can_calibrate_steps'),
        (*_CALIBRATORS[2], 'can_calibrate_batch_size'),
    ],
)
def test_accountant_flags_are_respected(calibrator, args, flag):
  accountant = _ConstantAccountant(0.1, **{flag: False})
  with pytest.raises(ValueError, match=flag):
    calibrator(**(args | dict(accountant=accountant)))
  assert accountant.calls == 0
