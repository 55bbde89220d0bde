"""Privacy accounting of DP training, built on dp_accounting.

* `accountants`: which accounting mathematics to use (RDP or PLD).
* `analysis`: the privacy settings of a run (`DpParams`) and training
  accountants that compute its epsilon.
* `calibrate`: the noise multiplier, number of updates or batch size that
  meets a target (epsilon, delta).
* `statements`: `dp_sgd_privacy_statement`, the guarantee of a run stated
  for Poisson and for shuffled batches (TensorFlow Privacy's arguments).

The DpEvent factories of `jax_privacy.experimental.accounting` are also
importable from here (`accounting.dpsgd_event(...)`).
"""

from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate
from jax_privacy.accounting import statements
from jax_privacy.experimental.accounting import amplified_bandmf_event
from jax_privacy.experimental.accounting import dpsgd_event
from jax_privacy.experimental.accounting import fixed_dpsgd_event
from jax_privacy.experimental.accounting import truncated_amplified_bandmf_event
from jax_privacy.experimental.accounting import truncated_dpsgd_event

__all__ = [
    'accountants',
    'amplified_bandmf_event',
    'analysis',
    'calibrate',
    'dpsgd_event',
    'fixed_dpsgd_event',
    'statements',
    'truncated_amplified_bandmf_event',
    'truncated_dpsgd_event',
]
