"""Ghost clipping with book-keeping behind ``clipped_grad(method=...)``.

Per-example gradients are the cost of DP-SGD: materialising them takes
``batch x parameters`` memory and most of the step's time. For a parameter
that enters the loss through one linear operation (a dense ``dot_general``,
a convolution, an embedding ``gather``), an example's gradient is a
contraction of that operation's input (the activation ``a``) with the
gradient of the loss with respect to its output (the cotangent ``g``):
``grad_W = a^T g`` for a dense layer. Its squared norm can be computed from
``a`` and ``g`` alone, ``<a a^T, g g^T>`` (the "ghost norm"), and the clipped
sum ``sum_b c_b a_b^T g_b`` is one more contraction ("book-keeping"), with no
per-example gradient stored and no second backward pass.

How it works on an arbitrary JAX loss (no layer objects needed):

1. The loss of one example is traced to a jaxpr. Every parameter leaf whose
   only use (after inlining ``jit`` calls) is as the weight of a supported
   primitive is *tapped*; every other leaf is *materialised*.
2. The jaxpr is re-evaluated per example under ``vmap`` by a small
   interpreter that records each tapped primitive's input and adds a zero
   perturbation to its output. One backward pass of the summed loss then
   gives, per example, the output cotangents of tapped primitives (the
   gradient with respect to the perturbation) and the gradients of
   materialised leaves (the gradient with respect to per-example copies of
   them, ``batch x leaf`` memory for those leaves only).
3. Norms come from (activation, cotangent) pairs: rank-one product for a
   single position, the ghost norm ``<a a^T, g g^T>`` when
   ``positions * (in + out) <= in * out``, else the per-example gradient
   ``a^T g`` of that one layer (a shape-based cost model per layer,
   :func:`materialises`; convolutions use patches of the input).
4. With the clip factors ``c_b`` known, the clipped sum of a ghost-norm leaf
   is the vector-Jacobian product of the batched primitive with cotangents
   ``c_b g_b`` (book-keeping); that of a formed per-example gradient is
   ``sum_b c_b grad_b``.

Anything unsupported (parameters used twice, inside ``scan`` or custom
derivatives, grouped convolutions, ...) is materialised, which is exact and
never worse than the vmap engine for that leaf.

References:
  Goodfellow, "Efficient per-example gradient computations", 2015,
  arXiv:1510.01799.
  Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", 2021, arXiv:2110.05679.
  Bu et al., "Differentially Private Optimization on Large Model at Small
  Cost", 2022, arXiv:2210.00038.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import Any, Callable

import jax
from jax import lax
from jax.extend import core as jex_core
import jax.numpy as jnp

from jax_privacy import _per_example

_LOGGER = logging.getLogger(__name__)
_CALL_PRIMITIVES = ('jit', 'pjit')


@dataclasses.dataclass(frozen=True)
class _Tap:
  """A parameter leaf used once, as ``operand`` of a supported equation."""

  leaf: int
  operand: int
  eqn: Any
  path: tuple[int, ...]


def _supported_use(eqn, operand: int) -> bool:
  """Whether ``eqn`` is a linear layer whose weight is operand ``operand``."""
  name = eqn.primitive.name
  params = eqn.params
  if name == 'dot_general':
    (_, _), (lhs_batch, rhs_batch) = params['dimension_numbers']
    return operand in (0, 1) and not lhs_batch and not rhs_batch
  if name == 'conv_general_dilated':
    return (
        operand == 1
        and params['feature_group_count'] == 1
        and params['batch_group_count'] == 1
        and all(d == 1 for d in params['lhs_dilation'])
    )
  if name == 'gather':
    table = eqn.invars[0].aval
    out_rank = len(eqn.outvars[0].aval.shape)
    dims = params['dimension_numbers']
    return (
        operand == 0
        and len(table.shape) == 2
        and tuple(dims.offset_dims) == (out_rank - 1,)
        and tuple(dims.collapsed_slice_dims) == (0,)
        and tuple(dims.start_index_map) == (0,)
        and not dims.operand_batching_dims
        and tuple(params['slice_sizes']) == (1, table.shape[1])
        and eqn.invars[1].aval.shape[-1:] == (1,)
    )
  return False


def _inner_jaxpr(eqn):
  if eqn.primitive.name in _CALL_PRIMITIVES:
    inner = eqn.params.get('jaxpr')
    if isinstance(inner, jex_core.ClosedJaxpr):
      return inner
  return None


def find_taps(jaxpr, num_leaves: int) -> dict[int, _Tap]:
  """Maps each tappable leaf index (the first jaxpr inputs) to its tap."""
  uses: dict[int, list[tuple[Any, int, tuple[int, ...]]]] = {
      i: [] for i in range(num_leaves)
  }
  bad: set[int] = set()

  # A jaxpr called twice (e.g. one jitted layer function used for two
  # layers) is one object: equations are identified by their call path.
  def walk(jaxpr, tags, path):
    for eqn in jaxpr.eqns:
      in_tags = [
          None if isinstance(v, jex_core.Literal) else tags.get(v)
          for v in eqn.invars
      ]
      inner = _inner_jaxpr(eqn)
      if inner is not None:
        inner_tags = {
            v: t for v, t in zip(inner.jaxpr.invars, in_tags) if t is not None
        }
        walk(inner.jaxpr, inner_tags, path + (id(eqn),))
        for v in inner.jaxpr.outvars:
          if not isinstance(v, jex_core.Literal) and v in inner_tags:
            bad.add(inner_tags[v])
        continue
      for operand, tag in enumerate(in_tags):
        if tag is not None:
          uses[tag].append((eqn, operand, path + (id(eqn),)))
    for v in jaxpr.outvars:
      if not isinstance(v, jex_core.Literal) and v in tags:
        bad.add(tags[v])

  walk(jaxpr, {v: i for i, v in enumerate(jaxpr.invars[:num_leaves])}, ())
  taps = {}
  for leaf, leaf_uses in uses.items():
    if leaf in bad or len(leaf_uses) != 1:
      continue
    eqn, operand, path = leaf_uses[0]
    if _supported_use(eqn, operand):
      taps[leaf] = _Tap(leaf=leaf, operand=operand, eqn=eqn, path=path)
  return taps


def evaluate(
    jaxpr, consts, args, taps_by_path, perturbations, activations, path=()
):
  """Evaluates ``jaxpr``, recording tapped inputs and perturbing outputs."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    inner = _inner_jaxpr(eqn)
    if inner is not None:
      outs = evaluate(
          inner.jaxpr, inner.consts, invals, taps_by_path, perturbations,
          activations, path + (id(eqn),),
      )
    else:
      bind_params = eqn.primitive.get_bind_params(eqn.params)
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **bind_params)
      tap = taps_by_path.get(path + (id(eqn),))
      if tap is not None:
        activations[tap.leaf] = invals[1 - tap.operand]
        outs = outs + perturbations[tap.leaf]
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _apply_layer(tap: _Tap, activation, weight):
  """Re-applies the tapped primitive to ``activation`` and ``weight``."""
  operands = [None, None]
  operands[tap.operand] = weight
  operands[1 - tap.operand] = activation
  bind_params = tap.eqn.primitive.get_bind_params(tap.eqn.params)
  return tap.eqn.primitive.bind(*operands, **bind_params)


def _to_rows(x, feature_axes):
  """Moves ``feature_axes`` last and flattens to ``(positions, features)``."""
  rest = [d for d in range(x.ndim) if d not in feature_axes]
  features = math.prod(x.shape[d] for d in feature_axes)
  return jnp.transpose(x, rest + list(feature_axes)).reshape((-1, features))


def _dense_rows(tap: _Tap, activation, cotangent, weight_shape):
  """``(positions, in)`` activations and ``(positions, out)`` cotangents."""
  (lhs_contract, rhs_contract), _ = tap.eqn.params['dimension_numbers']
  if tap.operand == 1:
    act_contract, w_contract = lhs_contract, rhs_contract
  else:
    act_contract, w_contract = rhs_contract, lhs_contract
  act_rows = _to_rows(activation, tuple(act_contract))
  w_free = math.prod(
      size for d, size in enumerate(weight_shape) if d not in w_contract
  )
  if tap.operand == 1:
    cot_rows = cotangent.reshape((-1, w_free))
  else:
    cot_rows = cotangent.reshape((w_free, -1)).T
  return act_rows, cot_rows


def _conv_rows(tap: _Tap, activation, cotangent, weight_shape):
  """Patches ``(positions, in * window)`` and ``(positions, out)`` rows.

  The patches are strided slices of the padded input, one per kernel offset
  (``lax.conv_general_dilated_patches`` is a grouped convolution, much
  slower on CPU). Their column order differs from the kernel's, which leaves
  the norm unchanged.
  """
  params = tap.eqn.params
  dims = params['dimension_numbers']
  x = jnp.transpose(activation, (dims.lhs_spec[0],) + tuple(dims.lhs_spec[2:])
                    + (dims.lhs_spec[1],))
  x = lax.pad(
      x,
      jnp.zeros((), x.dtype),
      [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in params['padding']] + [(0, 0, 0)],
  )
  window = [weight_shape[d] for d in dims.rhs_spec[2:]]
  out_sizes = [cotangent.shape[d] for d in dims.out_spec[2:]]
  strides = params['window_strides']
  dilation = params['rhs_dilation']
  patches = []
  for offset in itertools.product(*(range(k) for k in window)):
    starts = [o * r for o, r in zip(offset, dilation)]
    patches.append(
        lax.slice(
            x,
            [0] + starts + [0],
            [x.shape[0]]
            + [s + (n - 1) * t + 1 for s, n, t in zip(starts, out_sizes, strides)]
            + [x.shape[-1]],
            [1] + list(strides) + [1],
        )
    )
  patches = jnp.stack(patches, axis=-1)
  act_rows = patches.reshape((-1, patches.shape[-2] * patches.shape[-1]))
  cot = jnp.transpose(cotangent, (dims.out_spec[0],) + tuple(dims.out_spec[2:])
                      + (dims.out_spec[1],))
  return act_rows, cot.reshape((-1, cot.shape[-1]))


def _rows_squared_norm(act_rows, cot_rows):
  """``||act_rows^T cot_rows||_F^2`` without forming the product."""
  act_rows = act_rows.astype(_per_example.at_least_f32(act_rows.dtype))
  cot_rows = cot_rows.astype(_per_example.at_least_f32(cot_rows.dtype))
  if act_rows.shape[0] == 1:
    return jnp.sum(jnp.square(act_rows)) * jnp.sum(jnp.square(cot_rows))
  return jnp.sum((act_rows @ act_rows.T) * (cot_rows @ cot_rows.T))


def _weight_axes(tap: _Tap, weight_shape):
  """The weight's axes in the column order of ``act_rows^T cot_rows``."""
  if tap.eqn.primitive.name == 'conv_general_dilated':
    rhs_spec = tap.eqn.params['dimension_numbers'].rhs_spec
    return [rhs_spec[1]] + list(rhs_spec[2:]), [rhs_spec[0]]
  (lhs_contract, rhs_contract), _ = tap.eqn.params['dimension_numbers']
  contract = list(rhs_contract if tap.operand == 1 else lhs_contract)
  free = [d for d in range(len(weight_shape)) if d not in contract]
  return contract, free


def materialises(tap: _Tap, weight_shape) -> bool:
  """Whether forming the example's gradient beats the ghost norm.

  Cost model from shapes: with ``positions`` rows, ``size_in`` activation and
  ``size_out`` cotangent columns, the ghost norm costs ``positions^2 *
  (size_in + size_out)`` and the gradient ``positions * size_in *
  size_out`` (and as much memory as the activations, so no more than the
  step already holds). A formed gradient also gives the clipped sum without
  another weight-gradient contraction.
  """
  if tap.eqn.primitive.name == 'gather':
    return False
  positions, size_in, size_out = _rows_shape(tap, weight_shape)
  return positions > 1 and positions * (size_in + size_out) > (
      size_in * size_out
  )


def _rows_shape(tap: _Tap, weight_shape) -> tuple[int, int, int]:
  """``(positions, size_in, size_out)`` of a dense or convolution tap."""
  in_axes, out_axes = _weight_axes(tap, weight_shape)
  size_in = math.prod(weight_shape[d] for d in in_axes)
  size_out = math.prod(weight_shape[d] for d in out_axes)
  return math.prod(tap.eqn.outvars[0].aval.shape) // size_out, size_in, size_out


def tapped_gradient(tap: _Tap, activation, cotangent, weight_shape):
  """One example's gradient for a tapped dense or convolution weight."""
  rows = _conv_rows if tap.eqn.primitive.name == 'conv_general_dilated' else (
      _dense_rows
  )
  act_rows, cot_rows = rows(tap, activation, cotangent, weight_shape)
  grad = act_rows.T @ cot_rows
  in_axes, out_axes = _weight_axes(tap, weight_shape)
  order = in_axes + out_axes
  grad = grad.reshape([weight_shape[d] for d in order])
  return jnp.transpose(grad, [order.index(d) for d in range(len(order))])


def _embedding_squared_norm(tap: _Tap, indices, cotangent, weight_shape):
  vocab, width = weight_shape
  ids = indices.reshape((-1,))
  rows = cotangent.reshape((-1, width))
  rows = rows.astype(_per_example.at_least_f32(rows.dtype))
  if tap.eqn.params['mode'] == lax.GatherScatterMode.FILL_OR_DROP:
    valid = (ids >= 0) & (ids < vocab)
    rows = jnp.where(valid[:, None], rows, 0)
  else:
    ids = jnp.clip(ids, 0, vocab - 1)
  same = ids[:, None] == ids[None, :]
  return jnp.sum(jnp.where(same, rows @ rows.T, 0))


def tapped_squared_norm(tap: _Tap, activation, cotangent, weight_shape):
  """One example's squared gradient norm for a tapped leaf."""
  name = tap.eqn.primitive.name
  if name == 'gather':
    return _embedding_squared_norm(tap, activation, cotangent, weight_shape)
  rows = _conv_rows if name == 'conv_general_dilated' else _dense_rows
  return _rows_squared_norm(*rows(tap, activation, cotangent, weight_shape))


def _clip_coefficients(norms, is_padding, settings):
  """Per-example factors ``c_b`` with ``sum_b c_b grad_b`` the clipped sum."""
  bound = jnp.asarray(settings.l2_clip_norm, norms.dtype)
  scale = jnp.where(norms > bound, bound / norms, jnp.ones_like(norms))
  if settings.rescale_to_unit_norm:
    scale = scale / bound
  keep = ~is_padding
  if settings.nan_safe:
    keep = keep & jnp.isfinite(norms)
  return jnp.where(keep, scale, jnp.zeros_like(scale)), keep


def _mask_examples(keep, x):
  keep = keep.reshape(keep.shape + (1,) * (x.ndim - 1))
  return jnp.where(keep, x, jnp.zeros_like(x))


def _example_shape(x):
  return jax.ShapeDtypeStruct(jnp.shape(x)[1:], x.dtype)


def ghost_chunk_function(
    fun: Callable[..., Any],
    argnums: tuple[int, ...],
    has_aux: bool,
    settings: _per_example.ClipSettings,
    *,
    fallback: Callable[..., Any] | None = None,
) -> Callable[..., tuple[Any, jax.Array, Any]]:
  """The ghost-clipping chunk function for :func:`_per_example.batch_function`.

  Args:
    fun: the per-example loss, as given to ``clipped_grad``.
    argnums: the differentiated arguments.
    has_aux: ``fun`` returns ``(loss, aux)``.
    settings: the validated clipping settings (identity pre-clipping
      transform and the global L2 norm).
    fallback: a chunk function to use instead when no parameter leaf can be
      tapped (``method='auto'``); None materialises every leaf.

  Returns:
    ``chunk(args, is_padding, batched) -> (clipped_sum, norms, (values,
    aux))``, equal to the vmap engine's up to floating-point rounding.
  """

  def assemble(diff_values, rest):
    args = list(rest)
    for argnum, value in zip(argnums, diff_values):
      args[argnum] = value
    return args

  def chunk(args, is_padding, batched):
    batch_size = is_padding.shape[0]
    diff_leaves, diff_tree = jax.tree_util.tree_flatten(
        tuple(args[a] for a in argnums)
    )
    rest = tuple(None if i in argnums else arg for i, arg in enumerate(args))

    def prepare(rest_example):
      if not settings.keep_batch_dim:
        return rest_example
      return tuple(
          jax.tree_util.tree_map(lambda x: jnp.expand_dims(x, 0), arg)
          if i in settings.batch_argnums
          else arg
          for i, arg in enumerate(rest_example)
      )

    def traced(diff_values, rest_example):
      diff = jax.tree_util.tree_unflatten(diff_tree, diff_values)
      return fun(*assemble(diff, prepare(rest_example)))

    example_rest = tuple(
        jax.tree_util.tree_map(_example_shape, arg) if i in batched else arg
        for i, arg in enumerate(rest)
    )
    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(
        diff_leaves, example_rest
    )
    loss_shape = out_shape[0] if has_aux else out_shape
    if loss_shape.shape != ():
      raise TypeError(
          'clipped_grad needs fun to return a scalar loss per example, got '
          f'shape {loss_shape.shape}'
      )
    out_tree = jax.tree_util.tree_structure(out_shape)
    taps = find_taps(closed.jaxpr, len(diff_leaves))
    if not taps and fallback is not None:
      _LOGGER.info('clipped_grad method=auto: no layer to tap, using vmap')
      return fallback(args, is_padding, batched)
    materialised = [i for i in range(len(diff_leaves)) if i not in taps]
    _LOGGER.info(
        'clipped_grad ghost clipping: %d parameter leaves by ghost norm '
        '(%s), %d materialised per example',
        len(taps),
        ', '.join(sorted({t.eqn.primitive.name for t in taps.values()})),
        len(materialised),
    )
    taps_by_path = {tap.path: tap for tap in taps.values()}

    def example_loss(copies, perturbations, rest_example):
      values = list(diff_leaves)
      for leaf, copy in zip(materialised, copies):
        values[leaf] = copy
      activations = {}
      outs = evaluate(
          closed.jaxpr,
          closed.consts,
          values + jax.tree_util.tree_leaves(rest_example),
          taps_by_path,
          perturbations,
          activations,
      )
      out = jax.tree_util.tree_unflatten(out_tree, outs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, activations)

    rest_axes = tuple(0 if i in batched else None for i in range(len(rest)))
    batched_loss = jax.vmap(
        example_loss,
        in_axes=(0, 0, rest_axes),
        spmd_axis_name=settings.spmd_axis_name,
    )

    def losses_fn(copies, perturbations):
      losses, (aux, activations) = batched_loss(copies, perturbations, rest)
      return losses, (losses, aux, activations)

    copies = [
        jnp.broadcast_to(diff_leaves[i], (batch_size,) + diff_leaves[i].shape)
        for i in materialised
    ]
    perturbations = {
        leaf: jnp.zeros(
            (batch_size,) + tap.eqn.outvars[0].aval.shape,
            tap.eqn.outvars[0].aval.dtype,
        )
        for leaf, tap in taps.items()
    }
    losses, pullback, (values, aux, activations) = jax.vjp(
        losses_fn, copies, perturbations, has_aux=True
    )
    copy_grads, cotangents = pullback(jnp.ones_like(losses))

    # Per-example gradients that exist: materialised leaves, and tapped
    # layers whose gradient is cheaper to form than its ghost norm.
    formed = dict(zip(materialised, copy_grads))
    ghosts = {}
    for leaf, tap in taps.items():
      shape = diff_leaves[leaf].shape
      if materialises(tap, shape):
        formed[leaf] = jax.vmap(
            lambda a, g, tap=tap, shape=shape: tapped_gradient(
                tap, a, g, shape
            ),
            spmd_axis_name=settings.spmd_axis_name,
        )(activations[leaf], cotangents[leaf])
      else:
        ghosts[leaf] = tap
    squared = jnp.zeros((batch_size,), jnp.float32)
    for grad in formed.values():
      grad = grad.astype(_per_example.at_least_f32(grad.dtype))
      squared = squared + jnp.sum(
          jnp.square(grad).reshape((batch_size, -1)), axis=1
      )
    for leaf, tap in ghosts.items():
      shape = diff_leaves[leaf].shape
      squared = squared + jax.vmap(
          lambda a, g, tap=tap, shape=shape: tapped_squared_norm(
              tap, a, g, shape
          ),
          spmd_axis_name=settings.spmd_axis_name,
      )(activations[leaf], cotangents[leaf])
    norms = jnp.sqrt(squared)
    coefficients, keep = _clip_coefficients(norms, is_padding, settings)

    summed = list(diff_leaves)
    for leaf, grad in formed.items():
      out_dtype = _per_example.accumulation_dtype(
          diff_leaves[leaf].dtype, settings.dtype
      )
      grad = _mask_examples(keep, grad.astype(coefficients.dtype))
      summed[leaf] = jnp.tensordot(coefficients, grad, axes=1).astype(out_dtype)
    for leaf, tap in ghosts.items():
      weight = diff_leaves[leaf]
      cotangent = cotangents[leaf]
      scaled = _mask_examples(
          keep,
          coefficients.reshape((-1,) + (1,) * (cotangent.ndim - 1)) * cotangent,
      ).astype(cotangent.dtype)
      activation = _mask_examples(keep, activations[leaf])
      _, layer_pullback = jax.vjp(
          lambda w, tap=tap, activation=activation: jax.vmap(
              lambda a: _apply_layer(tap, a, w)
          )(activation),
          weight,
      )
      (grad_sum,) = layer_pullback(scaled)
      out_dtype = _per_example.accumulation_dtype(weight.dtype, settings.dtype)
      summed[leaf] = grad_sum.astype(out_dtype)
    summed = jax.tree_util.tree_unflatten(diff_tree, summed)
    if len(argnums) == 1:
      (summed,) = summed
    return summed, norms, (values, aux)

  return chunk
