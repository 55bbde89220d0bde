"""Tests of matrix_factorization.optimization (scoped float64 L-BFGS)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_privacy.matrix_factorization import optimization


def test_minimises_rosenbrock_in_float64_without_global_x64():
  def rosenbrock(p):
    assert p['x'].dtype == jnp.float64
    return jnp.sum(
        100.0 * (p['x'][1:] - p['x'][:-1] ** 2) ** 2 + (1 - p['x'][:-1]) ** 2
    )

  seen = []
  result = optimization.optimize(
      rosenbrock,
      {'x': np.array([-1.2, 1.0, 0.5])},
      max_optimizer_steps=200,
      callback=lambda args: seen.append(args.loss),
  )
  np.testing.assert_allclose(result['x'], 1.0, atol=1e-6)
  assert result['x'].dtype == np.float64
  assert seen and seen[-1] < 1e-10
  assert jnp.zeros(1).dtype == jnp.float32  # x64 stayed scoped.
  assert not jax.config.jax_enable_x64


def test_callback_can_stop_early_and_bad_steps_raise():
  calls = []
  optimization.optimize(
      lambda p: jnp.sum(p**2),
      np.ones(3),
      callback=lambda a: calls.append(a.step) or True,
  )
  assert calls == [1]
  with pytest.raises(ValueError, match='max_optimizer_steps'):
    optimization.optimize(
        lambda p: jnp.sum(p**2), np.ones(3), max_optimizer_steps=0
    )
