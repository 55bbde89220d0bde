"""How one example's pytree is scaled to a bounded norm (private).

:class:`ClipRule` holds the clipping part of ``clipped_grad`` /
``clipped_fun``: one norm for the whole pytree, or one norm per group of
leaves (per-layer clipping), and either hard clipping, ``min(1, C / ||g||)``,
or automatic clipping, ``C / (||g|| + gamma)``. Every engine (vmap, ghost)
computes one norm per group and asks the rule for the factors, so the
engines cannot disagree about what is clipped, nor about the bound that
:meth:`ClipRule.bound` reports.

References:
  McMahan et al., "A General Approach to Adding Differential Privacy to
  Iterative Training Procedures", 2018, arXiv:1812.06210 (per-layer
  clipping).
  Bu et al., "Automatic Clipping: Differentially Private Deep Learning Made
  Easier and Stronger", 2022, arXiv:2206.07136.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _is_scalar(value) -> bool:
  if isinstance(value, (numbers.Number, str, bytes)) or value is None:
    return True
  return isinstance(value, (np.ndarray, np.generic, jax.Array)) and (
      np.ndim(value) == 0
  )


def _group_norm(name: str, value, *, allow_inf: bool) -> float:
  """One validated norm; ``name`` locates it in the user's argument."""
  concrete_array = isinstance(value, (np.ndarray, jax.Array)) and not (
      isinstance(value, jax.core.Tracer)
  )
  if concrete_array and value.ndim == 0:
    value = value.item()
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(
        f'{name} must be a positive number (a Python or NumPy scalar, not a '
        f'traced value), got {value!r}'
    )
  value = float(value)
  if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
    upper = 'inf]' if allow_inf else 'inf)'
    raise ValueError(f'{name} must be in (0, {upper}, got {value}')
  return value


@dataclasses.dataclass(frozen=True)
class ClipRule:
  """The validated clipping rule of one clipped function.

  Attributes:
    group_norms: the norm of each group, in the leaf order of the
      ``l2_clip_norm`` pytree (one entry for a single, global norm).
    treedef: the structure of the ``l2_clip_norm`` pytree, or None when it is
      one number (the whole pytree is one group).
    rescale_to_unit_norm: divide the clipped pytree by :attr:`clip_bound`.
    stability: ``gamma`` of automatic clipping, or None for hard clipping.
  """

  group_norms: tuple[float, ...]
  treedef: Any
  rescale_to_unit_norm: bool
  stability: float | None

  @classmethod
  def create(
      cls, l2_clip_norm, *, rescale_to_unit_norm: bool, stability
  ) -> 'ClipRule':
    """Validates the user's ``l2_clip_norm`` and automatic-clipping gamma."""
    if stability is not None:
      stability = _group_norm(
          'automatic_clipping_stability', stability, allow_inf=False
      )
    if _is_scalar(l2_clip_norm):
      norms = (_group_norm('l2_clip_norm', l2_clip_norm, allow_inf=True),)
      treedef = None
    else:
      paths, treedef = jax.tree_util.tree_flatten_with_path(l2_clip_norm)
      if not paths:
        raise ValueError(
            'l2_clip_norm must be a positive number or a non-empty pytree of '
            f'them (one norm per group of parameters), got {l2_clip_norm!r}'
        )
      norms = tuple(
          _group_norm(
              f'l2_clip_norm{jax.tree_util.keystr(path)}', leaf, allow_inf=True
          )
          for path, leaf in paths
      )
    rule = cls(
        group_norms=norms,
        treedef=treedef,
        rescale_to_unit_norm=bool(rescale_to_unit_norm),
        stability=stability,
    )
    if math.isinf(rule.clip_bound):
      if rescale_to_unit_norm:
        raise ValueError(
            'rescale_to_unit_norm=True needs a finite l2_clip_norm (every '
            f'group norm finite), got {l2_clip_norm!r}'
        )
      if stability is not None:
        raise ValueError(
            'automatic_clipping_stability needs a finite l2_clip_norm (it '
            'scales each example to norm below l2_clip_norm), got '
            f'{l2_clip_norm!r}'
        )
    return rule

  @property
  def num_groups(self) -> int:
    return len(self.group_norms)

  @property
  def clip_bound(self) -> float:
    """The largest norm of one clipped pytree: the L2 norm of group norms."""
    return math.hypot(*self.group_norms)

  @property
  def l2_norm_bound(self) -> float:
    """The largest norm of one example's contribution (before normalize_by)."""
    return 1.0 if self.rescale_to_unit_norm else self.clip_bound

  def subtrees(self, tree: PyTree) -> list[PyTree]:
    """The groups of ``tree``, one subtree per ``l2_clip_norm`` leaf.

    Raises:
      ValueError: if the structure of ``l2_clip_norm`` is not a prefix of the
        structure of ``tree``.
    """
    if self.treedef is None:
      return [tree]
    try:
      return self.treedef.flatten_up_to(tree)
    except (ValueError, TypeError):
      # JAX's own message prints the whole pytree's values: structures only.
      raise ValueError(
          'l2_clip_norm must be one number or a pytree of norms whose '
          'structure is a prefix of the clipped pytree (the gradient with '
          'respect to argnums, or the output of fun); got l2_clip_norm '
          f'structure {self.treedef} for a pytree of structure '
          f'{jax.tree_util.tree_structure(tree)}'
      ) from None

  def leaf_groups(self, tree: PyTree) -> tuple[int, ...]:
    """The group of each leaf of ``tree``, in ``tree_leaves`` order."""
    return tuple(
        group
        for group, subtree in enumerate(self.subtrees(tree))
        for _ in jax.tree_util.tree_leaves(subtree)
    )

  def scales(self, norms: jax.Array) -> jax.Array:
    """Factors ``[..., groups]`` for group norms ``norms`` ``[..., groups]``.

    Hard clipping gives ``min(1, C_k / n_k)``; automatic clipping gives
    ``C_k / (n_k + gamma)``; ``rescale_to_unit_norm`` then divides by
    :attr:`clip_bound`. Non-finite norms are the caller's business.
    """
    bound = jnp.asarray(self.group_norms, norms.dtype)
    if self.stability is not None:
      scale = bound / (norms + jnp.asarray(self.stability, norms.dtype))
    else:
      scale = jnp.where(norms > bound, bound / norms, jnp.ones_like(norms))
    if self.rescale_to_unit_norm:
      scale = scale / jnp.asarray(self.clip_bound, norms.dtype)
    return scale

  def report(self, norms: jax.Array) -> PyTree:
    """Per-example norms ``[batch, groups]`` as returned to the user.

    One array ``[batch]`` for a single norm; otherwise a pytree with the
    structure of ``l2_clip_norm`` whose leaves are each group's ``[batch]``
    norms.
    """
    if self.treedef is None:
      return norms[..., 0]
    return self.treedef.unflatten(
        [norms[..., k] for k in range(self.num_groups)]
    )
