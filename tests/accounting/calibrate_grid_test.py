"""Calibration on a grid with the exact PLD accountant (the fast path).

For each calibrator the returned value meets the target according to the
exact accountant, and the next value toward less privacy (noise - tol,
steps + 1, batch size + 1) exceeds it. The staged search (coarse PLD first)
must also agree with a plain bisection that only uses the exact accountant,
and use few exact evaluations.
"""

import logging

import pytest

from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate
from _counting_accountant import CountingAccountant  # pylint: disable=g-import-not-at-top

logging.getLogger('absl').setLevel(logging.ERROR)

# The exact accountant of these tests; its coarse stage is PLD on 1e-2.
_FINE = accountants.PldAccountantConfig(value_discretization_interval=1e-3)


def _accountant():
  return CountingAccountant(_FINE)


def _epsilon(noise, batch_size, steps, num_samples, delta=1e-5):
  params = analysis.DpParams(noise_multipliers=noise, num_samples=num_samples,
                             delta=delta, batch_size=batch_size)
  return analysis.DpsgdTrainingAccountant(_FINE).compute_epsilon(steps, params)


def _plain_bisection(epsilon, target, low, high, tol):
  while high - low > tol:
    middle = (low + high) / 2
    if epsilon(middle) <= target:
      high = middle
    else:
      low = middle
  return high


@pytest.mark.parametrize('target, batch_size, steps, num_samples', [
    (1.0, 256, 300, 60_000),
    (8.0, 4096, 50, 50_000),
    (0.5, 100, 20, 1000),
    (3.0, 1000, 100, 10_000),
])
def test_noise_grid(target, batch_size, steps, num_samples):
  accountant = _accountant()
  tol = 0.01
  sigma = calibrate.calibrate_noise_multiplier(
      target_epsilon=target, accountant=accountant, batch_sizes=batch_size,
      num_updates=steps, num_samples=num_samples, target_delta=1e-5, tol=tol)
  assert _epsilon(sigma, batch_size, steps, num_samples) <= target
  assert _epsilon(sigma - tol, batch_size, steps, num_samples) > target
  assert accountant.calls[1e-3] <= 6  # Exact evaluations: a handful.
  assert accountant.calls[1e-2] >= 5  # The coarse stage did the search.


def test_noise_agrees_with_plain_bisection():
  args = dict(batch_size=1000, steps=100, num_samples=10_000)
  sigma = calibrate.calibrate_noise_multiplier(
      target_epsilon=3.0, accountant=_accountant(), batch_sizes=1000,
      num_updates=100, num_samples=10_000, target_delta=1e-5, tol=0.01)
  plain = _plain_bisection(
      lambda s: _epsilon(s, **args), 3.0, 0.5, 4.5, 0.01)
  assert abs(plain - sigma) <= 0.01


@pytest.mark.parametrize('target, noise, batch_size, num_samples', [
    (1.0, 1.0, 256, 60_000),
    (2.0, 2.0, 1000, 10_000),
    (4.0, 0.8, 50, 1000),
])
def test_num_updates_grid(target, noise, batch_size, num_samples):
  steps = calibrate.calibrate_num_updates(
      target_epsilon=target, accountant=_accountant(),
      noise_multipliers=noise, batch_sizes=batch_size,
      num_samples=num_samples, target_delta=1e-5)
  assert _epsilon(noise, batch_size, steps, num_samples) <= target
  assert _epsilon(noise, batch_size, steps + 1, num_samples) > target


@pytest.mark.parametrize('target, noise, steps, num_samples', [
    (1.0, 1.0, 100, 60_000),
    (2.0, 1.5, 200, 10_000),
    (0.8, 3.0, 30, 1000),
])
def test_batch_size_grid(target, noise, steps, num_samples):
  batch_size = calibrate.calibrate_batch_size(
      target_epsilon=target, accountant=_accountant(),
      noise_multipliers=noise, num_updates=steps, num_samples=num_samples,
      target_delta=1e-5)
  assert _epsilon(noise, batch_size, steps, num_samples) <= target
  assert _epsilon(noise, batch_size + 1, steps, num_samples) > target


def test_cyclic_batch_size_is_capped_by_the_group_size():
  accountant = analysis.DpsgdTrainingAccountant(
      accountants.RdpAccountantConfig())
  batch_size = calibrate.calibrate_batch_size(
      target_epsilon=50.0, accountant=accountant, noise_multipliers=5.0,
      num_updates=10, num_samples=1000, target_delta=1e-5, cycle_length=4)
  assert batch_size == 250


class _Floor(analysis.DpsgdTrainingAccountant):
  """Epsilon never below 0.7, whatever the noise."""

  def compute_epsilon(self, num_updates, dp_params,
                      allow_approximate_cache=False):
    return max(0.7, super().compute_epsilon(num_updates, dp_params))


def test_unreachable_noise_target_says_what_is_reachable():
  with pytest.raises(ValueError,
                     match='unreachable.*epsilon=0.7, the smallest reachable'):
    calibrate.calibrate_noise_multiplier(
        target_epsilon=0.5, accountant=_Floor(
            accountants.RdpAccountantConfig(orders=[2.0, 4.0])),
        batch_sizes=1000, num_updates=10, num_samples=1000,
        target_delta=1e-5)
