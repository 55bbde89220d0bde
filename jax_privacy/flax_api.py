"""Flax front end: Linen and NNX models as per-example losses for DP training.

DP-SGD needs the loss of ONE example as a pure function of the parameters.
This module builds that function from a Flax model and a per-example loss
(e.g. ``optax.softmax_cross_entropy_with_integer_labels``), in the two forms
the library consumes:

* ``fun(params, example, key) -> loss`` (:func:`linen_loss`,
  :func:`nnx_loss`): for :func:`jax_privacy.clipping.clipped_grad` (with
  ``batch_argnums=1, prng_argnum=2``) and for
  :class:`jax_privacy.training.DPTrainer`.
* ``loss_fn(params, network_state, rng, inputs) -> (loss, (network_state,
  metrics))`` (:func:`linen_loss_wrapper`, :func:`nnx_loss_wrapper`): the loss
  wrapper of :class:`jax_privacy.dp_sgd.gradients.DpsgdGradientComputer`.

``example`` / ``inputs`` is the pair ``(inputs, labels)`` of one example, each
with a leading axis of size 1; the model is called on ``inputs`` and the loss
is ``mean(per_example_loss(outputs, labels))``.

Linen::

    model = MLP()
    params, state = flax_api.linen_split_variables(model.init(key, x[:1]))
    xent = optax.softmax_cross_entropy_with_integer_labels
    loss = flax_api.linen_loss(model, xent, state=state,
                               apply_kwargs={'train': True})
    grad_fn = clipping.clipped_grad(loss, l2_clip_norm=1.0, batch_argnums=1,
                                    prng_argnum=2)
    grads = grad_fn(params, (x, y), key)

NNX (``nnx.split`` / ``nnx.merge`` happen inside; parameters are plain nested
dicts of arrays, so optax, orbax and ``DPTrainer`` take them as they are)::

    model = Model(rngs=nnx.Rngs(0))
    params, _ = flax_api.nnx_split_params(model)
    loss = flax_api.nnx_loss(model, xent)
    ...  # train params with clipped_grad, DPTrainer or a gradient computer
    flax_api.nnx_update_params(model, trained_params)

Parameter-efficient fine-tuning: ``trainable`` (an NNX filter, default
``nnx.Param``) selects the parameters to train, e.g. ``trainable=
nnx.LoRAParam`` for the adapters of ``nnx.LoRA`` / ``nnx.LoRALinear`` layers;
pass the same filter to ``nnx_split_params``, ``nnx_loss`` (or
``nnx_loss_wrapper``) and ``nnx_update_params``. The other parameters are
constants of the loss: they get no per-example gradient, and no gradient at
all.

Randomness: the key handed to the loss (one per example: ``clipped_grad``
splits its ``prng_argnum`` key, ``DPTrainer`` and the gradient computers do
the same) seeds every random stream of the model for that example. Linen
streams named in ``rng_streams`` get ``fold_in(key, i)``; every NNX
``RngStream`` of the module (e.g. the one each ``nnx.Dropout`` forks) gets
``fold_in(key, i)`` for its position ``i`` in the module graph, with its count
reset to 0. Two examples of a batch therefore draw independent dropout masks,
and the same key reproduces the same masks.

Privacy:
  Only the parameters are trained, through per-example gradients clipped by
  the caller, so the usual DP-SGD guarantee holds for them. Anything the model
  would update from the data during the forward pass is not privatised, so it
  is not supported: batch statistics (Linen ``nn.BatchNorm`` / a
  ``'batch_stats'`` collection, ``nnx.BatchNorm`` / ``nnx.BatchStat``) are
  refused, and other state (Linen collections other than ``'params'``, NNX
  variables other than the trainable ``nnx.Param`` ones) is read-only: it is
  passed to the model and returned unchanged. Metrics the wrappers report are
  computed on training examples without noise: they are not covered by the
  guarantee.

References:
  Abadi et al., "Deep Learning with Differential Privacy", 2016,
  arXiv:1607.00133.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

try:
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      "jax_privacy.flax_api needs flax: pip install 'flax>=0.12'"
  ) from e

from jax_privacy import _flax_nnx
from jax_privacy.dp_sgd import typing

PyTree = Any
PerExampleLoss = Callable[[Any, Any], jax.Array]
MetricsFn = Callable[[Any, Any], Mapping[str, jax.Array]]

_BATCH_NORM_MESSAGE = (
    'batch normalization is not per-example safe: its batch statistics mix '
    'the examples of a batch (so no per-example gradient bounds one '
    "example's influence) and its running averages are computed from the "
    'data without noise. Use GroupNorm or LayerNorm instead (flax.linen.'
    'GroupNorm / flax.linen.LayerNorm, or nnx.GroupNorm / nnx.LayerNorm)'
)


def _check_per_example_loss(per_example_loss) -> None:
  if not callable(per_example_loss):
    raise ValueError(
        'per_example_loss must be a callable (outputs, labels) -> losses, '
        f'e.g. optax.softmax_cross_entropy_with_integer_labels; got '
        f'{per_example_loss!r}'
    )


def _check_kwargs(name: str, value) -> dict[str, Any]:
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise ValueError(f'{name} must be None or a mapping, got {value!r}')
  return dict(value)


def _split_example(example) -> tuple[Any, Any]:
  if not isinstance(example, (tuple, list)) or len(example) != 2:
    raise ValueError(
        'example must be the pair (inputs, labels) of one example, got '
        f'{type(example).__name__} {jax.tree_util.tree_map(jnp.shape, example)}'
    )
  return example[0], example[1]


def _mean_loss(per_example_loss, outputs, labels) -> jax.Array:
  return jnp.mean(per_example_loss(outputs, labels))


def _metrics(loss, metrics_fn, outputs, labels) -> typing.Metrics:
  scalars = {'loss': loss}
  if metrics_fn is not None:
    scalars.update(
        {name: jnp.mean(v) for name, v in metrics_fn(outputs, labels).items()}
    )
  return typing.Metrics(scalars_avg=scalars)


# ----------------------------------------------------------------------------
# Linen
# ----------------------------------------------------------------------------


def _check_linen_module(module) -> None:
  if not isinstance(module, nn.Module):
    raise ValueError(
        f'module must be a flax.linen.Module, got {type(module).__name__}; '
        'for an NNX module use nnx_loss / nnx_loss_wrapper'
    )


def _check_rng_streams(rng_streams) -> tuple[str, ...]:
  if (
      isinstance(rng_streams, str)
      or not isinstance(rng_streams, Sequence)
      or not all(isinstance(s, str) for s in rng_streams)
  ):
    raise ValueError(
        f'rng_streams must be a sequence of stream names, got {rng_streams!r}'
    )
  return tuple(rng_streams)


def _check_linen_state(state) -> dict[str, Any]:
  if state is None:
    return {}
  if not isinstance(state, Mapping):
    raise ValueError(
        f'state must be None or a mapping of collections, got {state!r}'
    )
  if 'batch_stats' in state:
    raise ValueError(
        f"state has a 'batch_stats' collection: {_BATCH_NORM_MESSAGE}"
    )
  if 'params' in state:
    raise ValueError(
        "state must not hold the 'params' collection (parameters are the "
        'first argument of the loss); split variables with '
        'linen_split_variables'
    )
  return dict(state)


def _refuse_linen_batch_norm(next_fun, args, kwargs, context):
  if isinstance(context.module, nn.BatchNorm):
    raise ValueError(
        f'the model uses flax.linen.BatchNorm ({context.module.name}): '
        f'{_BATCH_NORM_MESSAGE}'
    )
  return next_fun(*args, **kwargs)


def linen_split_variables(
    variables: Mapping[str, Any],
) -> tuple[PyTree, dict[str, Any]]:
  """Splits Linen variables into trainable parameters and read-only state.

  Args:
    variables: the result of ``module.init(...)``.

  Returns:
    ``(params, state)``: the ``'params'`` collection, and a dict of the other
    collections (passed to the model unchanged, never trained).

  Raises:
    ValueError: if there is no ``'params'`` collection or there is a
      ``'batch_stats'`` one (batch normalization is not per-example safe).
  """
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError(
        "variables must be a mapping with a 'params' collection (the result "
        f'of module.init), got {type(variables).__name__}'
    )
  state = {k: v for k, v in variables.items() if k != 'params'}
  return variables['params'], _check_linen_state(state)


def _linen_apply(
    module, params, state, inputs, key, rng_streams, apply_kwargs
):
  rngs = None
  if key is not None and rng_streams:
    rngs = {
        name: jax.random.fold_in(key, i) for i, name in enumerate(rng_streams)
    }
  with nn.intercept_methods(_refuse_linen_batch_norm):
    return module.apply(
        {'params': params, **state}, inputs, rngs=rngs, **apply_kwargs
    )


def linen_loss(
    module: nn.Module,
    per_example_loss: PerExampleLoss,
    *,
    state: Mapping[str, Any] | None = None,
    rng_streams: Sequence[str] = ('dropout',),
    apply_kwargs: Mapping[str, Any] | None = None,
) -> Callable[..., jax.Array]:
  """The loss of one example of a Linen model, ``fun(params, example, key)``.

  Pass it to ``clipping.clipped_grad(fun, batch_argnums=1, prng_argnum=2,
  ...)`` or to ``training.DPTrainer(loss_fn=fun, ...)``.

  Args:
    module: the Linen module.
    per_example_loss: ``(outputs, labels) -> losses`` for a batch of one
      example (e.g. ``optax.softmax_cross_entropy_with_integer_labels``); the
      loss is the mean of what it returns.
    state: the model's non-parameter collections (from
      :func:`linen_split_variables`), read-only; None if it has none.
    rng_streams: names of the Linen RNG streams seeded from the per-example
      key (stream ``i`` gets ``fold_in(key, i)``).
    apply_kwargs: extra keyword arguments of ``module.apply`` (e.g.
      ``{'train': True}`` to enable dropout).

  Returns:
    ``fun(params, example, key=None)``, where ``example`` is ``(inputs,
    labels)`` with a leading axis of size 1 and ``key`` is this example's
    PRNG key (None for a model that draws no randomness).

  Raises:
    ValueError: on a bad argument, a ``'batch_stats'`` collection in
      ``state``, or, when the function is first traced, a model that uses
      ``nn.BatchNorm``.

  Privacy:
    See the module docstring: only ``params`` are trained; ``state`` is
    constant.
  """
  _check_linen_module(module)
  _check_per_example_loss(per_example_loss)
  state = _check_linen_state(state)
  rng_streams = _check_rng_streams(rng_streams)
  apply_kwargs = _check_kwargs('apply_kwargs', apply_kwargs)

  def loss(params, example, key=None):
    inputs, labels = _split_example(example)
    outputs = _linen_apply(
        module, params, state, inputs, key, rng_streams, apply_kwargs
    )
    return _mean_loss(per_example_loss, outputs, labels)

  return loss


def linen_loss_wrapper(
    module: nn.Module,
    per_example_loss: PerExampleLoss,
    *,
    metrics_fn: MetricsFn | None = None,
    rng_streams: Sequence[str] = ('dropout',),
    apply_kwargs: Mapping[str, Any] | None = None,
) -> typing.LossFn:
  """A Linen model as the loss wrapper of the ``dp_sgd`` gradient computers.

  Args:
    module: the Linen module.
    per_example_loss: see :func:`linen_loss`.
    metrics_fn: optional ``(outputs, labels) -> {name: value}``; each value is
      averaged over the batch by the computer (``Metrics.scalars_avg``, next
      to ``'loss'``).
    rng_streams: see :func:`linen_loss`.
    apply_kwargs: see :func:`linen_loss`.

  Returns:
    ``loss_fn(params, network_state, rng, inputs) -> (loss, (network_state,
    metrics))``, where ``network_state`` holds the non-parameter collections
    (``{}`` for none; from :func:`linen_split_variables`) and is returned
    unchanged, and ``inputs`` is ``(x, y)`` of one example.

  Raises:
    ValueError: on a bad argument; at trace time, on a ``'batch_stats'``
      collection or a model that uses ``nn.BatchNorm``.

  Privacy:
    See the module docstring; the metrics are not private.
  """
  _check_linen_module(module)
  _check_per_example_loss(per_example_loss)
  rng_streams = _check_rng_streams(rng_streams)
  apply_kwargs = _check_kwargs('apply_kwargs', apply_kwargs)

  def loss_fn(params, network_state, rng, inputs):
    state = _check_linen_state(network_state)
    x, labels = _split_example(inputs)
    outputs = _linen_apply(
        module, params, state, x, rng, rng_streams, apply_kwargs
    )
    loss = _mean_loss(per_example_loss, outputs, labels)
    return loss, (network_state, _metrics(loss, metrics_fn, outputs, labels))

  return loss_fn


# ----------------------------------------------------------------------------
# NNX
# ----------------------------------------------------------------------------


def _check_nnx_module(module) -> None:
  if not isinstance(module, nnx.Module):
    raise ValueError(
        f'module must be a flax.nnx.Module, got {type(module).__name__}; '
        'for a Linen module use linen_loss / linen_loss_wrapper'
    )
  found = [
      (path, node)
      for path, node in nnx.iter_graph(module)
      if isinstance(node, (nnx.BatchNorm, nnx.BatchStat))
  ]
  if found:
    # The outermost offender: the BatchNorm layer rather than its statistics.
    path, node = min(found, key=lambda item: len(item[0]))
    what = (
        'nnx.BatchNorm'
        if isinstance(node, nnx.BatchNorm)
        else 'batch statistics (nnx.BatchStat)'
    )
    where = '.'.join(str(p) for p in path) or 'the module'
    raise ValueError(
        f'the model uses {what} (at {where}): {_BATCH_NORM_MESSAGE}'
    )


def nnx_split_params(
    module: nnx.Module, *, trainable: Any = nnx.Param
) -> tuple[dict, dict]:
  """The trainable parameters and the other state of an NNX module.

  Args:
    module: the NNX module.
    trainable: an NNX filter selecting the parameters to train among the
      ``nnx.Param`` variables (e.g. ``nnx.LoRAParam`` for LoRA adapters
      only); the others are frozen. Variables that are not ``nnx.Param`` are
      never trainable.

  Returns:
    ``(params, network_state)`` as plain nested dicts of arrays: the values
    of the selected ``nnx.Param`` variables (what is trained and clipped),
    and of every other variable except RNG state, frozen parameters
    included (read-only; the ``network_state`` of :func:`nnx_loss_wrapper`).

  Raises:
    ValueError: if ``module`` is not an NNX module or uses batch
      normalization, or ``trainable`` is not a filter or selects no
      parameter.
  """
  _check_nnx_module(module)
  _, params, _, rest = _flax_nnx.split(module, trainable)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def nnx_update_params(
    module: nnx.Module,
    params: dict,
    network_state: dict | None = None,
    *,
    trainable: Any = nnx.Param,
) -> nnx.Module:
  """Writes (trained) parameters back into ``module``, in place.

  Args:
    module: the NNX module the parameters were split from.
    params: parameters with the structure :func:`nnx_split_params` returns
      (e.g. ``state.params`` of a :class:`~jax_privacy.training.DPTrainer`).
    network_state: optionally, the other state, likewise.
    trainable: the filter ``params`` were split with.

  Returns:
    ``module`` (updated in place), for chaining.

  Raises:
    ValueError: if a path of ``params`` is not a parameter of ``module``.
  """
  _check_nnx_module(module)
  _, param_state, _, rest = _flax_nnx.split(module, trainable)
  nnx.replace_by_pure_dict(param_state, params)
  nnx.update(module, param_state)
  if network_state is not None:
    nnx.replace_by_pure_dict(rest, network_state)
    nnx.update(module, rest)
  return module


def nnx_loss(
    module: nnx.Module,
    per_example_loss: PerExampleLoss,
    *,
    call_kwargs: Mapping[str, Any] | None = None,
    trainable: Any = nnx.Param,
) -> Callable[..., jax.Array]:
  """The loss of one example of an NNX model, ``fun(params, example, key)``.

  ``nnx.split`` / ``nnx.merge`` are done inside: ``params`` is the plain dict
  of :func:`nnx_split_params`. Pass ``fun`` to ``clipping.clipped_grad(fun,
  batch_argnums=1, prng_argnum=2, ...)`` or ``training.DPTrainer(loss_fn=fun,
  ...)``, and write the trained parameters back with
  :func:`nnx_update_params`.

  The module is snapshotted when ``nnx_loss`` is called: its structure,
  static attributes (e.g. ``deterministic``, set by ``module.train()`` /
  ``module.eval()``) and non-parameter state. Call ``module.train()`` before
  building a training loss with dropout.

  Args:
    module: the NNX module.
    per_example_loss: ``(outputs, labels) -> losses`` for a batch of one
      example; the loss is the mean of what it returns.
    call_kwargs: extra keyword arguments of ``module(inputs, ...)``.
    trainable: which ``nnx.Param`` variables ``params`` holds (see
      :func:`nnx_split_params`), e.g. ``nnx.LoRAParam`` to fine-tune LoRA
      adapters only. The other parameters are frozen at their values in the
      snapshot: constants of ``fun``, with no gradient (per-example or
      other) computed for them.

  Returns:
    ``fun(params, example, key=None)``: ``example`` is ``(inputs, labels)``
    with a leading axis of size 1; ``key`` (this example's PRNG key) seeds
    every RNG stream of the module. With ``key=None`` the streams keep the
    module's current keys, so every call draws the same randomness: pass
    keys whenever the model is stochastic.

  Raises:
    ValueError: on a bad argument, a module that uses batch normalization,
      or a ``trainable`` filter that selects no parameter.

  Privacy:
    Only the selected ``nnx.Param`` variables are trained; other state,
    frozen parameters included, is constant (changes the model makes to it
    during a call are discarded). Frozen weights must not have been fitted
    to the private data outside this mechanism (e.g. pretrained on public
    data).
  """
  _check_per_example_loss(per_example_loss)
  _check_nnx_module(module)
  call = _flax_nnx.NnxCall(
      module, _check_kwargs('call_kwargs', call_kwargs), trainable
  )

  def loss(params, example, key=None):
    inputs, labels = _split_example(example)
    outputs = call(params, None, key, inputs)
    return _mean_loss(per_example_loss, outputs, labels)

  return loss


def nnx_loss_wrapper(
    module: nnx.Module,
    per_example_loss: PerExampleLoss,
    *,
    metrics_fn: MetricsFn | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    trainable: Any = nnx.Param,
) -> typing.LossFn:
  """An NNX model as the loss wrapper of the ``dp_sgd`` gradient computers.

  Args:
    module: the NNX module (snapshotted as in :func:`nnx_loss`).
    per_example_loss: see :func:`nnx_loss`.
    metrics_fn: see :func:`linen_loss_wrapper`.
    call_kwargs: see :func:`nnx_loss`.
    trainable: see :func:`nnx_loss`; split with the same filter.

  Returns:
    ``loss_fn(params, network_state, rng, inputs) -> (loss, (network_state,
    metrics))`` with ``params`` and ``network_state`` as
    :func:`nnx_split_params` returns them; ``network_state`` is returned
    unchanged and ``rng`` seeds the module's RNG streams for this example.

  Raises:
    ValueError: on a bad argument, a module that uses batch normalization,
      or a ``trainable`` filter that selects no parameter.

  Privacy:
    See the module docstring; the metrics are not private.
  """
  _check_per_example_loss(per_example_loss)
  _check_nnx_module(module)
  call = _flax_nnx.NnxCall(
      module, _check_kwargs('call_kwargs', call_kwargs), trainable
  )

  def loss_fn(params, network_state, rng, inputs):
    x, labels = _split_example(inputs)
    outputs = call(params, network_state, rng, x)
    loss = _mean_loss(per_example_loss, outputs, labels)
    return loss, (network_state, _metrics(loss, metrics_fn, outputs, labels))

  return loss_fn
