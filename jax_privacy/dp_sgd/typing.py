"""Types of the gradient-computer API: what a loss wrapper returns."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

PyTree = Any
Inputs = Any
NetworkState = Mapping[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Metrics:
  """Metrics of one example, and how to aggregate them over a batch.

  A loss wrapper returns one ``Metrics`` per example; the gradient computer
  aggregates each dictionary over the (non-padding) examples of the batch.

  Attributes:
    scalars_avg: averaged over the batch (e.g. accuracy).
    scalars_sum: summed over the batch (e.g. a count of correct predictions).
    scalars_last: the value of the last example of the batch.
    per_example: stacked along a new leading batch axis (e.g. logits).
  """

  scalars_avg: dict[str, Any] = dataclasses.field(default_factory=dict)
  scalars_sum: dict[str, Any] = dataclasses.field(default_factory=dict)
  scalars_last: dict[str, Any] = dataclasses.field(default_factory=dict)
  per_example: dict[str, Any] = dataclasses.field(default_factory=dict)


LossFn = Callable[
    [PyTree, NetworkState, jax.Array, Inputs],
    tuple[jax.Array, tuple[NetworkState, Metrics]],
]
"""``loss_fn(params, network_state, rng, inputs) -> (loss, (state, metrics))``.

``inputs`` is ONE example, e.g. ``(x, y)``, each with a leading axis of size 1.
"""
