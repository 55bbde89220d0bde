"""Auditing: empirical lower bounds on the privacy of a training run.

A formal guarantee is only as good as the code that implements it. An audit
inserts canaries (or uses training examples), trains, scores every canary
with an attack (higher score = "was in the training data"), and turns the
scores into attack metrics and epsilon lower bounds with
`CanaryScoreAuditor`. A lower bound above the proven epsilon means a bug.

* `CanaryScoreAuditor` and its threshold strategies (`Bonferroni`,
  `Explicit`, `Split`, `MultiSplit`) and `BootstrapParams`.
* `canaries`: random-gradient and mislabelled-input canaries for a training
  run, and their scores.
* `membership`: membership-inference attacks on a trained model (loss,
  entropy, offline LiRA) and the ROC plot.

See docs/auditing.md for what each bound assumes.
"""

from jax_privacy.auditing import canaries
from jax_privacy.auditing import membership
from jax_privacy.auditing._auditor import CanaryScoreAuditor
from jax_privacy.auditing._thresholds import BootstrapParams
from jax_privacy.auditing._thresholds import Bonferroni
from jax_privacy.auditing._thresholds import Explicit
from jax_privacy.auditing._thresholds import MultiSplit
from jax_privacy.auditing._thresholds import Split

__all__ = [
    'BootstrapParams',
    'Bonferroni',
    'CanaryScoreAuditor',
    'Explicit',
    'MultiSplit',
    'Split',
    'canaries',
    'membership',
]
