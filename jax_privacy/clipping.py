"""Per-example clipping: functions whose batch sums have bounded L2 sensitivity.

The central object is :func:`clipped_grad`. It turns a loss ``fun(params,
example, ...)`` into a function of a whole batch that returns the sum over
examples of each example's gradient, clipped to L2 norm ``l2_clip_norm``
(measured over the whole gradient pytree). The result is a
:class:`BoundedSensitivityCallable`: the bound on each example's contribution
travels with the function, so the noise that makes it private is derived from
it (``noise stddev = noise_multiplier * f.sensitivity()``) rather than
re-derived by hand.

Example::

    import jax, jax.numpy as jnp
    from jax_privacy import clipping

    def loss(params, x, y):  # one example, with a leading axis of size 1
      return jnp.mean((x @ params['w'] - y) ** 2)

    grad_fn = clipping.clipped_grad(loss, l2_clip_norm=1.0, batch_argnums=(1, 2))
    summed = grad_fn({'w': jnp.zeros(3)}, jnp.ones((8, 3)), jnp.ones(8))
    stddev = 1.1 * grad_fn.sensitivity()  # noise multiplier 1.1

Privacy:
  Each example's contribution to the returned sum has L2 norm at most
  ``l2_clip_norm / normalize_by`` (``1 / normalize_by`` with
  ``rescale_to_unit_norm``; ``sqrt(sum_k C_k^2) / normalize_by`` with
  per-group norms ``C_k``), whatever the example is; padding examples
  contribute exactly zero, and with ``nan_safe`` so does an example whose
  gradient is not finite. The sum therefore has L2 sensitivity equal to that
  bound under add/remove-one and replace-with-special (zero-out) neighbours,
  and twice it under replace-one. The guarantee is about the exact sum: with a
  low-precision accumulation ``dtype`` the rounding of the sum is not covered,
  which is why the default accumulates in at least float32.

References:
  Abadi et al., "Deep Learning with Differential Privacy", 2016,
  arXiv:1607.00133.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import dp_accounting
import jax
import jax.numpy as jnp

from jax_privacy import _ghost
from jax_privacy import _per_example

PyTree = Any

_METHODS = ('vectorized', 'ghost', 'auto')

AuxiliaryOutput = collections.namedtuple(
    'AuxiliaryOutput', ['values', 'grad_norms', 'aux']
)
AuxiliaryOutput.__doc__ = """Per-example outputs of a clipped function.

Attributes:
  values: the value of ``fun`` for each example (``return_values``), else None.
  grad_norms: the L2 norm of each example's gradient (or output, for
    :func:`clipped_fun`) before clipping (``return_grad_norms`` /
    ``return_norms``), else None. With per-group clipping (``l2_clip_norm``
    a pytree) it is a pytree with the structure of ``l2_clip_norm`` holding
    each group's per-example norms; the global norm is the square root of the
    sum of their squares.
  aux: the auxiliary output of ``fun`` for each example (``has_aux``), else
    None.

Entries for padding examples are computed like the others (on whatever data
the padding slot holds); mask them with ``is_padding_example`` before use.
"""


@dataclasses.dataclass(frozen=True)
class BoundedSensitivityCallable:
  """A callable whose output is a sum of contributions of bounded L2 norm.

  Attributes:
    fun: the function to call.
    l2_norm_bound: the largest L2 norm one example (or one group, for
      per-group clipping) can contribute to the output of ``fun``.
    has_aux: whether ``fun`` returns ``(output, AuxiliaryOutput)`` rather than
      the output alone.
  """

  fun: Callable[..., Any]
  l2_norm_bound: float
  has_aux: bool = False

  def __call__(self, *args, **kwargs):
    return self.fun(*args, **kwargs)

  def sensitivity(
      self,
      neighboring_relation: dp_accounting.NeighboringRelation = (
          dp_accounting.NeighboringRelation.REPLACE_SPECIAL
      ),
  ) -> float:
    """The L2 sensitivity of the output under a neighbouring relation.

    Args:
      neighboring_relation: how two neighbouring data sets differ. Adding or
        removing one example, or replacing one with a special (e.g. zero or
        padding) example, moves the sum by at most the bound; replacing one
        example by an arbitrary other moves it by at most twice the bound.

    Returns:
      The sensitivity, to be multiplied by a noise multiplier to get the
      stddev of Gaussian noise.
    """
    relation = dp_accounting.NeighboringRelation
    if neighboring_relation in (
        relation.ADD_OR_REMOVE_ONE,
        relation.REPLACE_SPECIAL,
    ):
      return self.l2_norm_bound
    if neighboring_relation == relation.REPLACE_ONE:
      return 2.0 * self.l2_norm_bound
    raise ValueError(
        'neighboring_relation must be a dp_accounting.NeighboringRelation, '
        f'got {neighboring_relation!r}'
    )


def clip_pytree(
    pytree: PyTree,
    clip_norm: float | jax.Array,
    rescale_to_unit_norm: bool = False,
    nan_safe: bool = True,
    return_zero: bool = False,
) -> tuple[PyTree, jax.Array]:
  """Clips ``pytree`` to global L2 norm at most ``clip_norm``.

  The pytree is scaled by ``min(1, clip_norm / norm)`` (and by a further
  ``1 / clip_norm`` with ``rescale_to_unit_norm``). The scale is computed in at
  least float32; each leaf keeps its dtype.

  Args:
    pytree: the pytree to clip (e.g. one example's gradient).
    clip_norm: the largest L2 norm of the result; a positive number or a
      scalar array (which may be traced, e.g. for adaptive clipping).
    rescale_to_unit_norm: divide the clipped pytree by ``clip_norm``, so that
      its norm is at most 1.
    nan_safe: if the norm is not finite (the pytree holds a NaN or an
      infinity), return zeros instead of propagating the non-finite values.
    return_zero: return zeros of the same structure instead of the clipped
      pytree (the norm is still computed). Useful to trace the same
      computation for examples that must not contribute.

  Returns:
    ``(clipped_pytree, l2_norm)``, where ``l2_norm`` is the norm of ``pytree``
    before clipping.

  Raises:
    ValueError: if ``clip_norm`` is a concrete number that is not positive.
  """
  _per_example.check_concrete_positive('clip_norm', clip_norm)
  norm = _per_example.global_l2_norm(pytree)
  clipped = _per_example.scale_to_bound(
      pytree,
      norm,
      clip_norm,
      rescale_to_unit_norm=rescale_to_unit_norm,
      nan_safe=nan_safe,
      out_dtype=lambda leaf_dtype: leaf_dtype,
  )
  if return_zero:
    clipped = jax.tree_util.tree_map(jnp.zeros_like, clipped)
  return clipped, norm


def clipped_grad(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    l2_clip_norm: float,
    rescale_to_unit_norm: bool = False,
    normalize_by: float = 1.0,
    batch_argnums: int | Sequence[int] = 1,
    keep_batch_dim: bool = True,
    return_values: bool = False,
    return_grad_norms: bool = False,
    pre_clipping_transform: Callable[[PyTree], PyTree] = _per_example.identity,
    microbatch_size: int | None = None,
    nan_safe: bool = True,
    dtype: Any = None,
    prng_argnum: int | None = None,
    spmd_axis_name: Any = None,
    method: str = 'vectorized',
    automatic_clipping_stability: float | None = None,
) -> BoundedSensitivityCallable:
  """Sum of per-example gradients, each clipped to a bounded L2 norm.

  Args:
    fun: the loss of one example (or one group), e.g. ``fun(params, x, y)``.
      It must return a scalar (or ``(scalar, aux)`` with ``has_aux``).
    argnums: the argument(s) to differentiate with respect to. With a tuple,
      the gradient is a tuple and is clipped as one pytree.
    has_aux: ``fun`` returns ``(loss, aux)``; ``aux`` is returned per example.
    l2_clip_norm: the largest L2 norm of one example's gradient, over the whole
      gradient pytree. ``inf`` disables clipping (and makes the sensitivity
      infinite). Per-group (per-layer) clipping, ours: a pytree of positive
      numbers whose structure is a prefix of the gradient's (e.g.
      ``{'dense1': 1.0, 'dense2': 0.5}`` for parameters ``{'dense1': {'w',
      'b'}, 'dense2': {'w', 'b'}}``); each leaf is the norm ``C_k`` of one
      group, the subtree of the gradient at its position, and each group is
      clipped to its own norm. One example then contributes at most
      ``sqrt(sum_k C_k^2)``, the bound that ``sensitivity()`` reports.
    rescale_to_unit_norm: divide each clipped gradient by ``l2_clip_norm``
      (by ``sqrt(sum_k C_k^2)`` for per-group norms, which keeps the groups'
      relative scale) so that its norm is at most 1 (the sensitivity is then
      ``1 / normalize_by``).
    normalize_by: the sum is divided by this (e.g. the expected batch size).
    batch_argnums: the argument(s) holding the batch, along axis 0 of every
      leaf.
    keep_batch_dim: hand each example to ``fun`` with a leading axis of size
      1 (True) or without it (False). With 2-D batched inputs ``[groups,
      examples_per_group, ...]`` and False, ``fun`` sees one whole group and
      the clipping is per group (e.g. per user).
    return_values: also return the value of ``fun`` per example.
    return_grad_norms: also return each example's gradient norm before
      clipping (per group, as a pytree shaped like ``l2_clip_norm``, for
      per-group clipping).
    pre_clipping_transform: applied to each example's gradient before it is
      clipped.
    microbatch_size: process the batch in chunks of this many examples (a
      ``lax.scan``), for lower memory; the result equals the unchunked one up
      to floating-point summation order.
    nan_safe: an example whose gradient has a non-finite entry contributes
      zero instead of turning the sum into NaN.
    dtype: the dtype in which clipped gradients are accumulated and returned.
      ``None`` uses the gradient's dtype promoted to at least float32, so that
      low-precision models do not lose the sum's accuracy.
    prng_argnum: this argument is a PRNG key; it is split into one key per
      example before ``fun`` is called.
    spmd_axis_name: passed to ``jax.vmap`` for batches sharded over a mesh
      axis.
    method: how per-example gradients are computed; a performance option
      that never changes the sensitivity, and all methods agree to float
      rounding. ``'vectorized'`` (default): ``jax.vmap`` of ``jax.grad``,
      materialising every per-example gradient. ``'ghost'``: ghost norms and
      book-keeping (:mod:`jax_privacy._ghost`) for parameters used once as
      the weight of a ``dot_general`` (dense, batched, einsum), a
      convolution (incl. grouped and transposed) or an embedding
      ``gather``, also through reshapes and casts, and through weights
      computed from parameters alone (weight standardization, whose
      per-example gradients are mapped back to the parameters; Keras LoRA
      kernels ``K + s * A @ B``, whose factors' norms come without forming
      the full kernel gradient); norm scales and biases by a reduction over
      positions; the other parameters' per-example
      gradients are materialised (that leaf only). Needs the default
      ``pre_clipping_transform``. ``'auto'``: ghost when some parameter can
      be tapped and ``pre_clipping_transform`` is the identity, else
      vectorized. The choice is logged (``logging.INFO``) at trace time.
    automatic_clipping_stability: (ours) ``gamma > 0`` turns on automatic
      clipping (AUTO-S of Bu et al.): each example's gradient ``g`` (each
      group's, for per-group norms) is scaled by ``C / (||g|| + gamma)``
      instead of ``min(1, C / ||g||)``, where ``C`` is ``l2_clip_norm``
      (which must then be finite). Every example is normalised, so its norm
      is below ``C`` whatever its size; with ``l2_clip_norm=1.0`` or
      ``rescale_to_unit_norm=True`` the contribution is ``g / (||g|| +
      gamma)`` and the sensitivity ``1 / normalize_by``. None (default):
      hard clipping. The paper uses a small gamma such as 0.01.

  Returns:
    A :class:`BoundedSensitivityCallable` with the signature of ``fun`` plus
    an optional keyword ``is_padding_example`` (``bool[batch]``; padding
    examples contribute zero). It returns the clipped sum, or ``(clipped_sum,
    AuxiliaryOutput(values, grad_norms, aux))`` when any of
    ``return_values``, ``return_grad_norms``, ``has_aux`` is set.

  Raises:
    ValueError: on a non-positive or NaN ``l2_clip_norm`` (or group norm)
      or ``normalize_by``, a non-positive ``automatic_clipping_stability`` or
      one with an infinite ``l2_clip_norm``, a bad ``microbatch_size``,
      overlapping ``prng_argnum`` and ``batch_argnums``, an unknown
      ``method`` or ``method='ghost'`` with a ``pre_clipping_transform``; at
      call time, on batched arguments whose leading dimensions differ or a
      pytree ``l2_clip_norm`` that is not a prefix of the gradient.

  Privacy:
    Each example contributes at most ``sensitivity()`` in L2 norm to the
    output (see the module docstring). With ``keep_batch_dim=False`` and
    2-D inputs this bounds a user's (a group of examples') contribution:
    the guarantee is then per user (user-level DP). With per-group norms
    ``C_k`` each group's part of the contribution has norm at most ``C_k``,
    so the whole has norm at most ``sqrt(sum_k C_k^2)``; with automatic
    clipping the norm is strictly below ``l2_clip_norm``.

  References:
    McMahan et al., "A General Approach to Adding Differential Privacy to
    Iterative Training Procedures", 2018, arXiv:1812.06210 (per-layer
    clipping). Bu et al., "Automatic Clipping: Differentially Private Deep
    Learning Made Easier and Stronger", 2022, arXiv:2206.07136.
  """
  argnums = _per_example.normalize_argnums('argnums', argnums)
  settings = _per_example.ClipSettings.create(
      l2_clip_norm=l2_clip_norm,
      rescale_to_unit_norm=rescale_to_unit_norm,
      normalize_by=normalize_by,
      batch_argnums=batch_argnums,
      keep_batch_dim=keep_batch_dim,
      pre_clipping_transform=pre_clipping_transform,
      microbatch_size=microbatch_size,
      nan_safe=nan_safe,
      dtype=dtype,
      prng_argnum=prng_argnum,
      spmd_axis_name=spmd_axis_name,
      automatic_clipping_stability=automatic_clipping_stability,
  )
  overlap = set(argnums) & set(settings.batch_argnums)
  if overlap:
    raise ValueError(
        f'argnums {argnums} and batch_argnums {settings.batch_argnums} share '
        f'{sorted(overlap)}: gradients are taken with respect to '
        'non-batched arguments (the parameters)'
    )
  if method not in _METHODS:
    raise ValueError(f'method must be one of {_METHODS}, got {method!r}')
  custom_transform = pre_clipping_transform is not _per_example.identity
  if method == 'ghost' and custom_transform:
    raise ValueError(
        "method='ghost' computes norms without materialising gradients, so it "
        'cannot apply a pre_clipping_transform; use method=\'vectorized\''
    )
  chunk_fn = _per_example.vectorized_chunk_function(
      _per_example.gradient_per_example(fun, argnums, has_aux), settings
  )
  if method == 'ghost' or (method == 'auto' and not custom_transform):
    chunk_fn = _ghost.ghost_chunk_function(
        fun,
        argnums,
        has_aux,
        settings,
        fallback=chunk_fn if method == 'auto' else None,
    )
  batch_fn = _per_example.batch_function(chunk_fn, settings)
  return _bounded_callable(
      batch_fn,
      settings,
      has_aux=has_aux,
      return_values=return_values,
      return_norms=return_grad_norms,
  )


def _bounded_callable(
    batch_fn, settings, *, has_aux, return_values, return_norms
) -> BoundedSensitivityCallable:
  returns_aux = bool(has_aux or return_values or return_norms)

  def clipped(*args, is_padding_example=None):
    summed, norms, (values, aux) = batch_fn(
        *args, is_padding_example=is_padding_example
    )
    if not returns_aux:
      return summed
    return summed, AuxiliaryOutput(
        values=values if return_values else None,
        grad_norms=norms if return_norms else None,
        aux=aux if has_aux else None,
    )

  return BoundedSensitivityCallable(
      fun=clipped, l2_norm_bound=settings.l2_norm_bound, has_aux=returns_aux
  )


def clipped_fun(
    fun: Callable[..., Any],
    has_aux: bool = False,
    *,
    batch_argnums: int | Sequence[int] = 0,
    keep_batch_dim: bool = True,
    l2_clip_norm: float = 1.0,
    rescale_to_unit_norm: bool = False,
    normalize_by: float = 1.0,
    return_norms: bool = False,
    microbatch_size: int | None = None,
    nan_safe: bool = True,
    dtype: Any = None,
    prng_argnum: int | None = None,
    spmd_axis_name: Any = None,
    automatic_clipping_stability: float | None = None,
) -> BoundedSensitivityCallable:
  """Sum over examples of ``fun``'s output, each clipped to bounded L2 norm.

  The same as :func:`clipped_grad`, for any per-example function rather than
  a gradient: e.g. a bounded-sensitivity count or a per-example statistic.

  Args:
    fun: maps one example to a pytree of arrays (or ``(pytree, aux)`` with
      ``has_aux``).
    has_aux: see :func:`clipped_grad`.
    batch_argnums: see :func:`clipped_grad`.
    keep_batch_dim: see :func:`clipped_grad`.
    l2_clip_norm: the largest L2 norm of one example's output, or a pytree
      of group norms (a prefix of the output's structure), as in
      :func:`clipped_grad`.
    rescale_to_unit_norm: see :func:`clipped_grad`.
    normalize_by: see :func:`clipped_grad`.
    return_norms: also return each example's output norm before clipping.
    microbatch_size: see :func:`clipped_grad`.
    nan_safe: see :func:`clipped_grad`.
    dtype: see :func:`clipped_grad`.
    prng_argnum: see :func:`clipped_grad`.
    spmd_axis_name: see :func:`clipped_grad`.
    automatic_clipping_stability: see :func:`clipped_grad`.

  Returns:
    A :class:`BoundedSensitivityCallable`, returning the clipped sum or
    ``(clipped_sum, AuxiliaryOutput(None, norms, aux))``.

  Privacy:
    As for :func:`clipped_grad`: one example moves the sum by at most
    ``sensitivity()``.
  """
  settings = _per_example.ClipSettings.create(
      l2_clip_norm=l2_clip_norm,
      rescale_to_unit_norm=rescale_to_unit_norm,
      normalize_by=normalize_by,
      batch_argnums=batch_argnums,
      keep_batch_dim=keep_batch_dim,
      pre_clipping_transform=_per_example.identity,
      microbatch_size=microbatch_size,
      nan_safe=nan_safe,
      dtype=dtype,
      prng_argnum=prng_argnum,
      spmd_axis_name=spmd_axis_name,
      automatic_clipping_stability=automatic_clipping_stability,
  )
  return _bounded_callable(
      _per_example.clipped_sum_function(
          _per_example.output_per_example(fun, has_aux), settings
      ),
      settings,
      has_aux=has_aux,
      return_values=False,
      return_norms=return_norms,
  )
