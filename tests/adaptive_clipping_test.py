"""Tests for jax_privacy.adaptive_clipping."""

import math

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special

from jax_privacy import adaptive_clipping as ac
from jax_privacy import clipping
from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis


def _config(**overrides):
  kwargs = dict(
      initial_clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=100.0)
  kwargs.update(overrides)
  return ac.AdaptiveClippingConfig(**kwargs)


def _loss(params, x, y):
  return jnp.mean((x @ params['w'] + params['b'] - y) ** 2)


def _data(n=12, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 3)) * rng.uniform(0.1, 5, (n, 1)),
                  jnp.float32)
  y = jnp.asarray(rng.normal(size=n), jnp.float32)
  params = {'w': jnp.asarray(rng.normal(size=3), jnp.float32),
            'b': jnp.zeros((), jnp.float32)}
  return params, x, y


# --- the noise multiplier of the pair ---


@pytest.mark.parametrize(
    'z, sigma_b', [(1.0, 5.0), (0.8, 0.7), (0.3, 2.0), (3.0, 1.5001)])
def test_pair_has_privacy_of_requested_multiplier(z, sigma_b):
  z_grad = ac.gradient_noise_multiplier(z, sigma_b)
  # Independent derivation: divide each release by its noise stddev; the
  # joint unit-noise Gaussian has sensitivity sqrt((C / (z_grad C))^2 +
  # (1/2 / sigma_b)^2), which must be 1 / z.
  joint_sensitivity = math.hypot(1.0 / z_grad, 0.5 / sigma_b)
  assert joint_sensitivity == pytest.approx(1.0 / z, rel=1e-12)
  assert z_grad > z


def test_centred_count_has_sensitivity_one_half():
  rng = np.random.default_rng(1)
  for _ in range(200):
    norms = rng.exponential(size=rng.integers(1, 30))
    clip = rng.exponential()
    extra = rng.exponential()
    centred = lambda n: np.sum((n <= clip) - 0.5)
    diff = centred(np.append(norms, extra)) - centred(norms)
    assert abs(diff) == 0.5


@pytest.mark.parametrize(
    'field, value',
    [('target_quantile', 0.0), ('target_quantile', 1.0),
     ('target_quantile', 1.5), ('target_quantile', -0.2),
     ('clip_learning_rate', 0.0), ('clip_learning_rate', -0.1),
     ('initial_clip_norm', 0.0), ('initial_clip_norm', math.inf),
     ('noise_multiplier', 0.0), ('expected_batch_size', -1.0),
     ('count_noise_stddev', 0.4), ('count_noise_stddev', 0.5),
     ('target_quantile', True)])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    _config(**{field: value})


def test_default_count_noise_is_paper_choice():
  config = _config(expected_batch_size=400.0)
  assert config.count_noise_stddev == 20.0
  assert config.gradient_noise_multiplier == pytest.approx(
      (1.0 - (2 * 20.0) ** -2) ** -0.5)


def test_too_small_count_noise_error_says_bound():
  with pytest.raises(
      ValueError,
      match=r'count_noise_stddev must be > noise_multiplier / 2 = 1 ',
  ):
    ac.gradient_noise_multiplier(2.0, 0.25)


# --- accounting ---


def test_dp_event_structure():
  config = _config(noise_multiplier=1.2, count_noise_stddev=3.0)
  event = config.dp_event(10, sampling_prob=0.01)
  assert event == dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.ComposedDpEvent([
          dp_accounting.GaussianDpEvent(config.gradient_noise_multiplier),
          dp_accounting.GaussianDpEvent(6.0)])), 10)
  assert config.dp_event(0, sampling_prob=0.5) == dp_accounting.NoOpDpEvent()
  with pytest.raises(ValueError, match='sampling_prob'):
    config.dp_event(3, sampling_prob=1.5)
  with pytest.raises(ValueError, match='iterations'):
    config.dp_event(-1, sampling_prob=0.5)


def _log_a_two_gaussians(q, z_grad, sigma_b, order):
  """log E[(p1/p0)^order] for Poisson-sampled (sum, count), integer order.

  Written from scratch: the released pair, divided by its noise stddevs, is
  a 2-D unit Gaussian whose mean moves by mu = (1 / z_grad, (1/2) / sigma_b)
  when an example is added (clip norm C: C / (z_grad C)). With probability
  q the example is sampled. Expanding ((1 - q) + q L)^order, L the
  likelihood ratio of N(mu, I) to N(0, I), and E_0[L^k] = exp(k(k-1)|mu|^2
  / 2) gives the sum below.
  """
  mu_sq = z_grad**-2 + (0.5 / sigma_b) ** 2
  terms = [
      math.log(special.comb(order, k, exact=True))
      + (order - k) * math.log1p(-q) + k * math.log(q)
      + k * (k - 1) * mu_sq / 2
      for k in range(order + 1)
  ]
  return special.logsumexp(terms)


@pytest.mark.parametrize('q, steps', [(0.01, 1000), (0.1, 50)])
def test_epsilon_equals_independent_composition(q, steps):
  config = _config(noise_multiplier=1.1, count_noise_stddev=2.5)
  orders = list(range(2, 65))
  rdp = [
      steps * _log_a_two_gaussians(
          q, config.gradient_noise_multiplier, 2.5, a) / (a - 1)
      for a in orders
  ]
  expected, _ = rdp_privacy_accountant.compute_epsilon(orders, rdp, 1e-5)
  rdp_config = accountants.RdpAccountantConfig(
      orders=[float(a) for a in orders])
  ours = ac.compute_epsilon(config, iterations=steps, sampling_prob=q,
                            delta=1e-5, accountant_config=rdp_config)
  assert ours == pytest.approx(expected, rel=1e-6)
  # ...and the library's DP-SGD accountant at the requested multiplier.
  dpsgd = analysis.DpsgdTrainingAccountant(rdp_config).compute_epsilon(
      steps, analysis.DpParams(noise_multipliers=1.1, num_samples=10_000,
                               delta=1e-5, batch_size=int(q * 10_000)))
  assert ours == pytest.approx(dpsgd, rel=1e-6)


def test_pld_epsilon_equals_composition_of_two_gaussian_plds():
  config = _config(noise_multiplier=0.9, count_noise_stddev=1.0)
  interval = 1e-3
  grad = pld_lib.from_gaussian_mechanism(
      config.gradient_noise_multiplier, sensitivity=1.0,
      value_discretization_interval=interval)
  count = pld_lib.from_gaussian_mechanism(
      1.0, sensitivity=0.5, value_discretization_interval=interval)
  pair = grad.compose(count).self_compose(5)
  expected = pair.get_epsilon_for_delta(1e-6)
  ours = ac.compute_epsilon(
      config, iterations=5, sampling_prob=1.0, delta=1e-6,
      accountant_config=accountants.PldAccountantConfig(
          value_discretization_interval=interval))
  assert ours == pytest.approx(expected, rel=2e-2)
  assert ours > 0


def test_compute_epsilon_rejects_bad_delta():
  with pytest.raises(ValueError, match='delta'):
    ac.compute_epsilon(_config(), iterations=1, sampling_prob=0.1, delta=0.0)


# --- clipping at a traced norm ---


@pytest.mark.parametrize('clip_norm', [0.3, 50.0])
@pytest.mark.parametrize(
    'kwargs', [{}, {'microbatch_size': 5}, {'method': 'ghost'}])
def test_adaptive_clipped_grad_matches_fixed_norm(clip_norm, kwargs):
  params, x, y = _data()
  padding = jnp.arange(12) >= 10
  grad_fn = jax.jit(ac.adaptive_clipped_grad(
      _loss, batch_argnums=(1, 2), **kwargs))
  summed, norms = grad_fn(clip_norm, params, x, y, is_padding_example=padding)
  ref, aux = clipping.clipped_grad(
      _loss, l2_clip_norm=clip_norm, batch_argnums=(1, 2),
      return_grad_norms=True, **kwargs)(params, x, y,
                                        is_padding_example=padding)
  for k in ref:
    np.testing.assert_allclose(summed[k], ref[k], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(norms, aux.grad_norms, rtol=2e-5)


def test_adaptive_clipped_grad_compiles_once():
  params, x, y = _data()
  grad_fn = jax.jit(ac.adaptive_clipped_grad(_loss, batch_argnums=(1, 2)))
  for clip_norm in (0.1, 1.0, 7.0):
    summed, norms = grad_fn(jnp.float32(clip_norm), params, x, y)
    per_example = jnp.minimum(norms, clip_norm)
    # The clipped sum's norm is at most the sum of clipped norms.
    total = optax.tree.norm(summed)
    assert total <= jnp.sum(per_example) * (1 + 1e-5)
  assert grad_fn._cache_size() == 1


def test_adaptive_clipped_grad_rejects_pre_clipping_transform():
  with pytest.raises(ValueError, match='pre_clipping_transform'):
    ac.adaptive_clipped_grad(_loss, pre_clipping_transform=lambda g: g)


# --- the privatizer ---


def test_missing_key_raises():
  with pytest.raises(ValueError, match='prng_key'):
    ac.adaptive_clipping_privatizer(_config(), prng_key=None)


def test_gradient_noise_scale_follows_clip_norm():
  config = _config(initial_clip_norm=3.0, noise_multiplier=1.0,
                   count_noise_stddev=2.0)
  privatizer = ac.adaptive_clipping_privatizer(
      config, prng_key=jax.random.key(0))
  zeros = {'w': jnp.zeros((100, 100))}
  state = privatizer.init(zeros)
  noisy, _ = jax.jit(privatizer.update)(zeros, state, grad_norms=jnp.ones(4))
  expected = config.gradient_noise_multiplier * 3.0
  assert np.std(np.asarray(noisy['w'])) == pytest.approx(expected, rel=0.03)


def test_clip_norm_update_ignores_padding_and_is_exact():
  # A tiny z allows a tiny count noise: the update is then deterministic.
  config = _config(initial_clip_norm=1.0, noise_multiplier=1e-3,
                   count_noise_stddev=1e-3, expected_batch_size=4.0,
                   target_quantile=0.5, clip_learning_rate=0.2)
  privatizer = ac.adaptive_clipping_privatizer(
      config, prng_key=jax.random.key(1))
  state = privatizer.init({})
  norms = jnp.array([0.5, 0.9, 2.0, 0.1, 100.0, 0.2])
  padding = jnp.array([False, False, False, False, True, True])
  _, new_state = privatizer.update(
      {}, state, grad_norms=norms, is_padding_example=padding)
  # 3 of the 4 real examples are unclipped: b = (3 - 2) / 4 + 1/2 = 0.75.
  expected = math.exp(-0.2 * (0.75 - 0.5))
  assert float(new_state.clip_norm) == pytest.approx(expected, rel=1e-3)
  assert int(new_state.count) == 1


def _run_to_convergence(target_quantile, initial_clip_norm, steps=400):
  batch = 500
  config = _config(initial_clip_norm=initial_clip_norm, noise_multiplier=1.0,
                   expected_batch_size=float(batch),
                   target_quantile=target_quantile, clip_learning_rate=0.2)
  privatizer = ac.adaptive_clipping_privatizer(
      config, prng_key=jax.random.key(2))

  def step(state, key):
    norms = jnp.exp(jax.random.normal(key, (batch,)))  # log-normal norms
    _, state = privatizer.update({}, state, grad_norms=norms)
    return state, state.clip_norm

  keys = jax.random.split(jax.random.key(3), steps)
  _, history = jax.jit(lambda s: jax.lax.scan(step, s, keys))(
      privatizer.init({}))
  return np.asarray(history)


@pytest.mark.parametrize(
    'target_quantile, initial_clip_norm', [(0.2, 0.01), (0.5, 100.0),
                                           (0.9, 0.01)])
def test_clip_norm_converges_to_target_quantile(
    target_quantile, initial_clip_norm):
  history = _run_to_convergence(target_quantile, initial_clip_norm)
  # The target_quantile quantile of a log-normal with sigma 1.
  true_quantile = math.exp(math.sqrt(2) * special.erfinv(
      2 * target_quantile - 1))
  final = np.exp(np.mean(np.log(history[-100:])))
  assert final == pytest.approx(true_quantile, rel=0.05)
  assert abs(history[0] - true_quantile) > abs(final - true_quantile)


def test_chain_with_extra_args_and_current_clip_norm():
  params, x, y = _data()
  config = _config(initial_clip_norm=0.5, count_noise_stddev=1.0,
                   expected_batch_size=12.0)
  optimizer = optax.chain(
      ac.adaptive_clipping_privatizer(config, prng_key=jax.random.key(4)),
      optax.sgd(0.01))
  grad_fn = ac.adaptive_clipped_grad(_loss, batch_argnums=(1, 2))

  @jax.jit
  def step(params, opt_state):
    clip_norm = ac.current_clip_norm(opt_state)
    grads, norms = grad_fn(clip_norm, params, x, y)
    updates, opt_state = optimizer.update(
        grads, opt_state, params, grad_norms=norms)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  assert float(ac.current_clip_norm(opt_state)) == 0.5
  for _ in range(3):
    params, opt_state = step(params, opt_state)
  assert float(ac.current_clip_norm(opt_state)) != 0.5
  assert step._cache_size() == 1


def _mlp_loss(params, x, y):
  hidden = jnp.tanh(x @ params['w1'] + params['b1'])
  return jnp.mean((hidden @ params['w2'] - y) ** 2)


def test_empirical_sensitivity_of_both_releases():
  grad_fn = jax.jit(ac.adaptive_clipped_grad(_mlp_loss, batch_argnums=(1, 2)))

  def releases(clip_norm, params, x, y, padding):
    summed, norms = grad_fn(clip_norm, params, x, y,
                            is_padding_example=padding)
    count = jnp.sum(jnp.where(padding, 0.0, (norms <= clip_norm) - 0.5))
    return jnp.concatenate([g.ravel() for g in jax.tree.leaves(summed)]), count

  worst = {'add_remove': [0.0, 0.0], 'replace': [0.0, 0.0]}
  for seed in range(25):
    rng = np.random.default_rng(seed)
    n = 9
    params = {'w1': jnp.asarray(rng.normal(size=(4, 5)) * 2, jnp.float32),
              'b1': jnp.asarray(rng.normal(size=5), jnp.float32),
              'w2': jnp.asarray(rng.normal(size=5) * 3, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(n, 4)) * 3, jnp.float32)
    y = jnp.asarray(rng.normal(size=n) * 5, jnp.float32)
    clip_norm = jnp.float32(rng.exponential() * 3)
    full = releases(clip_norm, params, x, y, jnp.zeros(n, bool))
    # Remove the last example (as padding); replace it by another one.
    removed = releases(clip_norm, params, x, y, jnp.arange(n) == n - 1)
    x2 = x.at[-1].set(jnp.asarray(rng.normal(size=4) * 10, jnp.float32))
    replaced = releases(clip_norm, params, x2, y.at[-1].set(-y[-1] * 4),
                        jnp.zeros(n, bool))
    for name, other, factor in [('add_remove', removed, 1.0),
                                ('replace', replaced, 2.0)]:
      grad_moved = float(jnp.linalg.norm(full[0] - other[0])) / float(clip_norm)
      count_moved = abs(float(full[1] - other[1]))
      worst[name][0] = max(worst[name][0], grad_moved / factor)
      worst[name][1] = max(worst[name][1], count_moved / factor)
  for name in worst:
    assert worst[name][0] <= 1.0 + 1e-5  # sum: C, replace-one 2C
    assert worst[name][1] <= 0.5  # count: 1/2, replace-one 1
  assert worst['add_remove'][1] == 0.5  # the count bound is attained
  assert worst['add_remove'][0] > 0.9  # and the gradient one nearly
