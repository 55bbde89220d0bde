"""Accuracy, per-class accuracy and subgroup disparities of a classifier.

Berrada et al. (2023) ask whether DP training makes a classifier less fair:
besides the overall accuracy they compare the performance of the model on
each subpopulation (classes, or demographic groups of medical images)
between private and non-private training, and look at how far apart the
groups are. This module computes such numbers:

* per-group accuracy (groups default to the classes), the worst and best
  group, the gap between them (``accuracy_gap``), the largest shortfall of
  a group below the overall accuracy (``gap_to_overall``) and the standard
  deviation over groups;
* for binary tasks, AUC overall and per group, and the same gaps;
* :func:`disparity_change`: how much each group loses going from a
  reference (e.g. non-private) model to another (e.g. private) one, and how
  unequal those losses are (Bagdasaryan et al.'s "disparate impact").

Groups with no example are reported as None (not as 0) and ignored by the
worst/best/gap statistics.

Privacy:
  These are evaluations on the test set; they are not private releases. A
  test set drawn from the same people as the training set needs its own
  privacy analysis before the numbers are published.

References:
  Berrada, De, Shen, Hayes, Stanforth, Stutz, Kohli, Smith, Balle,
  "Unlocking Accuracy and Fairness in Differentially Private Image
  Classification", 2023, arXiv:2308.10888. Bagdasaryan, Shmatikov,
  "Differential Privacy Has Disparate Impact on Model Accuracy", 2019,
  arXiv:1905.12101.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import numpy as np


def _check_logits_labels(logits, labels) -> tuple[np.ndarray, np.ndarray]:
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(
        f'logits must have shape [N, num_classes], got {logits.shape}'
    )
  if labels.shape != (logits.shape[0],):
    raise ValueError(
        f'labels must have shape [{logits.shape[0]}] (one per row of '
        f'logits), got {labels.shape}'
    )
  return logits, labels


def _check_positive_int(name: str, value) -> int:
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Integral)
      or value < 1
  ):
    raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
  return int(value)


def accuracy(logits, labels) -> float:
  """Fraction of rows whose largest logit is at the label (top-1).

  Args:
    logits: ``[N, num_classes]``.
    labels: ``[N]`` integer labels.

  Returns:
    The accuracy in [0, 1] (NaN for N = 0).
  """
  logits, labels = _check_logits_labels(logits, labels)
  if not len(labels):
    return math.nan
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def top_k_accuracy(logits, labels, k: int) -> float:
  """Fraction of rows whose label is among the ``k`` largest logits.

  Equal logits are ranked by class index (lower first).
  """
  logits, labels = _check_logits_labels(logits, labels)
  k = _check_positive_int('k', k)
  if not len(labels):
    return math.nan
  top = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def group_accuracy(correct, groups, num_groups: int) -> tuple[np.ndarray,
                                                              np.ndarray]:
  """Accuracy within each group.

  Args:
    correct: ``[N]`` booleans (prediction right or wrong).
    groups: ``[N]`` integer group ids in ``[0, num_groups)``.
    num_groups: the number of groups.

  Returns:
    ``(accuracies [num_groups], counts [num_groups])``; a group with no
    example has accuracy NaN.

  Raises:
    ValueError: on mismatched shapes or group ids out of range.
  """
  num_groups = _check_positive_int('num_groups', num_groups)
  correct = np.asarray(correct, np.float64)
  groups = np.asarray(groups)
  if groups.shape != correct.shape or correct.ndim != 1:
    raise ValueError(
        f'groups must have shape {correct.shape} (one per example), got '
        f'{groups.shape}'
    )
  if groups.size and (
      not np.issubdtype(groups.dtype, np.integer)
      or groups.min() < 0
      or groups.max() >= num_groups
  ):
    raise ValueError(
        f'groups must be integers in [0, {num_groups}), got values in '
        f'[{groups.min()}, {groups.max()}]'
    )
  counts = np.bincount(groups, minlength=num_groups).astype(np.int64)
  hits = np.bincount(groups, weights=correct, minlength=num_groups)
  with np.errstate(invalid='ignore', divide='ignore'):
    accuracies = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
  return accuracies, counts


def per_class_accuracy(logits, labels, num_classes: int) -> np.ndarray:
  """Accuracy on the examples of each class (NaN for an absent class).

  Args:
    logits: ``[N, num_classes]``.
    labels: ``[N]`` integer labels in ``[0, num_classes)``.
    num_classes: the number of classes.

  Returns:
    ``[num_classes]`` accuracies (the recall of each class).
  """
  logits, labels = _check_logits_labels(logits, labels)
  correct = np.argmax(logits, axis=-1) == labels
  return group_accuracy(correct, labels, num_classes)[0]


def disparities(per_group, overall: float) -> dict[str, float]:
  """Summaries of how unequal per-group scores are.

  Args:
    per_group: per-group scores (accuracy or AUC); NaN entries (empty
      groups) are ignored.
    overall: the score on the whole test set.

  Returns:
    ``worst``, ``best``, ``gap`` (best - worst), ``gap_to_overall`` (the
    largest ``overall - group``, i.e. how far the worst group falls below
    the overall score; negative when every group is above it) and ``std``
    (population standard deviation over groups). NaN when no group has
    examples.
  """
  scores = np.asarray(per_group, np.float64)
  scores = scores[~np.isnan(scores)]
  if not scores.size:
    return {name: math.nan for name in
            ('worst', 'best', 'gap', 'gap_to_overall', 'std')}
  return {
      'worst': float(scores.min()),
      'best': float(scores.max()),
      'gap': float(scores.max() - scores.min()),
      'gap_to_overall': float(overall - scores.min()),
      'std': float(scores.std()),
  }


def binary_auc(scores, labels) -> float:
  """Area under the ROC curve of ``scores`` for binary ``labels``.

  The Mann-Whitney statistic: the probability that a random positive
  scores above a random negative, ties counting one half.

  Args:
    scores: ``[N]`` real scores (higher = more likely positive).
    labels: ``[N]`` in {0, 1}.

  Returns:
    The AUC in [0, 1]; NaN when a class is absent.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.shape != labels.shape or scores.ndim != 1:
    raise ValueError(
        f'scores and labels must have the same shape [N], got {scores.shape} '
        f'and {labels.shape}'
    )
  if labels.size and not np.all((labels == 0) | (labels == 1)):
    raise ValueError('labels must be 0 or 1 for binary_auc')
  positives = int(np.sum(labels == 1))
  negatives = len(labels) - positives
  if not positives or not negatives:
    return math.nan
  order = np.argsort(scores, kind='stable')
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  # Average 1-based ranks over runs of tied scores.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
  ends = np.r_[starts[1:], len(scores)]
  for start, end in zip(starts, ends):
    ranks[order[start:end]] = 0.5 * (start + 1 + end)
  rank_sum = ranks[labels == 1].sum()
  return float(
      (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
  )


def _json_list(values) -> list[float | None]:
  return [None if math.isnan(v) else float(v) for v in values]


def _batched_logits(logits_fn, images, batch_size: int) -> np.ndarray:
  """``logits_fn`` over ``images`` in batches of exactly ``batch_size``
  (the last one padded by repeating its first row), so a jitted function
  compiles once."""
  outputs = []
  for start in range(0, len(images), batch_size):
    batch = np.asarray(images[start : start + batch_size])
    size = len(batch)
    if size < batch_size:
      pad = np.repeat(batch[:1], batch_size - size, axis=0)
      batch = np.concatenate([batch, pad])
    outputs.append(np.asarray(logits_fn(batch))[:size])
  return np.concatenate(outputs)


def evaluate(
    logits_fn: Callable[[Any], Any],
    images,
    labels,
    *,
    num_classes: int,
    batch_size: int,
    groups=None,
    num_groups: int | None = None,
) -> dict[str, Any]:
  """Accuracy, per-class accuracy and subgroup disparities on a test set.

  Args:
    logits_fn: ``logits_fn(images [batch_size, H, W, C]) -> logits
      [batch_size, num_classes]`` (e.g. a jitted model apply). It always
      receives ``batch_size`` images (the last batch is padded).
    images: ``[N, H, W, C]`` (NumPy or memory-mapped).
    labels: ``[N]`` integer labels.
    num_classes: the number of classes.
    batch_size: the evaluation batch size.
    groups: ``[N]`` subgroup ids (e.g. demographic groups), or None to use
      the classes as groups.
    num_groups: the number of groups (default: ``max(groups) + 1``).

  Returns:
    A JSON-ready dict: ``num_examples``, ``accuracy``, ``loss`` (mean
    cross-entropy), ``per_class_accuracy`` (list, None for an absent
    class), ``worst_class_accuracy``, ``class_accuracy_gap``,
    ``per_group_accuracy``, ``group_counts``, ``worst_group_accuracy``,
    ``best_group_accuracy``, ``accuracy_gap`` (best - worst group),
    ``gap_to_overall`` (overall - worst group), ``group_accuracy_std``;
    for ``num_classes == 2`` also ``auc``, ``per_group_auc``,
    ``worst_group_auc``, ``auc_gap``; with 5 or more classes
    ``top5_accuracy``.

  Raises:
    ValueError: on mismatched lengths, labels or groups out of range, or
      bad ``num_classes`` / ``batch_size``.
  """
  num_classes = _check_positive_int('num_classes', num_classes)
  batch_size = _check_positive_int('batch_size', batch_size)
  labels = np.asarray(labels)
  if len(images) != len(labels):
    raise ValueError(
        f'images and labels must have the same length, got {len(images)} '
        f'and {len(labels)}'
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f'labels must be in [0, {num_classes}), got values in '
        f'[{labels.min()}, {labels.max()}]'
    )
  if not len(labels):
    raise ValueError('evaluate needs at least one example, got 0')
  logits = _batched_logits(logits_fn, images, batch_size)
  if logits.shape != (len(labels), num_classes):
    raise ValueError(
        f'logits_fn must return [batch, num_classes={num_classes}] logits, '
        f'got shape {logits.shape[1:]} per example'
    )
  logits = logits.astype(np.float64)
  correct = np.argmax(logits, axis=-1) == labels
  overall = float(np.mean(correct))
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  loss = float(-np.mean(log_probs[np.arange(len(labels)), labels]))

  class_acc, _ = group_accuracy(correct, labels, num_classes)
  class_stats = disparities(class_acc, overall)
  if groups is None:
    groups, num_groups = labels, num_classes
  else:
    groups = np.asarray(groups)
    if num_groups is None:
      num_groups = int(groups.max()) + 1 if groups.size else 1
  group_acc, counts = group_accuracy(correct, groups, num_groups)
  group_stats = disparities(group_acc, overall)
  out = {
      'num_examples': int(len(labels)),
      'accuracy': overall,
      'loss': loss,
      'per_class_accuracy': _json_list(class_acc),
      'worst_class_accuracy': class_stats['worst'],
      'class_accuracy_gap': class_stats['gap'],
      'per_group_accuracy': _json_list(group_acc),
      'group_counts': [int(c) for c in counts],
      'worst_group_accuracy': group_stats['worst'],
      'best_group_accuracy': group_stats['best'],
      'accuracy_gap': group_stats['gap'],
      'gap_to_overall': group_stats['gap_to_overall'],
      'group_accuracy_std': group_stats['std'],
  }
  if num_classes >= 5:
    out['top5_accuracy'] = top_k_accuracy(logits, labels, 5)
  if num_classes == 2:
    scores = logits[:, 1] - logits[:, 0]
    auc = binary_auc(scores, labels)
    per_group_auc = np.array([
        binary_auc(scores[groups == g], labels[groups == g])
        for g in range(num_groups)
    ])
    auc_stats = disparities(per_group_auc, auc)
    out.update(
        auc=auc,
        per_group_auc=_json_list(per_group_auc),
        worst_group_auc=auc_stats['worst'],
        auc_gap=auc_stats['gap'],
    )
  return out


def disparity_change(
    evaluation: dict[str, Any], reference: dict[str, Any]
) -> dict[str, Any]:
  """How each group's accuracy changes from a reference model to another.

  Berrada et al. compare a private model to a non-private one trained the
  same way; a model has "disparate impact" when the groups lose unequally
  (Bagdasaryan et al.). Both arguments come from :func:`evaluate` on the
  same test set and groups.

  Args:
    evaluation: the results of the model under study (e.g. DP).
    reference: the results of the reference model (e.g. non-private).

  Returns:
    ``accuracy_drop`` (reference - evaluation, overall),
    ``per_group_drop`` (list, None for empty groups), ``max_group_drop``,
    ``excess_drop`` (largest group drop minus the overall drop) and
    ``accuracy_gap_change`` (how much wider the best-worst gap is).

  Raises:
    ValueError: if the two were evaluated on different groups.
  """
  ours = evaluation['per_group_accuracy']
  theirs = reference['per_group_accuracy']
  if len(ours) != len(theirs) or (
      evaluation['group_counts'] != reference['group_counts']
  ):
    raise ValueError(
        'evaluation and reference must come from the same test set and '
        f"groups, got group counts {evaluation['group_counts']} and "
        f"{reference['group_counts']}"
    )
  drops = [
      None if a is None or b is None else b - a for a, b in zip(ours, theirs)
  ]
  present = [d for d in drops if d is not None]
  overall_drop = reference['accuracy'] - evaluation['accuracy']
  max_drop = max(present) if present else math.nan
  return {
      'accuracy_drop': overall_drop,
      'per_group_drop': drops,
      'max_group_drop': max_drop,
      'excess_drop': max_drop - overall_drop,
      'accuracy_gap_change': (
          evaluation['accuracy_gap'] - reference['accuracy_gap']
      ),
  }
