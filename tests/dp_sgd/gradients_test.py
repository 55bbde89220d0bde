"""Tests of the gradient-computer API (jax_privacy.dp_sgd)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from jax_privacy.dp_sgd import grad_clipping
from jax_privacy.dp_sgd import gradients
from jax_privacy.dp_sgd import typing


def _loss_fn(params, network_state, rng, inputs):
  x, y = inputs
  out = jnp.tanh(x @ params['w1']) @ params['w2']
  loss = jnp.mean((out - y) ** 2)
  metrics = typing.Metrics(
      scalars_avg={'loss': loss},
      scalars_sum={'count': jnp.ones(())},
      scalars_last={'x0': x[0, 0]},
      per_example={'out': out[0]},
  )
  return loss, (network_state, metrics)


def _setup(batch=6, scale=5.0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  params = {
      'w1': jax.random.normal(k1, (4, 5)),
      'w2': jax.random.normal(k2, (5, 2)),
  }
  x = scale * jax.random.normal(k3, (batch, 4))
  y = scale * jax.random.normal(k4, (batch, 2))
  return params, (x, y)


def _computer(**kwargs):
  defaults = dict(
      clipping_norm=1.0,
      noise_multiplier=1.0,
      rescale_to_unit_norm=False,
      per_example_grad_method=grad_clipping.VECTORIZED,
  )
  defaults.update(kwargs)
  return gradients.DpsgdGradientComputer(**defaults)


def _tree_norm(tree):
  return float(
      np.sqrt(sum(np.sum(np.square(l)) for l in jax.tree_util.tree_leaves(tree)))
  )


@pytest.mark.parametrize('rescale', [False, True])
@pytest.mark.parametrize(
    'method',
    [
        grad_clipping.VECTORIZED,
        grad_clipping.UNROLLED,
        grad_clipping.GHOST,
        grad_clipping.AUTO,
    ],
)
def test_mean_of_clipped_gradients_matches_loop(rescale, method):
  params, (x, y) = _setup()
  gc = _computer(
      clipping_norm=0.5, rescale_to_unit_norm=rescale, per_example_grad_method=method
  )
  (loss, (state, metrics)), grads = gc.loss_and_clipped_gradients(
      loss_fn=_loss_fn,
      params=params,
      network_state={},
      rng_per_local_microbatch=jax.random.key(1),
      inputs=(x, y),
  )
  expected = jax.tree_util.tree_map(jnp.zeros_like, params)
  losses = []
  for i in range(6):
    example = (x[i : i + 1], y[i : i + 1])
    loss_i, g = jax.value_and_grad(
        lambda p: _loss_fn(p, {}, None, example)[0]
    )(params)
    losses.append(float(loss_i))
    factor = min(1.0, 0.5 / _tree_norm(g)) / (0.5 if rescale else 1.0)
    expected = jax.tree_util.tree_map(
        lambda e, v: e + v * factor / 6, expected, g
    )
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      grads,
      expected,
  )
  assert float(loss) == pytest.approx(np.mean(losses), rel=1e-5)
  assert state == {}
  assert float(metrics.scalars_avg['loss']) == pytest.approx(np.mean(losses), rel=1e-5)
  assert float(metrics.scalars_sum['count']) == 6.0
  assert float(metrics.scalars_last['x0']) == pytest.approx(float(x[-1, 0]))
  assert metrics.per_example['out'].shape == (6, 2)


def test_padding_is_excluded_from_gradients_loss_and_metrics():
  params, (x, y) = _setup(batch=8)
  gc = _computer()
  mask = np.array([0, 0, 0, 0, 0, 1, 1, 1], bool)
  common = dict(
      loss_fn=_loss_fn,
      params=params,
      network_state={},
      rng_per_local_microbatch=jax.random.key(1),
  )
  (loss_p, (_, m_p)), g_p = gc.loss_and_clipped_gradients(
      inputs=(x, y), is_padding_example=mask, normalize_by=5.0, **common
  )
  (loss_r, (_, m_r)), g_r = gc.loss_and_clipped_gradients(
      inputs=(x[:5], y[:5]), **common
  )
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      g_p,
      g_r,
  )
  assert float(loss_p) == pytest.approx(float(loss_r), rel=1e-6)
  assert float(m_p.scalars_sum['count']) == 5.0
  assert float(m_p.scalars_last['x0']) == pytest.approx(float(x[4, 0]))


def _dropout_loss_fn(params, network_state, rng, inputs):
  x, y = inputs
  h = jnp.tanh(x @ params['w1'] + params['b1'])
  h = jnp.where(jax.random.bernoulli(rng, 0.8, h.shape), h / 0.8, 0.0)
  h = (h - h.mean()) * params['scale']
  out = h @ params['w2']
  loss = jnp.mean((out - y) ** 2)
  new_state = {'calls': network_state['calls'] + 1.0}
  metrics = typing.Metrics(
      scalars_avg={'loss': loss}, per_example={'out': out[0]}
  )
  return loss, (new_state, metrics)


@pytest.mark.parametrize('method', [grad_clipping.GHOST, grad_clipping.AUTO])
def test_ghost_methods_equal_vectorized(method):
  params, (x, y) = _setup(batch=8, scale=2.0)
  params.update(b1=jnp.linspace(-1.0, 1.0, 5), scale=jnp.linspace(0.5, 2.0, 5))
  x = x * jnp.geomspace(0.01, 10.0, 8)[:, None]
  mask = np.array([0, 0, 1, 0, 0, 0, 0, 1], bool)
  results = []
  for m in (grad_clipping.VECTORIZED, method):
    gc = _computer(clipping_norm=0.3, per_example_grad_method=m)
    step = jax.jit(
        lambda p, s, k, i, gc=gc: gc.loss_and_clipped_gradients(
            loss_fn=_dropout_loss_fn, params=p, network_state=s,
            rng_per_local_microbatch=k, inputs=i, is_padding_example=mask,
        )
    )
    results.append(step(params, {'calls': jnp.zeros(())}, jax.random.key(3),
                        (x, y)))
  (loss_v, (state_v, metrics_v)), grads_v = results[0]
  (loss_g, (state_g, metrics_g)), grads_g = results[1]
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      grads_g,
      grads_v,
  )
  assert float(loss_g) == pytest.approx(float(loss_v), rel=1e-6)
  assert float(state_g['calls']) == pytest.approx(1.0)
  np.testing.assert_allclose(
      metrics_g.per_example['out'], metrics_v.per_example['out'], rtol=1e-6
  )
  # The same dropout masks are drawn: per-example keys do not depend on the
  # method.
  assert float(metrics_g.scalars_avg['loss']) == pytest.approx(
      float(metrics_v.scalars_avg['loss']), rel=1e-6
  )


def test_auto_with_a_custom_norm_uses_it():
  params, inputs = _setup()
  def norm(grads):
    return 2.0 * optax.tree.norm(grads)

  results = [
      _computer(per_example_grad_method=m, global_norm_fn=norm)
      .loss_and_clipped_gradients(
          loss_fn=_loss_fn, params=params, network_state={},
          rng_per_local_microbatch=jax.random.key(1), inputs=inputs,
      )[1]
      for m in (grad_clipping.VECTORIZED, grad_clipping.AUTO)
  ]
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), *results
  )


def test_without_clipping_equals_clean_gradients():
  params, inputs = _setup()
  gc = _computer(clipping_norm=None, noise_multiplier=None)
  assert not gc.using_clipped_grads
  kwargs = dict(
      loss_fn=_loss_fn,
      params=params,
      network_state={},
      rng_per_local_microbatch=jax.random.key(1),
      inputs=inputs,
  )
  _, grads = gc.loss_and_clipped_gradients(**kwargs)
  clean = gc.clean_gradients(**kwargs)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      grads,
      clean,
  )
  noisy, std, _ = gc.add_noise_to_grads(grads, jax.random.key(2), 6, ())
  assert float(std) == 0.0
  jax.tree_util.tree_map(np.testing.assert_array_equal, noisy, grads)


@pytest.mark.parametrize('rescale, expected_std', [(False, 2.0 * 3.0 / 100), (True, 2.0 / 100)])
def test_noise_has_the_stated_stddev(rescale, expected_std):
  gc = _computer(clipping_norm=3.0, noise_multiplier=2.0, rescale_to_unit_norm=rescale)
  zeros = {'a': jnp.zeros((200, 250)), 'b': jnp.zeros((10_000,))}
  noisy, std, state = gc.add_noise_to_grads(
      zeros, jax.random.key(0), 100, gc.init_noise_state(zeros)
  )
  assert float(std) == pytest.approx(expected_std, rel=1e-6)
  assert state == ()
  sample = np.concatenate([np.ravel(l) for l in jax.tree_util.tree_leaves(noisy)])
  assert scipy.stats.kstest(sample, 'norm', args=(0, expected_std)).pvalue > 1e-3
  for wrong in (0.67, 1.5):
    assert (
        scipy.stats.kstest(sample, 'norm', args=(0, wrong * expected_std)).pvalue
        < 1e-6
    )
  again, _, _ = gc.add_noise_to_grads(zeros, jax.random.key(0), 100, state)
  jax.tree_util.tree_map(np.testing.assert_array_equal, noisy, again)
  other, _, _ = gc.add_noise_to_grads(zeros, jax.random.key(1), 100, state)
  assert not np.allclose(other['b'], noisy['b'])


def test_rng_per_param_fn_is_applied_to_the_noise_key():
  zeros = {'a': jnp.zeros((50,))}
  plain = _computer()
  folded = _computer(rng_per_param_fn=lambda k: jax.random.fold_in(k, 7))
  a, _, _ = plain.add_noise_to_grads(zeros, jax.random.key(0), 1, ())
  b, _, _ = folded.add_noise_to_grads(zeros, jax.random.key(0), 1, ())
  c, _, _ = plain.add_noise_to_grads(
      zeros, jax.random.fold_in(jax.random.key(0), 7), 1, ()
  )
  assert not np.allclose(a['a'], b['a'])
  np.testing.assert_array_equal(b['a'], c['a'])


def test_properties_and_l2_loss():
  gc = _computer(clipping_norm=2.0)
  assert gc.clipping_norm == 2.0 and gc.using_clipped_grads
  assert gc.l2_loss({'a': jnp.array([3.0, 4.0])}) == pytest.approx(12.5)


def test_works_under_jit():
  params, inputs = _setup()
  gc = _computer()

  @jax.jit
  def step(params, key):
    (loss, _), grads = gc.loss_and_clipped_gradients(
        loss_fn=_loss_fn,
        params=params,
        network_state={},
        rng_per_local_microbatch=key,
        inputs=inputs,
    )
    noisy, _, _ = gc.add_noise_to_grads(grads, key, 6, ())
    return loss, noisy

  loss, noisy = step(params, jax.random.key(0))
  assert np.isfinite(float(loss))
  assert jax.tree_util.tree_structure(noisy) == jax.tree_util.tree_structure(params)


@pytest.mark.parametrize(
    'kwargs, field',
    [
        (dict(clipping_norm=-1.0), 'clipping_norm'),
        (dict(clipping_norm=float('nan')), 'clipping_norm'),
        (dict(noise_multiplier=-0.5), 'noise_multiplier'),
        (dict(noise_multiplier=float('nan')), 'noise_multiplier'),
        (dict(noise_multiplier=float('inf')), 'noise_multiplier'),
        (dict(clipping_norm=None, noise_multiplier=1.0), 'clipping_norm'),
        (dict(per_example_grad_method='vmap'), 'per_example_grad_method'),
        (
            dict(
                per_example_grad_method=grad_clipping.GHOST,
                global_norm_fn=lambda g: 2.0 * optax.tree.norm(g),
            ),
            'global_norm_fn',
        ),
    ],
)
def test_bad_settings_raise(kwargs, field):
  with pytest.raises(ValueError, match=field):
    _computer(**kwargs)


def test_bad_total_batch_size_raises():
  with pytest.raises(ValueError, match='total_batch_size'):
    _computer().add_noise_to_grads({'a': jnp.zeros(2)}, jax.random.key(0), 0, ())
