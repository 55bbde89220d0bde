"""TensorFlow Privacy's membership-inference attack API, here.

TF Privacy:

    from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack \
        import membership_inference_attack as mia
    from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack \
        .data_structures import AttackInputData, AttackType, SlicingSpec
    results = mia.run_attacks(
        AttackInputData(loss_train=loss_train, loss_test=loss_test),
        SlicingSpec(entire_dataset=True),
        attack_types=[AttackType.THRESHOLD_ATTACK])
    print(results.summary())

JAX Privacy: per-example losses (or logits) of members and non-members
become scores; `CanaryScoreAuditor` gives AUC, TPR at a low FPR and, beyond
TF Privacy, an epsilon lower bound with a confidence level to compare with
the proven epsilon.

Run: python examples/tf_privacy_migration/membership_inference.py
"""

import numpy as np

from jax_privacy import auditing
from jax_privacy.auditing import membership


def overfit_losses(rng: np.random.Generator, n: int = 2000):
  """Per-example losses of a model that memorised its training set a bit."""
  loss_train = rng.gamma(shape=1.0, scale=0.2, size=n)
  loss_test = rng.gamma(shape=1.0, scale=0.5, size=n)
  return loss_train, loss_test


def main() -> None:
  rng = np.random.default_rng(0)
  loss_train, loss_test = overfit_losses(rng)
  # AttackType.THRESHOLD_ATTACK on losses: the loss-threshold attack.
  auditor = auditing.CanaryScoreAuditor(
      membership.loss_scores(loss_train), membership.loss_scores(loss_test))
  summary = membership.summarize(auditor, fpr=0.01, delta=1e-5)
  print(f'loss threshold attack: AUC {summary.auc:.3f},'
        f' TPR {summary.tpr_at_fpr:.3f} at FPR {summary.fpr:g}')
  print(f'epsilon lower bound (95% confidence, delta 1e-5):'
        f' {summary.epsilon_lower_bound:.3f}'
        f' (Gaussian trade-off: {summary.epsilon_lower_bound_gdp:.3f})')


if __name__ == '__main__':
  main()
