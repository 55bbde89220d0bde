"""Tests of jax_privacy.training.DPTrainer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_privacy import batch_selection
from jax_privacy import training
from jax_privacy.accounting import accountants
from jax_privacy.experimental import execution_plan

N = 400


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, 5)).astype(np.float32)
  w = np.array([1.5, -2.0, 0.5, 0.0, 1.0], np.float32)
  y = (x @ w > 0).astype(np.float32)
  return x, y


def _loss(params, example, key):
  del key
  x, y = example
  logits = x @ params['w'] + params['b']
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))


def _params():
  return {'w': jnp.zeros(5), 'b': jnp.zeros(())}


def _config(**kwargs):
  defaults = dict(
      iterations=30,
      num_examples=N,
      expected_batch_size=40,
      delta=1e-5,
      noise_multiplier=1.0,
      noise_seed=3,
      l2_clip_norm=1.0,
      accountant=accountants.PldAccountantConfig(1e-3),
  )
  defaults.update(kwargs)
  return execution_plan.DpsgdExecutionPlanConfig(**defaults)


def _trainer(config=None, **kwargs):
  return training.DPTrainer(
      loss_fn=_loss,
      config=config or _config(),
      optimizer=optax.sgd(0.5),
      sampling_seed=11,
      **kwargs,
  )


def _accuracy(params, x, y):
  return float(np.mean(((x @ params['w'] + params['b']) > 0) == (y > 0.5)))


def test_fit_learns_within_budget():
  x, y = _data()
  trainer = _trainer(_config(epsilon=4.0, noise_multiplier=None))
  seen = []
  state = trainer.fit(
      (x, y), trainer.init(_params()), callbacks=[seen.append], callback_every=10
  )
  assert int(state.step) == 30
  assert _accuracy(state.params, x, y) > 0.85
  spent = trainer.epsilon_spent(state)
  assert 3.5 < spent <= 4.0
  assert [p.step for p in seen] == [10, 20, 30]
  assert [p.epsilon for p in seen] == sorted(p.epsilon for p in seen)
  assert seen[-1].epsilon == pytest.approx(spent)


def test_gradient_accumulation_gives_the_same_result():
  x, y = _data()
  small = _trainer(physical_batch_size=8)
  large = _trainer(physical_batch_size=128)
  a = small.fit((x, y), small.init(_params()))
  b = large.fit((x, y), large.init(_params()))
  jax.tree_util.tree_map(
      lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
      a.params,
      b.params,
  )


def test_resumed_run_equals_uninterrupted_run_bitwise():
  x, y = _data()
  trainer = _trainer()
  full = trainer.fit((x, y), trainer.init(_params()))
  resumed_trainer = _trainer()
  part = resumed_trainer.fit((x, y), resumed_trainer.init(_params()), num_steps=13)
  assert int(part.step) == 13
  rest = resumed_trainer.fit((x, y), part)
  jax.tree_util.tree_map(np.testing.assert_array_equal, full.params, rest.params)
  assert int(rest.step) == 30
  assert resumed_trainer.epsilon_spent(rest) == trainer.epsilon_spent(full)


def test_never_runs_past_the_plan(caplog):
  x, y = _data()
  trainer = _trainer()
  state = trainer.fit((x, y), trainer.init(_params()), num_steps=1000)
  assert int(state.step) == 30
  assert 'plan' in caplog.text
  again = trainer.fit((x, y), state)
  assert int(again.step) == 30


def test_step_is_the_plan_mechanism():
  """One fit step equals clipped sum / B + the privatizer's noise, by hand."""
  x, y = _data()
  config = _config(iterations=1)
  trainer = _trainer(config)
  state = trainer.fit((x, y), trainer.init(_params()))
  indices = next(
      batch_selection.CyclicPoissonSampling(
          sampling_prob=config.sampling_prob, iterations=1
      ).batch_iterator(N, rng=np.random.default_rng(11))
  )
  per_example = jax.vmap(
      lambda xi, yi: jax.grad(_loss)(_params(), (xi[None], yi[None]), None)
  )(x[indices], y[indices])
  flat = np.concatenate(
      [np.asarray(per_example['b'])[:, None], np.asarray(per_example['w'])],
      axis=1,
  )
  factors = np.minimum(1.0, 1.0 / np.linalg.norm(flat, axis=1))
  total = {
      'w': np.sum(np.asarray(per_example['w']) * factors[:, None], axis=0),
      'b': np.sum(np.asarray(per_example['b']) * factors),
  }
  mean = jax.tree_util.tree_map(lambda t: t / 40, total)
  privatizer = config.plan.noise_addition_transform
  noisy, _ = privatizer.update(mean, privatizer.init(_params()))
  expected = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, _params(), noisy)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
      state.params,
      expected,
  )
  assert config.sensitivity == pytest.approx(1.0 / 40)


def test_bad_input():
  x, y = _data()
  trainer = _trainer()
  with pytest.raises(ValueError, match='num_examples'):
    trainer.fit((x[:10], y[:10]), trainer.init(_params()))
  with pytest.raises(ValueError, match='physical_batch_size'):
    _trainer(physical_batch_size=0)
  with pytest.raises(ValueError, match='sampling_seed'):
    training.DPTrainer(
        loss_fn=_loss, config=_config(), optimizer=optax.sgd(1.0),
        sampling_seed=None,
    )
  with pytest.raises(ValueError, match='callback_every'):
    trainer.fit((x, y), trainer.init(_params()), callback_every=0)
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match='num_steps'):
      trainer.fit((x, y), trainer.init(_params()), num_steps=bad)


@pytest.mark.parametrize(
    'kwargs, field',
    [
        (dict(noise_multiplier=None), 'epsilon'),
        (dict(epsilon=1.0), 'noise_multiplier'),
        (dict(delta=1.0), 'delta'),
        (dict(expected_batch_size=N + 1), 'expected_batch_size'),
        (dict(l2_clip_norm=float('nan')), 'l2_clip_norm'),
        (dict(epsilon=-1.0, noise_multiplier=None), 'epsilon'),
        (dict(iterations=0), 'iterations'),
    ],
)
def test_plan_config_validation(kwargs, field):
  with pytest.raises(ValueError, match=field):
    _config(**kwargs)


def test_checkpoint_resume_after_a_kill_is_bitwise_identical(tmp_path):
  x, y = _data()
  uninterrupted = _trainer()
  full = uninterrupted.fit((x, y), uninterrupted.init(_params()))

  class Killed(Exception):
    pass

  def kill_at_17(progress):
    if progress.step == 17:
      raise Killed

  first = _trainer()
  with pytest.raises(Killed):
    first.fit(
        (x, y), first.init(_params()), checkpoint_dir=str(tmp_path),
        checkpoint_every=5, callbacks=[kill_at_17], callback_every=1,
    )
  second = _trainer()
  restored = second.restore(str(tmp_path), _params())
  assert int(restored.step) == 15  # steps 16 and 17 are re-run, identically
  final = second.fit((x, y), restored, checkpoint_dir=str(tmp_path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, full.params, final.params)
  jax.tree_util.tree_map(
      np.testing.assert_array_equal,
      jax.tree_util.tree_map(
          lambda l: jax.random.key_data(l) if training._is_key(l) else l,
          full.opt_state,
      ),
      jax.tree_util.tree_map(
          lambda l: jax.random.key_data(l) if training._is_key(l) else l,
          final.opt_state,
      ),
  )
  assert second.epsilon_spent(final) == uninterrupted.epsilon_spent(full)
  assert int(second.restore(str(tmp_path), _params()).step) == 30


def test_restore_without_checkpoint_starts_fresh(tmp_path):
  trainer = _trainer()
  state = trainer.restore(str(tmp_path / 'none'), _params())
  assert int(state.step) == 0


def test_restore_refuses_a_checkpoint_of_another_plan(tmp_path):
  x, y = _data()
  trainer = _trainer()
  trainer.fit(
      (x, y), trainer.init(_params()), num_steps=2, checkpoint_dir=str(tmp_path)
  )
  other = _trainer(_config(noise_multiplier=2.0))
  with pytest.raises(ValueError, match='privacy'):
    other.restore(str(tmp_path), _params())
  before = sorted(p.name for p in tmp_path.iterdir())
  with pytest.raises(ValueError, match='privacy'):
    other.fit((x, y), other.init(_params()), checkpoint_dir=str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_variable_poisson_batches_compile_once():
  x, y = _data()
  trainer = _trainer(physical_batch_size=16)
  state = trainer.fit((x, y), trainer.init(_params()))
  assert int(state.step) == 30
  # Batch sizes vary around 40 (2-4 chunks of 16): one compiled shape each.
  assert trainer._accumulate._cache_size() == 1
  assert trainer._apply._cache_size() == 1


def test_extra_gradients_enter_before_normalisation_and_noise():
  """A canary sum c at step 0 moves the parameters by -lr * c / B."""
  x, y = _data()
  config = _config(iterations=1, noise_multiplier=0.0)
  canary = {'w': jnp.arange(5.0), 'b': jnp.array(2.0)}
  plain = _trainer(config).fit((x, y), _trainer(config).init(_params()))
  with_canary_trainer = _trainer(
      config, extra_gradients_fn=lambda step: canary if step == 0 else None
  )
  with_canary = with_canary_trainer.fit(
      (x, y), with_canary_trainer.init(_params())
  )
  jax.tree_util.tree_map(
      lambda a, b, c: np.testing.assert_allclose(
          a - b, -0.5 * c / 40, rtol=1e-5, atol=1e-7
      ),
      with_canary.params,
      plain.params,
      canary,
  )


def test_fit_reads_memory_mapped_numpy_files(tmp_path):
  """Data in .npy files is read batch by batch (memory-mapped), same result."""
  x, y = _data()
  np.save(tmp_path / 'x.npy', x)
  np.save(tmp_path / 'y.npy', y)
  mapped = (
      np.load(tmp_path / 'x.npy', mmap_mode='r'),
      np.load(tmp_path / 'y.npy', mmap_mode='r'),
  )
  trainer = _trainer(_config(iterations=5))
  from_files = trainer.fit(mapped, trainer.init(_params()))
  in_memory = trainer.fit((x, y), trainer.init(_params()))
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, from_files.params, in_memory.params
  )


def test_checkpoint_tag_guards_settings_the_plan_does_not_cover(tmp_path):
  x, y = _data()
  directory = str(tmp_path / 'run')
  assert training.DPTrainer.latest_checkpoint_step(directory) is None
  assert not (tmp_path / 'run').exists()
  trainer = _trainer(checkpoint_tag='sgd lr=0.5')
  trainer.fit(
      (x, y), trainer.init(_params()), num_steps=2, checkpoint_dir=directory
  )
  assert training.DPTrainer.latest_checkpoint_step(directory) == 2
  other = _trainer(checkpoint_tag='sgd lr=0.1')
  with pytest.raises(ValueError, match='checkpoint_tag'):
    other.restore(directory, _params())
  with pytest.raises(ValueError, match='checkpoint_tag'):
    other.fit((x, y), other.init(_params()), checkpoint_dir=directory)
  same = _trainer(checkpoint_tag='sgd lr=0.5')
  assert int(same.restore(directory, _params()).step) == 2
  with pytest.raises(ValueError, match='checkpoint_tag must be a str'):
    _trainer(checkpoint_tag=3)


@pytest.mark.parametrize('method', ['ghost', 'auto'])
def test_clipped_grad_method_changes_speed_not_the_result(method):
  x, y = _data()
  config = _config(iterations=5, l2_clip_norm=0.05)  # clipping is active
  reference = _trainer(config)
  other = _trainer(config, clipped_grad_method=method)
  a = reference.fit((x, y), reference.init(_params()))
  b = other.fit((x, y), other.init(_params()))
  for leaf_a, leaf_b in zip(
      jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)
  ):
    np.testing.assert_allclose(leaf_a, leaf_b, rtol=1e-5, atol=1e-6)
  assert reference.epsilon_spent(a) == other.epsilon_spent(b)


def test_clipped_grad_method_is_validated():
  with pytest.raises(ValueError, match='clipped_grad_method'):
    _trainer(clipped_grad_method='fast')
