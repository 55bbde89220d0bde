"""NNX plumbing of :mod:`jax_privacy.flax_api`: splitting, snapshots, keys.

A module is split into four states: the trainable parameters (the
``nnx.Param`` variables a ``trainable`` filter selects), RNG state, and the
rest (frozen parameters and any other variable). Only the first is an
argument of the loss; the rest is a snapshot taken when the loss is built,
so frozen weights enter the traced loss as constants and no gradient of any
kind is computed for them.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp


def trainable_filter(trainable: Any):
  """``nnx.All(nnx.Param, trainable)``: only parameters are ever trained."""
  try:
    nnx.filterlib.to_predicate(trainable)
  except (TypeError, ValueError) as e:
    raise ValueError(
        'trainable must be an NNX filter (a Variable type such as nnx.Param '
        'or nnx.LoRAParam, a path string, a predicate, nnx.All / nnx.Any / '
        f'nnx.Not of filters), got {trainable!r}'
    ) from e
  return nnx.All(nnx.Param, trainable)


def split(module, trainable: Any = nnx.Param):
  """``(graphdef, params, rngs, rest)`` states of ``module``.

  Raises:
    ValueError: if ``trainable`` selects no parameter of ``module``.
  """
  graphdef, params, rngs, rest = nnx.split(
      module, trainable_filter(trainable), nnx.RngState, ...
  )
  if not jax.tree_util.tree_leaves(params):
    raise ValueError(
        f'trainable={trainable!r} selects no nnx.Param of the module, so '
        'there is nothing to train; for nnx.LoRAParam, add adapters first '
        '(nnx.LoRA / nnx.LoRALinear layers)'
    )
  return graphdef, params, rngs, rest


def copy(state):
  """A State with new Variable objects holding the same values.

  ``nnx.split`` returns the module's own Variables and ``nnx.merge`` reuses
  those it is given, so without a copy a call would write (traced) values
  into the user's module or into the loss's snapshot.
  """
  return jax.tree_util.tree_map(lambda leaf: leaf, state)


def filled(template, values: dict):
  """A copy of the State ``template`` with the values of a pure dict."""
  state = copy(template)
  nnx.replace_by_pure_dict(state, values)
  return state


def _as_typed_key(key) -> jax.Array:
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def reseeded(rng_template, key):
  """RNG state where stream ``i`` is keyed by ``fold_in(key, i)``, count 0."""
  if key is None:
    return copy(rng_template)
  key = _as_typed_key(key)
  flat = []
  for i, (path, var) in enumerate(nnx.to_flat_state(rng_template)):
    shape = var.get_value().shape
    if isinstance(var, nnx.RngKey):
      value = jax.random.fold_in(key, i)
      if shape:
        value = jax.random.split(value, shape)
    else:
      value = jnp.zeros(shape, var.get_value().dtype)
    flat.append((path, var.replace(value)))
  return nnx.from_flat_state(flat)


class NnxCall:
  """Calls a snapshot of an NNX module with given params, state and key.

  The caller checks the module (``flax_api._check_nnx_module``) first.
  """

  def __init__(self, module, call_kwargs, trainable: Any = nnx.Param):
    graphdef, params, rngs, rest = split(module, trainable)
    self._graphdef = graphdef
    self._params = copy(params)
    self._rngs = copy(rngs)
    self._rest = copy(rest)
    self._call_kwargs = call_kwargs

  def __call__(self, params, network_state, key, inputs):
    rest = (
        copy(self._rest)
        if network_state is None
        else filled(self._rest, network_state)
    )
    model = nnx.merge(
        self._graphdef,
        filled(self._params, params),
        reseeded(self._rngs, key),
        rest,
    )
    return model(inputs, **self._call_kwargs)
