"""Membership-inference attacks on a trained model, and the ROC plot.

Each attack turns per-example losses or logits into scores (higher = "was a
training example"); `CanaryScoreAuditor(member_scores, non_member_scores)`
then gives the AUC, the TPR at a low FPR and an epsilon lower bound
(`summarize` collects them).

* `loss_scores`: minus the loss (Yeom et al., 2018).
* `entropy_scores`: minus the entropy of the predicted distribution.
* `lira_offline_scores`: offline LiRA (Carlini et al., 2022): the target
  model's logit-scaled confidence, standardised by its mean and spread over
  reference models trained without the example.

Privacy:
  Members must be examples the model was trained on and non-members
  examples from the same distribution it was not trained on (for instance
  train and test splits). The epsilon lower bound then holds for the
  training run as a mechanism on those examples, with the usual caveat that
  training examples are not independent canaries; for a rigorous audit use
  canaries (`auditing.canaries`).

References:
  Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine Learning",
  2018. arXiv:1709.01604.
  Carlini et al., "Membership Inference Attacks From First Principles",
  2022. arXiv:2112.03570.
"""

import dataclasses
import os
from typing import Mapping, Optional

import numpy as np
from scipy import special

from jax_privacy.auditing import _auditor

__all__ = [
    'AttackSummary',
    'entropy_scores',
    'lira_offline_scores',
    'logit_confidence',
    'loss_scores',
    'plot_roc',
    'summarize',
]


def _finite(name, array) -> np.ndarray:
  array = np.asarray(array, dtype=np.float64)
  if array.size == 0:
    raise ValueError(f'{name} must not be empty')
  if not np.all(np.isfinite(array)):
    raise ValueError(f'{name} must be finite, found NaN or infinite values')
  return array


def loss_scores(losses) -> np.ndarray:
  """Minus the per-example loss: members tend to have lower loss."""
  losses = _finite('losses', losses)
  if losses.ndim != 1:
    raise ValueError(f'losses must be 1-D, got shape {losses.shape}')
  return -losses


def entropy_scores(logits) -> np.ndarray:
  """Minus the entropy of softmax(logits) [n, classes]: members are surer."""
  logits = _finite('logits', logits)
  if logits.ndim != 2:
    raise ValueError(f'logits must be [examples, classes], got {logits.shape}')
  log_probs = logits - special.logsumexp(logits, axis=1, keepdims=True)
  return np.sum(np.exp(log_probs) * log_probs, axis=1)


def logit_confidence(logits, labels) -> np.ndarray:
  """log p_y - log(1 - p_y) of the true label, computed stably."""
  logits = _finite('logits', logits)
  labels = np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
        'logits must be [examples, classes] and labels [examples], got'
        f' {logits.shape} and {labels.shape}'
    )
  true = logits[np.arange(len(labels)), labels]
  others = logits.copy()
  others[np.arange(len(labels)), labels] = -np.inf
  return true - special.logsumexp(others, axis=1)


def _confidence_from_loss(losses):
  # For cross-entropy, p = exp(-loss) and log(p / (1 - p)) follows.
  return -losses - np.log(-np.expm1(-np.maximum(losses, 1e-30)))


def lira_offline_scores(
    target_losses, reference_losses, *, min_std: float = 1e-3
) -> np.ndarray:
  """Offline LiRA from cross-entropy losses.

  Args:
    target_losses: [examples] losses of the attacked model.
    reference_losses: [reference_models, examples] losses of models trained
      WITHOUT these examples (on other data from the same distribution).
    min_std: Floor on the per-example spread, > 0.

  Returns:
    [examples] scores (z = (phi - mean_out) / std_out of the logit-scaled
    confidence phi): the one-sided likelihood-ratio test of offline LiRA.
  """
  target = _finite('target_losses', target_losses)
  reference = _finite('reference_losses', reference_losses)
  if reference.ndim != 2 or reference.shape[1:] != target.shape:
    raise ValueError(
        'reference_losses must be [reference_models, examples] matching'
        f' target_losses {target.shape}, got {reference.shape}'
    )
  if reference.shape[0] < 2:
    raise ValueError(
        'reference_losses needs at least 2 reference models to estimate a'
        f' spread, got {reference.shape[0]}'
    )
  phi_target = _confidence_from_loss(target)
  phi_ref = _confidence_from_loss(reference)
  std = np.maximum(np.std(phi_ref, axis=0, ddof=1), min_std)
  return (phi_target - np.mean(phi_ref, axis=0)) / std


@dataclasses.dataclass(frozen=True)
class AttackSummary:
  """What an attack achieved.

  Attributes:
    auc: Area under the ROC curve (0.5 = chance).
    fpr: The false positive rate at which `tpr_at_fpr` is read.
    tpr_at_fpr: Best empirical TPR with empirical FPR <= `fpr`.
    epsilon_lower_bound: Clopper-Pearson (Bonferroni) lower bound at
      `delta`, confidence 1 - `significance`.
    epsilon_lower_bound_gdp: The same assuming a Gaussian trade-off curve.
    significance: Of the bounds.
    delta: Of the bounds.
    num_members: Number of member scores.
    num_non_members: Number of non-member scores.
  """

  auc: float
  fpr: float
  tpr_at_fpr: float
  epsilon_lower_bound: float
  epsilon_lower_bound_gdp: float
  significance: float
  delta: float
  num_members: int
  num_non_members: int


def summarize(
    auditor: _auditor.CanaryScoreAuditor,
    *,
    fpr: float = 0.01,
    significance: float = 0.05,
    delta: float = 1e-5,
) -> AttackSummary:
  """AUC, TPR at `fpr` and epsilon lower bounds of an attack."""
  return AttackSummary(
      auc=auditor.attack_auroc(),
      fpr=fpr,
      tpr_at_fpr=auditor.tpr_at_given_fpr(fpr),
      epsilon_lower_bound=auditor.epsilon_clopper_pearson(
          significance, delta, one_sided=False
      ),
      epsilon_lower_bound_gdp=auditor.epsilon_from_gdp(significance, delta),
      significance=significance,
      delta=delta,
      num_members=len(auditor.in_canary_scores),
      num_non_members=len(auditor.out_canary_scores),
  )


def plot_roc(
    auditors: Mapping[str, _auditor.CanaryScoreAuditor],
    path: str | os.PathLike,
    *,
    title: Optional[str] = None,
) -> None:
  """Writes the attacks' ROC curves (log-log, with chance) as a PNG.

  Needs matplotlib (`pip install 'jax-privacy[plots]'`).
  """
  if not auditors:
    raise ValueError('auditors must name at least one attack')
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  figure, axes = pyplot.subplots(figsize=(5, 5))
  floor = 1.0
  for name, auditor in auditors.items():
    fpr, tpr = auditor.roc_curve()
    floor = min(floor, 1.0 / len(auditor.out_canary_scores))
    axes.plot(
        np.maximum(fpr, 1e-6), np.maximum(tpr, 1e-6),
        label=f'{name} (AUC {auditor.attack_auroc():.3f})',
    )
  axes.plot([floor, 1], [floor, 1], 'k--', linewidth=0.8, label='chance')
  axes.set_xscale('log')
  axes.set_yscale('log')
  axes.set_xlim(floor / 2, 1)
  axes.set_ylim(floor / 2, 1)
  axes.set_xlabel('false positive rate')
  axes.set_ylabel('true positive rate')
  axes.set_title(title or 'Membership inference ROC')
  axes.legend(loc='lower right')
  figure.tight_layout()
  figure.savefig(path, format='png', dpi=100)
  pyplot.close(figure)
