"""Tests of jax_privacy.keras_lm: DP LoRA fine-tuning of keras-hub LMs."""

import importlib.util
import os
import pathlib

os.environ.setdefault('KERAS_BACKEND', 'jax')

# pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

keras = pytest.importorskip('keras')
keras_hub = pytest.importorskip('keras_hub')

import jax
import jax.numpy as jnp
import numpy as np

from jax_privacy import keras_api
from jax_privacy import keras_lm

VOCAB = 256
CONTEXT = 64


def _small_lm(seed=0, dropout=0.0, architecture='gpt2'):
  keras.utils.set_random_seed(seed)
  if architecture == 'gemma':
    # Rotary positions, grouped-query attention, no biases, no fixed context.
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=64, intermediate_dim=128,
        head_dim=32, dropout=dropout,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
  backbone = keras_hub.models.GPT2Backbone(
      vocabulary_size=VOCAB,
      num_layers=2,
      num_heads=2,
      hidden_dim=64,
      intermediate_dim=128,
      max_sequence_length=CONTEXT,
      dropout=dropout,
  )
  return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _token_sequences(num, seed=0, min_len=4, max_len=17):
  rng = np.random.default_rng(seed)
  return [
      rng.integers(1, VOCAB, size=int(rng.integers(min_len, max_len)))
      for _ in range(num)
  ]


def _perturb_lora(lm, seed=1):
  # lora_kernel_b starts at zero; give it values so both factors get
  # non-trivial gradients.
  rng = np.random.default_rng(seed)
  for variable in lm.trainable_variables:
    variable.assign(0.05 * rng.standard_normal(variable.shape))


@pytest.fixture(scope='module')
def plain_lm():
  """A small model the tests only read (never enable LoRA on it)."""
  return _small_lm()


def _config(**overrides):
  kwargs = dict(
      epsilon=8.0, delta=1e-5, clipping_norm=1.0, batch_size=8,
      gradient_accumulation_steps=1, train_steps=4, train_size=32, seed=0,
  )
  kwargs.update(overrides)
  return keras_api.DPKerasConfig(**kwargs)


def test_enable_lora_trains_only_adapters():
  lm = keras_lm.enable_lora(_small_lm(), 4)
  paths = [v.path for v in lm.trainable_variables]
  assert paths and all('lora_kernel' in p for p in paths)
  # 2 layers x (query, value) x (A: 64x2x4, B: 4x32).
  assert sum(int(np.prod(v.shape)) for v in lm.trainable_variables) == (
      2 * 2 * (64 * 2 * 4 + 4 * 32)
  )
  assert any(p.endswith('query/kernel') for p in (
      v.path for v in lm.non_trainable_variables))
  with pytest.raises(ValueError, match='already enabled'):
    keras_lm.enable_lora(lm, 2)


def test_enable_lora_train_biases_keeps_biases():
  lm = keras_lm.enable_lora(_small_lm(), 2, train_biases=True)
  paths = [v.path for v in lm.trainable_variables]
  assert sum(p.endswith('/bias') for p in paths) == 4


@pytest.mark.parametrize('rank', [0, -3, 1.5, True])
def test_enable_lora_bad_rank(plain_lm, rank):
  with pytest.raises(ValueError, match='rank must be an integer >= 1'):
    keras_lm.enable_lora(plain_lm, rank)
  assert not any('lora' in v.path for v in plain_lm.weights)


def test_enable_lora_not_a_causal_lm():
  with pytest.raises(ValueError, match='causal_lm must be'):
    keras_lm.enable_lora(keras.Sequential([keras.layers.Dense(2)]), 2)


def test_prepare_sequences_shifts_and_masks(plain_lm):
  lm = plain_lm
  x, y = keras_lm.prepare_sequences(lm, [np.array([5, 6, 7, 8]), [9, 10]])
  np.testing.assert_array_equal(x['token_ids'], [[5, 6, 7], [9, 0, 0]])
  np.testing.assert_array_equal(
      x['padding_mask'], [[True, True, True], [True, False, False]]
  )
  np.testing.assert_array_equal(y, [[6, 7, 8], [10, -1, -1]])
  x, y = keras_lm.prepare_sequences(lm, [[1, 2, 3]], sequence_length=5)
  assert x['token_ids'].shape == y.shape == (1, 5)


@pytest.mark.parametrize(
    'data, kwargs, match',
    [
        ([], {}, 'non-empty'),
        ('some text', {}, 'non-empty'),
        ([np.arange(CONTEXT + 2) % VOCAB], {}, 'max_sequence_length'),
        ([np.arange(10)], {'sequence_length': 5}, 'more than sequence_length'),
        ([np.arange(4)], {'sequence_length': CONTEXT + 1}, 'sequence_length'),
        ([[3]], {}, 'at least 2'),
        ([[3, VOCAB]], {}, 'outside'),
        (['hello'], {}, 'no preprocessor'),
    ],
)
def test_prepare_sequences_bad_input(plain_lm, data, kwargs, match):
  with pytest.raises(ValueError, match=match):
    keras_lm.prepare_sequences(plain_lm, data, **kwargs)


@pytest.mark.parametrize('reduction', ['sum', 'mean'])
def test_sequence_crossentropy_matches_numpy(reduction):
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (3, 5))
  labels[0, 3:] = -1
  labels[2, :] = -1
  log_probs = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  token = -np.take_along_axis(log_probs, np.maximum(labels, 0)[..., None], -1)
  token = token[..., 0] * (labels >= 0)
  expected = token.sum(-1)
  if reduction == 'mean':
    expected = expected / np.maximum((labels >= 0).sum(-1), 1)
  loss = keras_lm.SequenceCrossentropy(token_reduction=reduction)
  np.testing.assert_allclose(
      np.asarray(loss.call(labels, logits)), expected, rtol=1e-5
  )
  with pytest.raises(ValueError, match='token_reduction'):
    keras_lm.SequenceCrossentropy(token_reduction='max')


def _reference_clipped_sum(lm, trainable, x, y, is_padding, clip, normalize):
  """Loop over examples: jax.grad of one sequence's loss, clipped, summed."""
  non_trainable = [v.value for v in lm.non_trainable_variables]
  loss = keras_lm.SequenceCrossentropy()

  def example_loss(params, x_one, y_one):
    logits, _ = lm.stateless_call(params, non_trainable, x_one)
    return loss.call(y_one, logits)[0]

  example_grad = jax.jit(jax.grad(example_loss))
  total = [jnp.zeros_like(p) for p in trainable]
  norms = np.zeros(len(y))
  for i in range(len(y)):
    if is_padding[i]:
      continue
    grads = example_grad(
        trainable, {k: v[i : i + 1] for k, v in x.items()}, y[i : i + 1]
    )
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in grads))
    norms[i] = norm
    factor = jnp.minimum(1.0, clip / norm)
    total = [t + factor * g for t, g in zip(total, grads)]
  return [t / normalize for t in total], norms


@pytest.mark.parametrize(
    'architecture, clipping_norm',
    # Norms chosen between the smallest and largest gradient norm.
    [('gpt2', 1.2), pytest.param('gemma', 2.1, marks=pytest.mark.slow)],
)
def test_per_sequence_clipped_gradient_is_exact(architecture, clipping_norm):
  lm = keras_lm.enable_lora(_small_lm(architecture=architecture), 4)
  _perturb_lora(lm)
  x, y = keras_lm.prepare_sequences(
      lm, _token_sequences(6, min_len=3, max_len=13), sequence_length=12
  )
  # Two absent (padding) examples of zeros, as fit pads a Poisson batch.
  x = {k: np.concatenate([v, np.zeros_like(v[:2])]) for k, v in x.items()}
  y = np.concatenate([y, np.zeros_like(y[:2])])
  is_padding = np.array([False] * 6 + [True] * 2)
  config = _config(clipping_norm=clipping_norm, rescale_to_unit_norm=False)
  model = keras_api.make_private(lm, config)
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=keras_lm.SequenceCrossentropy())
  model.optimizer.build(model.trainable_variables)
  assert [v.path for v in model.trainable_variables] == [
      v.path for v in lm.trainable_variables
  ]
  trainable = [v.value for v in model.trainable_variables]
  grad_fn = jax.jit(model.clipped_gradient_fn(len(y)))
  summed, aux = grad_fn(
      trainable, x, y, (~is_padding).astype(np.float32), jax.random.key(0),
      [v.value for v in model.non_trainable_variables],
      [v.value for v in model.metrics_variables],
      [v.value for v in model.optimizer.variables],
      is_padding_example=is_padding,
  )
  expected, norms = _reference_clipped_sum(
      lm, trainable, x, y, is_padding, config.clipping_norm,
      config.effective_batch_size,
  )
  assert len(summed) == len(expected) == 8  # LoRA A and B only.
  for got, want in zip(summed, expected):
    # rtol 1e-5, and entries far below the largest one compared at 1e-5 of
    # it (float32 sums in another order differ there in the last bits).
    np.testing.assert_allclose(
        got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want)))
    )
  # Some sequences are clipped and some are not: both paths are exercised.
  assert np.any(norms[:6] > config.clipping_norm)
  assert np.any(norms[:6] < config.clipping_norm)
  np.testing.assert_array_equal(aux.values[6:], 0.0)
  # Tokens at padding positions do not change the gradient.
  x_noisy = dict(x)
  x_noisy['token_ids'] = np.where(
      x['padding_mask'], x['token_ids'], 77
  ).astype(np.int32)
  summed_noisy, _ = grad_fn(
      trainable, x_noisy, y, (~is_padding).astype(np.float32),
      jax.random.key(0), [v.value for v in model.non_trainable_variables],
      [v.value for v in model.metrics_variables],
      [v.value for v in model.optimizer.variables],
      is_padding_example=is_padding,
  )
  for got, want in zip(summed_noisy, summed):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_private_fit_changes_only_adapters_and_reports():
  lm = keras_lm.enable_lora(_small_lm(), 2)
  x, y = keras_lm.prepare_sequences(
      lm, _token_sequences(32, max_len=9), sequence_length=8
  )
  frozen = {v.path: np.array(v.value) for v in lm.non_trainable_variables}
  adapters = {v.path: np.array(v.value) for v in lm.trainable_variables}
  model = keras_api.make_private(lm, _config(batch_size=4, train_steps=2))
  model.compile(optimizer=keras.optimizers.Adam(1e-2),
                loss=keras_lm.SequenceCrossentropy(token_reduction='mean'),
                weighted_metrics=[keras_lm.SequenceAccuracy()])
  history = model.fit(x, y, epochs=1, steps_per_epoch=2, verbose=0)
  assert 0 < history.history['epsilon'][-1] <= 8.0
  assert 0 <= history.history['sequence_accuracy'][-1] <= 1
  assert 'sparse_categorical_accuracy' not in history.history
  for v in lm.non_trainable_variables:
    np.testing.assert_array_equal(np.array(v.value), frozen[v.path])
  assert any(
      not np.array_equal(np.array(v.value), adapters[v.path])
      for v in lm.trainable_variables
  )
  statement = keras_lm.privacy_statement(model, sequence_length=8)
  assert 'one sequence of up to 8 tokens' in statement
  assert '2 of 2 DP-SGD updates' in statement
  assert f'{sum(v.size for v in adapters.values())} trainable' in statement
  with pytest.raises(ValueError, match='train_steps'):
    model.fit(x, y, epochs=1, steps_per_epoch=1, verbose=0)


def test_perplexity_matches_loss(plain_lm):
  lm = plain_lm
  x, y = keras_lm.prepare_sequences(lm, _token_sequences(5), sequence_length=16)
  logits = np.asarray(lm.predict_on_batch(x))
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  real = y >= 0
  nll = -np.take_along_axis(
      np.asarray(log_probs), np.maximum(y, 0)[..., None], -1
  )[..., 0]
  expected = np.exp(nll[real].mean())
  np.testing.assert_allclose(
      keras_lm.perplexity(lm, x, y, batch_size=2), expected, rtol=1e-4
  )
  # A random model is close to uniform over the vocabulary.
  assert VOCAB / 3 < expected < VOCAB * 3
  with pytest.raises(ValueError, match='batch_size must be'):
    keras_lm.perplexity(lm, x, y, batch_size=0)
  with pytest.raises(ValueError, match='real'):
    keras_lm.perplexity(lm, x, np.full_like(y, keras_lm.IGNORE_LABEL))


def test_load_causal_lm_round_trip(plain_lm, tmp_path):
  lm = plain_lm
  lm.save_to_preset(str(tmp_path / 'preset'))
  loaded = keras_lm.load_causal_lm(tmp_path / 'preset', lora_rank=2)
  assert isinstance(loaded, keras_hub.models.GPT2CausalLM)
  x, _ = keras_lm.prepare_sequences(
      lm, _token_sequences(2, max_len=9), sequence_length=8
  )
  np.testing.assert_allclose(
      np.asarray(loaded.predict_on_batch(x)),
      np.asarray(lm.predict_on_batch(x)),
      rtol=1e-5, atol=1e-6,
  )
  assert all('lora_kernel' in v.path for v in loaded.trainable_variables)


def test_load_causal_lm_bad_directories(tmp_path):
  with pytest.raises(ValueError, match='not an existing directory.*save_to'):
    keras_lm.load_causal_lm(tmp_path / 'missing')
  with pytest.raises(ValueError, match='no config.json'):
    keras_lm.load_causal_lm(tmp_path)
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(ValueError, match='no model weights'):
    keras_lm.load_causal_lm(tmp_path)
  with pytest.raises(ValueError, match='lora_rank'):
    keras_lm.load_causal_lm(tmp_path, lora_rank=0)


def test_privacy_statement_needs_private_model(plain_lm):
  with pytest.raises(ValueError, match='make_private'):
    keras_lm.privacy_statement(plain_lm, sequence_length=8)
  shuffled = keras_api.make_private(
      plain_lm, _config(poisson_sampling_in_fit=False)
  )
  statement = keras_lm.privacy_statement(shuffled, sequence_length=8)
  assert 'replace-one neighbours, shuffled batches' in statement
  assert '0 of 4 DP-SGD updates' in statement


@pytest.mark.slow
def test_example_fast_run_lowers_perplexity():
  path = (
      pathlib.Path(__file__).resolve().parent.parent
      / 'examples'
      / 'keras_lora_finetuning.py'
  )
  spec = importlib.util.spec_from_file_location('keras_lora_example', path)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  result = example.run(fast=True, seed=0)
  assert 7.0 < result['epsilon_spent'] <= 8.0
  assert result['perplexity_after'] < result['perplexity_before']
  assert result['greedy'].startswith('Maya Rossi of ')
  assert 'one sequence of up to 64 tokens' in result['statement']


def test_generate_greedy_matches_argmax_loop(plain_lm):
  prompts = [np.array([5, 6, 7]), np.array([9])]
  outputs = keras_lm.generate(plain_lm, prompts, max_length=8)
  for prompt, out in zip(prompts, outputs):
    tokens = list(prompt)
    while len(tokens) < 8:
      logits = plain_lm.predict_on_batch({
          'token_ids': np.array([tokens]),
          'padding_mask': np.ones((1, len(tokens)), bool),
      })
      tokens.append(int(np.argmax(logits[0, -1])))
    np.testing.assert_array_equal(out, tokens)
  with pytest.raises(ValueError, match='max_length'):
    keras_lm.generate(plain_lm, prompts, max_length=CONTEXT + 1)
  with pytest.raises(ValueError, match='prompt 0'):
    keras_lm.generate(plain_lm, [np.arange(8)], max_length=8)
  with pytest.raises(ValueError, match='non-empty'):
    keras_lm.generate(plain_lm, [], max_length=8)


def _text_lm():
  vocabulary = {'<|endoftext|>': 0, 'a': 1, 'b': 2, '\u0120': 3, 'ab': 4,
                '\u0120a': 5}
  tokenizer = keras_hub.models.GPT2Tokenizer(
      vocabulary=vocabulary, merges=['a b', '\u0120 a']
  )
  preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
      tokenizer=tokenizer, sequence_length=16
  )
  backbone = keras_hub.models.GPT2Backbone(
      vocabulary_size=6, num_layers=1, num_heads=1, hidden_dim=8,
      intermediate_dim=8, max_sequence_length=16,
  )
  return keras_hub.models.GPT2CausalLM(
      backbone=backbone, preprocessor=preprocessor
  )


def test_text_through_the_preprocessor(tmp_path):
  lm = _text_lm()
  x, y = keras_lm.prepare_sequences(lm, ['ab a', 'b'], sequence_length=6)
  # Start token 0, the tokens, the end token 0; labels are shifted by one.
  np.testing.assert_array_equal(
      x['token_ids'], [[0, 4, 5, 0, 0, 0], [0, 2, 0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(
      y, [[4, 5, 0, -1, -1, -1], [2, 0, -1, -1, -1, -1]]
  )
  lm.save_to_preset(str(tmp_path))
  loaded = keras_lm.load_causal_lm(tmp_path)
  assert loaded.preprocessor is not None
  (text,) = keras_lm.generate(loaded, ['ab'], max_length=6)
  assert isinstance(text, str) and text.startswith('ab')


def test_sequence_accuracy_skips_padding():
  logits = np.zeros((2, 3, 4), np.float32)
  logits[0, :, 1] = 1.0  # predicts 1 everywhere
  logits[1, :, 2] = 1.0  # predicts 2 everywhere
  labels = np.array([[1, 3, -1], [2, -1, -1]])
  metric = keras_lm.SequenceAccuracy()
  metric.update_state(labels, logits)
  # Sequence 0: 1 of 2 real tokens right; sequence 1: 1 of 1.
  np.testing.assert_allclose(float(metric.result()), 0.75, rtol=1e-6)


def test_gemma_has_no_fixed_context():
  lm = keras_lm.enable_lora(_small_lm(architecture='gemma'), 2)
  assert len(lm.trainable_variables) == 8
  assert all('lora_kernel' in v.path for v in lm.trainable_variables)
  x, y = keras_lm.prepare_sequences(lm, [np.arange(1, 2 * CONTEXT) % VOCAB])
  assert y.shape == (1, 2 * CONTEXT - 2)
  with pytest.raises(ValueError, match='must be an integer >= 1'):
    keras_lm.prepare_sequences(lm, [[1, 2]], sequence_length=0)
