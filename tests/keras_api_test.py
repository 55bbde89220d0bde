"""Tests of jax_privacy.keras_api (Keras 3 on the JAX backend)."""

import dataclasses
import logging
import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
from scipy import stats  # pylint: disable=g-import-not-at-top

keras = pytest.importorskip('keras')
keras_api = pytest.importorskip('jax_privacy.keras_api')

# pylint: disable=g-import-not-at-top,wrong-import-position
from jax_privacy import batch_selection
from jax_privacy import clipping
from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate

_BASE = dict(
    epsilon=2.0,
    delta=1e-5,
    clipping_norm=1.0,
    batch_size=8,
    gradient_accumulation_steps=1,
    train_steps=12,
    train_size=64,
    seed=0,
)


def _config(**overrides):
  return keras_api.DPKerasConfig(**{**_BASE, **overrides})


def _pld_accountant():
  return analysis.DpsgdTrainingAccountant(
      dp_accountant_config=accountants.PldAccountantConfig(
          value_discretization_interval=1e-3
      )
  )


def _mlp(seed=0, inputs=4, hidden=6, outputs=3):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input(shape=(inputs,)),
      keras.layers.Dense(hidden, activation='tanh'),
      keras.layers.Dense(outputs),
  ])


def _data(n=64, inputs=4, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, inputs)).astype(np.float32)
  y = rng.integers(classes, size=n).astype(np.int32)
  return x, y


def _compiled(config, model=None, learning_rate=0.1):
  private = keras_api.make_private(model or _mlp(), config)
  private.compile(
      optimizer=keras.optimizers.SGD(learning_rate),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=['accuracy'],
  )
  return private


def _jitted(private, batch_size):
  grad_fn = private.clipped_gradient_fn(batch_size)
  return jax.jit(lambda *args, **kwargs: grad_fn(*args, **kwargs))


def _values(variables):
  return [np.asarray(v.value) for v in variables]


# --- DPKerasConfig ---------------------------------------------------------


def test_calibrated_noise_meets_target_and_is_tight():
  config = _config()
  accountant = _pld_accountant()

  def epsilon(sigma):
    params = analysis.DpParams(
        noise_multipliers=sigma, num_samples=64, delta=1e-5, batch_size=8
    )
    return accountant.compute_epsilon(12, params)

  assert epsilon(config.noise_multiplier) <= 2.0
  assert epsilon(config.noise_multiplier * 0.98) > 2.0
  assert keras_api.get_noise_multiplier(_compiled(config)) == (
      config.noise_multiplier
  )


def test_calibration_uses_effective_batch_with_accumulation():
  accumulated = _config(batch_size=4, gradient_accumulation_steps=4)
  expected = calibrate.calibrate_noise_multiplier(
      target_epsilon=2.0,
      accountant=_pld_accountant(),
      batch_sizes=16,
      num_updates=12,
      num_samples=64,
      target_delta=1e-5,
      tol=1e-3,
  )
  assert accumulated.effective_batch_size == 16
  assert accumulated.sampling_prob == 0.25
  assert accumulated.noise_multiplier == pytest.approx(expected, abs=2e-3)
  assert accumulated.noise_multiplier > _config().noise_multiplier


def test_given_noise_multiplier_is_checked_against_target():
  sigma = _config().noise_multiplier
  assert _config(noise_multiplier=1.5 * sigma).noise_multiplier == 1.5 * sigma
  with pytest.raises(ValueError, match='noise_multiplier=.*spends epsilon'):
    _config(noise_multiplier=0.67 * sigma)
  # The same sigma is too small once accumulation doubles the batch.
  with pytest.raises(ValueError, match='spends epsilon'):
    _config(noise_multiplier=sigma, gradient_accumulation_steps=2)


@pytest.mark.parametrize(
    'field, value',
    [
        ('epsilon', 0.0),
        ('epsilon', float('inf')),
        ('delta', 1.0),
        ('clipping_norm', -1.0),
        ('batch_size', 0),
        ('batch_size', 2.5),
        ('gradient_accumulation_steps', 0),
        ('train_steps', 0),
        ('train_size', 0),
        ('poisson_sampling_in_fit', 1),
        ('noise_multiplier', -1.0),
        ('rescale_to_unit_norm', 'yes'),
        ('microbatch_size', 0),
        ('seed', -1),
    ],
)
def test_invalid_config_field_is_named(field, value):
  with pytest.raises(ValueError, match=field):
    _config(**{field: value})


def test_batch_size_larger_than_train_size_is_refused():
  with pytest.raises(ValueError, match=r'batch_size must be <= train_size'):
    _config(batch_size=65)
  with pytest.raises(ValueError, match='gradient_accumulation_steps'):
    _config(batch_size=40, gradient_accumulation_steps=2)


# --- make_private: bad input -------------------------------------------------


def test_non_jax_backend_is_refused(monkeypatch):
  monkeypatch.setattr(keras.backend, 'backend', lambda: 'tensorflow')
  with pytest.raises(ValueError, match='KERAS_BACKEND=jax'):
    keras_api.make_private(_mlp(), _config())


def test_batch_normalization_is_refused_even_nested():
  inner = keras.Sequential(
      [keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()]
  )
  outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2)])
  with pytest.raises(ValueError, match='GroupNormalization'):
    keras_api.make_private(outer, _config())


def test_bad_models_and_configs_are_refused():
  with pytest.raises(ValueError, match='must be built'):
    keras_api.make_private(keras.Sequential([keras.layers.Dense(2)]), _config())
  with pytest.raises(ValueError, match='config must be a DPKerasConfig'):
    keras_api.make_private(_mlp(), dataclasses.asdict(_config()))
  private = keras_api.make_private(_mlp(), _config())
  with pytest.raises(ValueError, match='already private'):
    keras_api.make_private(private, _config())
  with pytest.raises(ValueError, match='make_private'):
    keras_api.get_noise_multiplier(_mlp())


def test_compile_settings_of_a_compiled_model_are_copied():
  model = _mlp()
  model.compile(
      optimizer=keras.optimizers.SGD(0.3, momentum=0.5),
      loss='sparse_categorical_crossentropy',
      metrics=['accuracy'],
  )
  private = keras_api.make_private(model, _config())
  assert private.compiled
  assert isinstance(private.optimizer, keras.optimizers.SGD)
  assert private.optimizer.momentum == 0.5
  config = private.get_compile_config()
  assert config['weighted_metrics'] == ['accuracy']
  assert config['metrics'] is None


def test_optimizers_that_rescale_or_accumulate_are_refused():
  private = keras_api.make_private(_mlp(), _config())
  with pytest.raises(ValueError, match='gradient_accumulation_steps'):
    private.compile(
        optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
        loss='mse',
    )
  with pytest.raises(ValueError, match='LossScaleOptimizer'):
    private.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
        loss='mse',
    )


def test_fit_input_checks():
  x, y = _data()
  private = _compiled(_config())
  with pytest.raises(ValueError, match='train_size'):
    private.fit(x[:60], y[:60])
  with pytest.raises(ValueError, match='generator'):
    private.fit((batch for batch in [(x, y)]))
  with pytest.raises(ValueError, match='validation_split'):
    private.fit(x, y, validation_split=0.1)
  with pytest.raises(ValueError, match='batch_size'):
    private.fit(x, y, batch_size=16)
  with pytest.raises(ValueError, match='class_weight'):
    private.fit(x, y, class_weight={0: 1.0})
  with pytest.raises(RuntimeError, match='Use fit'):
    private.train_on_batch(x[:8], y[:8])
  assert private.dp_steps_taken == 0


# --- gradients and noise -----------------------------------------------------


def _state_values(private):
  return jax.tree_util.tree_map(
      lambda v: v.value,
      (
          private.trainable_variables,
          private.non_trainable_variables,
          private.metrics_variables,
          private.optimizer.variables,
      ),
  )


@pytest.mark.parametrize('rescale', [True, False])
def test_clipped_gradient_equals_core_clipped_grad(rescale):
  config = _config(clipping_norm=0.1, rescale_to_unit_norm=rescale)
  inner = _mlp(seed=3)
  private = _compiled(config, inner)
  x, y = _data(16, seed=5)
  weight = np.ones(16, np.float32)
  weight[-4:] = 0.0
  trainable, non_trainable, metrics, optimizer = _state_values(private)
  summed, aux = _jitted(private, 16)(
      trainable, x, y, weight, jax.random.key(0), non_trainable, metrics,
      optimizer, is_padding_example=jnp.asarray(weight == 0),
  )

  inner_non_trainable = [v.value for v in inner.non_trainable_variables]
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  def pure_loss(params, features, labels):
    logits, _ = inner.stateless_call(params, inner_non_trainable, features)
    return loss_fn(labels, logits)

  reference = jax.jit(clipping.clipped_grad(
      pure_loss,
      l2_clip_norm=0.1,
      rescale_to_unit_norm=rescale,
      normalize_by=8.0,
      batch_argnums=(1, 2),
      method='vectorized',
  ))(trainable, x[:12], y[:12])
  for ours, theirs in zip(summed, reference):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-8)
  assert max(float(jnp.abs(g).max()) for g in summed) > 0
  values = [float(pure_loss(trainable, x[i : i + 1], y[i : i + 1]))
            for i in range(12)]
  np.testing.assert_allclose(aux.values[:12], values, rtol=1e-5)


def test_padding_rows_contribute_exactly_zero():
  private = _compiled(_config())
  x, y = _data(16, seed=2)
  trainable, non_trainable, metrics, optimizer = _state_values(private)
  real = _jitted(private, 8)(
      trainable, x[:8], y[:8], np.ones(8, np.float32), jax.random.key(1),
      non_trainable, metrics, optimizer,
  )[0]
  garbage = np.concatenate([x[:8], np.full((8, 4), 1e30, np.float32)])
  weight = np.concatenate([np.ones(8), np.zeros(8)]).astype(np.float32)
  padded = _jitted(private, 16)(
      trainable, garbage, y, weight, jax.random.key(1), non_trainable,
      metrics, optimizer, is_padding_example=jnp.asarray(weight == 0),
  )[0]
  for a, b in zip(real, padded):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('rescale', [False, True])
def test_noise_stddev_is_noise_multiplier_times_sensitivity(rescale):
  """Zero gradients: one SGD(lr=1) update is -noise / effective batch."""
  config = _config(
      clipping_norm=0.5,
      rescale_to_unit_norm=rescale,
      poisson_sampling_in_fit=False,
      seed=7,
  )
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
      [keras.Input((64,)), keras.layers.Dense(64, use_bias=False)]
  )
  private = keras_api.make_private(model, config)
  private.compile(optimizer=keras.optimizers.SGD(1.0), loss='mse')
  before = np.asarray(model.layers[0].kernel.value)
  x = np.zeros((64, 64), np.float32)  # zero output and zero gradient
  private.fit(x, np.zeros((64, 64), np.float32), steps_per_epoch=1, verbose=0)
  noise = (before - np.asarray(model.layers[0].kernel.value)) * 8
  expected = config.noise_multiplier * (1.0 if rescale else 0.5)
  assert stats.kstest(noise.ravel() / expected, 'norm').pvalue > 1e-3
  sample_std = noise.std()
  assert abs(sample_std / expected - 1) < 0.05
  for wrong in (0.67, 1.5):
    assert stats.kstest(noise.ravel() / (wrong * expected), 'norm').pvalue < 1e-6
  # The next update draws fresh noise.
  private.fit(x, np.zeros((64, 64), np.float32), steps_per_epoch=1, verbose=0)
  second = (before - np.asarray(model.layers[0].kernel.value)) * 8 - noise
  assert abs(np.corrcoef(noise.ravel(), second.ravel())[0, 1]) < 0.1


def test_dropout_masks_are_independent_per_example():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([
      keras.Input((32,)),
      keras.layers.Dropout(0.5),
      keras.layers.Dense(2),
  ])
  private = keras_api.make_private(model, _config())
  private.compile(optimizer=keras.optimizers.SGD(0.1), loss='mse')
  trainable, non_trainable, metrics, optimizer = _state_values(private)
  x = np.ones((8, 32), np.float32)
  _, aux = _jitted(private, 8)(
      trainable, x, np.zeros((8, 2), np.float32), np.ones(8, np.float32),
      jax.random.key(3), non_trainable, metrics, optimizer,
  )
  outputs = np.asarray(aux.aux).reshape(8, 2)
  assert len({tuple(np.round(row, 5)) for row in outputs}) == 8


# --- sampling, budget, epsilon, checkpoints ---------------------------------


def test_poisson_batches_match_the_sampler_and_pad_with_zero_weight():
  config = _config(batch_size=8, train_size=64)
  plan = keras_api.DPModel(_mlp(), config)._batch_plan()  # pylint: disable=protected-access
  sizes = np.array([len(plan.indices(step)) for step in range(2000)])
  q = 8 / 64
  # Binomial(64, q) batch sizes: mean and variance of the Poisson sampler.
  assert abs(sizes.mean() - 64 * q) < 4 * np.sqrt(64 * q * (1 - q) / 2000)
  assert sizes.var() == pytest.approx(64 * q * (1 - q), rel=0.15)
  assert plan.indices(5).tolist() == plan.indices(5).tolist()
  x, y = _data()
  for step, (bx, by, weight) in enumerate(plan.batches(x, y, None, 0, 30)):
    indices = plan.indices(step)
    assert len(weight) % plan.pad_multiple == 0 and len(weight) >= 1
    np.testing.assert_array_equal(weight[: len(indices)], 1.0)
    np.testing.assert_array_equal(weight[len(indices) :], 0.0)
    np.testing.assert_array_equal(bx[: len(indices)], x[indices])
    np.testing.assert_array_equal(bx[len(indices) :], 0.0)
    np.testing.assert_array_equal(by[: len(indices)], y[indices])
  # An empty Poisson batch still runs one all-padding step (noise only).
  sparse = keras_api.DPModel(_mlp(), _config(batch_size=1))._batch_plan()  # pylint: disable=protected-access
  empty_step = next(s for s in range(100) if not len(sparse.indices(s)))
  padded = sparse.padded_indices(empty_step)
  assert len(padded) == sparse.pad_multiple
  assert batch_selection.padding_mask(padded).all()
  (_, _, weight), = sparse.batches(x, y, None, empty_step, 1)
  np.testing.assert_array_equal(weight, np.zeros(sparse.pad_multiple))


def test_refuses_past_train_steps_and_reports_shuffled_epsilon(caplog):
  config = _config(train_steps=5, poisson_sampling_in_fit=False)
  private = _compiled(config)
  x, y = _data()
  before = _values(private.trainable_variables)
  with pytest.raises(ValueError, match=r'only 5 of .*train_steps=5 remain'):
    private.fit(x, y, epochs=2, steps_per_epoch=3)
  assert private.dp_steps_taken == 0
  for a, b in zip(before, _values(private.trainable_variables)):
    np.testing.assert_array_equal(a, b)
  with caplog.at_level(logging.WARNING):
    history = private.fit(x, y, epochs=1, steps_per_epoch=3, verbose=0)
  assert private.dp_steps_taken == 3
  # Shuffled batches: the warning states the proven (unamplified) bound.
  message = ' '.join(r.getMessage() for r in caplog.records)
  proven = _pld_accountant().compute_epsilon(
      5, config.dp_params(poisson=False)
  )
  assert 'no amplification by sampling is proven' in message
  assert f'epsilon={proven:.4g}' in message
  assert proven > config.epsilon
  with pytest.raises(ValueError, match=r'only 2 of .*\(3 taken\)'):
    private.fit(x, y, epochs=1, steps_per_epoch=3)
  history2 = private.fit(x, y, epochs=1, steps_per_epoch=2, verbose=0)
  assert private.dp_steps_taken == 5
  with pytest.raises(ValueError, match='only 0'):
    private.fit(x, y, epochs=1, steps_per_epoch=1)
  shuffled = config.dp_params(poisson=False)
  assert shuffled.sampling_method is analysis.SamplingMethod.SHUFFLED
  accountant = _pld_accountant()
  assert history.history['epsilon'] == [
      pytest.approx(accountant.compute_epsilon(3, shuffled))
  ]
  assert history2.history['epsilon'] == [
      pytest.approx(accountant.compute_epsilon(5, shuffled))
  ]
  assert 0 <= history.history['accuracy'][0] <= 1


def test_save_and_load_resume_identically(tmp_path):
  # Shuffled batches compile one shape; the Poisson plan is checked equal.
  config = _config(train_steps=8, seed=11, poisson_sampling_in_fit=False)
  x, y = _data()

  def fresh():
    private = keras_api.make_private(_mlp(seed=1), config)
    private.compile(
        optimizer=keras.optimizers.SGD(0.2, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=['accuracy'],
    )
    return private

  straight = fresh()
  straight.fit(x, y, epochs=2, steps_per_epoch=4, verbose=0)

  first = fresh()
  first.fit(x, y, epochs=1, steps_per_epoch=4, verbose=0)
  path = str(tmp_path / 'dp.keras')
  first.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded, keras_api.DPModel)
  assert loaded.dp_steps_taken == 4
  assert loaded.dp_config == config
  np.testing.assert_array_equal(
      loaded._dp_key.value, first._dp_key.value  # pylint: disable=protected-access
  )
  poisson = dataclasses.replace(config, poisson_sampling_in_fit=True)
  loaded_plan = dataclasses.replace(loaded._batch_plan(), config=poisson)  # pylint: disable=protected-access
  first_plan = dataclasses.replace(first._batch_plan(), config=poisson)  # pylint: disable=protected-access
  for step in (4, 5, 100):
    np.testing.assert_array_equal(
        loaded_plan.padded_indices(step), first_plan.padded_indices(step)
    )
  loaded.fit(x, y, epochs=1, steps_per_epoch=4, verbose=0)
  assert loaded.dp_steps_taken == 8
  for a, b in zip(
      _values(straight.trainable_variables), _values(loaded.trainable_variables)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match='only 0'):
    loaded.fit(x, y, epochs=1, steps_per_epoch=1)


def test_poisson_fit_learns_and_reports_epsilon_to_callbacks():
  rng = np.random.default_rng(0)
  labels = rng.integers(2, size=256).astype(np.int32)
  features = (rng.normal(size=(256, 4)) + 2.0 * (2 * labels[:, None] - 1))
  features = features.astype(np.float32)
  config = _config(
      epsilon=4.0, batch_size=32, train_size=192, train_steps=18, seed=3
  )
  private = _compiled(config, _mlp(outputs=2), learning_rate=0.5)

  class Recorder(keras.callbacks.Callback):
    seen = []
    steps = []

    def on_train_batch_end(self, batch, logs=None):
      self.steps.append(self.model.dp_steps_taken)

    def on_epoch_end(self, epoch, logs=None):
      self.seen.append(logs['epsilon'])

  history = private.fit(
      features[:192],
      labels[:192],
      epochs=3,
      validation_data=(features[192:], labels[192:]),
      callbacks=[Recorder()],
      verbose=0,
  )
  assert private.dp_steps_taken == 18
  poisson = config.dp_params(poisson=True)
  expected = [
      _pld_accountant().compute_epsilon(steps, poisson) for steps in (6, 12, 18)
  ]
  np.testing.assert_allclose(history.history['epsilon'], expected, rtol=1e-9)
  assert Recorder.seen == history.history['epsilon']
  assert Recorder.steps == list(range(1, 19))
  assert expected[-1] <= 4.0
  assert history.history['val_accuracy'][-1] >= 0.9


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
  """k micro-batches of B examples: the same update as one batch of k * B."""
  x, y = _data()
  weights = []
  for batch_size, steps in ((16, 1), (8, 2), (4, 4)):
    config = _config(
        batch_size=batch_size,
        gradient_accumulation_steps=steps,
        poisson_sampling_in_fit=False,
        clipping_norm=0.05,
    )
    private = _compiled(config, _mlp(seed=4), learning_rate=0.5)
    private.fit(x, y, epochs=1, steps_per_epoch=2, verbose=0)
    weights.append(_values(private.trainable_variables))
  initial = _values(_mlp(seed=4).trainable_variables)
  for other in weights[1:]:
    for a, b, w0 in zip(weights[0], other, initial):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      assert not np.allclose(a, w0)


def test_seed_to_key_and_unseeded_models():
  from jax_privacy import _keras_model  # pylint: disable=g-import-not-at-top

  np.testing.assert_array_equal(
      _keras_model.seed_to_key_data(5),
      jax.random.key_data(jax.random.key(5)),
  )
  np.testing.assert_array_equal(
      _keras_model.seed_to_key_data(2**40 + 3), [2**8, 3]
  )
  first = keras_api.make_private(_mlp(), _config(seed=None))
  second = keras_api.make_private(_mlp(), _config(seed=None))
  assert not np.array_equal(first._dp_key.value, second._dp_key.value)  # pylint: disable=protected-access
