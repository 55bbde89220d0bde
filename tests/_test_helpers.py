"""Assertions shared by several test files (imported as ``_test_helpers``).

pytest puts ``tests/`` on ``sys.path`` (the test files are not a package),
so a test file imports this module by its bare name.
"""

import jax
import jax.numpy as jnp
import numpy as np


def assert_trees_close(expected, actual, rtol=1e-5):
  """Same tree structure, shapes and dtypes; leaves equal to ``rtol``.

  The absolute tolerance is ``1e-6`` of the leaf's largest magnitude, so
  entries that should be zero are compared on the leaf's scale.
  """
  exp_leaves, exp_tree = jax.tree_util.tree_flatten(expected)
  act_leaves, act_tree = jax.tree_util.tree_flatten(actual)
  assert exp_tree == act_tree
  for exp, act in zip(exp_leaves, act_leaves):
    exp, act = np.asarray(exp), np.asarray(act)
    assert exp.shape == act.shape and exp.dtype == act.dtype
    scale = np.max(np.abs(exp)) if exp.size else 0.0
    np.testing.assert_allclose(act, exp, rtol=rtol, atol=1e-6 * scale + 1e-12)


def normal(seed, shape, scale=1.0):
  """``scale`` times standard normals from ``jax.random.key(seed)``."""
  return scale * jax.random.normal(jax.random.key(seed), shape)


def standardize(kernel, gain=None, *, scaled=False, epsilon=1e-4):
  """Weight standardization per output channel (the last axis).

  ``scaled``: the NFNet form ``(W - mean) / sqrt(max(fan_in * var, eps))``;
  otherwise ``(W - mean) / sqrt(var + eps)``. ``gain`` multiplies the result.
  """
  axes = tuple(range(kernel.ndim - 1))
  mean = jnp.mean(kernel, axis=axes, keepdims=True)
  var = jnp.var(kernel, axis=axes, keepdims=True)
  if scaled:
    fan_in = np.prod(kernel.shape[:-1])
    kernel = (kernel - mean) * jax.lax.rsqrt(jnp.maximum(var * fan_in, epsilon))
  else:
    kernel = (kernel - mean) * jax.lax.rsqrt(var + epsilon)
  return kernel if gain is None else kernel * gain


def conv(x, kernel, stride=1):
  """A 'SAME' NHWC/HWIO convolution."""
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
