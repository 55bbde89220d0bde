"""Epsilon of DpsgdTrainingAccountant on a wide grid, against dp_accounting.

The grid spans q from 1e-4 to 1, sigma from 0.5 to 20, 1 to 1e5 steps and
delta from 1e-8 to 1e-3 (48 settings). The reference is dp_accounting's own
accountant applied to the DP-SGD event built here by hand; RDP must agree
exactly, PLD within its discretisation (the same grid gives the same value;
a grid 10x finer may only lower it, by about the interval per step at most).
Known published values are in analysis_test.py.
"""

import itertools
import logging

import dp_accounting
import pytest

from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis

logging.getLogger('absl').setLevel(logging.ERROR)

_QS = [1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0]
_SIGMAS = [0.5, 1.0, 2.0, 5.0, 20.0]
_STEPS = [1, 10, 1000, 100_000]
_DELTAS = [1e-8, 1e-6, 1e-5, 1e-3]

# 48 settings: every q with every step count, cycling sigma and delta.
_GRID = [
    (q, sigma, steps, delta)
    for (q, steps), sigma, delta in zip(
        list(itertools.product(_QS, _STEPS)) * 2,
        itertools.cycle(_SIGMAS),
        itertools.cycle(_DELTAS + _DELTAS[::-1][1:]),
    )
]

# A grid like dp_accounting's default one (RDP must agree at any orders).
_ORDERS = (1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 8.0,
           10.0, 12.0, 14.0, 16.0, 20.0, 24.0, 28.0, 32.0, 64.0, 256.0)


def _event(q, sigma, steps):
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma)), steps)


def _params(q, sigma, delta, num_samples=100_000):
  return analysis.DpParams(noise_multipliers=sigma, num_samples=num_samples,
                           delta=delta, batch_size=round(q * num_samples))


def test_grid_spans_the_required_ranges():
  assert len(_GRID) >= 40
  assert len(set(_GRID)) == len(_GRID)
  for values, column in ((_QS, 0), (_SIGMAS, 1), (_STEPS, 2), (_DELTAS, 3)):
    assert {setting[column] for setting in _GRID} == set(values)


@pytest.mark.parametrize('q, sigma, steps, delta', _GRID)
def test_rdp_equals_dp_accounting(q, sigma, steps, delta):
  config = accountants.RdpAccountantConfig(orders=_ORDERS)
  epsilon = analysis.DpsgdTrainingAccountant(config).compute_epsilon(
      steps, _params(q, sigma, delta))
  reference = dp_accounting.rdp.RdpAccountant(list(_ORDERS)).compose(
      _event(q, sigma, steps)).get_epsilon(delta)
  assert epsilon == pytest.approx(reference, rel=1e-12, abs=1e-12)


def _pld_is_cheap(q, sigma, steps):
  # PLD of heavy composition at small noise takes seconds per setting.
  return steps <= 1000 or sigma >= 5.0 or q <= 1e-3


@pytest.mark.parametrize(
    'q, sigma, steps, delta',
    [s if _pld_is_cheap(*s[:3]) else pytest.param(*s, marks=pytest.mark.slow)
     for s in _GRID])
def test_pld_equals_dp_accounting_within_discretisation(q, sigma, steps, delta):
  config = accountants.PldAccountantConfig(value_discretization_interval=1e-3)
  epsilon = analysis.DpsgdTrainingAccountant(config).compute_epsilon(
      steps, _params(q, sigma, delta))
  reference = dp_accounting.pld.PLDAccountant(
      value_discretization_interval=1e-3).compose(
          _event(q, sigma, steps)).get_epsilon(delta)
  assert epsilon == pytest.approx(reference, rel=1e-12, abs=1e-12)
  rdp = dp_accounting.rdp.RdpAccountant(list(_ORDERS)).compose(
      _event(q, sigma, steps)).get_epsilon(delta)
  # PLD is the tighter analysis, up to its pessimistic rounding, which grows
  # with the number of composed steps (at 1e5 steps on a 1e-3 grid it can
  # exceed RDP: both remain upper bounds).
  if steps <= 1000:
    assert epsilon <= rdp + 1e-3 * steps + 1e-9
