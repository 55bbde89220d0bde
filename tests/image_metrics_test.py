"""Tests of experiments/image_classification/metrics.py."""

import json
import math

import numpy as np
import pytest

from experiments.image_classification import metrics


def _one_hot_logits(predictions, num_classes):
  return np.eye(num_classes)[np.asarray(predictions)]


# Labels and predictions chosen so every number below is easy to verify.
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
PREDS = np.array([0, 0, 0, 1, 1, 0, 2, 2, 1, 1])
# Class 0: 3/4 right, class 1: 1/2, class 2: 2/4; overall 6/10; class 3 absent.


def test_accuracy_and_per_class():
  logits = _one_hot_logits(PREDS, 4)
  assert metrics.accuracy(logits, LABELS) == pytest.approx(0.6)
  per_class = metrics.per_class_accuracy(logits, LABELS, 4)
  np.testing.assert_allclose(per_class[:3], [0.75, 0.5, 0.5])
  assert math.isnan(per_class[3])


def test_top_k():
  logits = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]])
  labels = np.array([1, 0, 2])
  assert metrics.top_k_accuracy(logits, labels, 1) == 0.0
  assert metrics.top_k_accuracy(logits, labels, 2) == pytest.approx(1 / 3)
  assert metrics.top_k_accuracy(logits, labels, 3) == 1.0
  with pytest.raises(ValueError, match='k must'):
    metrics.top_k_accuracy(logits, labels, 0)


def test_disparities_hand_computed():
  stats = metrics.disparities([0.75, 0.5, np.nan, 0.25], overall=0.6)
  assert stats['worst'] == 0.25 and stats['best'] == 0.75
  assert stats['gap'] == pytest.approx(0.5)
  assert stats['gap_to_overall'] == pytest.approx(0.35)
  assert stats['std'] == pytest.approx(np.std([0.75, 0.5, 0.25]))
  assert all(math.isnan(v) for v in metrics.disparities([np.nan], 0.5).values())


def test_binary_auc_against_pair_counting():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, 40).astype(float)  # Many ties.
  labels = rng.integers(0, 2, 40)
  pos, neg = scores[labels == 1], scores[labels == 0]
  pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
  assert metrics.binary_auc(scores, labels) == pytest.approx(pairs.mean())
  assert metrics.binary_auc([1.0, 2.0], [0, 1]) == 1.0
  assert metrics.binary_auc([1.0, 2.0], [1, 0]) == 0.0
  assert math.isnan(metrics.binary_auc([1.0, 2.0], [1, 1]))
  with pytest.raises(ValueError, match='0 or 1'):
    metrics.binary_auc([1.0, 2.0], [0, 2])


def test_evaluate_groups_default_to_classes_and_batches_are_padded():
  calls = []

  def logits_fn(images):
    calls.append(len(images))
    return _one_hot_logits(images[:, 0, 0, 0].astype(int), 4)

  images = np.zeros((10, 2, 2, 1), np.int32)
  images[:, 0, 0, 0] = PREDS  # The "model" reads its prediction off pixel 0.
  out = metrics.evaluate(logits_fn, images, LABELS, num_classes=4,
                         batch_size=4)
  assert calls == [4, 4, 4]  # 10 examples, last batch padded to 4.
  assert out['num_examples'] == 10
  assert out['accuracy'] == pytest.approx(0.6)
  assert out['per_class_accuracy'] == [0.75, 0.5, 0.5, None]
  assert out['per_group_accuracy'] == out['per_class_accuracy']
  assert out['group_counts'] == [4, 2, 4, 0]
  assert out['worst_class_accuracy'] == out['worst_group_accuracy'] == 0.5
  assert out['best_group_accuracy'] == 0.75
  assert out['accuracy_gap'] == pytest.approx(0.25)
  assert out['gap_to_overall'] == pytest.approx(0.1)
  # Cross-entropy of one-hot logits: log(1 + 3/e) when right, 1 + log(e + 3)
  # when wrong.
  right, wrong = np.log(np.e + 3) - 1, np.log(np.e + 3)
  assert out['loss'] == pytest.approx(0.6 * right + 0.4 * wrong)
  json.dumps(out)  # JSON-ready.


def test_evaluate_with_subgroups():
  images = np.zeros((10, 1, 1, 1), np.float32)
  images[:, 0, 0, 0] = PREDS
  groups = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
  # Group 0: items 0,2,4,6,8 -> right, right, right, right, wrong = 4/5.
  # Group 1: items 1,3,5,7,9 -> right, wrong, wrong, right, wrong = 2/5.
  out = metrics.evaluate(
      lambda x: _one_hot_logits(x[:, 0, 0, 0].astype(int), 3),
      images, LABELS, num_classes=3, batch_size=16, groups=groups,
  )
  assert out['per_group_accuracy'] == pytest.approx([0.8, 0.4])
  assert out['worst_group_accuracy'] == pytest.approx(0.4)
  assert out['accuracy_gap'] == pytest.approx(0.4)
  assert out['gap_to_overall'] == pytest.approx(0.2)
  assert out['group_accuracy_std'] == pytest.approx(0.2)
  assert out['per_class_accuracy'] == pytest.approx([0.75, 0.5, 0.5])
  assert 'top5_accuracy' not in out and 'auc' not in out


def test_evaluate_binary_auc_per_group():
  scores = np.array([0.1, 0.9, 0.4, 0.6, 0.8, 0.2, 0.3, 0.7])
  labels = np.array([0, 1, 0, 1, 0, 1, 1, 0])
  groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  logits = np.stack([np.zeros(8), scores], axis=1)
  images = np.arange(8, dtype=np.float32).reshape(8, 1, 1, 1)
  out = metrics.evaluate(
      lambda x: logits[x[:, 0, 0, 0].astype(int)], images, labels,
      num_classes=2, batch_size=3, groups=groups,
  )
  # Group 0 is perfectly ranked; in group 1 both positives (0.2, 0.3) score
  # below both negatives (0.8, 0.7).
  assert out['per_group_auc'] == [1.0, 0.0]
  assert out['auc_gap'] == 1.0 and out['worst_group_auc'] == 0.0
  assert out['auc'] == pytest.approx(metrics.binary_auc(scores, labels))


def test_evaluate_bad_inputs():
  fn = lambda x: np.zeros((len(x), 3))
  images = np.zeros((4, 1, 1, 1))
  with pytest.raises(ValueError, match='same length'):
    metrics.evaluate(fn, images, [0, 1, 2], num_classes=3, batch_size=2)
  with pytest.raises(ValueError, match=r'\[0, 3\)'):
    metrics.evaluate(fn, images, [0, 1, 2, 3], num_classes=3, batch_size=2)
  with pytest.raises(ValueError, match='batch_size'):
    metrics.evaluate(fn, images, [0, 1, 2, 0], num_classes=3, batch_size=0)
  with pytest.raises(ValueError, match='num_classes=4'):
    metrics.evaluate(fn, images, [0, 1, 2, 0], num_classes=4, batch_size=2)
  with pytest.raises(ValueError, match='groups'):
    metrics.evaluate(fn, images, [0, 1, 2, 0], num_classes=3, batch_size=2,
                     groups=[0, 1, 2, 3], num_groups=2)
  with pytest.raises(ValueError, match='logits must'):
    metrics.accuracy(np.zeros(3), np.zeros(3))


def test_disparity_change():
  reference = {'accuracy': 0.9, 'per_group_accuracy': [0.95, 0.85, None],
               'group_counts': [5, 5, 0], 'accuracy_gap': 0.1}
  private = {'accuracy': 0.7, 'per_group_accuracy': [0.8, 0.6, None],
             'group_counts': [5, 5, 0], 'accuracy_gap': 0.2}
  change = metrics.disparity_change(private, reference)
  assert change['accuracy_drop'] == pytest.approx(0.2)
  assert change['per_group_drop'][:2] == pytest.approx([0.15, 0.25])
  assert change['per_group_drop'][2] is None
  assert change['max_group_drop'] == pytest.approx(0.25)
  assert change['excess_drop'] == pytest.approx(0.05)
  assert change['accuracy_gap_change'] == pytest.approx(0.1)
  with pytest.raises(ValueError, match='same test set'):
    metrics.disparity_change(private, dict(reference, group_counts=[4, 6, 0]))
