"""The layers of ghost clipping: which uses of a weight, and their algebra.

A tapped weight enters one example's loss through one primitive that is
linear in it. For dense and convolution layers the example's gradient is,
group by group, a product of two row matrices built from that primitive's
input (the activation) and the gradient of the loss with respect to its
output (the cotangent)::

    grad_g = act_g^T cot_g,   act_g: (positions, size_in),
                              cot_g: (positions, size_out)

* ``dot_general`` (dense layers, Flax ``Dense`` / ``DenseGeneral`` and the
  query/key/value/output projections of attention, any ``einsum`` of an
  activation with a weight): one group per index of the weight's batch
  dimensions (e.g. per-head weights ``'bhsd,hdk->bhsk'``), rows over the
  activation's free dimensions, columns over the contracting dimensions.
* ``conv_general_dilated`` (1-D, 2-D, ... convolutions, Flax ``Conv`` and
  ``ConvTranspose``): one group per ``feature_group_count`` group (grouped
  and depthwise convolutions), rows are the positions of the output, columns
  the input patch (input channels of the group times the kernel window) of
  the padded input, dilated by ``lhs_dilation`` (transposed convolutions).
  ``rhs_dilation`` and strides select which input elements a patch holds.
* ``gather`` of rows of a 2-D table (embedding lookups): the gradient's
  squared norm is ``sum_{p,q: id_p = id_q} <cot_p, cot_q>``.

The squared norm of ``act_g^T cot_g`` is ``<act_g act_g^T, cot_g cot_g^T>``
(the ghost norm), at ``positions^2 * (size_in + size_out)`` operations per
group, or the gradient is formed at ``positions * size_in * size_out``;
:func:`materialises` chooses from shapes (operations, and memory bounded by
the layer's activations). Convolutions with
``batch_group_count > 1`` (weight-gradient convolutions) are not tapped.

References:
  Goodfellow, "Efficient per-example gradient computations", 2015,
  arXiv:1510.01799.
  Rochette, Manoel and Tramel, "Efficient Per-Example Gradient Computations
  in Convolutional Neural Networks", 2019, arXiv:1912.06015.
  Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", 2021, arXiv:2110.05679.
"""

from __future__ import annotations

import itertools
import math

from jax import lax
from jax.extend import core as jex_core
import jax.numpy as jnp

from jax_privacy import _per_example

CALL_PRIMITIVES = ('jit', 'pjit')
_VIEW_PRIMITIVES = (
    'broadcast_in_dim', 'convert_element_type', 'copy', 'copy_p', 'reshape',
    'squeeze', 'transpose',
)


def is_view(eqn) -> bool:
  """Whether ``eqn`` relabels the entries of one float array, one to one."""
  if eqn.primitive.name not in _VIEW_PRIMITIVES or len(eqn.invars) != 1:
    return False
  source, target = eqn.invars[0].aval, eqn.outvars[0].aval
  return (
      source.size == target.size
      and jnp.issubdtype(source.dtype, jnp.floating)
      and jnp.issubdtype(target.dtype, jnp.floating)
  )


def inner_jaxpr(eqn):
  """The called jaxpr of a ``jit`` equation, else None."""
  if eqn.primitive.name in CALL_PRIMITIVES:
    inner = eqn.params.get('jaxpr')
    if isinstance(inner, jex_core.ClosedJaxpr):
      return inner
  return None


def supported_use(eqn, operand: int) -> bool:
  """Whether ``eqn`` is a linear layer whose weight is operand ``operand``."""
  name = eqn.primitive.name
  params = eqn.params
  if name == 'dot_general':
    return operand in (0, 1)
  if name == 'conv_general_dilated':
    return operand == 1 and params['batch_group_count'] == 1
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


def apply_layer(tap, activation, weight, *, compute_dtype=None):
  """Re-applies the tapped primitive to ``activation`` and ``weight``.

  With ``compute_dtype``, floating-point operands are cast to it and the
  primitive computes (and returns) in it rather than in the traced dtypes.
  """
  params = dict(tap.eqn.params)
  if compute_dtype is not None:
    weight = weight.astype(compute_dtype)
    if jnp.issubdtype(activation.dtype, jnp.floating):
      activation = activation.astype(compute_dtype)
    if 'preferred_element_type' in params:
      params['preferred_element_type'] = None
  operands = [None, None]
  operands[tap.operand] = weight
  operands[1 - tap.operand] = activation
  bind_params = tap.eqn.primitive.get_bind_params(params)
  return tap.eqn.primitive.bind(*operands, **bind_params)


def _dense_dims(tap):
  """``(weight_batch, weight_contract, act_batch, act_contract)`` axes."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = tap.eqn.params[
      'dimension_numbers'
  ]
  if tap.operand == 1:
    return rhs_batch, rhs_contract, lhs_batch, lhs_contract
  return lhs_batch, lhs_contract, rhs_batch, rhs_contract


def _dense_weight_axes(tap, ndim: int):
  """The weight's axes as ``(group, in, out)`` of ``act_g^T cot_g``."""
  w_batch, w_contract, _, _ = _dense_dims(tap)
  free = [d for d in range(ndim) if d not in w_batch and d not in w_contract]
  return list(w_batch), list(w_contract), free


def _dense_rows(tap, activation, cotangent, weight_shape):
  """``(groups, positions, in)`` activations, ``(groups, positions, out)``."""
  _, _, act_batch, act_contract = _dense_dims(tap)
  group_axes, in_axes, out_axes = _dense_weight_axes(tap, len(weight_shape))
  groups = math.prod(weight_shape[d] for d in group_axes)
  size_in = math.prod(weight_shape[d] for d in in_axes)
  size_out = math.prod(weight_shape[d] for d in out_axes)
  act_free = [
      d for d in range(activation.ndim)
      if d not in act_batch and d not in act_contract
  ]
  act = jnp.transpose(
      activation, list(act_batch) + act_free + list(act_contract)
  ).reshape((groups, -1, size_in))
  # dot_general's output is (batch, lhs free, rhs free).
  if tap.operand == 1:
    cot = cotangent.reshape((groups, -1, size_out))
  else:
    cot = jnp.swapaxes(cotangent.reshape((groups, size_out, -1)), 1, 2)
  return act, cot


def _conv_window(tap, weight_shape):
  rhs_spec = tap.eqn.params['dimension_numbers'].rhs_spec
  return [weight_shape[d] for d in rhs_spec[2:]]


def _conv_slices(tap, activation, cotangent, weight_shape):
  """One input slice per kernel offset, and the cotangent, position-major.

  Returns ``(slices, cot)``: for each offset of the kernel window (in
  row-major order), the input elements it meets at every output position,
  ``(positions, channels)``, strided slices of the padded (and, for
  transposed convolutions, dilated) input; and the cotangent as
  ``(positions, out channels)``. ``lax.conv_general_dilated_patches`` would
  be a grouped convolution, much slower on CPU.
  """
  params = tap.eqn.params
  dims = params['dimension_numbers']
  x = jnp.transpose(
      activation,
      (dims.lhs_spec[0],) + tuple(dims.lhs_spec[2:]) + (dims.lhs_spec[1],),
  )
  x = lax.pad(
      x,
      jnp.zeros((), x.dtype),
      [(0, 0, 0)]
      + [
          (lo, hi, dilation - 1)
          for (lo, hi), dilation in zip(
              params['padding'], params['lhs_dilation']
          )
      ]
      + [(0, 0, 0)],
  )
  window = _conv_window(tap, weight_shape)
  out_sizes = [cotangent.shape[d] for d in dims.out_spec[2:]]
  strides = params['window_strides']
  slices = []
  for offset in itertools.product(*(range(k) for k in window)):
    starts = [o * r for o, r in zip(offset, params['rhs_dilation'])]
    piece = lax.slice(
        x,
        [0] + starts + [0],
        [x.shape[0]]
        + [s + (n - 1) * t + 1 for s, n, t in zip(starts, out_sizes, strides)]
        + [x.shape[-1]],
        [1] + list(strides) + [1],
    )
    slices.append(piece.reshape((-1, x.shape[-1])))
  cot = jnp.transpose(
      cotangent, (dims.out_spec[0],) + tuple(dims.out_spec[2:])
      + (dims.out_spec[1],),
  )
  return slices, cot.reshape((-1, cot.shape[-1]))


def _conv_rows(tap, activation, cotangent, weight_shape):
  """Patches ``(groups, positions, in_group * window)``, ``(groups, pos, out)``."""
  groups = tap.eqn.params['feature_group_count']
  slices, cot = _conv_slices(tap, activation, cotangent, weight_shape)
  # (positions, channels, window) -> (groups, positions, in_group * window).
  patches = jnp.stack(slices, axis=-1)
  act = patches.reshape(
      (-1, groups, patches.shape[-2] // groups * patches.shape[-1])
  )
  cot = cot.reshape((-1, groups, cot.shape[-1] // groups))
  return jnp.swapaxes(act, 0, 1), jnp.swapaxes(cot, 0, 1)


def _conv_gradient(tap, activation, cotangent, weight_shape, dtype):
  """``(groups, in_group * window, out_group)``, one product per offset.

  The same numbers as ``act^T cot`` of :func:`_conv_rows`, without forming
  the patches: on CPU, a product per kernel offset of a slice of the input
  is about twice as fast as the product of the (window times larger)
  patch matrix, which must first be written out.
  """
  groups = tap.eqn.params['feature_group_count']
  slices, cot = _conv_slices(tap, activation, cotangent, weight_shape)
  cot = cot.astype(dtype).reshape((cot.shape[0], groups, -1))
  grads = [
      jnp.einsum(
          'pgi,pgo->gio',
          piece.astype(dtype).reshape((piece.shape[0], groups, -1)),
          cot,
      )
      for piece in slices
  ]
  grad = jnp.stack(grads, axis=-2)
  return grad.reshape((groups, -1, grad.shape[-1]))


def rows(tap, activation, cotangent, weight_shape):
  """The ``(groups, positions, size)`` row matrices of a dense or conv tap."""
  if tap.eqn.primitive.name == 'conv_general_dilated':
    return _conv_rows(tap, activation, cotangent, weight_shape)
  return _dense_rows(tap, activation, cotangent, weight_shape)


def _rows_shape(tap, weight_shape) -> tuple[int, int, int, int]:
  """``(groups, positions, size_in, size_out)`` of a dense or conv tap."""
  if tap.eqn.primitive.name == 'conv_general_dilated':
    rhs_spec = tap.eqn.params['dimension_numbers'].rhs_spec
    groups = tap.eqn.params['feature_group_count']
    size_in = weight_shape[rhs_spec[1]] * math.prod(
        _conv_window(tap, weight_shape)
    )
    size_out = weight_shape[rhs_spec[0]] // groups
  else:
    group_axes, in_axes, out_axes = _dense_weight_axes(tap, len(weight_shape))
    groups = math.prod(weight_shape[d] for d in group_axes)
    size_in = math.prod(weight_shape[d] for d in in_axes)
    size_out = math.prod(weight_shape[d] for d in out_axes)
  outputs = math.prod(tap.eqn.outvars[0].aval.shape)
  return groups, outputs // (groups * size_out), size_in, size_out


def materialises(tap, weight_shape) -> bool:
  """Whether forming the example's gradient beats the ghost norm.

  Cost model from shapes, per group, with ``positions`` rows, ``size_in``
  activation and ``size_out`` cotangent columns: the ghost norm costs
  ``positions^2 * (size_in + size_out)`` and its clipped sum another
  ``positions * size_in * size_out`` (book-keeping); a formed gradient costs
  ``positions * size_in * size_out`` and its clipped sum ``size_in *
  size_out``, so it always has fewer operations when ``positions > 1``. Its
  memory, ``size_in * size_out`` per example, is the limit: a gradient is
  formed only when it is at most twice the size of the layer's activations
  and cotangents, ``positions * (size_in + size_out)``, which the step holds
  anyway. Formed gradients thus take at most twice the activation memory,
  never ``batch x parameters`` of layers with small activations (an MLP's
  dense layers, a language model's output layer over a short sequence).
  """
  if tap.eqn.primitive.name == 'gather':
    return False
  _, positions, size_in, size_out = _rows_shape(tap, weight_shape)
  return forms_rows(positions, size_in, size_out)


def forms_rows(positions: int, size_in: int, size_out: int) -> bool:
  """The rule of :func:`materialises` for one group of row matrices."""
  return positions > 1 and 2 * positions * (size_in + size_out) >= (
      size_in * size_out
  )


def rows_squared_norm(act, cot):
  """``sum_g ||act_g^T cot_g||_F^2`` without forming the products."""
  act = act.astype(_per_example.at_least_f32(act.dtype))
  cot = cot.astype(_per_example.at_least_f32(cot.dtype))
  if act.shape[1] == 1:
    return jnp.sum(
        jnp.sum(jnp.square(act), axis=(1, 2))
        * jnp.sum(jnp.square(cot), axis=(1, 2))
    )
  return jnp.sum(
      jnp.einsum('gpi,gqi->gpq', act, act)
      * jnp.einsum('gpo,gqo->gpq', cot, cot)
  )


def tapped_gradient(tap, activation, cotangent, weight_shape):
  """One example's gradient for a tapped weight, in at least float32."""
  dtype = jnp.promote_types(
      _per_example.at_least_f32(activation.dtype),
      _per_example.at_least_f32(cotangent.dtype),
  )
  ndim = len(weight_shape)
  if tap.eqn.primitive.name == 'conv_general_dilated':
    grad = _conv_gradient(tap, activation, cotangent, weight_shape, dtype)
    rhs_spec = tap.eqn.params['dimension_numbers'].rhs_spec
    window = _conv_window(tap, weight_shape)
    groups, size_in, size_out = grad.shape
    # (group, in_group * window, out_group) -> (out, in_group, *window), the
    # kernel laid out as (rhs_spec[0], rhs_spec[1], *rhs_spec[2:]).
    grad = jnp.swapaxes(grad, 1, 2).reshape(
        [groups * size_out, size_in // math.prod(window)] + window
    )
    return jnp.transpose(grad, [rhs_spec.index(d) for d in range(ndim)])
  act, cot = rows(tap, activation, cotangent, weight_shape)
  grad = jnp.einsum('gpi,gpo->gio', act.astype(dtype), cot.astype(dtype))
  group_axes, in_axes, out_axes = _dense_weight_axes(tap, ndim)
  order = group_axes + in_axes + out_axes
  grad = grad.reshape([weight_shape[d] for d in order])
  return jnp.transpose(grad, [order.index(d) for d in range(ndim)])


def lookup_rows(indices, cotangent, vocab: int, mode):
  """``(ids, cotangent rows)`` of one example's lookups of a table.

  Out-of-range ids are dropped (``FILL_OR_DROP``: their cotangent is zero)
  or clamped (the other modes), as the lookup itself does.
  """
  ids = indices.reshape((-1,))
  cot = cotangent.reshape((ids.shape[0], -1))
  cot = cot.astype(_per_example.at_least_f32(cot.dtype))
  if mode == lax.GatherScatterMode.FILL_OR_DROP:
    cot = jnp.where(((ids >= 0) & (ids < vocab))[:, None], cot, 0)
  return jnp.clip(ids, 0, vocab - 1), cot


def same_id_squared_norm(ids, cot):
  """``||sum_p e_{id_p} cot_p^T||^2 = sum_{p,q: id_p = id_q} <cot_p, cot_q>``."""
  same = ids[:, None] == ids[None, :]
  return jnp.sum(jnp.where(same, cot @ cot.T, 0))


def embedding_squared_norm(tap, indices, cotangent, weight_shape):
  """One example's squared gradient norm for a tapped embedding table."""
  ids, cot = lookup_rows(
      indices, cotangent, weight_shape[0], tap.eqn.params['mode']
  )
  return same_id_squared_norm(ids, cot)
