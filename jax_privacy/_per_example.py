"""The per-example engine behind :mod:`jax_privacy.clipping` (private).

It computes, for a batch, the sum of per-example pytrees (gradients or
outputs) each scaled to L2 norm at most a bound, plus the per-example norms
and extras. Public entry points are :func:`jax_privacy.clipping.clipped_grad`
and :func:`jax_privacy.clipping.clipped_fun`, and the gradient computers of
:mod:`jax_privacy.dp_sgd`, which all build on :func:`clipped_sum_function`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jax_privacy import _clip_norms

PyTree = Any


def identity(x):
  return x


def global_l2_norm(tree: PyTree) -> jax.Array:
  """The L2 norm of all leaves of ``tree`` together, computed in >= float32."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  squares = [
      jnp.sum(jnp.square(leaf.astype(at_least_f32(leaf.dtype))))
      for leaf in leaves
  ]
  return jnp.sqrt(sum(squares))


def at_least_f32(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def check_concrete_positive(name: str, value) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  try:
    value = float(value)
  except TypeError:
    return
  if math.isnan(value) or value <= 0:
    raise ValueError(f'{name} must be > 0, got {value}')


def _check_positive(name: str, value, *, allow_inf: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f'{name} must be a positive number, got {value!r}')
  value = float(value)
  if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
    upper = 'inf]' if allow_inf else 'inf)'
    raise ValueError(f'{name} must be in (0, {upper}, got {value}')
  return value


def normalize_argnums(name: str, argnums) -> tuple[int, ...]:
  if isinstance(argnums, int) and not isinstance(argnums, bool):
    argnums = (argnums,)
  if not isinstance(argnums, Sequence) or not all(
      isinstance(a, int) and not isinstance(a, bool) and a >= 0
      for a in argnums
  ):
    raise ValueError(
        f'{name} must be a non-negative int or a tuple of them, got {argnums!r}'
    )
  if len(set(argnums)) != len(argnums) or not argnums:
    raise ValueError(f'{name} must be non-empty and unique, got {argnums!r}')
  return tuple(argnums)


@dataclasses.dataclass(frozen=True)
class ClipSettings:
  """Everything the batch machinery needs, validated once on the host.

  ``clip_rule`` holds the clipping itself (``l2_clip_norm`` as one norm or a
  pytree of group norms, ``rescale_to_unit_norm`` and automatic clipping);
  build with :meth:`create`, which takes those as keywords.
  """

  clip_rule: _clip_norms.ClipRule
  normalize_by: float
  batch_argnums: tuple[int, ...]
  keep_batch_dim: bool
  pre_clipping_transform: Callable[[PyTree], PyTree]
  microbatch_size: int | None
  nan_safe: bool
  dtype: Any
  prng_argnum: int | None
  spmd_axis_name: Any
  norm_fn: Callable[[PyTree], jax.Array] = global_l2_norm

  @classmethod
  def create(
      cls,
      *,
      l2_clip_norm,
      rescale_to_unit_norm,
      normalize_by,
      batch_argnums,
      microbatch_size,
      prng_argnum,
      automatic_clipping_stability=None,
      **kwargs,
  ) -> 'ClipSettings':
    clip_rule = _clip_norms.ClipRule.create(
        l2_clip_norm,
        rescale_to_unit_norm=rescale_to_unit_norm,
        stability=automatic_clipping_stability,
    )
    normalize_by = _check_positive('normalize_by', normalize_by)
    batch_argnums = normalize_argnums('batch_argnums', batch_argnums)
    if microbatch_size is not None:
      if (
          isinstance(microbatch_size, bool)
          or not isinstance(microbatch_size, numbers.Integral)
          or microbatch_size < 1
      ):
        raise ValueError(
            f'microbatch_size must be None or an int >= 1, got {microbatch_size!r}'
        )
      microbatch_size = int(microbatch_size)
    if prng_argnum is not None:
      (prng_argnum,) = normalize_argnums('prng_argnum', prng_argnum)
      if prng_argnum in batch_argnums:
        raise ValueError(
            f'prng_argnum ({prng_argnum}) must not be one of batch_argnums '
            f'{batch_argnums}: the key is split per example by clipped_grad'
        )
    return cls(
        normalize_by=normalize_by,
        batch_argnums=batch_argnums,
        microbatch_size=microbatch_size,
        prng_argnum=prng_argnum,
        clip_rule=clip_rule,
        **kwargs,
    )

  @property
  def l2_norm_bound(self) -> float:
    return self.clip_rule.l2_norm_bound / self.normalize_by


def _batch_size(args: tuple, batch_argnums: tuple[int, ...]) -> int:
  sizes = {}
  for argnum in batch_argnums:
    if argnum >= len(args):
      raise ValueError(
          f'batch_argnums names argument {argnum}, but the function was '
          f'called with {len(args)} positional arguments'
      )
    for path, leaf in jax.tree_util.tree_leaves_with_path(args[argnum]):
      shape = jnp.shape(leaf)
      if not shape:
        raise ValueError(
            f'argument {argnum} is batched (batch_argnums) but its leaf '
            f'{jax.tree_util.keystr(path) or "<root>"} is a scalar; batched '
            'arguments need a leading batch axis'
        )
      sizes[(argnum, jax.tree_util.keystr(path))] = shape[0]
  if not sizes:
    raise ValueError(
        f'the arguments named by batch_argnums {batch_argnums} hold no arrays'
    )
  if len(set(sizes.values())) != 1:
    raise ValueError(
        'all batched arguments must have the same leading (batch) dimension, '
        f'got {sizes}'
    )
  return next(iter(sizes.values()))


def _padding_mask(is_padding_example, batch_size: int) -> jax.Array:
  if is_padding_example is None:
    return jnp.zeros((batch_size,), dtype=bool)
  mask = jnp.asarray(is_padding_example)
  if mask.shape != (batch_size,):
    raise ValueError(
        f'is_padding_example must have shape ({batch_size},) to match the '
        f'batch, got {mask.shape}'
    )
  return mask.astype(bool)


def vectorized_chunk_function(
    per_example_fn: Callable[..., tuple[PyTree, PyTree]],
    settings: ClipSettings,
) -> Callable[..., tuple[PyTree, jax.Array, PyTree]]:
  """Builds ``chunk(args, is_padding, batched) -> (sum, norms, extras)``.

  ``per_example_fn(*args)`` is called on one example at a time (batched
  arguments sliced, with or without a leading axis of size 1) and returns the
  pytree to clip and a pytree of per-example ``extras`` that are stacked.

  This is the vectorised (vmap) per-example engine: the batch is processed in
  one vmap or, with ``microbatch_size``, in a ``lax.scan`` over chunks whose
  clipped sums are accumulated (:func:`batch_function`). Faster engines (ghost
  clipping, :mod:`jax_privacy._ghost`) plug their own chunk function into
  :func:`batch_function` and produce the same ``(sum, norms, extras)``.
  """

  def one_example(args, is_padding):
    if settings.keep_batch_dim:
      args = tuple(
          jax.tree_util.tree_map(lambda x: jnp.expand_dims(x, 0), arg)
          if i in settings.batch_argnums
          else arg
          for i, arg in enumerate(args)
      )
    to_clip, extras = per_example_fn(*args)
    to_clip = settings.pre_clipping_transform(to_clip)
    clipped, norms = clip_groups(
        to_clip,
        settings,
        out_dtype=lambda d: accumulation_dtype(d, settings.dtype),
    )
    clipped = jax.tree_util.tree_map(
        lambda leaf: jnp.where(is_padding, jnp.zeros_like(leaf), leaf), clipped
    )
    return clipped, norms, extras

  def vmapped(args, is_padding, batched):
    in_axes = tuple(0 if i in batched else None for i in range(len(args)))
    clipped, norms, extras = jax.vmap(
        one_example,
        in_axes=(in_axes, 0),
        spmd_axis_name=settings.spmd_axis_name,
    )(args, is_padding)
    summed = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), clipped)
    return summed, norms, extras

  return vmapped


def clipped_sum_function(
    per_example_fn: Callable[..., tuple[PyTree, PyTree]],
    settings: ClipSettings,
) -> Callable[..., tuple[PyTree, jax.Array, PyTree]]:
  """The vmap engine, ``batch_function(vectorized_chunk_function(...))``."""
  return batch_function(
      vectorized_chunk_function(per_example_fn, settings), settings
  )


def batch_function(
    chunk_fn: Callable[..., tuple[PyTree, jax.Array, PyTree]],
    settings: ClipSettings,
) -> Callable[..., tuple[PyTree, jax.Array, PyTree]]:
  """Wraps an engine's ``chunk_fn`` into ``batch_fn(*args, is_padding_example)``.

  ``chunk_fn(args, is_padding, batched)`` returns the (unnormalised) clipped
  sum, the per-example norms of each clipping group (``[batch, groups]``)
  and extras of the examples it is given; ``batched`` is the set of argument
  positions with a batch axis. This wrapper, shared by every engine, checks
  the batch, splits the PRNG key per example, runs microbatches in a
  ``lax.scan``, divides by ``normalize_by`` and returns the norms in the
  user's form (:meth:`_clip_norms.ClipRule.report`).
  """

  def batch_fn(*args, is_padding_example=None):
    batch_size = _batch_size(args, settings.batch_argnums)
    is_padding = _padding_mask(is_padding_example, batch_size)
    batched = frozenset(settings.batch_argnums)
    if settings.prng_argnum is not None:
      key = args[settings.prng_argnum]
      args = _replace_args(
          args, {settings.prng_argnum: jax.random.split(key, batch_size)}
      )
      batched = batched | {settings.prng_argnum}

    microbatch_size = settings.microbatch_size
    if microbatch_size is None or microbatch_size >= batch_size:
      summed, norms, extras = chunk_fn(args, is_padding, batched)
    else:
      summed, norms, extras = _scan_microbatches(
          chunk_fn, args, is_padding, batched, batch_size, microbatch_size
      )
    summed = jax.tree_util.tree_map(
        lambda x: x / jnp.asarray(settings.normalize_by, x.dtype), summed
    )
    return summed, settings.clip_rule.report(norms), extras

  return batch_fn


def _replace_args(args: tuple, replacements: dict[int, Any]) -> tuple:
  return tuple(replacements.get(i, arg) for i, arg in enumerate(args))


def scale_to_bound(
    tree, norm, clip_norm, *, rescale_to_unit_norm, nan_safe, out_dtype
):
  """Scales ``tree`` by ``min(1, clip_norm / norm)``, in >= float32.

  Args:
    tree: the pytree to clip.
    norm: its global L2 norm (a scalar in >= float32).
    clip_norm: the bound (number or scalar array; ``inf`` means no clipping).
    rescale_to_unit_norm: also divide by ``clip_norm``.
    nan_safe: return zeros when ``norm`` is not finite.
    out_dtype: maps a leaf's dtype to the dtype of its clipped version.

  Returns:
    The clipped pytree.
  """
  bound = jnp.asarray(clip_norm, norm.dtype)
  scale = jnp.where(norm > bound, bound / norm, jnp.ones_like(norm))
  if rescale_to_unit_norm:
    scale = scale / bound
  keep = jnp.isfinite(norm) if nan_safe else jnp.bool_(True)

  def scale_leaf(leaf):
    scaled = (leaf.astype(scale.dtype) * scale).astype(out_dtype(leaf.dtype))
    return jnp.where(keep, scaled, jnp.zeros_like(scaled))

  return jax.tree_util.tree_map(scale_leaf, tree)


def clip_groups(tree, settings: ClipSettings, *, out_dtype):
  """Clips one example's ``tree`` by ``settings.clip_rule``.

  Returns:
    ``(clipped_tree, norms)`` where ``norms`` (``[groups]``, >= float32)
    holds the norm of each group of ``tree`` before clipping. With
    ``nan_safe``, an example with a non-finite norm in any group becomes
    zero in every group.
  """
  rule = settings.clip_rule
  subtrees = rule.subtrees(tree)
  norms = jnp.stack([settings.norm_fn(subtree) for subtree in subtrees])
  scales = rule.scales(norms)
  keep = jnp.all(jnp.isfinite(norms)) if settings.nan_safe else jnp.bool_(True)

  def scale_leaf(leaf, scale):
    scaled = (leaf.astype(scale.dtype) * scale).astype(out_dtype(leaf.dtype))
    return jnp.where(keep, scaled, jnp.zeros_like(scaled))

  clipped = [
      jax.tree_util.tree_map(lambda leaf, k=k: scale_leaf(leaf, scales[k]), sub)
      for k, sub in enumerate(subtrees)
  ]
  if rule.treedef is None:
    return clipped[0], norms
  return rule.treedef.unflatten(clipped), norms


def accumulation_dtype(leaf_dtype, requested):
  if requested is not None:
    return jnp.dtype(requested)
  return at_least_f32(leaf_dtype)


def _scan_microbatches(
    vmapped, args, is_padding, batched, batch_size, microbatch_size
):
  """Runs ``vmapped`` over chunks of ``microbatch_size`` examples in a scan.

  The batch is padded (by repeating its first example, marked as padding) to
  a multiple of ``microbatch_size``; the padding contributes zero and its
  per-example outputs are dropped.
  """
  num_chunks = -(-batch_size // microbatch_size)
  padded_size = num_chunks * microbatch_size
  extra = padded_size - batch_size

  def to_chunks(x):
    if extra:
      x = jnp.concatenate([x, jnp.repeat(x[:1], extra, axis=0)], axis=0)
    return x.reshape((num_chunks, microbatch_size) + x.shape[1:])

  chunks = {k: jax.tree_util.tree_map(to_chunks, args[k]) for k in batched}
  if extra:
    is_padding = jnp.concatenate([is_padding, jnp.ones((extra,), bool)])
  padding_chunks = is_padding.reshape(num_chunks, microbatch_size)

  def run_chunk(chunk, pad):
    return vmapped(_replace_args(args, chunk), pad, batched)

  first_chunk = jax.tree_util.tree_map(lambda x: x[0], chunks)
  sum_shape = jax.eval_shape(run_chunk, first_chunk, padding_chunks[0])[0]
  init = jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape, s.dtype), sum_shape
  )

  def body(total, xs):
    summed, norms, extras = run_chunk(*xs)
    return jax.tree_util.tree_map(jnp.add, total, summed), (norms, extras)

  total, (norms, extras) = jax.lax.scan(body, init, (chunks, padding_chunks))

  def unchunk(x):
    return x.reshape((padded_size,) + x.shape[2:])[:batch_size]

  return total, unchunk(norms), jax.tree_util.tree_map(unchunk, extras)


def gradient_per_example(fun, argnums, has_aux):
  grad_argnums = argnums[0] if len(argnums) == 1 else argnums
  value_and_grad = jax.value_and_grad(fun, grad_argnums, has_aux=has_aux)

  def per_example(*args):
    if has_aux:
      (value, aux), grads = value_and_grad(*args)
    else:
      (value, grads), aux = value_and_grad(*args), None
    return grads, (value, aux)

  return per_example


def output_per_example(fun, has_aux):
  def per_example(*args):
    if has_aux:
      output, aux = fun(*args)
    else:
      output, aux = fun(*args), None
    return output, (None, aux)

  return per_example


