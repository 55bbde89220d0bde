"""Ghost clipping through parameter transforms (weight standardization, LoRA).

Some layers do not use a parameter leaf as their weight but a function of
the parameters: weight standardization uses ``w' = (w - mean(w)) / std(w)``
per output channel (scaled WS: times a gain, over ``sqrt(fan_in)``), Keras'
``enable_lora`` uses ``kernel + s * A @ B``. Such a weight ``w' = T(theta)``
depends on the parameters only, not on the example, so an example's gradient
is, by the chain rule,
``grad_theta = (direct uses of theta) + J_T^T grad_w'``, where ``grad_w'``
is the gradient of the layer's weight, which ghost clipping gets from the
layer's activation and output cotangent as for a plain weight.

:func:`plan_transforms` finds such weights in the loss's jaxpr (the weight
operand of a dense layer or convolution that depends on trainable leaves and
on no batched input, and is not just a view of one leaf) and makes each one
a *virtual leaf*: an input of a new jaxpr, the loss with the weight cut from
its parameters, which the engine of :mod:`jax_privacy._ghost` taps like any
parameter. The per-example gradient of a virtual leaf is then mapped back:

* In general, the example's weight gradient is formed (as the engine does for
  a convolution over many positions) and mapped through the vector-Jacobian
  product of ``T``, vmapped over the examples; each parameter's gradient is
  the sum of its direct part and of every transform it enters, and its norm
  is taken on that sum, exactly the norm of the vmap reference.
* A low-rank product ``w' = K + s * (A @ B)`` (any ``dot_general`` of two
  leaves used nowhere else, times constants, plus a term free of trainable
  leaves, as Keras' LoRA kernels) is never formed at the weight's size. With
  ``act`` and ``cot`` the layer's activation and output cotangent,
  ``grad_A = s act^T (cot B^T)`` and ``grad_B = s (act A)^T cot`` are the
  gradients of two dense layers of their own, whose norms come from the
  ghost norm or from the (low-rank sized) formed gradient, whichever the
  shapes make cheaper (:func:`jax_privacy._ghost_layers.forms_rows`).

References:
  Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
  Weight Standardization", 2019, arXiv:1903.10520.
  Brock et al., "High-Performance Large-Scale Image Recognition Without
  Normalization", 2021, arXiv:2102.06171.
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
  arXiv:2106.09685.
  Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", 2021, arXiv:2110.05679.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

from jax_privacy import _ghost_layers
from jax_privacy import _ghost_lora
from jax_privacy import _per_example

_CASTS = ('convert_element_type', 'copy', 'copy_p')
# Layers whose weight may be a transform; a looked-up table only as LoRA.
_TRANSFORMED_LAYERS = ('dot_general', 'conv_general_dilated', 'gather')


def _is_var(v) -> bool:
  return not isinstance(v, jex_core.Literal)


def _read(env, v):
  return v.val if isinstance(v, jex_core.Literal) else env[v]


def _bind(eqn, invals):
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(
        *invals, **eqn.primitive.get_bind_params(eqn.params)
    )
  return outs if eqn.primitive.multiple_results else [outs]


def _evaluate_inlined(jaxpr, consts, args):
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [_read(env, v) for v in eqn.invars]
    inner = _ghost_layers.inner_jaxpr(eqn)
    if inner is not None:
      outs = _evaluate_inlined(inner.jaxpr, inner.consts, invals)
    else:
      outs = _bind(eqn, invals)
    env.update(zip(eqn.outvars, outs))
  return [_read(env, v) for v in jaxpr.outvars]


def _abstract(v):
  aval = v.aval
  return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _slice(eqns, targets, cut=frozenset()):
  """The equations that compute ``targets``, and the variables they read.

  Variables in ``cut`` are given, so the equations that compute them are
  left out (unless needed for something else).
  """
  needed = {v for v in targets if _is_var(v)}
  kept = []
  for eqn in reversed(eqns):
    if any(v in needed and v not in cut for v in eqn.outvars):
      kept.append(eqn)
      needed.update(v for v in eqn.invars if _is_var(v))
  kept.reverse()
  return tuple(kept), needed


def _run(eqns, env, skip=frozenset()):
  for eqn in eqns:
    outs = _bind(eqn, [_read(env, v) for v in eqn.invars])
    env.update((v, out) for v, out in zip(eqn.outvars, outs) if v not in skip)


@dataclasses.dataclass(frozen=True, eq=False)
class _Transform:
  """A layer weight ``var`` computed by ``eqns`` from the leaves ``leaves``."""

  var: Any
  leaves: tuple[int, ...]
  eqns: tuple[Any, ...]
  lora: _ghost_lora.Lora | None


class _Graph:
  """Producers, use counts and dependencies of a flat jaxpr's variables."""

  def __init__(self, jaxpr, num_leaves: int, batched):
    self.jaxpr = jaxpr
    self.leaf_vars = {v: i for i, v in enumerate(jaxpr.invars[:num_leaves])}
    self.producer = {}
    self.uses = collections.Counter(v for v in jaxpr.outvars if _is_var(v))
    self.on_leaves = set(self.leaf_vars)
    self.on_batch = {
        v for v, b in zip(jaxpr.invars[num_leaves:], batched) if b
    }
    for eqn in jaxpr.eqns:
      ins = [v for v in eqn.invars if _is_var(v)]
      self.uses.update(ins)
      for v in eqn.outvars:
        self.producer[v] = eqn
      if any(v in self.on_leaves for v in ins):
        self.on_leaves.update(eqn.outvars)
      if any(v in self.on_batch for v in ins):
        self.on_batch.update(eqn.outvars)

  def frozen(self, v) -> bool:
    """Free of trainable leaves and of batched inputs (a constant)."""
    return not _is_var(v) or (v not in self.on_leaves and v not in self.on_batch)

  def view_of_leaf(self, v) -> bool:
    while v in self.producer and _ghost_layers.is_view(self.producer[v]):
      v = self.producer[v].invars[0]
    return v in self.leaf_vars

  def peel(self, v, factors: list):
    """Walks back from ``v`` through casts and products with constants.

    Each step's input must be used only there; the constant scalars (and
    their powers, -1 for a division) are appended to ``factors``.
    """
    while self.uses[v] == 1 and v in self.producer:
      eqn = self.producer[v]
      name = eqn.primitive.name
      if name in _CASTS and _ghost_layers.is_view(eqn):
        v = eqn.invars[0]
        continue
      if name == 'neg':
        factors.append((-1.0, 1))
        v = eqn.invars[0]
        continue
      trained = [u for u in eqn.invars if _is_var(u) and u in self.on_leaves]
      if name not in ('mul', 'div') or len(trained) != 1:
        break
      (u,) = trained
      (other,) = [w for w in eqn.invars if w is not u]
      if (
          not self.frozen(other)
          or other.aval.shape != ()
          or u.aval.shape != eqn.outvars[0].aval.shape
          or (name == 'div' and eqn.invars[0] is not u)
      ):
        break
      factors.append((other, 1 if name == 'mul' else -1))
      v = u
    return v

  def candidates(self):
    """``(weight, layer eqn, operand)`` of each transformed layer weight."""
    found = {}
    for eqn in self.jaxpr.eqns:
      if eqn.primitive.name not in _TRANSFORMED_LAYERS:
        continue
      for operand in (0, 1):
        weight, other = eqn.invars[operand], eqn.invars[1 - operand]
        if (
            _is_var(weight)
            and _is_var(other)
            and weight not in found
            and weight in self.on_leaves
            and weight not in self.on_batch
            and other in self.on_batch
            and jnp.issubdtype(weight.aval.dtype, jnp.floating)
            and _ghost_layers.supported_use(eqn, operand)
            and not self.view_of_leaf(weight)
        ):
          found[weight] = (eqn, operand)
    return found

  def match_lora(self, weight, eqn, operand) -> _ghost_lora.Lora | None:
    """Recognises ``weight = K + s * dot_general(A, B)`` (see module doc)."""
    if self.uses[weight] != 1:
      return None
    factors = []
    v = self.peel(weight, factors)
    producer = self.producer.get(v)
    if self.uses[v] != 1:
      return None
    if producer is not None and producer.primitive.name == 'add':
      trained = [
          u for u in producer.invars if _is_var(u) and u in self.on_leaves
      ]
      others = [u for u in producer.invars if all(u is not t for t in trained)]
      if len(trained) != 1 or not all(self.frozen(u) for u in others):
        return None
      v = self.peel(trained[0], factors)
      producer = self.producer.get(v)
    if (
        producer is None
        or producer.primitive.name != 'dot_general'
        or self.uses[v] != 1
        or v.aval.shape != weight.aval.shape
    ):
      return None
    a_var = self.peel(producer.invars[0], factors)
    b_var = self.peel(producer.invars[1], factors)
    a_leaf, b_leaf = self.leaf_vars.get(a_var), self.leaf_vars.get(b_var)
    if eqn.primitive.name == 'gather':
      (ca, cb), (ba, bb) = producer.params['dimension_numbers']
      labels = dict(lookup_mode=eqn.params['mode'])
      if (tuple(ca), tuple(cb), tuple(ba), tuple(bb)) != ((1,), (0,), (), ()):
        return None
    else:
      labels = _ghost_lora.lora_labels(eqn, operand, producer)
    if (
        a_leaf is None
        or b_leaf is None
        or a_leaf == b_leaf
        or self.uses[a_var] != 1
        or self.uses[b_var] != 1
        or labels is None
    ):
      return None
    factor_eqns, _ = _slice(
        self.jaxpr.eqns, [f for f, _ in factors if isinstance(f, jex_core.Var)]
    )
    return _ghost_lora.Lora(
        a_leaf=a_leaf,
        b_leaf=b_leaf,
        a_dtype=producer.invars[0].aval.dtype,
        b_dtype=producer.invars[1].aval.dtype,
        factors=tuple(factors),
        factor_eqns=factor_eqns,
        **labels,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class TransformPlan:
  """The loss with its transformed weights cut out as virtual leaves.

  Attributes:
    flat: the loss's jaxpr with ``jit`` calls inlined; its inputs are the
      trainable leaves, then the other arguments' leaves.
    inner: the loss with each transformed weight an input: trainable leaves,
      then one virtual leaf per transform, then the other arguments' leaves.
    num_leaves: the number of trainable leaves.
    transforms: the transformed weights, virtual leaf ``num_leaves + j``.
    unused: trainable leaves that ``inner`` does not read (their gradient
      comes from transforms only).
  """

  flat: Any
  inner: Any
  num_leaves: int
  transforms: tuple[_Transform, ...]
  unused: frozenset[int]

  def _env(self, leaves, rest):
    jaxpr = self.flat.jaxpr
    env = dict(zip(jaxpr.constvars, self.flat.consts))
    env.update(zip(jaxpr.invars, list(leaves[: self.num_leaves]) + list(rest)))
    return env

  def virtual_values(self, leaves, rest) -> list[jax.Array]:
    """The transformed weights, from the leaves and unbatched ``rest``."""
    env = self._env(leaves, rest)
    eqns, _ = _slice(self.flat.jaxpr.eqns, [t.var for t in self.transforms])
    _run(eqns, env)
    return [env[t.var] for t in self.transforms]

  def lora_taps(self, taps) -> frozenset[int]:
    """Virtual leaves whose low-rank factors take the gradients' place."""
    return frozenset(
        self.num_leaves + j
        for j, t in enumerate(self.transforms)
        if t.lora is not None
        and self.num_leaves + j in taps
        and {t.lora.a_leaf, t.lora.b_leaf} <= self.unused
    )

  def forced(self, taps) -> frozenset[int]:
    """Tapped leaves whose per-example gradient must be formed."""
    lora = self.lora_taps(taps)
    forced = set()
    for j, t in enumerate(self.transforms):
      if self.num_leaves + j not in lora:
        forced.add(self.num_leaves + j)
        forced.update(t.leaves)
    return frozenset(forced & set(taps))

  def linear_taps(self, taps, groups) -> frozenset[int]:
    """Virtual leaves whose parameters get gradient from them alone.

    Such a transform's leaves are read by no other transform and not by the
    loss directly, and lie in one clipping group: an example's gradient for
    them is ``J_T^T grad_w'``, linear in the weight's gradient, so their
    clipped sum is ``J_T^T (sum_b c_b grad_w'_b)``, the transform's VJP of
    the weight's book-kept sum, and only the per-example norms need the
    weight's per-example gradient (:meth:`linear_gradients`).
    """
    counts = collections.Counter(
        leaf for t in self.transforms for leaf in t.leaves
    )
    lora = self.lora_taps(taps)
    linear = set()
    for j, t in enumerate(self.transforms):
      index = self.num_leaves + j
      if (
          index in taps
          and index not in lora
          and t.leaves
          and all(counts[i] == 1 and i in self.unused for i in t.leaves)
          and len({groups[i] for i in t.leaves}) == 1
      ):
        linear.add(index)
    return frozenset(linear)

  def _transform(self, t, env, values):
    local = dict(env)
    local.update(
        (self.flat.jaxpr.invars[i], v) for i, v in zip(t.leaves, values)
    )
    _run(t.eqns, local)
    return local[t.var]

  def _pullback(self, index, leaves, rest):
    """The transform of virtual leaf ``index``, and its VJP at ``leaves``."""
    t = self.transforms[index - self.num_leaves]
    env = self._env(leaves, rest)
    _, pullback = jax.vjp(
        lambda values: self._transform(t, env, values),
        [leaves[i] for i in t.leaves],
    )
    return t, pullback

  def linear_gradients(
      self, index, weight_gradient, activations, cotangents, leaves, rest,
      *, squared_norms=False, chunk_size=None, spmd_axis_name=None,
  ) -> dict[int, jax.Array]:
    """Per-example gradients (or squared norms) of a linear tap's leaves.

    Args:
      index: a virtual leaf of :meth:`linear_taps`.
      weight_gradient: ``(activation, cotangent) -> gradient`` of one
        example for the virtual leaf.
      activations: ``[batch, ...]`` the layer's activations.
      cotangents: ``[batch, ...]`` its output cotangents.
      leaves: trainable leaves then virtual leaves (values).
      rest: the other arguments' leaves (None where batched).
      squared_norms: return each leaf's squared gradient norm per example
        (``[batch]``, at least float32) rather than the gradient.
      chunk_size: take the examples this many at a time (``lax.map``), which
        caps the memory of the weight gradients (and of their inputs) that
        are formed at once; None: all at once.
      spmd_axis_name: for ``jax.vmap`` (then all examples at once).

    Returns:
      ``{leaf: [batch, ...]}``, the examples' gradients for the transform's
      leaves (in at least float32) or their squared norms.
    """
    t, pullback = self._pullback(index, leaves, rest)

    def one(pair):
      grad = weight_gradient(*pair).astype(t.var.aval.dtype)
      (contributions,) = pullback(grad)
      contributions = [
          c.astype(_per_example.at_least_f32(c.dtype)) for c in contributions
      ]
      if squared_norms:
        return [jnp.sum(jnp.square(c)) for c in contributions]
      return contributions

    pair = (activations, cotangents)
    if spmd_axis_name is not None or chunk_size is None:
      out = jax.vmap(one, spmd_axis_name=spmd_axis_name)(pair)
    else:
      out = jax.lax.map(one, pair, batch_size=chunk_size)
    return dict(zip(t.leaves, out))

  def linear_sums(self, index, weight_sum, leaves, rest) -> dict[int, Any]:
    """``{leaf: J_T^T weight_sum}`` of a :meth:`linear_taps` leaf."""
    t, pullback = self._pullback(index, leaves, rest)
    (contributions,) = pullback(weight_sum.astype(t.var.aval.dtype))
    return dict(zip(t.leaves, contributions))

  def leaf_gradients(
      self, formed, taps, activations, cotangents, leaves, rest,
      spmd_axis_name=None,
  ):
    """Maps virtual leaves' gradients to the trainable leaves.

    Args:
      formed: ``{leaf: per-example gradient}`` of the engine, with those of
        every virtual leaf not in :meth:`lora_taps`.
      taps: the engine's taps of ``inner``.
      activations: per-example activations of tapped leaves.
      cotangents: per-example output cotangents of tapped leaves.
      leaves: trainable leaves then virtual leaves (values).
      rest: the other arguments' leaves (None where batched).
      spmd_axis_name: for ``jax.vmap``.

    Returns:
      ``(formed, rows)``: per-example gradients of trainable leaves only
      (direct part plus transforms' contributions), and
      ``{leaf: RowsGradient or LookupGradient}`` (:mod:`_ghost_lora`) of
      low-rank factors kept as rows.
    """
    formed = dict(formed)
    rows = {}
    env = self._env(leaves, rest)
    lora_taps = self.lora_taps(taps)
    for j, t in enumerate(self.transforms):
      index = self.num_leaves + j
      if index in lora_taps:
        factor_env = dict(env)
        _run(t.lora.factor_eqns, factor_env)
        scale = jnp.asarray(1.0, jnp.float32)
        for factor, power in t.lora.factors:
          value = (
              factor if isinstance(factor, float) else _read(factor_env, factor)
          )
          scale = scale * jnp.asarray(value, jnp.float32) ** power
        for leaf, grad in _ghost_lora.lora_gradients(
            t.lora, activations[index], cotangents[index], leaves, scale,
            spmd_axis_name,
        ).items():
          if isinstance(grad, jax.Array):
            formed[leaf] = grad
          else:
            rows[leaf] = grad
        continue

      if index not in formed:
        continue  # a linear tap (:meth:`linear_taps`)

      def transform(values, t=t):
        return self._transform(t, env, values)

      weight_grad = formed.pop(index).astype(t.var.aval.dtype)
      _, pullback = jax.vjp(transform, [leaves[i] for i in t.leaves])
      (contributions,) = jax.vmap(pullback, spmd_axis_name=spmd_axis_name)(
          weight_grad
      )
      for leaf, grad in zip(t.leaves, contributions):
        grad = grad.astype(_per_example.at_least_f32(grad.dtype))
        if leaf in formed:
          grad = grad + formed[leaf].astype(
              jnp.promote_types(formed[leaf].dtype, grad.dtype)
          )
        formed[leaf] = grad
    return formed, rows


def plan_transforms(closed, num_leaves: int, batched) -> TransformPlan | None:
  """Cuts the transformed layer weights of a loss out as virtual leaves.

  Args:
    closed: the ClosedJaxpr of one example's loss; its inputs are the
      ``num_leaves`` trainable leaves, then the other arguments' leaves.
    num_leaves: the number of trainable leaves.
    batched: per other-argument leaf, whether it differs between examples.

  Returns:
    A :class:`TransformPlan`, or None when no layer weight is a transform of
    trainable leaves (the engine then runs on ``closed`` as it is).
  """
  flat = jax.make_jaxpr(
      lambda *args: _evaluate_inlined(closed.jaxpr, closed.consts, args)
  )(*[_abstract(v) for v in closed.jaxpr.invars])
  jaxpr = flat.jaxpr
  graph = _Graph(jaxpr, num_leaves, batched)
  candidates = graph.candidates()
  if not candidates:
    return None
  transforms = []
  for weight, (eqn, operand) in candidates.items():
    lora = graph.match_lora(weight, eqn, operand)
    if lora is None and eqn.primitive.name == 'gather':
      continue  # a full table per example: the vmap engine's cost
    eqns, needed = _slice(jaxpr.eqns, [weight])
    transforms.append(
        _Transform(
            var=weight,
            leaves=tuple(
                i for v, i in graph.leaf_vars.items() if v in needed
            ),
            eqns=eqns,
            lora=lora,
        )
    )
  if not transforms:
    return None
  cut = frozenset(t.var for t in transforms)
  inner_eqns, needed = _slice(jaxpr.eqns, jaxpr.outvars, cut)

  def inner(*args):
    virtual = args[num_leaves : num_leaves + len(transforms)]
    env = dict(zip(jaxpr.constvars, flat.consts))
    env.update(
        zip(
            jaxpr.invars,
            args[:num_leaves] + args[num_leaves + len(transforms) :],
        )
    )
    env.update(zip([t.var for t in transforms], virtual))
    _run(inner_eqns, env, skip=cut)
    return [_read(env, v) for v in jaxpr.outvars]

  avals = [_abstract(v) for v in jaxpr.invars]
  inner_closed = jax.make_jaxpr(inner)(
      *avals[:num_leaves],
      *[_abstract(t.var) for t in transforms],
      *avals[num_leaves:],
  )
  return TransformPlan(
      flat=flat,
      inner=inner_closed,
      num_leaves=num_leaves,
      transforms=tuple(transforms),
      unused=frozenset(
          i for v, i in graph.leaf_vars.items() if v not in needed
      ),
  )
