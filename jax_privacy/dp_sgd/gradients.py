"""Gradient computers: clipped per-example gradients and their noise.

This is the API of the "JAX & Flax" guide. A gradient computer takes a loss
wrapper for ONE example (see :data:`jax_privacy.dp_sgd.typing.LossFn`),
computes the batch's mean clipped gradient with
:func:`jax_privacy.clipping.clipped_grad`, and adds Gaussian noise calibrated
to the clipping norm::

    gc = gradients.DpsgdGradientComputer(
        clipping_norm=1.0, noise_multiplier=sigma, rescale_to_unit_norm=True,
        per_example_grad_method=grad_clipping.VECTORIZED)
    (loss, (network_state, metrics)), grads = gc.loss_and_clipped_gradients(
        loss_fn=loss_fn, params=params, network_state={},
        rng_per_local_microbatch=key, inputs=(batch_x, batch_y))
    noisy_grads, std, noise_state = gc.add_noise_to_grads(
        grads, rng_per_batch, total_batch_size, noise_state)

Privacy:
  The noisy mean gradient is the Gaussian mechanism applied to a sum of
  per-example contributions of L2 norm at most ``clipping_norm`` (1 with
  ``rescale_to_unit_norm``), divided by ``total_batch_size``. A training run
  made of such steps is (epsilon, delta)-DP as computed by
  :class:`jax_privacy.accounting.analysis.DpsgdTrainingAccountant` when the
  batches are Poisson-sampled with expected size ``total_batch_size`` (see
  :mod:`jax_privacy.batch_selection`) and the same key is never reused for
  noise.

References:
  Abadi et al., "Deep Learning with Differential Privacy", 2016,
  arXiv:1607.00133.
"""

from __future__ import annotations

import abc
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jax_privacy import _ghost
from jax_privacy import _per_example
from jax_privacy import noise_addition
from jax_privacy.dp_sgd import grad_clipping
from jax_privacy.dp_sgd import typing

PyTree = Any


def _identity(x):
  return x


def _check_optional(name: str, value, *, positive: bool) -> float | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f'{name} must be None or a number, got {value!r}')
  value = float(value)
  bad = value <= 0 if positive else value < 0
  if math.isnan(value) or math.isinf(value) or bad:
    accepted = '(0, inf)' if positive else '[0, inf)'
    raise ValueError(f'{name} must be None or in {accepted}, got {value}')
  return value


class GradientComputer(abc.ABC):
  """Computes clipped per-example gradients and privatizes their mean.

  Subclasses choose the noise (:meth:`init_noise_state`,
  :meth:`add_noise_to_grads`); this base class does the clipping, which every
  mechanism shares.

  Args:
    clipping_norm: the largest L2 norm of one example's gradient; ``None``
      disables clipping (non-private).
    noise_multiplier: the noise stddev relative to the per-example
      sensitivity; ``None`` adds no noise (non-private).
    rescale_to_unit_norm: divide each clipped gradient by ``clipping_norm``
      (the per-example sensitivity is then 1, and the learning rate does not
      need retuning when the clipping norm changes).
    per_example_grad_method: a :class:`grad_clipping.PerExampleGradMethod`
      (a performance choice: every method gives the same result).
    rng_per_param_fn: applied to the noise key before use, e.g. to make each
      device of a model-parallel run draw noise for its own parameters.
    global_norm_fn: the norm that clipping bounds (default: the global L2
      norm of the gradient pytree, as ``optax.global_norm`` computes it, but
      accumulated in at least float32). A replacement must be at least the L2
      norm for the guarantee to hold.

  Raises:
    ValueError: on a negative, NaN or infinite setting, noise without
      clipping, or ``GHOST`` with a custom ``global_norm_fn``.
  """

  def __init__(
      self,
      *,
      clipping_norm: float | None,
      noise_multiplier: float | None,
      rescale_to_unit_norm: bool,
      per_example_grad_method: grad_clipping.PerExampleGradMethod,
      rng_per_param_fn: Callable[[jax.Array], jax.Array] = _identity,
      global_norm_fn: Callable[[PyTree], jax.Array] = _per_example.global_l2_norm,
  ):
    self._clipping_norm = _check_optional(
        'clipping_norm', clipping_norm, positive=True
    )
    self._noise_multiplier = _check_optional(
        'noise_multiplier', noise_multiplier, positive=False
    )
    if self._clipping_norm is None and self._noise_multiplier:
      raise ValueError(
          'noise_multiplier is set but clipping_norm is None: noise is '
          'relative to the clipping norm, so private training needs both'
      )
    if self._clipping_norm is None and rescale_to_unit_norm:
      raise ValueError('rescale_to_unit_norm=True needs a clipping_norm')
    if not isinstance(per_example_grad_method, grad_clipping.PerExampleGradMethod):
      raise ValueError(
          'per_example_grad_method must be a grad_clipping.PerExampleGradMethod '
          f'(e.g. grad_clipping.VECTORIZED), got {per_example_grad_method!r}'
      )
    if (
        per_example_grad_method == grad_clipping.GHOST
        and global_norm_fn is not _per_example.global_l2_norm
    ):
      raise ValueError(
          'per_example_grad_method=grad_clipping.GHOST computes the global L2 '
          'norm without materialising gradients, so it cannot use a custom '
          'global_norm_fn; use grad_clipping.VECTORIZED or AUTO'
      )
    self._rescale_to_unit_norm = bool(rescale_to_unit_norm)
    self._per_example_grad_method = per_example_grad_method
    self._rng_per_param_fn = rng_per_param_fn
    self._global_norm_fn = global_norm_fn

  @property
  def clipping_norm(self) -> float | None:
    """The clipping norm, or None when gradients are not clipped."""
    return self._clipping_norm

  @property
  def noise_multiplier(self) -> float | None:
    """The noise multiplier, or None when no noise is added."""
    return self._noise_multiplier

  @property
  def using_clipped_grads(self) -> bool:
    """Whether per-example gradients are clipped."""
    return self._clipping_norm is not None

  @property
  def per_example_sensitivity(self) -> float:
    """The largest L2 norm one example adds to the clipped sum."""
    if self._clipping_norm is None:
      return math.inf
    return 1.0 if self._rescale_to_unit_norm else self._clipping_norm

  def loss_and_clipped_gradients(
      self,
      loss_fn: typing.LossFn,
      params: PyTree,
      network_state: typing.NetworkState,
      rng_per_local_microbatch: jax.Array,
      inputs: typing.Inputs,
      *,
      is_padding_example: jax.Array | None = None,
      normalize_by: float | None = None,
  ) -> tuple[tuple[jax.Array, tuple[typing.NetworkState, typing.Metrics]], PyTree]:
    """The batch's mean loss, metrics, and mean clipped gradient.

    Args:
      loss_fn: the loss wrapper for one example.
      params: the model parameters (differentiated).
      network_state: the model state (e.g. ``{}``), passed to every example.
      rng_per_local_microbatch: a PRNG key, split into one key per example.
      inputs: the batch, a pytree whose leaves share a leading batch axis.
      is_padding_example: (ours) ``bool[batch]``; padding examples contribute
        nothing to the gradient, the loss or the metrics.
      normalize_by: (ours) divide the clipped sum by this instead of the
        number of examples in ``inputs``; with Poisson sampling, pass the
        expected batch size so that the sensitivity does not depend on the
        batch drawn.

    Returns:
      ``((loss, (network_state, metrics)), grads)``: the loss averaged over
      the (non-padding) examples, the per-example network states averaged,
      the aggregated :class:`typing.Metrics`, and the sum of clipped
      per-example gradients divided by the batch size (or ``normalize_by``).
    """
    batch_size = _batch_size(inputs)
    settings = _per_example.ClipSettings.create(
        l2_clip_norm=(
            math.inf if self._clipping_norm is None else self._clipping_norm
        ),
        rescale_to_unit_norm=self._rescale_to_unit_norm,
        normalize_by=batch_size if normalize_by is None else normalize_by,
        batch_argnums=3,
        keep_batch_dim=True,
        pre_clipping_transform=_per_example.identity,
        microbatch_size=(
            1
            if self._per_example_grad_method == grad_clipping.UNROLLED
            else None
        ),
        nan_safe=True,
        dtype=None,
        prng_argnum=2,
        spmd_axis_name=None,
        norm_fn=self._global_norm_fn,
    )
    clipped_sum = _per_example.batch_function(
        self._chunk_function(loss_fn, settings), settings
    )
    grads, _, (values, (new_states, metrics)) = clipped_sum(
        params,
        network_state,
        rng_per_local_microbatch,
        inputs,
        is_padding_example=is_padding_example,
    )
    weights = _example_weights(is_padding_example, batch_size)
    loss = _weighted_mean(values, weights)
    network_state = jax.tree_util.tree_map(
        lambda s: _weighted_mean(s, weights), new_states
    )
    return (loss, (network_state, _aggregate(metrics, weights))), grads

  def _chunk_function(self, loss_fn, settings):
    """The per-example engine of ``per_example_grad_method``."""
    chunk_fn = _per_example.vectorized_chunk_function(
        _per_example.gradient_per_example(loss_fn, (0,), has_aux=True),
        settings,
    )
    method = self._per_example_grad_method
    default_norm = self._global_norm_fn is _per_example.global_l2_norm
    if method == grad_clipping.GHOST or (
        method == grad_clipping.AUTO and default_norm
    ):
      return _ghost.ghost_chunk_function(
          loss_fn,
          (0,),
          True,
          settings,
          fallback=chunk_fn if method == grad_clipping.AUTO else None,
      )
    return chunk_fn

  def clean_gradients(
      self,
      loss_fn: typing.LossFn,
      params: PyTree,
      network_state: typing.NetworkState,
      rng_per_local_microbatch: jax.Array,
      inputs: typing.Inputs,
  ) -> PyTree:
    """The gradient of the batch's mean loss, without clipping or noise.

    For monitoring only (e.g. how much clipping distorts the gradient): it is
    not private.
    """
    batch_size = _batch_size(inputs)
    keys = jax.random.split(rng_per_local_microbatch, batch_size)

    def mean_loss(p):
      def one(key, example):
        example = jax.tree_util.tree_map(lambda x: x[None], example)
        return loss_fn(p, network_state, key, example)[0]

      return jnp.mean(jax.vmap(one)(keys, inputs))

    return jax.grad(mean_loss)(params)

  @abc.abstractmethod
  def init_noise_state(self, params: PyTree) -> Any:
    """The state of the noise mechanism before the first step."""

  @abc.abstractmethod
  def add_noise_to_grads(
      self,
      grads: PyTree,
      rng_per_batch: jax.Array,
      total_batch_size: int | jax.Array,
      noise_state: Any,
  ) -> tuple[PyTree, jax.Array, Any]:
    """Adds the mechanism's noise to a mean clipped gradient."""

  def l2_loss(self, params: PyTree) -> jax.Array:
    """``0.5 * sum(p ** 2)`` over all parameters, for weight decay."""
    leaves = jax.tree_util.tree_leaves(params)
    return 0.5 * sum(jnp.sum(jnp.square(p)) for p in leaves)


class DpsgdGradientComputer(GradientComputer):
  """DP-SGD: i.i.d. Gaussian noise on the mean clipped gradient.

  See :class:`GradientComputer` for the arguments.

  Privacy:
    ``add_noise_to_grads`` adds N(0, std^2) per coordinate with ``std =
    noise_multiplier * sensitivity / total_batch_size``, where the
    per-example sensitivity is ``clipping_norm`` (1 with
    ``rescale_to_unit_norm``). Use a fresh ``rng_per_batch`` every step.
  """

  def init_noise_state(self, params: PyTree) -> tuple[()]:
    """DP-SGD's noise is independent across steps: its state is empty."""
    del params
    return ()

  def add_noise_to_grads(
      self,
      grads: PyTree,
      rng_per_batch: jax.Array,
      total_batch_size: int | jax.Array,
      noise_state: Any,
  ) -> tuple[PyTree, jax.Array, Any]:
    """Adds Gaussian noise for a mean over ``total_batch_size`` examples.

    Args:
      grads: the mean clipped gradient (sum divided by ``total_batch_size``).
      rng_per_batch: the key of this step's noise.
      total_batch_size: the (expected) number of examples the mean is over.
      noise_state: from :meth:`init_noise_state`; returned unchanged.

    Returns:
      ``(noisy_grads, std, noise_state)``.

    Raises:
      ValueError: if a concrete ``total_batch_size`` is not positive.
    """
    _per_example.check_concrete_positive('total_batch_size', total_batch_size)
    if not self._noise_multiplier:
      return grads, jnp.zeros((), jnp.float32), noise_state
    std = (
        jnp.asarray(self._noise_multiplier * self.per_example_sensitivity)
        / total_batch_size
    )
    noise = noise_addition.gaussian_noise_like(
        grads, self._rng_per_param_fn(rng_per_batch), std
    )
    noisy = jax.tree_util.tree_map(
        lambda g, n: g + n.astype(g.dtype), grads, noise
    )
    return noisy, std, noise_state


def _batch_size(inputs) -> int:
  leaves = jax.tree_util.tree_leaves(inputs)
  if not leaves or not jnp.shape(leaves[0]):
    raise ValueError(
        'inputs must be a pytree of arrays with a leading batch axis, got '
        f'{jax.tree_util.tree_map(jnp.shape, inputs)}'
    )
  return jnp.shape(leaves[0])[0]


def _example_weights(is_padding_example, batch_size: int) -> jax.Array:
  if is_padding_example is None:
    return jnp.ones((batch_size,), jnp.float32)
  return 1.0 - jnp.asarray(is_padding_example, jnp.float32)


def _weighted_mean(x, weights):
  """Mean over the batch axis of the non-padding entries (last, if integer)."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return x[-1]
  w = weights.reshape(weights.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
  return jnp.sum(x * w, axis=0) / jnp.maximum(jnp.sum(weights), 1.0).astype(
      x.dtype
  )


def _aggregate(metrics: typing.Metrics, weights: jax.Array) -> typing.Metrics:
  def weighted_sum(x):
    w = weights.reshape(weights.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
    return jnp.sum(x * w, axis=0)

  last_real = jnp.max(jnp.where(weights > 0, jnp.arange(weights.shape[0]), 0))
  return typing.Metrics(
      scalars_avg=jax.tree_util.tree_map(
          lambda x: _weighted_mean(x, weights), metrics.scalars_avg
      ),
      scalars_sum=jax.tree_util.tree_map(weighted_sum, metrics.scalars_sum),
      scalars_last=jax.tree_util.tree_map(
          lambda x: x[last_real], metrics.scalars_last
      ),
      per_example=metrics.per_example,
  )
