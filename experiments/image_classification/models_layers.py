"""Layers of the image models: weight-standardized convolutions, activations.

Weight standardization (WS) re-parameterises a convolution kernel so that,
for every output channel, the kernel entries over (height, width, input
channels) have mean 0 and variance 1 (Qiao et al.). De et al. 2022 use it,
with GroupNorm, in their Wide-ResNets; Brock et al. 2021 use its *scaled*
form, ``gain * (W - mean) / (std * sqrt(fan_in))``, in the normalizer-free
networks, where it keeps the variance of each activation at initialization
without any normalization layer.

The standardized kernel is a function of the parameters only
(:func:`standardize_kernel`), computed in every call and then used as the
weight of one ``jax.lax.conv_general_dilated``. It never depends on the
data, so per-example gradients stay per-example (no statistic mixes the
examples of a batch), and the gradient with respect to the raw kernel is
the vector-Jacobian product of the standardization.

References:
  Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
  Weight Standardization", 2019, arXiv:1903.10520.
  Brock et al., "Characterizing signal propagation to close the performance
  gap in unnormalized ResNets", 2021, arXiv:2101.08692.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The gain that brings a unit Gaussian's activation back to unit second
# moment (Brock et al. 2021a, Sec. 4 and App. D): sqrt(2 / (1 - 1/pi)) for
# ReLU, the measured constant for GELU.
ACTIVATION_GAMMA = {
    'relu': math.sqrt(2.0 / (1.0 - 1.0 / math.pi)),
    'gelu': 1.7015043497085571,
}
_CONV_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def standardize_kernel(
    kernel: jax.Array,
    *,
    epsilon: float,
    scaled: bool = False,
) -> jax.Array:
  """The weight-standardized kernel, per output channel (last axis).

  Args:
    kernel: an ``HWIO`` convolution kernel (or any array whose last axis is
      the output channel).
    epsilon: added to the variance (WS), or the floor of ``var * fan_in``
      (scaled WS), for numerical safety.
    scaled: False: ``(W - mean) / sqrt(var + epsilon)``, each output
      channel with mean 0 and variance ~1 (De et al.). True: ``(W - mean) /
      sqrt(max(var * fan_in, epsilon))``, variance ~``1 / fan_in`` (Brock et
      al.), so that a unit-variance input gives a unit-variance output.

  Returns:
    An array shaped like ``kernel``.
  """
  axes = tuple(range(kernel.ndim - 1))
  mean = jnp.mean(kernel, axis=axes, keepdims=True)
  var = jnp.var(kernel, axis=axes, keepdims=True)
  if scaled:
    fan_in = math.prod(kernel.shape[:-1])
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, epsilon))
  else:
    scale = jax.lax.rsqrt(var + epsilon)
  return (kernel - mean) * scale


def normal_init(scale: float = 1.0):
  """An initializer ``init(key, shape, dtype)``: N(0, scale / fan_in).

  ``fan_in`` is the product of all but the last axis (HWI for kernels, the
  input features for dense layers): ``scale=2`` is He initialization,
  ``scale=1`` LeCun's. With a concrete key the values are drawn on the host
  (NumPy's generator seeded by the key's bits, so a key always gives the
  same values): building a model then compiles nothing, where one XLA
  compilation per distinct kernel shape would take seconds. Under tracing
  (``nnx.eval_shape``, ``jit``) it draws with ``jax.random.normal``.
  """

  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:-1]) if len(shape) > 1 else 1
    stddev = math.sqrt(scale / max(fan_in, 1))
    if isinstance(key, jax.core.Tracer):
      return jax.random.normal(key, shape, dtype) * stddev
    bits = np.asarray(jax.random.key_data(key)).ravel()
    values = np.random.default_rng(bits.astype(np.uint64)).standard_normal(
        shape, np.float32)
    return jnp.asarray(values * np.float32(stddev), dtype)

  return init


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
    raise ValueError(f'{name} must be a positive int or a pair, got {value!r}')
  return pair


class WSConv(nnx.Module):
  """A 2-D convolution (NHWC) with a weight-standardized kernel.

  ``y = conv(x, standardize_kernel(kernel) [* gain]) [+ bias]``. The raw
  ``kernel`` is the parameter; the standardized one is recomputed from it in
  every call (:meth:`standardized_kernel`), so the layer is a pure function
  of its parameters and the input.

  Attributes:
    kernel: ``nnx.Param`` ``[kh, kw, in / groups, out]``.
    gain: ``nnx.Param`` ``[out]`` (ones at init) with ``use_gain``, else None.
    bias: ``nnx.Param`` ``[out]`` (zeros at init) with ``use_bias``, else
      None.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int | Sequence[int] = 3,
      *,
      strides: int | Sequence[int] = 1,
      padding: str = 'SAME',
      feature_group_count: int = 1,
      use_bias: bool = False,
      use_gain: bool = False,
      scaled: bool = False,
      epsilon: float = 1e-5,
      rngs: nnx.Rngs,
  ):
    """Creates the layer.

    Args:
      in_features: input channels.
      out_features: output channels.
      kernel_size: an int or ``(kh, kw)``.
      strides: an int or a pair.
      padding: ``'SAME'`` or ``'VALID'``.
      feature_group_count: grouped convolution with this many groups (must
        divide both channel counts).
      use_bias: add a learnable bias.
      use_gain: multiply the standardized kernel by a learnable
        per-output-channel gain (scaled WS of the NF networks).
      scaled: scaled WS (see :func:`standardize_kernel`).
      epsilon: see :func:`standardize_kernel`.
      rngs: the NNX RNG streams (``params`` draws the kernel).

    Raises:
      ValueError: on a non-positive size or a group count that does not
        divide the channels.
    """
    for name, value in (('in_features', in_features),
                        ('out_features', out_features),
                        ('feature_group_count', feature_group_count)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    if in_features % feature_group_count or out_features % feature_group_count:
      raise ValueError(
          f'feature_group_count must divide in_features ({in_features}) and '
          f'out_features ({out_features}), got {feature_group_count}'
      )
    if padding not in ('SAME', 'VALID'):
      raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    self.kernel_size = _pair(kernel_size, 'kernel_size')
    self.strides = _pair(strides, 'strides')
    self.padding = padding
    self.feature_group_count = feature_group_count
    self.scaled = scaled
    self.epsilon = epsilon
    shape = (*self.kernel_size, in_features // feature_group_count,
             out_features)
    self.kernel = nnx.Param(normal_init(2.0)(rngs.params(), shape))
    self.gain = (
        nnx.Param(jnp.ones((out_features,), jnp.float32)) if use_gain else None
    )
    self.bias = (
        nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias
        else None
    )

  def standardized_kernel(self) -> jax.Array:
    """The kernel the convolution uses (standardized, times the gain)."""
    kernel = standardize_kernel(
        self.kernel[...], epsilon=self.epsilon, scaled=self.scaled
    )
    if self.gain is not None:
      kernel = kernel * self.gain[...]
    return kernel

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x,
        self.standardized_kernel().astype(x.dtype),
        window_strides=self.strides,
        padding=self.padding,
        dimension_numbers=_CONV_DIMENSIONS,
        feature_group_count=self.feature_group_count,
    )
    if self.bias is not None:
      y = y + self.bias[...]
    return y


def scaled_activation(name: str):
  """``gamma * act(x)``: the activation with unit second moment on N(0, 1).

  Args:
    name: ``'relu'`` or ``'gelu'``.

  Returns:
    The scaled activation function.

  Raises:
    ValueError: on another name.
  """
  if name not in ACTIVATION_GAMMA:
    raise ValueError(
        f'activation must be one of {sorted(ACTIVATION_GAMMA)}, got {name!r}'
    )
  gamma = ACTIVATION_GAMMA[name]
  fn = jax.nn.relu if name == 'relu' else jax.nn.gelu
  return lambda x: fn(x) * gamma
