"""Tests of experiments/image_classification/augmult.py."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.image_classification import augmult
from jax_privacy import clipping

H = W = 8
C = 3
NUM_CLASSES = 4


def _images(n, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  if dtype == np.uint8:
    return rng.integers(0, 256, (n, H, W, C)).astype(np.uint8)
  # Distinct values everywhere, so that a crop/flip is identified uniquely.
  return rng.permutation(n * H * W * C).reshape(n, H, W, C).astype(dtype)


def _numpy_candidates(image, padding):
  """All crops (and their mirror images) of the reflect-padded image."""
  padded = np.pad(
      image, ((padding, padding), (padding, padding), (0, 0)), mode='reflect'
  )
  out = {}
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      crop = padded[dy : dy + H, dx : dx + W]
      out[(dy, dx, False)] = crop
      out[(dy, dx, True)] = crop[:, ::-1]
  return out


def _identify(view, image, padding):
  matches = [
      k
      for k, cand in _numpy_candidates(image, padding).items()
      if np.array_equal(cand, view)
  ]
  assert len(matches) == 1, matches
  return matches[0]


def test_augment_is_reflect_crop_and_flip_of_each_image():
  padding = 2
  images = _images(64)
  out = np.asarray(augmult.augment(jax.random.key(0), images,
                                   crop_padding=padding))
  assert out.shape == images.shape and out.dtype == images.dtype
  found = [_identify(out[i], images[i], padding) for i in range(len(images))]
  offsets = {(dy, dx) for dy, dx, _ in found}
  flips = [f for _, _, f in found]
  # Shifts of every size occur, and flips about half of the time.
  assert {dy for dy, _ in offsets} == set(range(2 * padding + 1))
  assert {dx for _, dx in offsets} == set(range(2 * padding + 1))
  assert 16 <= sum(flips) <= 48


def test_reflect_padding_does_not_repeat_the_edge():
  image = np.arange(H, dtype=np.float32)[None, :, None, None] * np.ones(
      (1, H, W, 1), np.float32
  )  # Row index as value.
  seen_top = set()
  for seed in range(40):
    out = np.asarray(
        augmult.augment(jax.random.key(seed), image, crop_padding=2, flip=False)
    )
    seen_top.add(float(out[0, 0, 0, 0]))
  # Reflection of rows [0, 1, 2, ...] gives [2, 1, 0, 1, 2, ...]: the first
  # row of a crop is 2, 1, 0, 1 or 2, never a repeated edge.
  assert seen_top == {0.0, 1.0, 2.0}


def test_augment_keeps_uint8_and_jits():
  images = _images(5, dtype=np.uint8)
  fn = jax.jit(lambda k, x: augmult.augment(k, x, crop_padding=3))
  out = fn(jax.random.key(1), images)
  assert out.dtype == jnp.uint8
  for i in range(5):
    _identify(np.asarray(out[i]), images[i], 3)


def test_no_augmentation_is_identity():
  images = jnp.asarray(_images(3))
  assert augmult.augment(
      jax.random.key(0), images, crop_padding=0, flip=False
  ) is images
  assert augmult.make_views(
      jax.random.key(0), images, 1, crop_padding=0, flip=False
  ) is images


def test_make_views_layout_reproducible_and_key_dependent():
  images = _images(3)
  views = augmult.make_views(jax.random.key(3), images, 4, crop_padding=2)
  assert views.shape == (12, H, W, C)
  grouped = np.asarray(views).reshape(3, 4, H, W, C)
  for i in range(3):
    for k in range(4):
      _identify(grouped[i, k], images[i], 2)
  again = augmult.make_views(jax.random.key(3), images, 4, crop_padding=2)
  np.testing.assert_array_equal(views, again)
  other = augmult.make_views(jax.random.key(4), images, 4, crop_padding=2)
  assert not np.array_equal(views, other)
  # The views of one image are not all the same.
  assert len({grouped[0, k].tobytes() for k in range(4)}) > 1


def test_unaugmented_first_view():
  images = _images(2)
  views = np.asarray(
      jax.jit(
          lambda k, x: augmult.make_views(
              k, x, 3, crop_padding=2, augment_first_view=False
          )
      )(jax.random.key(0), images)
  ).reshape(2, 3, H, W, C)
  np.testing.assert_array_equal(views[:, 0], images)
  # With one view and augment_first_view=False nothing is augmented.
  assert augmult.make_views(
      jax.random.key(0), images, 1, augment_first_view=False
  ) is images


@pytest.mark.parametrize(
    'kwargs, field',
    [
        ({'num_views': 0}, 'num_views'),
        ({'num_views': 1.5}, 'num_views'),
        ({'num_views': 2, 'crop_padding': -1}, 'crop_padding'),
        ({'num_views': 2, 'crop_padding': 8}, 'crop_padding'),
    ],
)
def test_make_views_rejects_bad_settings(kwargs, field):
  with pytest.raises(ValueError, match=field):
    augmult.make_views(jax.random.key(0), _images(1), **kwargs)


def test_bad_inputs():
  with pytest.raises(ValueError, match='num_views'):
    augmult.make_augmult_loss(lambda p, x, y: x, num_views=0)
  with pytest.raises(ValueError, match='crop_padding'):
    augmult.make_augmult_loss(lambda p, x, y: x, num_views=2, crop_padding=-2)
  with pytest.raises(ValueError, match='NHWC'):
    augmult.augment(jax.random.key(0), jnp.zeros((H, W, C)))
  loss = augmult.make_augmult_loss(
      lambda p, x, y: jnp.sum(x), num_views=2
  )
  with pytest.raises(ValueError, match='one loss per view'):
    loss({}, {'image': jnp.zeros((1, H, W, C)), 'label': jnp.zeros((1,))},
         jax.random.key(0))
  with pytest.raises(ValueError, match="'label'"):
    loss({}, {'image': jnp.zeros((1, H, W, C))}, jax.random.key(0))


# A tiny conv net: conv 3x3 (C -> 4), relu, global mean pool, dense (4 -> 4).
def _init_params():
  k1, k2 = jax.random.split(jax.random.key(42))
  return {
      'conv': jax.random.normal(k1, (3, 3, C, 4)) * 0.3,
      'dense': jax.random.normal(k2, (4, NUM_CLASSES)) * 0.3,
      'bias': jnp.zeros((NUM_CLASSES,)),
  }


def _logits(params, images):
  x = images.astype(jnp.float32) / 255.0
  x = jax.lax.conv_general_dilated(
      x, params['conv'], (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  x = jnp.mean(jax.nn.relu(x), axis=(1, 2))
  return x @ params['dense'] + params['bias']


def _per_view_loss(params, images, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      _logits(params, images), labels
  )


def _plain_loss(params, example, key):
  del key
  return _per_view_loss(params, example['image'], example['label'])[0]


def _batch(n=6, seed=0):
  rng = np.random.default_rng(seed)
  return {
      'image': jnp.asarray(_images(n, seed, np.uint8)),
      'label': jnp.asarray(rng.integers(0, NUM_CLASSES, n), jnp.int32),
  }


def _norm(tree):
  return float(optax.tree.norm(tree))


def _tree_close(a, b, **kwargs):
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(x, y, **kwargs), a, b
  )


def test_one_view_without_augmentation_equals_plain_path():
  params, batch, key = _init_params(), _batch(), jax.random.key(0)
  loss = augmult.make_augmult_loss(
      _per_view_loss, num_views=1, crop_padding=0, flip=False
  )
  kw = dict(l2_clip_norm=0.05, batch_argnums=1, prng_argnum=2)
  got = jax.jit(clipping.clipped_grad(loss, **kw))(params, batch, key)
  want = jax.jit(clipping.clipped_grad(_plain_loss, **kw))(params, batch, key)
  _tree_close(got, want, rtol=1e-6, atol=1e-9)


def test_k_unaugmented_views_equal_one_view():
  params, batch, key = _init_params(), _batch(), jax.random.key(0)
  kw = dict(l2_clip_norm=0.05, batch_argnums=1, prng_argnum=2)
  grads = [
      jax.jit(clipping.clipped_grad(
          augmult.make_augmult_loss(
              _per_view_loss, num_views=k, crop_padding=0, flip=False
          ),
          **kw,
      ))(params, batch, key)
      for k in (1, 4)
  ]
  _tree_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_tuple_examples_equal_dict_examples():
  params, batch, key = _init_params(), _batch(), jax.random.key(0)
  loss = augmult.make_augmult_loss(_per_view_loss, num_views=3)
  kw = dict(l2_clip_norm=0.05, batch_argnums=1, prng_argnum=2)
  fn = jax.jit(clipping.clipped_grad(loss, **kw))
  _tree_close(
      fn(params, batch, key),
      fn(params, (batch['image'], batch['label']), key),
      rtol=1e-6,
  )


@pytest.mark.parametrize('num_views', [1, 4])
def test_views_are_averaged_then_clipped(num_views):
  """Each contribution is clip(mean of the views' gradients), computed here
  independently from explicit per-example keys."""
  clip = 0.02
  params, batch = _init_params(), _batch(4)
  keys = jax.random.split(jax.random.key(7), 4)
  loss = augmult.make_augmult_loss(
      _per_view_loss, num_views=num_views, crop_padding=2
  )
  fn = jax.jit(clipping.clipped_grad(
      lambda p, ex, k: loss(p, ex, k[0]),
      l2_clip_norm=clip,
      batch_argnums=(1, 2),
  ))
  got = fn(params, batch, keys)

  @jax.jit
  def mean_of_view_grads(key, image, label):
    views = augmult.make_views(key, image, num_views, crop_padding=2)
    view_grads = [
        jax.grad(lambda p, v=v: _per_view_loss(p, views[v : v + 1], label)[0])(
            params
        )
        for v in range(num_views)
    ]
    return jax.tree_util.tree_map(lambda *g: sum(g) / num_views, *view_grads)

  want = jax.tree_util.tree_map(jnp.zeros_like, params)
  for i in range(4):
    mean = mean_of_view_grads(
        keys[i], batch['image'][i : i + 1], batch['label'][i : i + 1]
    )
    norm = _norm(mean)
    assert norm > clip  # The test exercises clipping.
    want = jax.tree_util.tree_map(
        lambda w, g: w + g * min(1.0, clip / norm), want, mean
    )
  _tree_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('num_views', [1, 4])
def test_empirical_sensitivity(num_views):
  clip = 0.01
  params, batch, key = _init_params(), _batch(6), jax.random.key(1)
  loss = augmult.make_augmult_loss(_per_view_loss, num_views=num_views)
  fn = jax.jit(
      clipping.clipped_grad(
          loss, l2_clip_norm=clip, batch_argnums=1, prng_argnum=2,
          return_grad_norms=True,
      )
  )
  full, aux = fn(params, batch, key)
  assert np.all(np.asarray(aux.grad_norms) > clip)
  for i in range(6):
    alone, _ = fn(params, batch, key, is_padding_example=jnp.arange(6) != i)
    assert _norm(alone) <= clip * (1 + 1e-5)
    without, _ = fn(
        params, batch, key, is_padding_example=jnp.arange(6) == i
    )
    diff = jax.tree_util.tree_map(jnp.subtract, full, without)
    assert _norm(diff) <= clip * (1 + 1e-5)
    assert _norm(diff) > 0.5 * clip


def test_vectorized_and_auto_give_equal_sums(caplog):
  params, batch, key = _init_params(), _batch(5), jax.random.key(2)
  loss = augmult.make_augmult_loss(_per_view_loss, num_views=3)
  kw = dict(l2_clip_norm=0.05, batch_argnums=1, prng_argnum=2)
  vectorized = jax.jit(clipping.clipped_grad(loss, method='vectorized', **kw))
  auto = jax.jit(clipping.clipped_grad(loss, method='auto', **kw))
  with caplog.at_level(logging.INFO, logger='jax_privacy._ghost'):
    got = auto(params, batch, key)
  assert 'ghost' in caplog.text  # 'auto' really took the ghost path.
  _tree_close(vectorized(params, batch, key), got, rtol=1e-4, atol=1e-7)
