"""Tests of matrix_factorization.dense (multi-epoch dense strategies)."""

import numpy as np
import pytest

from jax_privacy.matrix_factorization import dense
from jax_privacy.matrix_factorization import sensitivity


def test_strategy_from_x_is_lower_triangular_factor():
  rng = np.random.default_rng(0)
  factor = rng.normal(size=(6, 6))
  X = factor.T @ factor + np.eye(6)  # pylint: disable=invalid-name
  strategy = dense.strategy_from_X(X)
  assert np.all(np.triu(strategy, 1) == 0)
  np.testing.assert_allclose(strategy.T @ strategy, X, atol=1e-10)
  np.testing.assert_allclose(
      dense.per_query_error(X=X),
      dense.per_query_error(strategy=strategy),
      rtol=1e-9,
  )
  workload = np.tril(np.ones((6, 6)))
  np.testing.assert_allclose(
      dense.per_query_error(X=X),
      np.diag(workload @ np.linalg.inv(X) @ workload.T),
      rtol=1e-9,
  )


def test_orthogonal_mask():
  mask = dense.get_orthogonal_mask(6, epochs=2)
  assert not mask[0, 3] and not mask[4, 1] and mask[0, 0] and mask[0, 1]
  assert mask.sum() == 36 - 6


@pytest.mark.slow
def test_optimize_beats_identity_under_fixed_epochs():
  n, epochs = 8, 2
  X = dense.optimize(n, epochs=epochs, equal_norm=True, max_optimizer_steps=30)  # pylint: disable=invalid-name
  strategy = dense.strategy_from_X(X)
  np.testing.assert_allclose(np.diag(X), 1.0, rtol=1e-9)
  loss = (
      sensitivity.fixed_epoch_sensitivity_squared(np.abs(strategy), epochs)
      * dense.per_query_error(strategy=strategy).mean()
  )
  identity = epochs * dense.per_query_error(strategy=np.eye(n)).mean()
  assert loss < identity


@pytest.mark.parametrize(
    'call, field',
    [
        (lambda: dense.optimize(6, epochs=4), 'epochs'),
        (lambda: dense.optimize(4, bands=5), 'bands'),
        (
            lambda: dense.strategy_from_X(np.array([[1.0, 2.0], [2.0, 1.0]])),
            'positive definite',
        ),
        (
            lambda: dense.strategy_from_X(np.array([[1.0, 0.5], [0.0, 1.0]])),
            'symmetric',
        ),
        (
            lambda: dense.per_query_error(strategy=np.ones((3, 3))),
            'lower-triangular',
        ),
        (lambda: dense.per_query_error(), 'strategy'),
    ],
)
def test_bad_input_raises(call, field):
  with pytest.raises(ValueError, match=field):
    call()
