"""Tests of experimental.execution_plan."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_privacy import noise_addition
from jax_privacy.accounting import accountants
from jax_privacy.experimental import accounting as dp_events
from jax_privacy.experimental import execution_plan
from jax_privacy.matrix_factorization import banded

PLD = accountants.PldAccountantConfig(1e-3)


def _epsilon(event, delta=1e-5):
  accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
  accountant.compose(event)
  return accountant.get_epsilon(delta)


def test_bandmf_calibration_meets_the_target_tightly():
  config = execution_plan.BandMFExecutionPlanConfig.default(
      4, 64, epsilon=2.0, delta=1e-5, sampling_prob=0.5, noise_seed=0,
      accountant=PLD,
  )
  sigma = config.calibrated_noise_multiplier
  independent = dp_events.dpsgd_event(sigma, 16, sampling_prob=0.5)
  assert config.plan.dp_event == independent
  assert _epsilon(independent) <= 2.0
  assert _epsilon(dp_events.dpsgd_event(0.99 * sigma, 16, sampling_prob=0.5)) > 2.0
  sampler = config.plan.batch_selection_strategy
  assert sampler.cycle_length == 4 and sampler.sampling_prob == 0.5


def test_one_band_is_dpsgd():
  config = execution_plan.BandMFExecutionPlanConfig.default(
      1, 20, noise_multiplier=1.3, delta=1e-5, sampling_prob=0.1,
      noise_seed=5, rescale_to_unit_norm=False, l2_clip_norm=2.0,
      normalize_by=10.0,
  )
  plan = config.plan
  assert plan.dp_event == dp_events.dpsgd_event(1.3, 20, sampling_prob=0.1)
  gaussian = noise_addition.gaussian_privatizer(
      stddev=1.3 * 2.0 / 10.0, prng_key=jax.random.key(5)
  )
  grads = {'w': jnp.ones((3, 4)), 'b': jnp.zeros(4)}
  mf_state = plan.noise_addition_transform.init(grads)
  g_state = gaussian.init(grads)
  for _ in range(3):
    mf_out, mf_state = plan.noise_addition_transform.update(grads, mf_state)
    g_out, g_state = gaussian.update(grads, g_state)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        mf_out,
        g_out,
    )
  assert plan.batch_selection_strategy.cycle_length == 1
  dpsgd = execution_plan.DpsgdExecutionPlanConfig(
      iterations=20, num_examples=100, expected_batch_size=10, delta=1e-5,
      noise_multiplier=1.3, noise_seed=5,
  )
  assert dpsgd.plan.dp_event == plan.dp_event


def test_bandmf_validation():
  strategy = banded.ColumnNormalizedBanded.default(10, 2)
  common = dict(strategy=strategy, delta=1e-5, noise_seed=0)
  with pytest.raises(ValueError, match='noise_seed'):
    execution_plan.BandMFExecutionPlanConfig(
        iterations=10, strategy=strategy, delta=1e-5, noise_multiplier=1.0
    )
  with pytest.raises(ValueError, match='iterations'):
    execution_plan.BandMFExecutionPlanConfig(
        iterations=11, noise_multiplier=1.0, **common
    )
  with pytest.raises(ValueError, match='target'):
    execution_plan.BandMFExecutionPlanConfig(
        iterations=10, noise_multiplier=0.1, epsilon=1.0, accountant=PLD,
        **common,
    )
  with pytest.raises(ValueError, match='strategy'):
    execution_plan.BandMFExecutionPlanConfig(
        iterations=10, strategy=np.eye(10), delta=1e-5, noise_multiplier=1.0,
        noise_seed=0,
    )
  with pytest.raises(ValueError, match='sampling_prob'):
    execution_plan.BandMFExecutionPlanConfig(
        iterations=10, noise_multiplier=1.0, sampling_prob=1.5, **common
    )
  with pytest.raises(ValueError, match='num_examples'):
    execution_plan.BandMFExecutionPlanConfig(
        iterations=10, noise_multiplier=1.0, truncated_batch_size=4, **common
    )


def test_dpsgd_plan_pieces_agree():
  config = execution_plan.DpsgdExecutionPlanConfig(
      iterations=50, num_examples=1000, expected_batch_size=50, delta=1e-5,
      epsilon=2.0, noise_seed=1, l2_clip_norm=3.0, accountant=PLD,
  )
  plan = config.plan
  sigma = config.calibrated_noise_multiplier
  assert config.epsilon_after(50) <= 2.0
  assert plan.dp_event == dp_events.dpsgd_event(sigma, 50, sampling_prob=0.05)
  grad_fn = plan.clipped_grad(lambda p, x: jnp.sum(p * x), batch_argnums=1)
  assert grad_fn.sensitivity() == pytest.approx(3.0 / 50)
  assert config.sensitivity == pytest.approx(grad_fn.sensitivity())
  assert plan.batch_selection_strategy.sampling_prob == pytest.approx(0.05)
