"""Ghost clipping of weight-standardized layers: exact, and lean in memory.

The parameters of a standardized kernel that feeds nothing else get their
clipped sum as the transform's VJP of the book-kept weight sum, and their
per-example norms a chunk of examples at a time (``jax_privacy._ghost_linear``).
Every result is compared with an independent reference computed here:
``jax.vmap(jax.grad(loss))``, per-example norms and ``min(1, C / norm)``
factors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_privacy import _ghost_linear
from jax_privacy import clipping
from _test_helpers import conv  # pylint: disable=g-import-not-at-top
from _test_helpers import normal  # pylint: disable=g-import-not-at-top
from _test_helpers import standardize  # pylint: disable=g-import-not-at-top

BATCH = 7


def _params():
  return {
      # 12x12 positions, small kernel: per-example gradients kept, formed
      # three examples at a time (a remainder chunk of one).
      'a': {'kernel': normal(0, (3, 3, 3, 12))},
      # 3x3 positions, a wide kernel with a gain (scaled WS): book-kept sum.
      'b': {
          'kernel': normal(1, (3, 3, 12, 32)),
          'gain': 1.0 + normal(2, (32,), 0.3),
      },
      'head': {'kernel': normal(3, (32, 4), 0.5), 'bias': normal(4, (4,))},
  }


def _loss(params, image, label):
  """One example's loss; ``image`` [1, 12, 12, 3], ``label`` [1, 4]."""
  h = jax.nn.relu(conv(image, standardize(params['a']['kernel'])))
  b = params['b']
  h = jax.nn.relu(
      conv(h, standardize(b['kernel'], b['gain'], scaled=True), 4)
  )
  logits = jnp.mean(h, axis=(1, 2)) @ params['head']['kernel']
  logits = logits + params['head']['bias']
  return -jnp.sum(jax.nn.log_softmax(logits) * label)


def _data():
  images = normal(10, (BATCH, 12, 12, 3))
  images = images * jnp.linspace(0.3, 3.0, BATCH)[:, None, None, None]
  labels = jax.nn.one_hot(jnp.arange(BATCH) % 4, 4)
  return images, labels


def _reference(params, images, labels, clip):
  """Clipped sum and norms from per-example gradients (vmap of grad)."""
  grads = jax.vmap(
      lambda x, y: jax.grad(_loss)(params, x[None], y[None])
  )(images, labels)
  leaves = jax.tree_util.tree_leaves(grads)
  norms = jnp.sqrt(
      sum(jnp.sum(jnp.square(g).reshape((BATCH, -1)), axis=1) for g in leaves)
  )
  factors = jnp.minimum(1.0, clip / norms)
  summed = jax.tree_util.tree_map(
      lambda g: jnp.tensordot(factors, g, axes=1), grads
  )
  return summed, norms


def _ghost(params, images, labels, clip, **kwargs):
  fn = clipping.clipped_grad(
      _loss, l2_clip_norm=clip, batch_argnums=(1, 2), return_grad_norms=True,
      method='ghost', **kwargs,
  )
  summed, aux = jax.jit(fn)(params, images, labels)
  return summed, aux.grad_norms


def _assert_close(expected, actual):
  exp_leaves, exp_tree = jax.tree_util.tree_flatten(expected)
  act_leaves, act_tree = jax.tree_util.tree_flatten(actual)
  assert exp_tree == act_tree
  for exp, act in zip(exp_leaves, act_leaves):
    exp, act = np.asarray(exp), np.asarray(act)
    assert np.any(exp != 0)
    np.testing.assert_allclose(
        act, exp, rtol=1e-5, atol=1e-6 * np.max(np.abs(exp))
    )


@pytest.mark.parametrize('microbatch_size', [None, 4])
def test_standardized_layers_equal_vmap_grad_reference(microbatch_size):
  params = _params()
  images, labels = _data()
  _, norms = _reference(params, images, labels, 1.0)
  clip = float(np.median(np.asarray(norms)))  # some clipped, some not
  expected = _reference(params, images, labels, clip)
  actual = _ghost(
      params, images, labels, clip, microbatch_size=microbatch_size
  )
  _assert_close(expected, actual)


def test_standardized_layers_are_mapped_in_chunks():
  """The per-example weight gradients are formed in a ``lax.map`` (scan)."""
  params = _params()
  images, labels = _data()
  fn = clipping.clipped_grad(
      _loss, l2_clip_norm=1.0, batch_argnums=(1, 2), method='ghost'
  )
  text = str(jax.make_jaxpr(fn)(params, images, labels))
  assert 'scan[' in text


def test_kernel_and_gain_in_different_clip_groups_fall_back_exactly():
  """Per-group norms that split one transform's parameters: exact too."""
  params = _params()
  images, labels = _data()
  clip = {'a': 1.0, 'b': {'kernel': 0.5, 'gain': 0.2}, 'head': 1.0}
  fn = clipping.clipped_grad(
      _loss, l2_clip_norm=clip, batch_argnums=(1, 2), return_grad_norms=True,
      method='ghost',
  )
  summed, aux = jax.jit(fn)(params, images, labels)
  grads = jax.vmap(
      lambda x, y: jax.grad(_loss)(params, x[None], y[None])
  )(images, labels)

  def group_norm(*trees):
    leaves = [g for t in trees for g in jax.tree_util.tree_leaves(t)]
    return jnp.sqrt(sum(
        jnp.sum(jnp.square(g).reshape((BATCH, -1)), axis=1) for g in leaves
    ))

  groups = {
      'a': (group_norm(grads['a']), 1.0),
      'b_kernel': (group_norm(grads['b']['kernel']), 0.5),
      'b_gain': (group_norm(grads['b']['gain']), 0.2),
      'head': (group_norm(grads['head']), 1.0),
  }
  factor = {k: jnp.minimum(1.0, c / n) for k, (n, c) in groups.items()}
  expected = {
      'a': jax.tree_util.tree_map(
          lambda g: jnp.tensordot(factor['a'], g, axes=1), grads['a']
      ),
      'b': {
          'kernel': jnp.tensordot(
              factor['b_kernel'], grads['b']['kernel'], axes=1
          ),
          'gain': jnp.tensordot(factor['b_gain'], grads['b']['gain'], axes=1),
      },
      'head': jax.tree_util.tree_map(
          lambda g: jnp.tensordot(factor['head'], g, axes=1), grads['head']
      ),
  }
  _assert_close(expected, summed)
  np.testing.assert_allclose(
      aux.grad_norms['b']['gain'], groups['b_gain'][0], rtol=1e-5
  )


def test_chunk_size_caps_transient_memory():
  images = jnp.zeros((1, 12, 12, 3))
  kernel = jnp.zeros((3, 3, 3, 12))
  closed = jax.make_jaxpr(conv)(images, kernel)

  class Tap:
    eqn = closed.jaxpr.eqns[0]
    operand = 1
    weight_shape = kernel.shape

  # Per example: input 432 + output 1,728 numbers; transient 2 * 324
  # (gradient and its map to the parameters) + 144 * 27 (input slices):
  # 2,160 / 4,536 of an example per example of the batch.
  assert _ghost_linear._linear_chunk_size(Tap, 7) == 3  # 1 divides 7: too few
  assert _ghost_linear._linear_chunk_size(Tap, 1) == 1
  # 30 fit; 16 divides 64 (no remainder chunk) and is at least half of 30.
  assert _ghost_linear._linear_chunk_size(Tap, 64) == 16
  assert _ghost_linear._linear_chunk_size(Tap, 63) == 21


def test_compiled_memory_is_below_per_example_gradients():
  """Wide standardized kernels on small images: the step's temporary memory
  stays far below ``batch x parameters`` (what keeping per-example
  gradients of the parameters takes)."""
  batch = 32
  params = {
      'k1': normal(0, (3, 3, 64, 64), 0.1),
      'k2': normal(1, (3, 3, 64, 64), 0.1),
  }

  def loss(params, image):
    h = jax.nn.relu(conv(image, standardize(params['k1'])))
    h = conv(h, standardize(params['k2']))
    return jnp.mean(jnp.square(h))

  images = normal(2, (batch, 4, 4, 64))
  fn = clipping.clipped_grad(loss, l2_clip_norm=1.0, method='ghost')
  compiled = jax.jit(fn).lower(params, images).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip('no memory analysis on this backend')
  per_example = batch * 2 * 3 * 3 * 64 * 64 * 4
  assert analysis.temp_size_in_bytes < 0.5 * per_example, (
      analysis.temp_size_in_bytes, per_example
  )


def test_low_precision_weight_is_not_book_kept():
  """A bfloat16 standardized kernel keeps per-example gradients (its VJP
  would otherwise take the whole clipped sum in bfloat16)."""
  params = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), _params())
  images, labels = _data()
  seen = []
  original = _ghost_linear.linear_taps

  def record(*args):
    seen.append(original(*args))
    return seen[-1]

  _ghost_linear.linear_taps = record
  try:
    fn = clipping.clipped_grad(
        _loss, l2_clip_norm=1.0, batch_argnums=(1, 2), method='ghost'
    )
    summed = jax.jit(fn)(params, images.astype(jnp.bfloat16), labels)
  finally:
    _ghost_linear.linear_taps = original
  assert seen and seen[0] and not any(kept for _, kept in seen[0].values())
  expected = clipping.clipped_grad(
      _loss, l2_clip_norm=1.0, batch_argnums=(1, 2), method='vectorized'
  )(params, images.astype(jnp.bfloat16), labels)
  for exp, act in zip(
      jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(summed)
  ):
    exp = np.asarray(exp, np.float32)
    act = np.asarray(act, np.float32)
    np.testing.assert_allclose(act, exp, atol=0.05 * np.max(np.abs(exp)))
