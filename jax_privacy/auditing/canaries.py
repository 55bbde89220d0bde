"""Canaries for auditing a training run, and their scores after training.

Two kinds:

* Random-gradient canaries (white box): random directions in parameter
  space of L2 norm equal to the clip norm, added as extra per-example
  gradients to the clipped sum of chosen steps, before the noise. The
  auditor then scores each canary by the projection of what it observes
  (the privatized gradients, or the change of the parameters) on its
  direction. This is the strongest audit of the clipping + noise step: each
  canary is an example whose clipped gradient is known exactly.
* Mislabelled-input canaries (black box): real inputs with a wrong label,
  added to the training data; their score is minus the trained model's loss
  on the wrong label (`membership.loss_scores`).

A typical hand-written DP-SGD step with gradient canaries::

    grads = clipped_grad_fn(params, x, y, is_padding_example=pad)
    grads = jax.tree.map(jnp.add, grads,
                         canaries.canary_gradient_sum(cans, included))
    noisy, noise_state = privatizer.update(grads, noise_state)

and, after training, `gradient_canary_scores(sum_of_noisy, cans)` split by
`included` gives the auditor's in and out scores.

Privacy:
  A canary is one more example of the data set: add/remove of a canary is
  the neighbouring relation the accountant covers, provided the canary's
  contribution to every step is at most the clip norm (true by
  construction here) and the canary is treated like the other examples
  (sampled like them, or present in every step with sampling probability 1
  in the accountant).

References:
  Nasr et al., "Tight Auditing of Differentially Private Machine Learning",
  2023. arXiv:2302.07956.
  Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run",
  2023. arXiv:2305.08846.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'canary_gradient_sum',
    'choose_included',
    'gradient_canary_scores',
    'mislabelled_canaries',
    'random_gradient_canaries',
]


def random_gradient_canaries(
    params: Any,
    num_canaries: int,
    *,
    l2_norm: float,
    seed: int | np.random.Generator | None = 0,
) -> Any:
  """Random directions shaped like `params`, each of L2 norm `l2_norm`.

  Drawn on the host with NumPy (a canary is a fixed artefact of the audit,
  not part of the mechanism), uniformly on the sphere of radius `l2_norm`
  over the whole tree.

  Args:
    params: A pytree of arrays (only shapes and dtypes are used).
    num_canaries: Number of canaries, >= 1.
    l2_norm: The norm of each canary over the whole tree, > 0; use the clip
      norm so that a canary is a worst-case example.
    seed: Seed or `np.random.Generator` of the directions.

  Returns:
    A pytree like `params` (JAX arrays) with a leading axis of size
    `num_canaries`.
  """
  if int(num_canaries) != num_canaries or num_canaries < 1:
    raise ValueError(
        f'num_canaries must be an integer >= 1, got {num_canaries}'
    )
  if not l2_norm > 0 or not np.isfinite(l2_norm):
    raise ValueError(f'l2_norm must be a finite number > 0, got {l2_norm}')
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(params)
  draws = [
      rng.standard_normal((num_canaries,) + np.shape(leaf), dtype=np.float32)
      for leaf in leaves
  ]
  squared = sum(np.sum(d.reshape(num_canaries, -1) ** 2, axis=1) for d in draws)
  scale = l2_norm / np.sqrt(squared)
  scaled = [
      jnp.asarray(
          d * scale.reshape((-1,) + (1,) * (d.ndim - 1)),
          dtype=jnp.result_type(leaf),
      )
      for d, leaf in zip(draws, leaves)
  ]
  return jax.tree.unflatten(treedef, scaled)


def canary_gradient_sum(canaries: Any, included: jax.typing.ArrayLike) -> Any:
  """The sum of the included canaries: add it to the clipped gradient sum.

  Args:
    canaries: From `random_gradient_canaries` (leading canary axis).
    included: Boolean or 0/1 mask of shape [num_canaries] saying which
      canaries take part in this step.

  Returns:
    A pytree shaped like one canary.
  """
  mask = jnp.asarray(included)
  first = jax.tree.leaves(canaries)[0]
  if mask.shape != first.shape[:1]:
    raise ValueError(
        f'included must have shape ({first.shape[0]},) (one entry per'
        f' canary), got {mask.shape}'
    )
  return jax.tree.map(
      lambda c: jnp.tensordot(mask.astype(c.dtype), c, axes=1), canaries
  )


def gradient_canary_scores(observed: Any, canaries: Any) -> np.ndarray:
  """Projection of an observed gradient-like tree on each canary direction.

  Args:
    observed: A pytree shaped like one canary, e.g. the sum over steps of the
      privatized gradients, or (params_initial - params_final) / lr for SGD.
    canaries: From `random_gradient_canaries`.

  Returns:
    NumPy array [num_canaries]: <observed, c_i> / ||c_i||. Included canaries
    have a larger expected score (by the clip norm per step they were in).
  """
  obs_leaves = jax.tree.leaves(observed)
  can_leaves = jax.tree.leaves(canaries)
  if len(obs_leaves) != len(can_leaves):
    raise ValueError(
        'observed must have the structure of one canary: got'
        f' {len(obs_leaves)} leaves, the canaries have {len(can_leaves)}'
    )
  num = can_leaves[0].shape[0]
  flat_canaries = np.concatenate(
      [np.asarray(c, np.float64).reshape(num, -1) for c in can_leaves], axis=1
  )
  flat_observed = np.concatenate(
      [np.asarray(o, np.float64).reshape(-1) for o in obs_leaves]
  )
  if flat_observed.size != flat_canaries.shape[1]:
    raise ValueError(
        'observed must have the shapes of one canary: got'
        f' {flat_observed.size} values, a canary has {flat_canaries.shape[1]}'
    )
  return flat_canaries @ flat_observed / np.linalg.norm(flat_canaries, axis=1)


def choose_included(
    num_canaries: int,
    *,
    seed: int | np.random.Generator | None = 0,
    inclusion_prob: float = 0.5,
) -> np.ndarray:
  """Independent Bernoulli(inclusion_prob) membership, as one-run audits need.

  Returns:
    Boolean array [num_canaries].
  """
  if int(num_canaries) != num_canaries or num_canaries < 1:
    raise ValueError(
        f'num_canaries must be an integer >= 1, got {num_canaries}'
    )
  if not 0 < inclusion_prob < 1:
    raise ValueError(
        f'inclusion_prob must be in (0, 1), got {inclusion_prob}'
    )
  rng = np.random.default_rng(seed)
  return rng.random(num_canaries) < inclusion_prob


def mislabelled_canaries(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    num_canaries: int,
    seed: int | np.random.Generator | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Inputs drawn without replacement, each given a different random label.

  Draw them from data that is not otherwise in the training set (a held-out
  split), so that a canary is in the training data only if you insert it.

  Returns:
    (canary_features, canary_labels), the labels never equal to the true
    ones.
  """
  labels = np.asarray(labels)
  if len(features) != len(labels):
    raise ValueError(
        f'features and labels must have the same length, got {len(features)}'
        f' and {len(labels)}'
    )
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f'num_classes must be an integer >= 2, got {num_classes}')
  if not 1 <= num_canaries <= len(labels):
    raise ValueError(
        f'num_canaries must be in [1, {len(labels)}] (the number of'
        f' examples), got {num_canaries}'
    )
  rng = np.random.default_rng(seed)
  chosen = rng.choice(len(labels), size=num_canaries, replace=False)
  shift = rng.integers(1, num_classes, size=num_canaries)
  return np.asarray(features)[chosen], (labels[chosen] + shift) % num_classes
