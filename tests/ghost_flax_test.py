"""clipped_grad(method='ghost'/'auto') equals 'vectorized' on Flax models.

The models are ordinary Linen and NNX models (Dense, Conv 1-D and 2-D, Embed,
LayerNorm, multi-head attention, dropout) turned into per-example losses by
jax_privacy.flax_api, not rewritten for ghost clipping: whatever the engine
taps or falls back on, the clipped sum and the per-example norms must match
the vmap path.
"""

import numpy as np
import pytest

flax = pytest.importorskip('flax')

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from jax_privacy import clipping
from jax_privacy import flax_api
# pylint: enable=g-import-not-at-top,wrong-import-position

xent = optax.softmax_cross_entropy_with_integer_labels
BATCH, SEQ, VOCAB, DIM, CLASSES = 5, 6, 11, 8, 3
CLIP = 0.3


class LinenSequence(nn.Module):
  """Embed -> Conv1D -> LayerNorm -> self-attention -> dropout -> Dense."""

  @nn.compact
  def __call__(self, tokens, train=False):
    x = nn.Embed(VOCAB, DIM)(tokens)
    x = jax.nn.gelu(nn.Conv(DIM, kernel_size=(3,))(x))
    x = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=DIM)(x)
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(CLASSES)(jnp.mean(x, axis=1))


class LinenImage(nn.Module):
  """Conv2D -> relu -> Dense -> Dense."""

  @nn.compact
  def __call__(self, images, train=False):
    x = jax.nn.relu(nn.Conv(4, kernel_size=(3, 3))(images))
    x = jnp.tanh(nn.Dense(6)(x.reshape(x.shape[0], -1)))
    return nn.Dense(CLASSES)(x)


class NnxSequence(nnx.Module):
  """The NNX twin of LinenSequence."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.conv = nnx.Conv(DIM, DIM, kernel_size=(3,), rngs=rngs)
    self.norm = nnx.LayerNorm(DIM, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=2, in_features=DIM, decode=False, rngs=rngs
    )
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(DIM, CLASSES, rngs=rngs)

  def __call__(self, tokens):
    x = jax.nn.gelu(self.conv(self.embed(tokens)))
    x = self.norm(x)
    x = self.dropout(x + self.attention(x))
    return self.head(jnp.mean(x, axis=1))


class NnxImage(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, kernel_size=(3, 3), rngs=rngs)
    self.hidden = nnx.Linear(6 * 6 * 4, 6, rngs=rngs)
    self.head = nnx.Linear(6, CLASSES, rngs=rngs)

  def __call__(self, images):
    x = jax.nn.relu(self.conv(images))
    x = jnp.tanh(self.hidden(x.reshape(x.shape[0], -1)))
    return self.head(x)


def _sequence_data():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
  labels = rng.integers(0, CLASSES, size=BATCH).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(labels)


def _image_data():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(BATCH, 6, 6, 2)).astype(np.float32) * 2.0
  labels = rng.integers(0, CLASSES, size=BATCH).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def _linen(model_cls, data):
  model = model_cls()
  params, state = flax_api.linen_split_variables(
      model.init(jax.random.key(0), data[0][:1])
  )
  loss = flax_api.linen_loss(
      model, xent, state=state, apply_kwargs={'train': True}
  )
  return loss, params


def _nnx(model_cls, data):
  del data
  model = model_cls(nnx.Rngs(0))
  params, _ = flax_api.nnx_split_params(model)
  return flax_api.nnx_loss(model, xent), params


CASES = {
    'linen_sequence': lambda: _linen(LinenSequence, _sequence_data()),
    'linen_image': lambda: _linen(LinenImage, _image_data()),
    'nnx_sequence': lambda: _nnx(NnxSequence, _sequence_data()),
    'nnx_image': lambda: _nnx(NnxImage, _image_data()),
}


def _run(loss, params, data, method, **kwargs):
  fn = clipping.clipped_grad(
      loss, l2_clip_norm=CLIP, batch_argnums=1, prng_argnum=2,
      return_grad_norms=True, method=method, **kwargs,
  )
  padding = jnp.arange(BATCH) == BATCH - 1
  return jax.jit(fn)(params, data, jax.random.key(42),
                     is_padding_example=padding)


def _assert_same(result, reference):
  grads, aux = result
  ref_grads, ref_aux = reference
  np.testing.assert_allclose(aux.grad_norms, ref_aux.grad_norms, rtol=1e-5)
  assert jax.tree_util.tree_structure(grads) == (
      jax.tree_util.tree_structure(ref_grads)
  )
  for path_leaf, ref in zip(
      jax.tree_util.tree_leaves_with_path(grads),
      jax.tree_util.tree_leaves(ref_grads),
  ):
    path, leaf = path_leaf
    np.testing.assert_allclose(
        leaf, ref, rtol=1e-5, atol=1e-6,
        err_msg=jax.tree_util.keystr(path),
    )


_REFERENCES = {}


def _reference(case):
  """The vectorized result of a case (computed once per test session)."""
  if case not in _REFERENCES:
    loss, params = CASES[case]()
    data = _sequence_data() if case.endswith('sequence') else _image_data()
    reference = _run(loss, params, data, 'vectorized')
    # Clipping binds for some examples, so a wrong norm changes the sum.
    assert np.any(np.asarray(reference[1].grad_norms) > CLIP)
    _REFERENCES[case] = (loss, params, data, reference)
  return _REFERENCES[case]


_SLOW = pytest.mark.slow  # Each compiles an attention model once more.


@pytest.mark.parametrize(
    'case, method',
    [
        ('linen_image', 'ghost'),
        ('linen_image', 'auto'),
        ('nnx_image', 'ghost'),
        ('nnx_image', 'auto'),
        ('linen_sequence', 'ghost'),
        ('nnx_sequence', 'ghost'),
        pytest.param('linen_sequence', 'auto', marks=_SLOW),
        pytest.param('nnx_sequence', 'auto', marks=_SLOW),
    ],
)
def test_ghost_and_auto_equal_vectorized(case, method):
  loss, params, data, reference = _reference(case)
  _assert_same(_run(loss, params, data, method), reference)


@_SLOW
def test_ghost_with_microbatches_equals_vectorized_on_nnx_attention():
  loss, params, data, reference = _reference('nnx_sequence')
  _assert_same(_run(loss, params, data, 'ghost', microbatch_size=2),
               reference)
