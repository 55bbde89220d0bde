"""The low-rank (LoRA) weights of ghost clipping through parameter transforms.

A dense layer whose weight is ``K + s * dot_general(A, B)``, with ``A`` and
``B`` trainable leaves used nowhere else and ``K`` free of trainable leaves
(Keras' ``enable_lora`` kernels), has per-example gradients

    grad_A = s * sum act * cot * B,    grad_B = s * sum act * A * cot,

sums over every axis not of the leaf, with ``act`` the layer's activation and
``cot`` its output cotangent (einsum notation, the weight's axes labelled
alike in the layer and in the product). Merging ``B`` into the cotangent
(``A`` into the activation) leaves the gradient of a dense layer of its own,
``left^T right`` over positions, whose norm is the ghost norm of those row
matrices or the norm of the formed gradient, which has the size of the
low-rank factor: the ``in x out`` weight gradient is never formed.
:mod:`jax_privacy._ghost_transforms` recognises the weights.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
  arXiv:2106.09685.
  Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", 2021, arXiv:2110.05679.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jax_privacy import _ghost_layers
from jax_privacy import _per_example


@dataclasses.dataclass(frozen=True, eq=False)
class Lora:
  """A weight ``K + s * dot_general(A, B)`` of a dense layer or a lookup.

  The label strings name the axes of the layer's activation (``act``), of
  its output (``out``) and of the ``dot_general`` operands (``a``, ``b``, of
  the dtypes ``a_dtype``, ``b_dtype``), as in an ``einsum``: the weight's
  axes carry the same labels in the layer and in the product. For a table
  lookup (``gather``, ``lookup_mode`` its mode), ``A @ B`` is a matrix
  product and the labels are unused.
  """

  a_leaf: int
  b_leaf: int
  a_dtype: Any
  b_dtype: Any
  factors: tuple[tuple[Any, int], ...]
  factor_eqns: tuple[Any, ...]
  act: str = ''
  out: str = ''
  a: str = ''
  b: str = ''
  sizes: tuple[tuple[str, int], ...] = ()
  lookup_mode: Any = None


class RowsGradient:
  """Per-example gradients ``left_b^T right_b`` of one leaf, kept as rows.

  ``left``: ``(batch, groups, positions, in)``, ``right``: ``(batch,
  groups, positions, out)``; ``to_leaf`` lays a ``(groups, in, out)``
  gradient out as the leaf.
  """

  def __init__(self, left, right, to_leaf: Callable[[jax.Array], jax.Array]):
    self.left, self.right, self.to_leaf = left, right, to_leaf

  def squared_norms(self, spmd_axis_name=None) -> jax.Array:
    return jax.vmap(
        _ghost_layers.rows_squared_norm, spmd_axis_name=spmd_axis_name
    )(self.left, self.right)

  def clipped_sum(self, coefficients, keep) -> jax.Array:
    """``sum_b coefficients_b grad_b`` over the kept examples."""
    shape = (-1, 1, 1, 1)
    left = jnp.where(keep.reshape(shape), self.left, 0)
    right = jnp.where(
        keep.reshape(shape), coefficients.reshape(shape) * self.right, 0
    )
    return self.to_leaf(jnp.einsum('bgpi,bgpo->gio', left, right))


class LookupGradient:
  """Per-example gradients of a table from its lookups, kept as rows.

  Example ``b``'s gradient is ``sum_p e_{ids[b, p]} cot[b, p]^T``, a
  ``(vocab, width)`` table that is never formed per example.
  """

  def __init__(self, ids, cot, vocab: int):
    self.ids, self.cot, self.vocab = ids, cot, vocab

  def squared_norms(self, spmd_axis_name=None) -> jax.Array:
    return jax.vmap(
        _ghost_layers.same_id_squared_norm, spmd_axis_name=spmd_axis_name
    )(self.ids, self.cot)

  def clipped_sum(self, coefficients, keep) -> jax.Array:
    """``sum_b coefficients_b grad_b`` over the kept examples."""
    scaled = jnp.where(
        keep[:, None, None], coefficients[:, None, None] * self.cot, 0
    )
    table = jnp.zeros((self.vocab, self.cot.shape[-1]), scaled.dtype)
    return table.at[self.ids.reshape(-1)].add(
        scaled.reshape((-1, scaled.shape[-1]))
    )


def _lookup_gradients(lora, indices, cotangent, a_value, b_value, scale,
                      spmd_axis_name):
  """Gradients of ``A`` and ``B`` in ``(K + s A @ B)[ids]``.

  ``grad_A = scatter(ids, s cot B^T)`` is the gradient of a table ``A``
  looked up at ``ids``; ``grad_B = s A[ids]^T cot`` that of a dense layer
  with activations ``A[ids]``.
  """
  vocab = a_value.shape[0]
  ids, cot = jax.vmap(
      lambda i, c: _ghost_layers.lookup_rows(i, c, vocab, lora.lookup_mode),
      spmd_axis_name=spmd_axis_name,
  )(indices, cotangent)
  cot = cot * scale
  # Dropped ids have a zero cotangent, so their rows of A do not count.
  return {
      lora.a_leaf: LookupGradient(ids, cot @ b_value.T, vocab),
      lora.b_leaf: (a_value[ids][:, None], cot[:, None], lambda g: g[0]),
  }


def _unique(labels) -> str:
  return ''.join(dict.fromkeys(labels))


def _rows_layout(left: str, right: str, out: str):
  """How ``grad[out] = sum left * right`` splits into row matrices.

  Returns the labels ``left`` and ``right`` keep (the others are summed out
  first) and the ``(groups, positions, ins, outs)`` labels: groups are in
  both factors and the output, positions in both factors only.
  """
  left_kept = ''.join(c for c in left if c in out or c in right)
  right_kept = ''.join(c for c in right if c in out or c in left_kept)
  groups = ''.join(c for c in out if c in left_kept and c in right_kept)
  positions = ''.join(
      c for c in left_kept if c in right_kept and c not in out
  )
  ins = ''.join(c for c in left_kept if c not in right_kept)
  outs = ''.join(c for c in right_kept if c not in left_kept)
  return left_kept, right_kept, groups, positions, ins, outs


def _size(labels: str, sizes) -> int:
  return math.prod(sizes[c] for c in labels)


def _lora_side(lora: _Lora, leaf_labels: str, merge_left: bool):
  """Labels of the two factors of one LoRA leaf's gradient.

  ``grad_A = s sum act * cot * B`` (``B`` merged into the cotangent side),
  ``grad_B = s sum act * A * cot`` (``A`` merged into the activation side).
  """
  if merge_left:
    left = _unique(
        c for c in lora.act + lora.a if c in leaf_labels or c in lora.out
    )
    return left, lora.out
  right = _unique(
      c for c in lora.out + lora.b if c in leaf_labels or c in lora.act
  )
  return lora.act, right


def _dense_rows(lora, activation, cotangent, a_value, b_value, scale,
                spmd_axis_name):
  """``{leaf: (left, right, to_leaf)}`` rows of A and B of a dense layer."""
  sizes = dict(lora.sizes)
  results = {}
  for leaf, leaf_labels, merge_left in (
      (lora.a_leaf, lora.a, False),
      (lora.b_leaf, lora.b, True),
  ):
    left_labels, right_labels = _lora_side(lora, leaf_labels, merge_left)
    _, _, groups, positions, ins, outs = _rows_layout(
        left_labels, right_labels, leaf_labels
    )

    # The einsums to (groups, positions, ins / outs) sum out the other labels.
    def rows(act, cot, left_labels=left_labels, right_labels=right_labels,
             groups=groups, positions=positions, ins=ins, outs=outs,
             merge_left=merge_left):
      act, cot = _f32(act), _f32(cot) * scale
      if merge_left:
        left = jnp.einsum(f'{lora.act},{lora.a}->{left_labels}', act, a_value)
        right = cot
      else:
        left = act
        right = jnp.einsum(f'{lora.out},{lora.b}->{right_labels}', cot, b_value)
      left = jnp.einsum(f'{left_labels}->{groups + positions + ins}', left)
      right = jnp.einsum(f'{right_labels}->{groups + positions + outs}', right)
      return (
          left.reshape(
              _size(groups, sizes), _size(positions, sizes), _size(ins, sizes)
          ),
          right.reshape(
              _size(groups, sizes), _size(positions, sizes), _size(outs, sizes)
          ),
      )

    def to_leaf(grad, order=groups + ins + outs, leaf_labels=leaf_labels):
      grad = grad.reshape([sizes[c] for c in order])
      return jnp.einsum(f'{order}->{leaf_labels}', grad)

    left, right = jax.vmap(rows, spmd_axis_name=spmd_axis_name)(
        activation, cotangent
    )
    results[leaf] = (left, right, to_leaf)
  return results


def _f32(x):
  return x.astype(_per_example.at_least_f32(x.dtype))


def lora_gradients(lora, activation, cotangent, leaves, scale, spmd_axis_name):
  """Per-example gradients of a LoRA weight's factors A and B.

  Args:
    lora: the recognised weight.
    activation: the layer's per-example activations (ids for a lookup).
    cotangent: the per-example cotangents of the layer's output.
    leaves: the values of the trainable (and virtual) leaves.
    scale: the product of the constant factors ``s``.
    spmd_axis_name: for ``jax.vmap``.

  Returns:
    ``{leaf: gradient}`` for A and B: formed per-example gradients (the size
    of the factor) where the shapes make that cheaper than the ghost norm,
    else :class:`RowsGradient` / :class:`LookupGradient`.
  """
  a_value = _f32(leaves[lora.a_leaf].astype(lora.a_dtype))
  b_value = _f32(leaves[lora.b_leaf].astype(lora.b_dtype))
  if lora.lookup_mode is None:
    parts = _dense_rows(
        lora, activation, cotangent, a_value, b_value, scale, spmd_axis_name
    )
  else:
    parts = _lookup_gradients(
        lora, activation, cotangent, a_value, b_value, scale, spmd_axis_name
    )
  results = {}
  for leaf, part in parts.items():
    if not isinstance(part, tuple):
      results[leaf] = part
      continue
    left, right, to_leaf = part
    if _ghost_layers.forms_rows(*left.shape[2:], right.shape[-1]):
      results[leaf] = jax.vmap(
          lambda l, r, to_leaf=to_leaf: to_leaf(
              jnp.einsum('gpi,gpo->gio', l, r)
          ),
          spmd_axis_name=spmd_axis_name,
      )(left, right)
    else:
      results[leaf] = RowsGradient(left, right, to_leaf)
  return results


def lora_labels(eqn, operand: int, product) -> dict[str, Any] | None:
  """Einsum labels of a dense layer ``eqn`` and of its weight's ``product``."""
  weight = eqn.invars[operand].aval
  activation = eqn.invars[1 - operand].aval
  a_aval, b_aval = product.invars[0].aval, product.invars[1].aval
  (ca, cb), (ba, bb) = product.params['dimension_numbers']
  count = weight.ndim + activation.ndim + len(ca)
  if count > len(string.ascii_letters):
    return None
  letters = iter(string.ascii_letters)
  w = [next(letters) for _ in range(weight.ndim)]
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  wc, xc = (rc, lc) if operand == 1 else (lc, rc)
  wb, xb = (rb, lb) if operand == 1 else (lb, rb)
  x = [None] * activation.ndim
  for i, j in zip(tuple(xc) + tuple(xb), tuple(wc) + tuple(wb)):
    x[i] = w[j]
  x = [c if c is not None else next(letters) for c in x]
  x_free = [x[i] for i in range(activation.ndim) if i not in xc and i not in xb]
  w_free = [w[i] for i in range(weight.ndim) if i not in wc and i not in wb]
  out = [w[j] for j in wb] + (
      x_free + w_free if operand == 1 else w_free + x_free
  )
  a, b = [None] * a_aval.ndim, [None] * b_aval.ndim
  for k, (i, j) in enumerate(zip(ba, bb)):
    a[i] = b[j] = w[k]
  for i, j in zip(ca, cb):
    a[i] = b[j] = next(letters)
  position = len(ba)
  for labels in (a, b):
    for i, c in enumerate(labels):
      if c is None:
        labels[i] = w[position]
        position += 1
  sizes = {}
  for labels, aval in ((w, weight), (x, activation), (a, a_aval), (b, b_aval)):
    sizes.update(zip(labels, aval.shape))
  return dict(
      act=''.join(x), out=''.join(out), a=''.join(a), b=''.join(b),
      sizes=tuple(sizes.items()),
  )
