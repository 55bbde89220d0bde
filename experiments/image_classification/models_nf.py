"""Normalizer-free ResNets (NF-ResNet-50) and NFNets (NFNet-F0 to F3), NNX.

No normalization layer at all: signal propagation is kept by

* scaled weight standardization in every convolution,
  ``gain * (W - mean) / (std * sqrt(fan_in))`` with a learnable
  per-channel gain (:class:`~experiments.image_classification.models_layers.
  WSConv` with ``scaled=True, use_gain=True``);
* scaled activations ``gamma * act(x)`` with unit second moment on N(0, 1)
  inputs;
* residual blocks ``h_{i+1} = h_i + alpha * f_i(h_i / beta_i)``, where
  ``beta_i`` is the expected standard deviation of ``h_i`` at
  initialization: ``beta_{i+1}^2 = beta_i^2 + alpha^2``, reset to 1 after a
  transition block (whose shortcut is a convolution of the normalized
  input, of variance 1). ``alpha = 0.2``.

NF-ResNet-50 (Brock et al. 2021a): a ResNet-50 v2 layout (7x7 stride-2
stem to 64 channels, 3x3 max-pool, bottleneck stages of depths 3, 4, 6, 3
and widths 256, 512, 1024, 2048, bottleneck ratio 1/4, ReLU), made
normalizer-free as above. NFNet-F0 (Brock et al. 2021b): a 4-convolution
stem (16, 32, 64, 128 channels, two stride-2), stages of depths 1, 2, 6, 3
and widths 256, 512, 1536, 1536, bottleneck ratio 1/2 with grouped 3x3
convolutions of group width 128 (two per block), squeeze-and-excite
(ratio 1/2, output doubled), a learnable scalar gain at the end of each
residual branch initialized to 0, average-pool + 1x1 shortcuts, a final
1x1 convolution to 3072 channels, GELU. Stochastic depth, used in the
paper for training from scratch, is left out (these models are for
fine-tuning); dropout before the head is optional (``dropout_rate``; 0.2
in the paper for F0). Both heads are dense layers initialized to zero, as
for fine-tuning from a pretrained body.

The larger NFNets differ from F0 by depth only (Brock et al. 2021b, the
table of NFNet variants): NFNet-Fn has F0's stage depths times ``n + 1``
(F1: 2, 4, 12, 6; F2: 3, 6, 18, 9; F3: 4, 8, 24, 12) and the same widths
(:data:`NFNET_DEPTHS`), for 132.6M, 193.8M and 254.9M parameters with a
1000-class head. The paper trains and tests each variant at its own image
size (:data:`NFNET_RESOLUTIONS`); the networks accept any size (global
average pooling before the head), so the sizes are recommendations, set
with a config's ``image_size``.

No variable depends on a batch statistic: every example is processed on its
own, as per-example clipping requires.

References:
  Brock et al., "Characterizing signal propagation to close the performance
  gap in unnormalized ResNets", 2021, arXiv:2101.08692.
  Brock et al., "High-Performance Large-Scale Image Recognition Without
  Normalization", 2021, arXiv:2102.06171.
  De et al., "Unlocking High-Accuracy Differentially Private Image
  Classification through Scale", 2022, arXiv:2204.13650 (fine-tuning
  NFNets with DP-SGD).
"""

from __future__ import annotations

import math
import types
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.image_classification import models_layers

_ALPHA = 0.2
_WS_EPSILON = 1e-4
_F0_DEPTHS = (1, 2, 6, 3)

# Stage depths of the NFNet variants we build: F0's depths times n + 1.
NFNET_DEPTHS = types.MappingProxyType({
    f'nfnet-f{n}': tuple((n + 1) * depth for depth in _F0_DEPTHS)
    for n in range(4)
})


class NFNetResolution(NamedTuple):
  """The square image sizes an NFNet variant is trained and tested at."""

  train: int
  test: int


# Brock et al. 2021b: the train / test image sizes of each variant.
NFNET_RESOLUTIONS = types.MappingProxyType({
    'nfnet-f0': NFNetResolution(train=192, test=256),
    'nfnet-f1': NFNetResolution(train=224, test=320),
    'nfnet-f2': NFNetResolution(train=256, test=352),
    'nfnet-f3': NFNetResolution(train=320, test=416),
})


def _conv(in_features, out_features, kernel_size, *, rngs, strides=1,
          groups=1):
  return models_layers.WSConv(
      in_features, out_features, kernel_size, strides=strides,
      feature_group_count=groups, use_bias=True, use_gain=True, scaled=True,
      epsilon=_WS_EPSILON, rngs=rngs,
  )


def _check_stages(depths, widths):
  depths, widths = tuple(depths), tuple(widths)
  if not depths or len(depths) != len(widths):
    raise ValueError(
        f'depths and widths must be non-empty and of equal length, got '
        f'{depths} and {widths}'
    )
  for name, values in (('depths', depths), ('widths', widths)):
    if not all(isinstance(v, int) and v >= 1 for v in values):
      raise ValueError(f'{name} must be positive ints, got {values}')
  return depths, widths


def _check_classes(num_classes):
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')


def _zero_linear(in_features, out_features, rngs):
  return nnx.Linear(in_features, out_features,
                    kernel_init=jax.nn.initializers.zeros, rngs=rngs)


def _betas(depths):
  """The expected input standard deviation ``beta_i`` of every block."""
  betas, expected_std = [], 1.0
  for depth in depths:
    for i in range(depth):
      betas.append(expected_std)
      if i == 0:
        expected_std = 1.0
      expected_std = math.sqrt(expected_std**2 + _ALPHA**2)
  return betas


def _max_pool_3x3_s2(x):
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME'
  )


def _avg_pool_2x2_s2(x):
  window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, 'SAME')
  count = jax.lax.reduce_window(
      jnp.ones(x.shape[1:3], x.dtype)[None, :, :, None], 0.0, jax.lax.add,
      window, strides, 'SAME',
  )
  return total / count


class NFBottleneck(nnx.Module):
  """NF-ResNet bottleneck: 1x1, 3x3 (strided), 1x1, times ``alpha``."""

  def __init__(self, in_features, out_features, stride, beta, *, activation,
               rngs):
    width = out_features // 4
    self.beta = beta
    self.activation = activation
    self.conv1 = _conv(in_features, width, 1, rngs=rngs)
    self.conv2 = _conv(width, width, 3, strides=stride, rngs=rngs)
    self.conv3 = _conv(width, out_features, 1, rngs=rngs)
    self.shortcut = (
        _conv(in_features, out_features, 1, strides=stride, rngs=rngs)
        if in_features != out_features or stride != 1 else None
    )

  def __call__(self, x):
    act = models_layers.scaled_activation(self.activation)
    h = act(x / self.beta)
    shortcut = x if self.shortcut is None else self.shortcut(h)
    y = self.conv1(h)
    y = self.conv2(act(y))
    y = self.conv3(act(y))
    return y * _ALPHA + shortcut


class NFResNet(nnx.Module):
  """A normalizer-free bottleneck ResNet (default: NF-ResNet-50)."""

  head_name = 'classifier'

  def __init__(
      self,
      num_classes: int,
      *,
      depths: Sequence[int] = (3, 4, 6, 3),
      widths: Sequence[int] = (256, 512, 1024, 2048),
      stem_width: int = 64,
      activation: str = 'relu',
      rngs: nnx.Rngs,
  ):
    """Creates the network.

    Args:
      num_classes: outputs of the (zero-initialized) classifier.
      depths: blocks per stage (strides 1, 2, 2, ...).
      widths: output channels per stage (bottleneck width: a quarter).
      stem_width: channels of the 7x7 stem convolution.
      activation: ``'relu'`` or ``'gelu'`` (scaled).
      rngs: NNX RNG streams (``params``).

    Raises:
      ValueError: on a bad size.
    """
    _check_classes(num_classes)
    depths, widths = _check_stages(depths, widths)
    if any(w % 4 for w in widths):
      raise ValueError(f'widths must be multiples of 4, got {widths}')
    models_layers.scaled_activation(activation)
    self.activation = activation
    self.stem = _conv(3, stem_width, 7, strides=2, rngs=rngs)
    betas = iter(_betas(depths))
    layers, in_features = [], stem_width
    for stage, (depth, width) in enumerate(zip(depths, widths)):
      for i in range(depth):
        stride = 2 if i == 0 and stage > 0 else 1
        layers.append(NFBottleneck(in_features, width, stride, next(betas),
                                   activation=activation, rngs=rngs))
        in_features = width
    self.blocks = nnx.List(layers)
    self.classifier = _zero_linear(in_features, num_classes, rngs)

  def __call__(self, images):
    """Logits ``[batch, num_classes]`` of NHWC images ``[batch, h, w, 3]``."""
    x = _max_pool_3x3_s2(self.stem(images))
    for block in self.blocks:
      x = block(x)
    x = models_layers.scaled_activation(self.activation)(x)
    return self.classifier(jnp.mean(x, axis=(1, 2)))


class SqueezeExcite(nnx.Module):
  """``x * 2 * sigmoid(dense(relu(dense(mean_hw(x)))))`` (NFNet's SE)."""

  def __init__(self, features, hidden, *, rngs):
    init = models_layers.normal_init()
    self.reduce = nnx.Linear(features, hidden, kernel_init=init, rngs=rngs)
    self.expand = nnx.Linear(hidden, features, kernel_init=init, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.reduce(jnp.mean(x, axis=(1, 2))))
    return x * (2.0 * jax.nn.sigmoid(self.expand(h)))[:, None, None, :]


class NFNetBlock(nnx.Module):
  """NFNet block: 1x1, grouped 3x3 (strided), grouped 3x3, 1x1, SE, gain."""

  def __init__(self, in_features, out_features, stride, beta, *, group_size,
               activation, rngs):
    width = out_features // 2
    if width % group_size:
      raise ValueError(
          f'group_size ({group_size}) must divide every bottleneck width '
          f'(half the stage width), got width {width}'
      )
    groups = width // group_size
    self.beta = beta
    self.stride = stride
    self.activation = activation
    self.conv0 = _conv(in_features, width, 1, rngs=rngs)
    self.conv1 = _conv(width, width, 3, strides=stride, groups=groups,
                       rngs=rngs)
    self.conv1b = _conv(width, width, 3, groups=groups, rngs=rngs)
    self.conv2 = _conv(width, out_features, 1, rngs=rngs)
    self.se = SqueezeExcite(out_features, max(1, out_features // 2),
                            rngs=rngs)
    self.skip_gain = nnx.Param(jnp.zeros((), jnp.float32))
    self.shortcut = (
        _conv(in_features, out_features, 1, rngs=rngs)
        if in_features != out_features or stride != 1 else None
    )

  def __call__(self, x):
    act = models_layers.scaled_activation(self.activation)
    h = act(x / self.beta)
    shortcut = x
    if self.shortcut is not None:
      shortcut = self.shortcut(_avg_pool_2x2_s2(h) if self.stride > 1 else h)
    y = self.conv0(h)
    y = self.conv1(act(y))
    y = self.conv1b(act(y))
    y = self.se(self.conv2(act(y)))
    return y * (self.skip_gain[...] * _ALPHA) + shortcut


class NFNet(nnx.Module):
  """An NFNet (default: NFNet-F0; F1 to F3 with ``NFNET_DEPTHS``)."""

  head_name = 'classifier'

  def __init__(
      self,
      num_classes: int,
      *,
      depths: Sequence[int] = _F0_DEPTHS,
      widths: Sequence[int] = (256, 512, 1536, 1536),
      stem_widths: Sequence[int] = (16, 32, 64, 128),
      group_size: int = 128,
      final_width_multiplier: int = 2,
      activation: str = 'gelu',
      dropout_rate: float = 0.0,
      rngs: nnx.Rngs,
  ):
    """Creates the network.

    Args:
      num_classes: outputs of the (zero-initialized) classifier.
      depths: blocks per stage (strides 1, 2, 2, ...); F0's by default,
        ``NFNET_DEPTHS['nfnet-f3']`` for NFNet-F3.
      widths: output channels per stage (bottleneck width: a half).
      stem_widths: the channels of the four 3x3 stem convolutions (the
        first and the last have stride 2).
      group_size: channels per group of the 3x3 convolutions.
      final_width_multiplier: the final 1x1 convolution has this times the
        last stage width.
      activation: ``'gelu'`` or ``'relu'`` (scaled).
      dropout_rate: dropout before the classifier (0.2 in the paper; then
        call ``model.train()`` / ``model.eval()`` and pass per-example keys).
      rngs: NNX RNG streams (``params``; ``dropout`` with dropout).

    Raises:
      ValueError: on a bad size or rate.
    """
    _check_classes(num_classes)
    depths, widths = _check_stages(depths, widths)
    stem_widths = tuple(stem_widths)
    if len(stem_widths) != 4 or not all(
        isinstance(w, int) and w >= 1 for w in stem_widths):
      raise ValueError(
          f'stem_widths must be 4 positive ints, got {stem_widths}')
    if not isinstance(group_size, int) or group_size < 1:
      raise ValueError(f'group_size must be a positive int, got {group_size!r}')
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate!r}')
    models_layers.scaled_activation(activation)
    self.activation = activation
    stem, in_features = [], 3
    for i, width in enumerate(stem_widths):
      stem.append(_conv(in_features, width, 3, strides=2 if i in (0, 3) else 1,
                        rngs=rngs))
      in_features = width
    self.stem = nnx.List(stem)
    betas = iter(_betas(depths))
    layers = []
    for stage, (depth, width) in enumerate(zip(depths, widths)):
      for i in range(depth):
        stride = 2 if i == 0 and stage > 0 else 1
        layers.append(NFNetBlock(
            in_features, width, stride, next(betas), group_size=group_size,
            activation=activation, rngs=rngs))
        in_features = width
    self.blocks = nnx.List(layers)
    final_width = final_width_multiplier * in_features
    self.final_conv = _conv(in_features, final_width, 1, rngs=rngs)
    self.dropout = (
        nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0 else None
    )
    self.classifier = _zero_linear(final_width, num_classes, rngs)

  def __call__(self, images):
    """Logits ``[batch, num_classes]`` of NHWC images ``[batch, h, w, 3]``."""
    act = models_layers.scaled_activation(self.activation)
    x = images
    for i, conv in enumerate(self.stem):
      x = conv(x) if i == 0 else conv(act(x))
    for block in self.blocks:
      x = block(x)
    x = jnp.mean(act(self.final_conv(x)), axis=(1, 2))
    if self.dropout is not None:
      x = self.dropout(x)
    return self.classifier(x)
