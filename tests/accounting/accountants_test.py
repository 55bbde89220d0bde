"""Tests for jax_privacy.accounting.accountants."""

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest

from jax_privacy.accounting import accountants

NeighboringRelation = dp_accounting.NeighboringRelation


def _dpsgd(q, sigma, steps):
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma)
      ),
      steps,
  )


def test_default_orders_are_a_dense_grid_containing_dp_accounting_defaults():
  orders = accountants.RdpAccountantConfig().orders
  assert all(o > 1 for o in orders)
  assert list(orders) == sorted(set(orders))
  assert min(orders) <= 1.01 and max(orders) >= 1024
  assert set(dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS) <= (
      set(orders)
  )
  assert sum(1 < o < 2 for o in orders) >= 15  # Fine steps near 1.


@pytest.mark.parametrize(
    'q, sigma, steps',
    [(0.001, 20.0, 1), (0.01, 4.0, 1000), (0.1, 1.0, 100), (1.0, 50.0, 10)],
)
def test_default_orders_never_worse_than_dp_accounting_defaults(
    q, sigma, steps
):
  ours = accountants.RdpAccountantConfig().create_accountant()
  theirs = dp_accounting.rdp.RdpAccountant()
  ours_epsilon = ours.compose(_dpsgd(q, sigma, steps)).get_epsilon(1e-5)
  their_epsilon = theirs.compose(_dpsgd(q, sigma, steps)).get_epsilon(1e-5)
  assert ours_epsilon <= their_epsilon + 1e-12


@pytest.mark.parametrize(
    'config, accountant_type',
    [
        (accountants.RdpAccountantConfig(), dp_accounting.rdp.RdpAccountant),
        (accountants.PldAccountantConfig(), dp_accounting.pld.PLDAccountant),
    ],
)
@pytest.mark.parametrize(
    'relation', [None, *dp_accounting.NeighboringRelation]
)
def test_create_accountant_type_and_relation(config, accountant_type, relation):
  if relation is None:
    accountant = config.create_accountant()
    relation = NeighboringRelation.ADD_OR_REMOVE_ONE
  else:
    accountant = config.create_accountant(relation)
  assert isinstance(accountant, accountant_type)
  assert accountant.neighboring_relation is relation
  assert accountant.get_epsilon(1e-5) == 0  # Fresh: nothing composed.


def test_create_accountant_returns_independent_accountants():
  config = accountants.PldAccountantConfig(value_discretization_interval=1e-3)
  first = config.create_accountant().compose(_dpsgd(0.1, 1.0, 10))
  second = config.create_accountant()
  assert first.get_epsilon(1e-5) > 0
  assert second.get_epsilon(1e-5) == 0


def test_rdp_orders_are_used():
  config = accountants.RdpAccountantConfig(orders=[2, 3.5, 32])
  accountant = config.create_accountant()
  np.testing.assert_array_equal(accountant.orders, [2.0, 3.5, 32.0])
  assert config.orders == (2.0, 3.5, 32.0)


def test_rdp_orders_accepts_numpy_and_is_immutable():
  config = accountants.RdpAccountantConfig(orders=np.array([1.5, 2.0]))
  assert config.orders == (1.5, 2.0)
  assert hash(config) == hash(accountants.RdpAccountantConfig([1.5, 2.0]))
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.orders = (3.0,)


def test_pld_discretization_is_used():
  coarse = accountants.PldAccountantConfig(value_discretization_interval=1e-2)
  fine = accountants.PldAccountantConfig(value_discretization_interval=1e-3)
  event = _dpsgd(0.01, 1.0, 100)
  coarse_epsilon = coarse.create_accountant().compose(event).get_epsilon(1e-5)
  fine_epsilon = fine.create_accountant().compose(event).get_epsilon(1e-5)
  # Both are upper bounds; the finer grid is tighter but close.
  assert fine_epsilon < coarse_epsilon < fine_epsilon * 1.5


def test_base_class_is_abstract():
  with pytest.raises(TypeError):
    accountants.DpAccountantConfig()  # pytype: disable=not-instantiable


@pytest.mark.parametrize(
    'orders',
    [[], [1.0], [2.0, 0.5], [2.0, math.nan], [math.inf], [True], 'abc', 3.0],
)
def test_bad_orders_raise(orders):
  with pytest.raises(ValueError, match='orders'):
    accountants.RdpAccountantConfig(orders=orders)


@pytest.mark.parametrize('value', [0.0, -1e-4, math.nan, math.inf, '1e-4'])
def test_bad_discretization_raises(value):
  with pytest.raises(
      ValueError, match=r'value_discretization_interval must be .*> 0'
  ):
    accountants.PldAccountantConfig(value_discretization_interval=value)
