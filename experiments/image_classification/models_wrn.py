"""Wide-ResNets with GroupNorm and weight standardization (De et al. 2022).

WRN-d-k (Zagoruyko and Komodakis): a 3x3 stem convolution to 16 channels,
then three stages of ``n = (d - 4) / 6`` pre-activation residual blocks of
widths ``16k, 32k, 64k`` (strides 1, 2, 2), a final normalization and ReLU,
global average pooling and a dense classifier. For DP-SGD, De et al.
replace batch normalization by GroupNorm (16 groups) and standardize the
weights of every convolution; there is no dropout. The model then has no
batch statistics: each example's output depends on that example only, as
per-example clipping requires.

A block computes ``h = relu(gn1(x))``; ``y = conv2(relu(gn2(conv1(h))))``
(``conv1`` with the stage's stride) and returns ``y + shortcut``, where the
shortcut is ``x``, or a 1x1 convolution of ``h`` when the width or the
resolution changes.

References:
  De et al., "Unlocking High-Accuracy Differentially Private Image
  Classification through Scale", 2022, arXiv:2204.13650.
  Zagoruyko and Komodakis, "Wide Residual Networks", 2016,
  arXiv:1605.07146.
  Wu and He, "Group Normalization", 2018, arXiv:1803.08494.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.image_classification import models_layers

_STEM_WIDTH = 16


def wrn_depth_blocks(depth: int) -> int:
  """Blocks per stage of a WRN of this depth, ``(depth - 4) / 6``.

  Raises:
    ValueError: unless ``depth`` is 10, 16, 22, 28, 34, 40, ...
  """
  if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
    raise ValueError(
        'depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got '
        f'{depth!r}'
    )
  return (depth - 4) // 6


def _group_norm(features: int, num_groups: int, rngs: nnx.Rngs):
  if features % num_groups:
    raise ValueError(
        f'num_groups must divide every normalized width; {num_groups} does '
        f'not divide {features}'
    )
  return nnx.GroupNorm(features, num_groups=num_groups, epsilon=1e-5,
                       rngs=rngs)


class WideResNetBlock(nnx.Module):
  """One pre-activation residual block (GroupNorm, ReLU, WS 3x3 conv, x2)."""

  def __init__(self, in_features: int, out_features: int, stride: int, *,
               num_groups: int, rngs: nnx.Rngs):
    self.norm1 = _group_norm(in_features, num_groups, rngs)
    self.conv1 = models_layers.WSConv(in_features, out_features, 3,
                                      strides=stride, rngs=rngs)
    self.norm2 = _group_norm(out_features, num_groups, rngs)
    self.conv2 = models_layers.WSConv(out_features, out_features, 3,
                                      rngs=rngs)
    self.shortcut = (
        models_layers.WSConv(in_features, out_features, 1, strides=stride,
                             rngs=rngs)
        if in_features != out_features or stride != 1 else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.norm1(x))
    shortcut = x if self.shortcut is None else self.shortcut(h)
    y = self.conv1(h)
    y = self.conv2(jax.nn.relu(self.norm2(y)))
    return y + shortcut


class WideResNet(nnx.Module):
  """WRN-``depth``-``width`` for NHWC float images; returns logits.

  Attributes:
    classifier: the dense head (its path, ``'classifier'``, is what
      :func:`experiments.image_classification.models.load_params` skips when
      fine-tuning with another number of classes).
  """

  head_name = 'classifier'

  def __init__(
      self,
      depth: int,
      width: int,
      num_classes: int,
      *,
      num_groups: int = 16,
      rngs: nnx.Rngs,
  ):
    """Creates the network.

    Args:
      depth: ``d``, with ``(d - 4) / 6`` blocks per stage.
      width: the widening factor ``k`` (stage widths ``16k, 32k, 64k``).
      num_classes: outputs of the classifier.
      num_groups: GroupNorm groups (16 in De et al.); must divide 16 and
        every stage width.
      rngs: NNX RNG streams (``params``).

    Raises:
      ValueError: on a bad depth, width, number of classes or groups.
    """
    blocks = wrn_depth_blocks(depth)
    if not isinstance(width, int) or width < 1:
      raise ValueError(f'width must be a positive int, got {width!r}')
    if not isinstance(num_classes, int) or num_classes < 1:
      raise ValueError(
          f'num_classes must be a positive int, got {num_classes!r}'
      )
    if not isinstance(num_groups, int) or num_groups < 1:
      raise ValueError(f'num_groups must be a positive int, got {num_groups!r}')
    self.depth, self.width = depth, width
    self.stem = models_layers.WSConv(3, _STEM_WIDTH, 3, rngs=rngs)
    layers = []
    in_features = _STEM_WIDTH
    for stage, stride in enumerate((1, 2, 2)):
      out_features = _STEM_WIDTH * width * 2**stage
      for i in range(blocks):
        layers.append(WideResNetBlock(
            in_features, out_features, stride if i == 0 else 1,
            num_groups=num_groups, rngs=rngs))
        in_features = out_features
    self.blocks = nnx.List(layers)
    self.final_norm = _group_norm(in_features, num_groups, rngs)
    self.classifier = nnx.Linear(
        in_features, num_classes, kernel_init=models_layers.normal_init(),
        rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Logits ``[batch, num_classes]`` of NHWC images ``[batch, h, w, 3]``."""
    x = self.stem(images)
    for block in self.blocks:
      x = block(x)
    x = jax.nn.relu(self.final_norm(x))
    return self.classifier(jnp.mean(x, axis=(1, 2)))

