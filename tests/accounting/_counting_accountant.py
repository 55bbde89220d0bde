"""A training accountant that counts its evaluations per PLD grid.

Shared by the calibration tests in this directory (imported by its bare
name: pytest puts this directory on ``sys.path``).
"""

from jax_privacy.accounting import analysis


class CountingAccountant(analysis.DpsgdTrainingAccountant):
  """Counts the evaluations made with each discretization interval.

  A subclass, so calibration never memoizes its results: every evaluation
  is made, and counted in ``calls`` (``{interval: count}``).
  """

  def __init__(self, dp_accountant_config):
    super().__init__(dp_accountant_config)
    self.calls = {}

  def compute_epsilon(self, num_updates, dp_params,
                      allow_approximate_cache=False):
    interval = self.dp_accountant_config.value_discretization_interval
    self.calls[interval] = self.calls.get(interval, 0) + 1
    return super().compute_epsilon(num_updates, dp_params)
