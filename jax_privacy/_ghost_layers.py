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

import jax.numpy as jnp
from jax import lax

from jax_privacy import _per_example


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


def _conv_rows(tap, activation, cotangent, weight_shape):
  """Patches ``(groups, positions, in_group * window)``, ``(groups, pos, out)``.

  The patches are strided slices of the padded (and, for transposed
  convolutions, dilated) input, one per kernel offset:
  ``lax.conv_general_dilated_patches`` is itself a grouped convolution, much
  slower on CPU.
  """
  params = tap.eqn.params
  dims = params['dimension_numbers']
  groups = params['feature_group_count']
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
  patches = []
  for offset in itertools.product(*(range(k) for k in window)):
    starts = [o * r for o, r in zip(offset, params['rhs_dilation'])]
    patches.append(
        lax.slice(
            x,
            [0] + starts + [0],
            [x.shape[0]]
            + [
                s + (n - 1) * t + 1
                for s, n, t in zip(starts, out_sizes, strides)
            ]
            + [x.shape[-1]],
            [1] + list(strides) + [1],
        )
    )
  # (positions, channels, window) -> (groups, positions, in_group * window).
  patches = jnp.stack(patches, axis=-1)
  act = patches.reshape(
      (-1, groups, patches.shape[-2] // groups * patches.shape[-1])
  )
  cot = jnp.transpose(
      cotangent, (dims.out_spec[0],) + tuple(dims.out_spec[2:])
      + (dims.out_spec[1],),
  )
  cot = cot.reshape((-1, groups, cot.shape[-1] // groups))
  return jnp.swapaxes(act, 0, 1), jnp.swapaxes(cot, 0, 1)


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
  act, cot = rows(tap, activation, cotangent, weight_shape)
  dtype = jnp.promote_types(
      _per_example.at_least_f32(act.dtype), _per_example.at_least_f32(cot.dtype)
  )
  grad = jnp.einsum('gpi,gpo->gio', act.astype(dtype), cot.astype(dtype))
  ndim = len(weight_shape)
  if tap.eqn.primitive.name == 'conv_general_dilated':
    rhs_spec = tap.eqn.params['dimension_numbers'].rhs_spec
    window = _conv_window(tap, weight_shape)
    groups, size_in, size_out = grad.shape
    # (group, in_group * window, out_group) -> (out, in_group, *window), the
    # kernel laid out as (rhs_spec[0], rhs_spec[1], *rhs_spec[2:]).
    grad = jnp.swapaxes(grad, 1, 2).reshape(
        [groups * size_out, size_in // math.prod(window)] + window
    )
    return jnp.transpose(grad, [rhs_spec.index(d) for d in range(ndim)])
  group_axes, in_axes, out_axes = _dense_weight_axes(tap, ndim)
  order = group_axes + in_axes + out_axes
  grad = grad.reshape([weight_shape[d] for d in order])
  return jnp.transpose(grad, [order.index(d) for d in range(ndim)])


def embedding_squared_norm(tap, indices, cotangent, weight_shape):
  """One example's squared gradient norm for a tapped embedding table."""
  vocab, width = weight_shape
  ids = indices.reshape((-1,))
  cot = cotangent.reshape((-1, width))
  cot = cot.astype(_per_example.at_least_f32(cot.dtype))
  if tap.eqn.params['mode'] == lax.GatherScatterMode.FILL_OR_DROP:
    valid = (ids >= 0) & (ids < vocab)
    cot = jnp.where(valid[:, None], cot, 0)
  else:
    ids = jnp.clip(ids, 0, vocab - 1)
  same = ids[:, None] == ids[None, :]
  return jnp.sum(jnp.where(same, cot @ cot.T, 0))
