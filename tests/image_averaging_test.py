"""Tests of experiments/image_classification/averaging.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.image_classification import averaging


def _numpy_averages(init, grads, lr, decay, start, warmup):
  """Independent loop: SGD iterates and their EMA / Polyak averages."""
  p = init.copy()
  ema = init.copy()
  polyak_sum, polyak_n = np.zeros_like(init), 0
  history = []
  for t, g in enumerate(grads):  # t = number of earlier updates
    p = p - lr * g
    d = min(decay, (1 + t) / (10 + t)) if warmup else decay
    ema = d * ema + (1 - d) * p
    step = t + 1
    if step > start:
      polyak_sum += p
      polyak_n += 1
      polyak = polyak_sum / polyak_n
    else:
      polyak = p.copy()
    history.append((p.copy(), ema.copy(), polyak.copy()))
  return history


@pytest.mark.parametrize(
    'decay, start, warmup',
    [(0.9, 0, True), (0.5, 3, False), (0.99, 5, True)],
)
def test_matches_numpy_loop(decay, start, warmup):
  rng = np.random.default_rng(0)
  init = rng.normal(size=(3, 2)).astype(np.float64)
  grads = rng.normal(size=(12, 3, 2))
  lr = 0.3
  want = _numpy_averages(init, grads, lr, decay, start, warmup)
  opt = averaging.with_parameter_averages(
      optax.sgd(lr), ema_decay=decay, polyak_start_step=start,
      ema_warmup=warmup,
  )
  params = {'w': jnp.asarray(init, jnp.float32)}
  state = opt.init(params)
  step = jax.jit(opt.update)
  for t, g in enumerate(grads):
    updates, state = step({'w': jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    p, ema, polyak = want[t]
    avg = averaging.averaged_params(state)
    np.testing.assert_allclose(params['w'], p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(avg['ema']['w'], ema, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        avg['polyak']['w'], polyak, rtol=1e-5, atol=1e-5
    )
  assert int(state.count) == len(grads)


def test_updates_are_those_of_the_wrapped_optimizer():
  params = {'a': jnp.arange(3.0), 'b': jnp.ones((2, 2))}
  grads = jax.tree_util.tree_map(lambda x: 0.5 * x + 1.0, params)
  inner = optax.adam(0.1)
  wrapped = averaging.with_parameter_averages(inner)
  want, _ = inner.update(grads, inner.init(params), params)
  got, _ = wrapped.update(grads, wrapped.init(params), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_warmup_decay_values():
  decays = [float(averaging.ema_decay_at(t, 0.9999, True)) for t in range(3)]
  np.testing.assert_allclose(decays, [0.1, 2 / 11, 0.25], rtol=1e-6)
  assert float(averaging.ema_decay_at(10**7, 0.9999, True)) == pytest.approx(
      0.9999
  )
  assert float(averaging.ema_decay_at(0, 0.9, False)) == pytest.approx(0.9)


def test_switched_off_averages_and_bf16_params():
  params = {'w': jnp.ones((4,), jnp.bfloat16)}
  opt = averaging.with_parameter_averages(
      optax.sgd(1e-3), ema_decay=None, polyak_start_step=0
  )
  state = opt.init(params)
  assert set(averaging.averaged_params(state)) == {'polyak'}
  # Averages are kept in float32 even for bfloat16 parameters.
  assert averaging.averaged_params(state)['polyak']['w'].dtype == jnp.float32
  opt = averaging.with_parameter_averages(
      optax.sgd(1e-3), ema_decay=0.9, polyak_start_step=None
  )
  assert set(averaging.averaged_params(opt.init(params))) == {'ema'}


def test_found_inside_a_chain_and_refused_when_absent():
  params = {'w': jnp.zeros(2)}
  chain = optax.chain(
      optax.scale(1.0), averaging.with_parameter_averages(optax.sgd(0.1))
  )
  state = chain.init(params)
  assert set(averaging.averaged_params(state)) == {'ema', 'polyak'}
  with pytest.raises(ValueError, match='ParameterAveragesState'):
    averaging.averaged_params(optax.sgd(0.1).init(params))


@pytest.mark.parametrize(
    'kwargs, field',
    [
        ({'ema_decay': 0.0}, 'ema_decay'),
        ({'ema_decay': 1.0}, 'ema_decay'),
        ({'ema_decay': -0.5}, 'ema_decay'),
        ({'ema_decay': float('nan')}, 'ema_decay'),
        ({'ema_decay': True}, 'ema_decay'),
        ({'ema_decay': '0.9'}, 'ema_decay'),
        ({'polyak_start_step': -1}, 'polyak_start_step'),
        ({'polyak_start_step': 1.5}, 'polyak_start_step'),
        ({'ema_warmup': 1}, 'ema_warmup'),
    ],
)
def test_bad_settings(kwargs, field):
  with pytest.raises(ValueError, match=field):
    averaging.with_parameter_averages(optax.sgd(0.1), **kwargs)


def test_update_needs_params():
  opt = averaging.with_parameter_averages(optax.sgd(0.1))
  params = {'w': jnp.zeros(2)}
  with pytest.raises(ValueError, match='params'):
    opt.update(params, opt.init(params))


def test_dp_trainer_checkpoints_and_resumes_the_averages(tmp_path):
  pytest.importorskip('orbax.checkpoint')
  from jax_privacy import training  # pylint: disable=g-import-not-at-top
  from jax_privacy.accounting import accountants  # pylint: disable=g-import-not-at-top
  from jax_privacy.experimental import execution_plan  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 3)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.float32)

  def loss(params, example, key):
    del key
    xb, yb = example
    return jnp.mean(optax.sigmoid_binary_cross_entropy(xb @ params['w'], yb))

  config = execution_plan.DpsgdExecutionPlanConfig(
      iterations=6, num_examples=64, expected_batch_size=16, delta=1e-5,
      noise_multiplier=1.0, noise_seed=1, l2_clip_norm=1.0,
      accountant=accountants.PldAccountantConfig(1e-2),
  )
  trainer = training.DPTrainer(
      loss_fn=loss, config=config, sampling_seed=2,
      optimizer=averaging.with_parameter_averages(
          optax.sgd(0.5), ema_decay=0.9, polyak_start_step=2
      ),
  )
  params = {'w': jnp.zeros(3)}
  seen = []
  full = trainer.fit(
      (x, y), trainer.init(params), callbacks=[
          lambda p: seen.append(np.asarray(p.state.params['w']))
      ], callback_every=1,
  )
  averages = averaging.averaged_params(full.opt_state)
  np.testing.assert_allclose(
      averages['polyak']['w'], np.mean(seen[2:], axis=0), rtol=1e-5, atol=1e-6
  )
  # Interrupted after 3 steps, resumed from the checkpoint: same averages.
  directory = str(tmp_path / 'ckpt')
  trainer.fit((x, y), trainer.init(params), num_steps=3,
              checkpoint_dir=directory)
  resumed = trainer.fit((x, y), trainer.restore(directory, params))
  for name in ('ema', 'polyak'):
    np.testing.assert_allclose(
        averaging.averaged_params(resumed.opt_state)[name]['w'],
        averages[name]['w'], rtol=1e-6,
    )
