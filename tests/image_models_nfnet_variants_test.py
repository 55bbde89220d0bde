"""Tests of the NFNet-F1/F2/F3 variants of experiments/image_classification.

The full-size models are only built abstractly (``nnx.eval_shape``): their
parameter counts and output shapes are checked without allocating the
255M parameters of an NFNet-F3. A forward pass runs on an F3-deep network
of reduced width at 16x16.
"""

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip('flax.nnx')

from experiments.image_classification import config as config_lib  # pylint: disable=g-import-not-at-top
from experiments.image_classification import models  # pylint: disable=g-import-not-at-top
from experiments.image_classification import models_nf  # pylint: disable=g-import-not-at-top
from jax_privacy import flax_api  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parent.parent
F3_CONFIG = (ROOT / 'experiments' / 'image_classification' / 'configs'
             / 'imagenet_nfnet_f3_finetune_eps0.5.toml')
F0_WIDTHS = (256, 512, 1536, 1536)
F0_DEPTHS = (1, 2, 6, 3)
ALPHA = 0.2
TINY = {'widths': (16, 32, 32, 32), 'stem_widths': (4, 4, 8, 8),
        'group_size': 4}


def _abstract(name, num_classes=1000, **kwargs):
  return nnx.eval_shape(
      lambda: models.build_model(name, num_classes, rngs=nnx.Rngs(0),
                                 **kwargs)
  )


@functools.cache
def _shared(name):
  """The named 1000-class model, built abstractly once (never modified)."""
  return _abstract(name)


def _count(name):
  return models.count_params(_shared(name))


def _block_params(width, group_size=128):
  """Parameters of one non-transition NFNet block of ``width`` channels.

  Every convolution has a kernel, a bias and a gain per output channel;
  the squeeze-and-excite layers are dense with biases; one scalar skip gain.
  """
  half = width // 2
  conv0 = width * half + 2 * half
  conv3x3 = 9 * group_size * half + 2 * half  # grouped: group_size inputs
  conv2 = half * width + 2 * width
  squeeze_excite = (width * half + half) + (half * width + width)
  return conv0 + 2 * conv3x3 + conv2 + squeeze_excite + 1


# Brock et al. 2021b (arXiv:2102.06171): parameters in millions, 1000
# classes. F2 was also read from a public results page (193.8M).
@pytest.mark.parametrize('name, published_millions', [
    ('nfnet-f0', 71.5), ('nfnet-f1', 132.6), ('nfnet-f2', 193.8),
    ('nfnet-f3', 254.9),
])
def test_variants_have_the_published_parameter_counts(
    name, published_millions):
  count = _count(name)
  assert round(count / 1e6, 1) == published_millions, count


def test_f0_is_unchanged():
  assert _count('nfnet-f0') == 71_489_284
  assert models_nf.NFNET_DEPTHS['nfnet-f0'] == F0_DEPTHS


@pytest.mark.parametrize('n', [1, 2, 3])
def test_each_depth_step_adds_f0_many_plain_blocks(n):
  """Fn minus F0 is n extra non-transition blocks per F0 block, per stage."""
  expected = n * sum(
      depth * _block_params(width)
      for depth, width in zip(F0_DEPTHS, F0_WIDTHS)
  )
  difference = _count(f'nfnet-f{n}') - _count('nfnet-f0')
  assert difference == expected
  assert models_nf.NFNET_DEPTHS[f'nfnet-f{n}'] == tuple(
      (n + 1) * d for d in F0_DEPTHS)


def test_f3_layout_transitions_and_signal_propagation():
  model = _shared('nfnet-f3')
  depths = (4, 8, 24, 12)
  assert len(model.blocks) == sum(depths) == 48
  starts = {sum(depths[:s]) for s in range(len(depths))}
  expected_std = 1.0
  for index, block in enumerate(model.blocks):
    assert (block.shortcut is not None) == (index in starts), index
    assert block.stride == (2 if index in starts and index > 0 else 1)
    # beta is the expected std of the block's input: 1 after a transition
    # block's normalized shortcut, plus alpha^2 in variance per block.
    assert math.isclose(block.beta, expected_std), index
    if index in starts:
      expected_std = 1.0
    expected_std = math.sqrt(expected_std**2 + ALPHA**2)
  assert model.final_conv.kernel.get_value().shape == (1, 1, 1536, 3072)


def test_f3_output_shape_at_its_train_and_test_sizes():
  graphdef, state = nnx.split(_shared('nfnet-f3'))
  for size in models.NFNET_RESOLUTIONS['nfnet-f3']:
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    logits = jax.eval_shape(
        lambda s, x: nnx.merge(graphdef, s)(x), state, images)
    assert logits.shape == (2, 1000)


def test_recommended_resolutions_are_data_not_constraints():
  resolutions = models.NFNET_RESOLUTIONS
  assert set(resolutions) == set(models_nf.NFNET_DEPTHS)
  assert set(resolutions) <= set(models.MODEL_NAMES)
  assert dict(resolutions) == {
      'nfnet-f0': (192, 256), 'nfnet-f1': (224, 320),
      'nfnet-f2': (256, 352), 'nfnet-f3': (320, 416),
  }
  assert resolutions['nfnet-f3'].train == 320
  assert resolutions['nfnet-f3'].test == 416
  with pytest.raises(TypeError):
    resolutions['nfnet-f3'] = (1, 1)  # pytype: disable=unsupported-operands


def test_tiny_f3_deep_forward_is_finite_and_per_example():
  """F3's 48 blocks at width 32 and 16x16: finite, per-example logits."""
  model = models.build_model('NFNet-F3', 5, rngs=nnx.Rngs(0), **TINY)
  assert len(model.blocks) == 48
  for block in model.blocks:  # the zero-initialized gains hide the blocks
    block.skip_gain.set_value(jnp.ones(()))
  kernel = model.classifier.kernel
  kernel.set_value(jax.random.normal(jax.random.key(1), kernel.shape))
  apply = jax.jit(models.make_apply(model))
  params, _ = flax_api.nnx_split_params(model)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  logits = apply(params, images)
  assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
  assert float(jnp.std(logits)) > 1e-3
  other = images.at[1].set(jax.random.normal(jax.random.key(2), (16, 16, 3)))
  np.testing.assert_allclose(apply(params, other)[0], logits[0], rtol=1e-5,
                             atol=1e-6)


def test_variant_keyword_arguments_and_bad_names():
  model = _abstract('nfnet-f2', 10, depths=(1, 1), widths=(256, 512))
  assert len(model.blocks) == 2
  with pytest.raises(ValueError, match='nfnet-f0, nfnet-f1, nfnet-f2, '
                     'nfnet-f3, got'):
    _abstract('nfnet-f4')
  with pytest.raises(ValueError, match='dropout_rate must be in'):
    _abstract('nfnet-f3', dropout_rate=1.0)


def test_f3_config_builds_the_paper_model():
  config = config_lib.load_config(F3_CONFIG)
  assert config.model == 'nfnet-f3'
  assert (config.epsilon, config.delta) == (0.5, 8e-7)
  assert config.published_accuracy == 83.8
  assert config.image_size == models.NFNET_RESOLUTIONS['nfnet-f3'].train
  assert config.num_classes == 1000
  assert round(_count(config.model) / 1e6, 1) == 254.9
