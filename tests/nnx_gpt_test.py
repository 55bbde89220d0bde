"""Tests of examples/nnx_gpt.py: the NNX GPT decoder, LoRA, generation."""

import importlib.util
import pathlib

import numpy as np
import pytest

pytest.importorskip('flax')

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx
import jax
import jax.numpy as jnp
# pylint: enable=g-import-not-at-top,wrong-import-position

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


gpt = _load('nnx_gpt')

CONTEXT = 8


@nnx.jit
def _forward(model, tokens):
  """``model(tokens)``, compiled once per shape (eager calls are slow)."""
  return model(tokens)


def _config(**overrides):
  settings = dict(
      vocab_size=gpt.VOCAB_SIZE, context_length=CONTEXT, num_layers=2,
      num_heads=2, embed_dim=16, mlp_dim=32,
  )
  settings.update(overrides)
  return gpt.GPTConfig(**settings)


@pytest.fixture(scope='module')
def model():
  return gpt.GPT(_config(), rngs=nnx.Rngs(0))


def _tokens(batch, length, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, size=(batch, length)), jnp.int32)


def _randomize_lora_b(model, seed):
  """Non-zero ``lora_b`` so the adapters change the output."""
  state = nnx.state(model, nnx.LoRAParam)
  leaves, tree = jax.tree_util.tree_flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [
      0.3 * jax.random.normal(k, leaf.shape) if leaf.ndim and not leaf.any()
      else leaf
      for k, leaf in zip(keys, leaves)
  ]
  nnx.update(model, jax.tree_util.tree_unflatten(tree, new))


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('length', [1, 5, CONTEXT])
def test_logits_shape_and_dtype(model, length):
  logits = _forward(model, _tokens(3, length))
  assert logits.shape == (3, length, gpt.VOCAB_SIZE)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))


def test_head_is_not_tied_to_the_embedding(model):
  params = nnx.state(model, nnx.Param)
  assert params['head']['kernel'].shape == (16, gpt.VOCAB_SIZE)
  assert params['token_embed']['embedding'].shape == (gpt.VOCAB_SIZE, 16)


@pytest.mark.parametrize('changed', [0, 3, CONTEXT - 1])
def test_causal_a_future_token_does_not_change_earlier_logits(
    model, changed
):
  tokens = _tokens(2, CONTEXT, seed=1)
  other = tokens.at[:, changed].set((tokens[:, changed] + 7) % 256)
  before = np.asarray(_forward(model, tokens))
  after = np.asarray(_forward(model, other))
  np.testing.assert_array_equal(before[:, :changed], after[:, :changed])
  # The changed position (and, through attention, later ones) does move.
  assert np.abs(before[:, changed:] - after[:, changed:]).max() > 1e-4


def test_too_long_sequence_is_refused_with_advice(model):
  with pytest.raises(ValueError, match='longer than the model.s context_len'):
    model(_tokens(1, CONTEXT + 1))
  with pytest.raises(ValueError, match='truncate or split'):
    model(_tokens(1, CONTEXT + 1))
  with pytest.raises(ValueError, match='tokens must be int'):
    model(jnp.zeros((CONTEXT,), jnp.int32))


@pytest.mark.parametrize(
    'field, value',
    [
        ('vocab_size', 0),
        ('context_length', -1),
        ('num_layers', 0),
        ('num_heads', 0),
        ('embed_dim', 15),  # not a multiple of num_heads=2
        ('mlp_dim', 0),
        ('dropout', 1.0),
        ('dropout', -0.1),
        ('lora_rank', -1),
        ('lora_targets', ()),
        ('lora_targets', ('attention', 'head')),
    ],
)
def test_config_rejects_bad_fields(field, value):
  with pytest.raises(ValueError, match=field):
    _config(**{field: value})


# ----------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------


def _flat_without_base_module(tree):
  """``{path: leaf}`` with the ``base_module`` level that LoRA adds removed."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(str(k.key) for k in path if str(k.key) != 'base_module')
    flat[keys] = np.asarray(leaf)
  return flat


@pytest.mark.parametrize(
    'targets, per_block',
    [(('attention', 'mlp'), 6), (('mlp',), 2)],
)
def test_add_lora_wraps_the_targeted_layers_and_keeps_outputs(
    targets, per_block
):
  model = gpt.GPT(_config(), rngs=nnx.Rngs(0))
  tokens = _tokens(2, CONTEXT)
  before = np.asarray(_forward(model, tokens))
  frozen = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert gpt.add_lora(model, 3, rngs=nnx.Rngs(1), targets=targets) is model
  lora = nnx.state(model, nnx.LoRAParam)
  shapes = [leaf.shape for leaf in jax.tree_util.tree_leaves(lora)]
  assert len(shapes) == 2 * per_block * 2  # (lora_a, lora_b) x layers
  assert all(3 in shape for shape in shapes)
  # lora_b starts at zero: same outputs, same pretrained weights.
  np.testing.assert_allclose(
      _forward(model, tokens), before, rtol=1e-6, atol=1e-6
  )
  base = _flat_without_base_module(
      nnx.to_pure_dict(nnx.state(model, nnx.All(
          nnx.Param, nnx.Not(nnx.LoRAParam))))
  )
  expected = _flat_without_base_module(frozen)
  assert base.keys() == expected.keys()
  for path, value in expected.items():
    np.testing.assert_array_equal(base[path], value)
  # The adapters are in the forward pass.
  _randomize_lora_b(model, seed=2)
  assert np.abs(np.asarray(_forward(model, tokens)) - before).max() > 1e-3


def test_config_lora_rank_builds_the_same_structure_as_add_lora():
  built = gpt.GPT(_config(lora_rank=2), rngs=nnx.Rngs(0))
  added = gpt.add_lora(
      gpt.GPT(_config(), rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(1)
  )
  shapes = lambda m: jax.tree_util.tree_map(
      jnp.shape, nnx.to_pure_dict(nnx.state(m, nnx.Param))
  )
  assert shapes(built) == shapes(added)
  tokens = _tokens(2, CONTEXT)
  np.testing.assert_allclose(
      _forward(built, tokens),
      _forward(gpt.GPT(_config(), rngs=nnx.Rngs(0)), tokens),
      rtol=1e-6, atol=1e-6,
  )


@pytest.mark.parametrize('rank', [0, -2, 1.5])
def test_add_lora_rejects_a_bad_rank(rank):
  model = gpt.GPT(_config(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='rank must be an integer >= 1'):
    gpt.add_lora(model, rank, rngs=nnx.Rngs(1))


def test_add_lora_rejects_bad_targets_and_a_second_set():
  model = gpt.GPT(_config(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='lora_targets'):
    gpt.add_lora(model, 2, rngs=nnx.Rngs(1), targets=('embedding',))
  gpt.add_lora(model, 2, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match='already has LoRA adapters'):
    gpt.add_lora(model, 2, rngs=nnx.Rngs(1))


# ----------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------


def _argmax_decoding(model, prompt, num_tokens):
  """Greedy decoding by hand: full forward pass on the last CONTEXT tokens."""
  tokens = list(np.asarray(prompt))
  for _ in range(num_tokens):
    window = jnp.asarray(tokens[-CONTEXT:], jnp.int32)[None]
    tokens.append(int(jnp.argmax(_forward(model, window)[0, -1])))
  return np.asarray(tokens)


@pytest.mark.parametrize('num_tokens', [0, 12])  # 12 slides the window
def test_greedy_generation_is_argmax_decoding(model, num_tokens):
  prompt = jnp.asarray(gpt.encode('Hi!'))
  out = gpt.generate(model, prompt, num_tokens=num_tokens, greedy=True)
  assert out.shape == (3 + num_tokens,)
  np.testing.assert_array_equal(
      out, _argmax_decoding(model, prompt, num_tokens)
  )
  again = gpt.generate(model, prompt, num_tokens=num_tokens, greedy=True)
  np.testing.assert_array_equal(out, again)


def test_batched_greedy_generation_matches_each_row(model):
  prompts = _tokens(2, 4, seed=5)
  out = gpt.generate(model, prompts, num_tokens=5, greedy=True)
  assert out.shape == (2, 9)
  for row in range(2):
    np.testing.assert_array_equal(
        out[row], _argmax_decoding(model, prompts[row], 5)
    )


def test_dropout_is_on_in_train_mode_and_off_in_generation():
  model = gpt.GPT(_config(dropout=0.5), rngs=nnx.Rngs(0))
  tokens = _tokens(2, CONTEXT)
  model.train()
  first, second = _forward(model, tokens), _forward(model, tokens)
  assert np.abs(np.asarray(first - second)).max() > 1e-3
  prompt = gpt.encode('ab')
  generated = gpt.generate(model, prompt, num_tokens=6, greedy=True)
  again = gpt.generate(model, prompt, num_tokens=6, greedy=True)
  np.testing.assert_array_equal(generated, again)
  assert model.blocks[0].dropout.deterministic is False  # still training
  model.eval()
  np.testing.assert_array_equal(
      _forward(model, tokens), _forward(model, tokens)
  )
  np.testing.assert_array_equal(
      generated, _argmax_decoding(model, jnp.asarray(prompt), 6)
  )


def test_sampling_is_reproducible_from_the_key(model):
  prompt = gpt.encode('abc')
  sample = lambda seed, **kw: np.asarray(gpt.generate(
      model, prompt, num_tokens=10, key=jax.random.key(seed), **kw
  ))
  np.testing.assert_array_equal(sample(0), sample(0))
  assert not np.array_equal(sample(0), sample(1))
  # top_k=1 is greedy, whatever the key and temperature.
  np.testing.assert_array_equal(
      sample(3, top_k=1, temperature=5.0),
      gpt.generate(model, prompt, num_tokens=10, greedy=True),
  )


def test_top_k_samples_only_among_the_k_most_likely(model):
  prompt = gpt.encode('xy')
  for seed in range(4):
    out = np.asarray(gpt.generate(
        model, prompt, num_tokens=6, key=jax.random.key(seed), top_k=3,
        temperature=3.0,
    ))
    for position in range(2, len(out)):
      window = jnp.asarray(out[max(0, position - CONTEXT):position])[None]
      top3 = np.argsort(np.asarray(_forward(model, window)[0, -1]))[-3:]
      assert out[position] in top3


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(prompt_tokens=np.zeros((0,), np.int32), greedy=True), 'empty'),
        (
            dict(prompt_tokens=np.zeros((CONTEXT + 1,), np.int32),
                 greedy=True),
            'context_length',
        ),
        (dict(num_tokens=-1, greedy=True), 'num_tokens'),
        (dict(key=None), 'key'),
        (dict(temperature=0.0), 'temperature'),
        (dict(top_k=0), 'top_k'),
        (dict(top_k=gpt.VOCAB_SIZE + 1), 'top_k'),
    ],
)
def test_generate_rejects_bad_input(model, kwargs, match):
  arguments = dict(
      prompt_tokens=gpt.encode('ab'), num_tokens=3, key=jax.random.key(0)
  )
  arguments.update(kwargs)
  prompt = arguments.pop('prompt_tokens')
  with pytest.raises(ValueError, match=match):
    gpt.generate(model, prompt, **arguments)


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'text', ['', 'hello world', 'naïve café – ünïcödé ✓ 日本', 'a\nb\tc\x00']
)
def test_tokenizer_round_trip(text):
  tokens = gpt.encode(text)
  assert tokens.dtype == np.int32
  assert len(tokens) == len(text.encode('utf-8'))
  assert tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 256)
  assert gpt.decode(tokens) == text


def test_padding_is_dropped_and_pad_batch_masks_it():
  tokens, mask = gpt.pad_batch([gpt.encode('abc'), gpt.encode('de')], 5)
  assert tokens.shape == mask.shape == (2, 5)
  np.testing.assert_array_equal(tokens[1], [100, 101] + [gpt.PAD_ID] * 3)
  np.testing.assert_array_equal(mask.sum(axis=1), [3, 2])
  assert [gpt.decode(row) for row in tokens] == ['abc', 'de']
  with pytest.raises(ValueError, match='more than length=2'):
    gpt.pad_batch([gpt.encode('abc')], 2)
  with pytest.raises(ValueError, match='tokens must be in'):
    gpt.decode([gpt.PAD_ID + 1])
