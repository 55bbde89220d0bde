"""Parameter averaging (EMA and Polyak) as an optax wrapper.

De et al. (2022) evaluate an exponential moving average (EMA) of the
parameters, which smooths out part of DP-SGD's noise; a Polyak (uniform)
average of the iterates is the classical alternative. Both are functions of the sequence of released (noisy)
parameters, so they are post-processing and cost no privacy.

:func:`with_parameter_averages` wraps any optax optimizer. The averages
live in its state, so a :class:`jax_privacy.training.DPTrainer` built with
the wrapped optimizer checkpoints and resumes them with ``opt_state`` at no
extra work, and :func:`averaged_params` reads them back::

    optimizer = with_parameter_averages(optax.sgd(4.0), ema_decay=0.9999)
    trainer = DPTrainer(loss_fn=loss, config=config, optimizer=optimizer,
                        sampling_seed=0)
    state = trainer.fit(data, trainer.init(params))
    averages = averaged_params(state.opt_state)  # {'ema': ..., 'polyak': ...}

Privacy:
  The averages are computed from the parameters after each noisy update,
  i.e. from the outputs of the DP mechanism only (post-processing): they
  are as private as the final parameters, whatever the decay or start.

References:
  De, Berrada, Hayes, Smith, Balle, "Unlocking High-Accuracy Differentially
  Private Image Classification through Scale", 2022, arXiv:2204.13650.
  Polyak and Juditsky, "Acceleration of Stochastic Approximation by
  Averaging", SIAM J. Control Optim. 30(4), 1992.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class ParameterAveragesState(NamedTuple):
  """State of :func:`with_parameter_averages`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    count: number of updates applied so far (int32 scalar).
    ema: the exponential moving average of the parameters, or
      ``optax.EmptyState()`` when it is off.
    polyak: the Polyak average of the parameters, or ``optax.EmptyState()``
      when it is off.
  """

  inner_state: optax.OptState
  count: jax.Array
  ema: PyTree
  polyak: PyTree


def _check_settings(ema_decay, polyak_start_step, ema_warmup) -> None:
  if ema_decay is not None:
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, numbers.Real):
      raise ValueError(
          f'ema_decay must be None or a number in (0, 1), got {ema_decay!r}'
      )
    if math.isnan(ema_decay) or not 0.0 < ema_decay < 1.0:
      raise ValueError(f'ema_decay must be in (0, 1), got {ema_decay}')
  if polyak_start_step is not None and (
      isinstance(polyak_start_step, bool)
      or not isinstance(polyak_start_step, numbers.Integral)
      or polyak_start_step < 0
  ):
    raise ValueError(
        'polyak_start_step must be None or an integer >= 0, got '
        f'{polyak_start_step!r}'
    )
  if not isinstance(ema_warmup, bool):
    raise ValueError(f'ema_warmup must be a bool, got {ema_warmup!r}')


def _average_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def _copy_as_average(params: PyTree) -> PyTree:
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(p, _average_dtype(p.dtype)) if _is_float(p)
      else jnp.asarray(p),
      params,
  )


def _mix(average, new, weight_of_new):
  """``average + weight * (new - average)`` for float leaves; else ``new``."""
  def leaf(avg, value):
    if not _is_float(avg):
      return jnp.asarray(value, avg.dtype)
    value = value.astype(avg.dtype)
    return avg + weight_of_new.astype(avg.dtype) * (value - avg)

  return jax.tree_util.tree_map(leaf, average, new)


def ema_decay_at(count: jax.Array, ema_decay: float, warmup: bool) -> jax.Array:
  """The decay used by the update that follows ``count`` earlier updates.

  With ``warmup`` it is ``min(ema_decay, (1 + count) / (10 + count))``: the
  first updates use a short memory (0.1, 0.18, 0.25, ...), so that the
  average quickly forgets the random initialisation, and the decay reaches
  ``ema_decay`` after about ``10 / (1 - ema_decay)`` steps. This is the
  warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``,
  the usual choice for parameter EMAs.

  Args:
    count: the number of updates before this one (a scalar).
    ema_decay: the target decay, in (0, 1).
    warmup: whether to warm up.

  Returns:
    The decay, a float32 scalar.
  """
  decay = jnp.asarray(ema_decay, jnp.float32)
  if not warmup:
    return decay
  count = jnp.asarray(count, jnp.float32)
  return jnp.minimum(decay, (1.0 + count) / (10.0 + count))


def with_parameter_averages(
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float | None = 0.9999,
    polyak_start_step: int | None = 0,
    ema_warmup: bool = True,
) -> optax.GradientTransformation:
  """Wraps ``optimizer`` to keep EMA and Polyak averages of the parameters.

  The updates are those of ``optimizer``, unchanged. After update ``t``
  (``t = 1, 2, ...``) the new parameters ``p_t = params + updates`` enter
  the averages:

  * EMA: ``ema_t = d_t * ema_{t-1} + (1 - d_t) * p_t`` with ``ema_0`` the
    initial parameters and ``d_t = ema_decay_at(t - 1, ema_decay,
    ema_warmup)`` (see :func:`ema_decay_at`).
  * Polyak: the uniform mean of ``p_t`` over ``polyak_start_step < t``;
    before that (and before any update) it is the current parameters.

  Float averages are kept in at least float32 (so that bfloat16 models do
  not lose the small EMA increments); other leaves are copied.

  This transformation must be the LAST in the chain (the optimizer handed
  to ``DPTrainer``, or the last element of ``optax.chain``), so that
  ``params + updates`` is the next parameters; it needs ``params`` in
  ``update``.

  Args:
    optimizer: the optax optimizer to wrap.
    ema_decay: the EMA decay in (0, 1), or None for no EMA. The average
      spans about ``1 / (1 - ema_decay)`` steps, so a long run wants a
      decay closer to 1.
    polyak_start_step: average the parameters after the updates numbered
      above this (0: all of them), or None for no Polyak average.
    ema_warmup: use the warm-up decay ``min(ema_decay, (1 + t) / (10 +
      t))``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ParameterAveragesState`.

  Raises:
    ValueError: on an ``ema_decay`` outside (0, 1), a negative or
      non-integer ``polyak_start_step``, a non-bool ``ema_warmup``; at
      update time, when ``params`` is not given.

  Privacy:
    Post-processing of the released parameters: no privacy cost.
  """
  _check_settings(ema_decay, polyak_start_step, ema_warmup)

  def init_fn(params):
    return ParameterAveragesState(
        inner_state=optimizer.init(params),
        count=jnp.zeros((), jnp.int32),
        ema=optax.EmptyState() if ema_decay is None
        else _copy_as_average(params),
        polyak=optax.EmptyState() if polyak_start_step is None
        else _copy_as_average(params),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          'with_parameter_averages needs params in update(updates, state, '
          'params) to average the parameters'
      )
    updates, inner_state = optimizer.update(updates, state.inner_state, params)
    new_params = optax.apply_updates(params, updates)
    count = state.count
    ema = state.ema
    if ema_decay is not None:
      decay = ema_decay_at(count, ema_decay, ema_warmup)
      ema = _mix(ema, new_params, 1.0 - decay)
    polyak = state.polyak
    if polyak_start_step is not None:
      # Number of updates averaged so far, this one included; before the
      # start the "average" follows the parameters (weight 1).
      averaged = jnp.maximum(count + 1 - polyak_start_step, 1)
      polyak = _mix(polyak, new_params, 1.0 / averaged.astype(jnp.float32))
    return updates, ParameterAveragesState(
        inner_state=inner_state,
        count=count + 1,
        ema=ema,
        polyak=polyak,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def averaged_params(opt_state: Any) -> dict[str, PyTree]:
  """The averages kept by :func:`with_parameter_averages`.

  Args:
    opt_state: an optimizer state holding exactly one
      :class:`ParameterAveragesState` anywhere inside (e.g. a
      ``DPTrainer``'s ``state.opt_state``, or the whole ``TrainState``).

  Returns:
    ``{'ema': ..., 'polyak': ...}`` with the averages that are on (an empty
    dict when both are off).

  Raises:
    ValueError: if ``opt_state`` holds no :class:`ParameterAveragesState`
      or more than one.
  """
  found = [
      leaf
      for leaf in jax.tree_util.tree_leaves(
          opt_state, is_leaf=lambda x: isinstance(x, ParameterAveragesState)
      )
      if isinstance(leaf, ParameterAveragesState)
  ]
  if len(found) != 1:
    raise ValueError(
        'opt_state must hold exactly one ParameterAveragesState (build the '
        'optimizer with with_parameter_averages), found '
        f'{len(found)}'
    )
  (state,) = found
  out = {}
  if not isinstance(state.ema, optax.EmptyState):
    out['ema'] = state.ema
  if not isinstance(state.polyak, optax.EmptyState):
    out['polyak'] = state.polyak
  return out
