"""Standard normal draws of the Gaussian privatizers (private).

Every value of a draw is a fixed function of the key and of its flat index,
so a leaf's noise is the same on one device or split over many
(``sharding``), and the privatizers' noise is reproducible from their key.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

_THREEFRY = 'threefry2x32'
_SQRT2 = np.float32(math.sqrt(2.0))
_MANTISSA_MASK = np.uint32(0x7FFFFF)
_SIGN_BIT = np.uint32(0x80000000)
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = np.uint32(0x1BD11BDA)
# The fused Threefry path counts in one uint32 word.
_MAX_FUSED_SIZE = 2**32 - 1
SMALL_LEAF = 1 << 16


def standard_normal_tree(key, specs, sharding=None):
  """Draws an i.i.d. N(0, 1) pytree shaped like ``specs``.

  Leaf ``i`` gets the key ``jax.random.split(key, num_leaves)[i]``, except
  that the float32 leaves of at most ``SMALL_LEAF`` values (biases, norms,
  LoRA factors), when there are several, share one draw: the key of the
  first of them, one flat vector (never sharded) cut in leaf order. One
  generator instead of one per leaf saves compile time and memory; the
  noise does not depend on ``sharding``. Any privatizer that needs a fresh
  Gaussian tree per step draws it here.

  Args:
    key: a typed PRNG key, used for nothing else.
    specs: a pytree of ``jax.ShapeDtypeStruct`` (or arrays); float dtypes.
    sharding: ``None``, or a 1-D ``NamedSharding`` over which each leaf's
      flat draw is split evenly (zero-redundancy generation).

  Returns:
    A pytree with the structure, shapes and dtypes of ``specs``.
  """
  leaves, treedef = jax.tree.flatten(specs)
  keys = jax.random.split(key, len(leaves)) if leaves else []
  small = [
      i for i, leaf in enumerate(leaves)
      if leaf.dtype == jnp.float32 and 0 < math.prod(leaf.shape) <= SMALL_LEAF
  ]
  noise = {}
  if len(small) > 1:
    sizes = [math.prod(leaves[i].shape) for i in small]
    flat = standard_normal(keys[small[0]], (sum(sizes),), jnp.float32)
    offsets = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
    for j, i in enumerate(small):
      noise[i] = flat[offsets[j]:offsets[j + 1]].reshape(leaves[i].shape)
  return jax.tree.unflatten(treedef, [
      noise[i] if i in noise
      else standard_normal(keys[i], leaf.shape, leaf.dtype, sharding)
      for i, leaf in enumerate(leaves)
  ])


def standard_normal(key, shape, dtype, sharding=None) -> jax.Array:
  """N(0, 1) draws of ``shape``; each value depends only on its flat index.

  float32 draws are ``standard_normal_from_bits(jax.random.bits(key,
  shape, jnp.uint32))``; wider types come from ``jax.random.normal``.
  """
  size = math.prod(shape)
  if size == 0:
    return jnp.zeros(shape, dtype)
  num_shards = 1 if sharding is None else sharding.mesh.size
  padded_size = -(-size // num_shards) * num_shards
  if dtype == jnp.float32:
    flat = standard_normal_from_bits(random_bits(key, padded_size, sharding))
  else:
    flat = jax.random.normal(key, (padded_size,), dtype)
  if sharding is not None:
    flat = jax.lax.with_sharding_constraint(flat, sharding)
  return flat[:size].reshape(shape)


def random_bits(key, size, sharding) -> jax.Array:
  """``jax.random.bits(key, (size,), jnp.uint32)``, faster for Threefry keys.

  JAX lowers its Threefry hash on CPU as a rolled loop that stores every
  intermediate array; :func:`threefry2x32` is the same hash as elementwise
  ops, which XLA fuses with the counters, the conversion to floats and the
  addition to the gradient into one loop (see benchmarks/noise_benchmark.py).
  The result is bitwise that of ``jax.random.bits`` with the default
  ``jax_threefry_partitionable=True``: element ``i`` hashes the 64-bit
  counter ``i`` and keeps the XOR of the two output words.
  """
  if str(jax.random.key_impl(key)) != _THREEFRY or size > _MAX_FUSED_SIZE:
    return jax.random.bits(key, (size,), jnp.uint32)
  counters = jax.lax.iota(jnp.uint32, size)
  if sharding is not None:
    counters = jax.lax.with_sharding_constraint(counters, sharding)
  high, low = threefry2x32(
      jax.random.key_data(key), jnp.zeros_like(counters), counters
  )
  return high ^ low


def threefry2x32(key_words, x0, x1):
  """The Threefry-2x32 block function with 20 rounds, as elementwise ops.

  Bitwise the hash behind ``jax.random``'s default generator.

  Args:
    key_words: ``uint32[2]``, the key.
    x0: ``uint32`` array, the high words of the counters.
    x1: ``uint32`` array of the same shape, the low words.

  Returns:
    The two ``uint32`` output words of each block.

  References:
    Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011.
  """
  k0, k1 = key_words[0], key_words[1]
  schedule = (k0, k1, k0 ^ k1 ^ _THREEFRY_PARITY)
  x0, x1 = x0 + schedule[0], x1 + schedule[1]
  for group in range(5):
    for rotation in _THREEFRY_ROTATIONS[group % 2]:
      x0 = x0 + x1
      x1 = (x1 << rotation) | (x1 >> (32 - rotation))
      x1 = x0 ^ x1
    x0 = x0 + schedule[(group + 1) % 3]
    x1 = x1 + schedule[(group + 2) % 3] + np.uint32(group + 1)
  return x0, x1


def standard_normal_from_bits(bits: jax.Array) -> jax.Array:
  """Maps uniform uint32 words to float32 N(0, 1) by the inverse CDF.

  The top bit is the sign and the low 23 bits ``m`` pick the quantile
  ``p = (m + 1/2) / 2^23`` of the half-normal ``|Z|``, whose inverse CDF
  is ``sqrt(2) * erfinv(p)``. Equivalently ``Z = Phi^-1((k + 1/2) / 2^24)``
  for ``k`` uniform on ``{0, ..., 2^24 - 1}``: symmetric, mean exactly 0,
  never infinite.
  """
  quantile = ((bits & _MANTISSA_MASK).astype(jnp.float32) + 0.5) * np.float32(
      2.0**-23
  )
  magnitude = _SQRT2 * jax.lax.erf_inv(quantile)
  magnitude_bits = jax.lax.bitcast_convert_type(magnitude, jnp.uint32)
  signed = magnitude_bits | (bits & _SIGN_BIT)
  return jax.lax.bitcast_convert_type(signed, jnp.float32)
