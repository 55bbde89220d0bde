"""Ghost clipping's clipped sums, and transformed weights a chunk at a time.

:func:`book_kept_sum` is the clipped sum ``sum_b c_b grad_b`` of a tapped
weight from its layer's activations and scaled output cotangents, one
vector-Jacobian product of the batched layer (book-keeping).

A layer weight computed from parameters alone (weight standardization) has
per-example gradient ``J_T^T grad_w'`` for the parameters, ``grad_w'`` the
gradient of the layer's weight. When those parameters feed nothing else
(:meth:`jax_privacy._ghost_transforms.TransformPlan.linear_taps`) it is
linear in ``grad_w'``, so:

* the per-example norms need ``grad_w'_b``, which is formed and mapped
  through ``J_T^T`` a chunk of examples at a time (``lax.map``), so the
  formed gradients (and a convolution's input slices) of one chunk of one
  layer are live at a time, not those of every layer for the whole batch;
* the clipped sum is either ``J_T^T (sum_b c_b grad_w'_b)``, the transform's
  VJP of the weight's book-kept sum, with no per-example gradient kept
  (layers whose weight is large next to their activations), or
  ``sum_b c_b grad_b`` of the parameters' per-example gradients kept from
  the chunks (the others: one pass fewer over the activations). A shape
  rule chooses (:func:`linear_taps`).

Privacy:
  Both ways give the clipped sum and the per-example norms of the exact
  per-example gradients (up to floating-point rounding), so the clipping,
  and the sensitivity that ``clipped_grad`` reports, are unchanged.

References:
  Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", 2021, arXiv:2110.05679.
  Bu et al., "Differentially Private Optimization on Large Model at Small
  Cost", 2022, arXiv:2210.00038.
  Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
  Weight Standardization", 2019, arXiv:1903.10520.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jax_privacy import _ghost_layers
from jax_privacy import _per_example


def _book_keeping_layer(tap, weight, activations):
  """The tapped layer on a batch of activations, for book-keeping.

  ``weight`` is the leaf. The views of ``tap.chain`` are applied except
  casts, and the layer computes in at least float32 (and the leaf's dtype):
  its weight gradient is the clipped sum over the batch, which a
  low-precision layer (e.g. a bfloat16 Flax ``Dense`` of float32
  parameters) would otherwise accumulate in low precision.
  """
  for eqn in tap.chain:
    if eqn.primitive.name != 'convert_element_type':
      weight = eqn.primitive.bind(
          weight, **eqn.primitive.get_bind_params(eqn.params)
      )
  dtype = weight.dtype
  if jnp.issubdtype(activations.dtype, jnp.floating):
    dtype = jnp.promote_types(
        dtype, _per_example.at_least_f32(activations.dtype)
    )
  outputs = jax.vmap(
      lambda a: _ghost_layers.apply_layer(tap, a, weight, compute_dtype=dtype)
  )(activations)
  return outputs.astype(tap.eqn.outvars[0].aval.dtype)


def book_kept_sum(tap, weight, activation, cotangent, coefficient, keep):
  """``sum_b c_b grad_b`` of a tapped weight, one VJP of the batched layer."""
  scaled = mask_examples(
      keep,
      coefficient.reshape((-1,) + (1,) * (cotangent.ndim - 1)) * cotangent,
  ).astype(cotangent.dtype)
  activation = mask_examples(keep, activation)
  _, layer_pullback = jax.vjp(
      lambda w: _book_keeping_layer(tap, w, activation),
      weight.astype(_per_example.at_least_f32(weight.dtype)),
  )
  (grad_sum,) = layer_pullback(scaled)
  return grad_sum


def linear_taps(plan, taps, groups) -> dict[int, tuple[int, bool]]:
  """``{virtual leaf: (clipping group, book-kept)}`` of the linear taps.

  The examples' gradients of a transformed weight used only by its layer
  (:meth:`jax_privacy._ghost_transforms.TransformPlan.linear_taps`) are
  formed a chunk of examples at a time (:func:`_linear_chunk_size`) and
  mapped to the parameters in the same chunk. When they would take more
  memory than the layer's activations and cotangents (the rule of
  :func:`jax_privacy._ghost_layers.materialises`) only their norms are kept,
  and the clipped sum is book-kept (*book-kept* True); otherwise the
  parameters' per-example gradients are kept for the clipped sum, which
  saves a pass over the layer's activations. A weight of less than 32 bits
  is never book-kept: the transform's VJP would take the whole sum in that
  precision.
  """
  linear = {}
  for index in plan.linear_taps(taps, groups):
    tap = taps[index]
    t = plan.transforms[index - plan.num_leaves]
    linear[index] = (
        groups[t.leaves[0]],
        jnp.dtype(t.var.aval.dtype).itemsize >= 4
        and not _ghost_layers.materialises(tap, tap.weight_shape),
    )
  return linear


def linear_gradients(
    plan, tap, activations, cotangents, leaves, rest, batch_size,
    spmd_axis_name, squared_norms=False,
):
  """:meth:`TransformPlan.linear_gradients` of a tapped virtual leaf."""
  return plan.linear_gradients(
      tap.leaf,
      lambda a, g: gradient_to_leaf(
          tap, _ghost_layers.tapped_gradient(tap, a, g, tap.weight_shape)
      ),
      activations[tap.leaf], cotangents[tap.leaf], leaves, rest,
      squared_norms=squared_norms,
      chunk_size=_linear_chunk_size(tap, batch_size),
      spmd_axis_name=spmd_axis_name,
  )


def _linear_chunk_size(tap, batch_size: int) -> int:
  """Examples whose transient per-example tensors fit in the layer's memory.

  Forming one example's weight gradient and mapping it to the parameters
  takes about twice the weight's size, plus, for a convolution, one input
  slice per kernel offset (:func:`jax_privacy._ghost_layers.tapped_gradient`).
  A chunk holds as many examples as fit in the memory of the layer's
  activations and cotangents for the whole batch, which the step holds
  anyway (at least one example). Without chunks XLA computes them for every
  layer at once (the slices of all convolutions are live together). A
  divisor of the batch size at least half that number is preferred: it
  leaves no remainder, which ``lax.map`` would compile separately.
  """
  outputs = math.prod(tap.eqn.outvars[0].aval.shape)
  inputs = math.prod(tap.eqn.invars[1 - tap.operand].aval.shape)
  weight = math.prod(tap.weight_shape)
  transient = 2 * weight
  if tap.eqn.primitive.name == 'conv_general_dilated':
    out_channels = tap.eqn.outvars[0].aval.shape[
        tap.eqn.params['dimension_numbers'].out_spec[1]
    ]
    # Input channels of a group times the window, times the groups.
    transient += (
        outputs // out_channels * (weight // out_channels)
        * tap.eqn.params['feature_group_count']
    )
  chunk = max(1, min(batch_size, batch_size * (inputs + outputs) // transient))
  # A divisor of the batch (if not much smaller) leaves no remainder chunk,
  # which ``lax.map`` would compile as a second copy of the computation.
  divisor = max(d for d in range(1, chunk + 1) if batch_size % d == 0)
  return divisor if 2 * divisor >= chunk else chunk


def gradient_to_leaf(tap, grad):
  """Maps a gradient for the layer's weight back through ``tap.chain``."""
  for eqn in reversed(tap.chain):
    if eqn.primitive.name == 'transpose':
      permutation = eqn.params['permutation']
      grad = jnp.transpose(
          grad, [permutation.index(d) for d in range(len(permutation))]
      )
    grad = grad.reshape(eqn.invars[0].aval.shape)
  return grad


def mask_examples(keep, x):
  """``x`` with the examples (leading axis) where ``keep`` is False zeroed."""
  keep = keep.reshape(keep.shape + (1,) * (x.ndim - 1))
  return jnp.where(keep, x, jnp.zeros_like(x))
