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
   only use (after inlining ``jit`` calls, and through reshapes, transposes
   and float casts, as in mixed-precision layers) is as the weight of a
   supported primitive is *tapped*; every other leaf is *materialised*.
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
   :func:`jax_privacy._ghost_layers.materialises`; convolutions use patches
   of the input, grouped ones one product per group).
4. With the clip factors ``c_b`` known, the clipped sum of a ghost-norm leaf
   is the vector-Jacobian product of the batched primitive with cotangents
   ``c_b g_b`` (book-keeping), computed in at least float32 whatever the
   layer's precision; that of a formed per-example gradient is
   ``sum_b c_b grad_b``.

Tapped: weights of ``dot_general`` (dense layers, ``einsum`` projections,
per-head weights with batch dimensions), of convolutions of any dimension
(strided, dilated, grouped, depthwise, transposed) and embedding lookups
(``gather``); :mod:`jax_privacy._ghost_layers` holds their algebra.
Layer-norm and group-norm scales and biases, and the biases of dense and
convolution layers, are materialised: their per-example gradient is the
reduction of (cotangent x normalised input) over the positions that the
backward pass computes anyway, ``batch x features`` numbers, while the
weights of the model are never copied per example. Anything else (a
parameter used twice, as in tied embeddings, or inside ``scan`` or custom
derivatives) is materialised too, which is exact and never worse than the
vmap engine for that leaf.

A layer weight computed from parameters alone (weight standardization, a
Keras LoRA kernel ``K + s * A @ B``) is cut out of the jaxpr as a virtual
leaf and tapped like a parameter; its per-example gradient is mapped back
to the parameters it is made of (:mod:`jax_privacy._ghost_transforms`), a
chunk of examples at a time, and when those parameters feed nothing else
their clipped sum is the transform's VJP of the weight's book-kept sum
(:mod:`jax_privacy._ghost_linear`).

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
import logging
from typing import Any, Callable

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

from jax_privacy import _ghost_layers
from jax_privacy import _ghost_linear
from jax_privacy import _ghost_transforms
from jax_privacy import _per_example

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Tap:
  """A parameter leaf used once, as ``operand`` of a supported equation.

  ``chain`` holds the views (reshapes, transposes, float casts, as in
  mixed-precision layers) between the leaf and the layer's weight operand,
  in order; they relabel entries, so norms are the weight's.
  """

  leaf: int
  operand: int
  eqn: Any
  path: tuple[int, ...]
  chain: tuple[Any, ...] = ()

  @property
  def weight_shape(self) -> tuple[int, ...]:
    return tuple(self.eqn.invars[self.operand].aval.shape)


def find_taps(jaxpr, num_leaves: int) -> dict[int, _Tap]:
  """Maps each tappable leaf index (the first jaxpr inputs) to its tap."""
  # Per leaf: (eqn, operand, path, chain of views before eqn, is a view).
  uses: dict[int, list[tuple[Any, int, tuple[int, ...], tuple, bool]]] = {
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
      inner = _ghost_layers.inner_jaxpr(eqn)
      if inner is not None:
        inner_tags = {
            v: t for v, t in zip(inner.jaxpr.invars, in_tags) if t is not None
        }
        walk(inner.jaxpr, inner_tags, path + (id(eqn),))
        for v in inner.jaxpr.outvars:
          if not isinstance(v, jex_core.Literal) and v in inner_tags:
            bad.add(inner_tags[v][0])
        continue
      view = _ghost_layers.is_view(eqn)
      for operand, tag in enumerate(in_tags):
        if tag is not None:
          leaf, chain = tag
          uses[leaf].append((eqn, operand, path + (id(eqn),), chain, view))
          if view:
            tags[eqn.outvars[0]] = (leaf, chain + (eqn,))
    for v in jaxpr.outvars:
      if not isinstance(v, jex_core.Literal) and v in tags:
        bad.add(tags[v][0])

  walk(
      jaxpr,
      {v: (i, ()) for i, v in enumerate(jaxpr.invars[:num_leaves])},
      (),
  )
  taps = {}
  tapped_paths = set()
  for leaf, leaf_uses in uses.items():
    layers = [use for use in leaf_uses if not use[4]]
    if leaf in bad or len(layers) != 1:
      continue
    eqn, operand, path, chain, _ = layers[0]
    # Every view must lie on the one path from the leaf to the layer, and a
    # layer has one tapped weight (in ``a @ b`` of two leaves, b is
    # materialised).
    if (
        len(leaf_uses) == len(chain) + 1
        and path not in tapped_paths
        and _ghost_layers.supported_use(eqn, operand)
    ):
      tapped_paths.add(path)
      taps[leaf] = _Tap(
          leaf=leaf, operand=operand, eqn=eqn, path=path, chain=chain
      )
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
    inner = _ghost_layers.inner_jaxpr(eqn)
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


def tapped_squared_norm(tap: _Tap, activation, cotangent, leaf_shape):
  """One example's squared gradient norm for a tapped leaf.

  The layer's weight may be a view of the leaf (``tap.chain``), with the same
  entries: the norm is computed in the weight's shape.
  """
  del leaf_shape
  if tap.eqn.primitive.name == 'gather':
    return _ghost_layers.embedding_squared_norm(
        tap, activation, cotangent, tap.weight_shape
    )
  return _ghost_layers.rows_squared_norm(
      *_ghost_layers.rows(tap, activation, cotangent, tap.weight_shape)
  )


def _clip_coefficients(norms, is_padding, settings):
  """Factors ``c_bk`` with ``sum_b c_bk grad_bk`` group k's clipped sum.

  Args:
    norms: ``[batch, groups]`` per-example norms of each clipping group.
    is_padding: ``bool[batch]``.
    settings: the clipping settings (their ``clip_rule`` gives the factors,
      as on the vmap path).

  Returns:
    ``(coefficients [batch, groups], keep bool[batch])``: padding examples,
    and with ``nan_safe`` examples with a non-finite norm, get zero.
  """
  scale = settings.clip_rule.scales(norms)
  keep = ~is_padding
  if settings.nan_safe:
    keep = keep & jnp.all(jnp.isfinite(norms), axis=1)
  return jnp.where(keep[:, None], scale, jnp.zeros_like(scale)), keep


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
    # Unbatched argument leaves in the jaxpr's order (None where batched).
    rest_leaves, rest_batched = [], []
    for i, arg in enumerate(rest):
      for leaf in jax.tree_util.tree_leaves(arg):
        rest_leaves.append(None if i in batched else leaf)
        rest_batched.append(i in batched)
    plan = _ghost_transforms.plan_transforms(
        closed, len(diff_leaves), rest_batched
    )
    leaves, unused = list(diff_leaves), frozenset()
    if plan is not None:
      closed, unused = plan.inner, plan.unused
      leaves += plan.virtual_values(diff_leaves, rest_leaves)
    taps = find_taps(closed.jaxpr, len(leaves))
    if not taps and fallback is not None:
      _LOGGER.info('clipped_grad method=auto: no layer to tap, using vmap')
      return fallback(args, is_padding, batched)
    materialised = [
        i for i in range(len(leaves)) if i not in taps and i not in unused
    ]
    _LOGGER.info(
        'clipped_grad ghost clipping: %d parameter leaves by ghost norm '
        '(%s), %d materialised per example, %d weights transformed from '
        'parameters',
        len(taps),
        ', '.join(sorted({t.eqn.primitive.name for t in taps.values()})),
        len(materialised),
        len(plan.transforms) if plan is not None else 0,
    )
    taps_by_path = {tap.path: tap for tap in taps.values()}

    def example_loss(copies, perturbations, rest_example):
      values = list(leaves)
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
        jnp.broadcast_to(leaves[i], (batch_size,) + leaves[i].shape)
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
    ghosts, rows = {}, {}
    # Each leaf's squared norm goes to its clipping group (one group unless
    # l2_clip_norm is a pytree), and each leaf is scaled by its group's
    # factor, as the vmap path does.
    user_tree = jax.tree_util.tree_unflatten(diff_tree, diff_leaves)
    groups = settings.clip_rule.leaf_groups(
        user_tree[0] if len(argnums) == 1 else user_tree
    )
    lora_taps = plan.lora_taps(taps) if plan is not None else frozenset()
    forced = plan.forced(taps) if plan is not None else frozenset()
    linear = {}
    if plan is not None:
      linear = _ghost_linear.linear_taps(plan, taps, groups)
    for index, (_, book_kept) in linear.items():
      if not book_kept:
        formed.update(_ghost_linear.linear_gradients(
            plan, taps[index], activations, cotangents, leaves, rest_leaves,
            batch_size, settings.spmd_axis_name,
        ))
    for leaf, tap in taps.items():
      if leaf in lora_taps or leaf in linear:
        continue
      if leaf in forced or _ghost_layers.materialises(tap, tap.weight_shape):
        formed[leaf] = jax.vmap(
            lambda a, g, tap=tap: _ghost_linear.gradient_to_leaf(
                tap,
                _ghost_layers.tapped_gradient(tap, a, g, tap.weight_shape),
            ),
            spmd_axis_name=settings.spmd_axis_name,
        )(activations[leaf], cotangents[leaf])
      else:
        ghosts[leaf] = tap
    if plan is not None:
      # Virtual leaves' gradients go to the parameters they are made from.
      formed, rows = plan.leaf_gradients(
          formed, taps, activations, cotangents, leaves, rest_leaves,
          settings.spmd_axis_name,
      )
    squared = jnp.zeros((batch_size, settings.clip_rule.num_groups), jnp.float32)
    for index, (group, book_kept) in linear.items():
      if book_kept:
        for grad in _ghost_linear.linear_gradients(
            plan, taps[index], activations, cotangents, leaves, rest_leaves,
            batch_size, settings.spmd_axis_name, squared_norms=True,
        ).values():
          squared = squared.at[:, group].add(grad)
    for leaf, grad in formed.items():
      grad = grad.astype(_per_example.at_least_f32(grad.dtype))
      squared = squared.at[:, groups[leaf]].add(
          jnp.sum(jnp.square(grad).reshape((batch_size, -1)), axis=1)
      )
    for leaf, tap in ghosts.items():
      shape = diff_leaves[leaf].shape
      squared = squared.at[:, groups[leaf]].add(
          jax.vmap(
              lambda a, g, tap=tap, shape=shape: tapped_squared_norm(
                  tap, a, g, shape
              ),
              spmd_axis_name=settings.spmd_axis_name,
          )(activations[leaf], cotangents[leaf])
      )
    for leaf, grad in rows.items():
      squared = squared.at[:, groups[leaf]].add(
          grad.squared_norms(settings.spmd_axis_name)
      )
    norms = jnp.sqrt(squared)
    coefficients, keep = _clip_coefficients(norms, is_padding, settings)

    # Leaves that the loss does not use get zero.
    summed = [
        jnp.zeros(
            leaf.shape,
            _per_example.accumulation_dtype(leaf.dtype, settings.dtype),
        )
        for leaf in diff_leaves
    ]
    for leaf, grad in formed.items():
      out_dtype = _per_example.accumulation_dtype(
          diff_leaves[leaf].dtype, settings.dtype
      )
      grad = _ghost_linear.mask_examples(keep, grad.astype(coefficients.dtype))
      summed[leaf] = jnp.tensordot(
          coefficients[:, groups[leaf]], grad, axes=1
      ).astype(out_dtype)
    for leaf, tap in ghosts.items():
      weight = diff_leaves[leaf]
      grad_sum = _ghost_linear.book_kept_sum(
          tap, weight, activations[leaf], cotangents[leaf],
          coefficients[:, groups[leaf]], keep,
      )
      out_dtype = _per_example.accumulation_dtype(weight.dtype, settings.dtype)
      summed[leaf] = grad_sum.astype(out_dtype)
    for index, (group, book_kept) in linear.items():
      if not book_kept:
        continue
      # The transform's VJP of the weight's clipped sum (linear_taps).
      weight_sum = _ghost_linear.book_kept_sum(
          taps[index], leaves[index], activations[index], cotangents[index],
          coefficients[:, group], keep,
      )
      for leaf, grad_sum in plan.linear_sums(
          index, weight_sum, leaves, rest_leaves
      ).items():
        summed[leaf] = grad_sum.astype(
            _per_example.accumulation_dtype(
                diff_leaves[leaf].dtype, settings.dtype
            )
        )
    for leaf, grad in rows.items():
      summed[leaf] = grad.clipped_sum(
          coefficients[:, groups[leaf]], keep
      ).astype(
          _per_example.accumulation_dtype(
              diff_leaves[leaf].dtype, settings.dtype
          )
      )
    summed = jax.tree_util.tree_unflatten(diff_tree, summed)
    if len(argnums) == 1:
      (summed,) = summed
    return summed, norms, (values, aux)

  return chunk
