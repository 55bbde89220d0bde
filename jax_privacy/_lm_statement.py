"""Privacy statements naming the unit of privacy of a language-model run.

Private helpers of :mod:`jax_privacy.lm_finetuning`, which re-exports the
public names; import them from there.

References:
  Charles et al., "Fine-Tuning Large Language Models with User-Level
  Differential Privacy", 2024, arXiv:2407.07737.
"""

from __future__ import annotations

import dataclasses
import numbers

from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < minimum
  ):
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
  return int(value)


_KINDS = ('sequence', 'user')
_CLIPPING = ('per_user', 'per_sequence')


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyUnit:
  """What one "neighbour" of the guarantee differs by.

  Attributes:
    kind: ``'sequence'`` or ``'user'``.
    max_tokens: the most tokens one sequence holds (the context), >= 1.
    max_sequences_per_user: ``k`` for ``kind='user'`` (>= 1), else None.
    clipping: for ``kind='user'``: ``'per_user'`` (each example of the
      trainer is a user, :func:`group_by_user`) or ``'per_sequence'`` (each
      example is a sequence and a user's ``k`` sequences are accounted with
      the user-level accountant).
  """

  kind: str = 'sequence'
  max_tokens: int
  max_sequences_per_user: int | None = None
  clipping: str = 'per_user'

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f'kind must be one of {_KINDS}, got {self.kind!r}')
    _check_int('max_tokens', self.max_tokens, 1)
    if self.kind == 'user':
      _check_int('max_sequences_per_user', self.max_sequences_per_user, 1)
      if self.clipping not in _CLIPPING:
        raise ValueError(
            f'clipping must be one of {_CLIPPING}, got {self.clipping!r}'
        )
    elif self.max_sequences_per_user is not None:
      raise ValueError(
          "max_sequences_per_user must be None for kind='sequence', got "
          f'{self.max_sequences_per_user!r}'
      )

  @property
  def description(self) -> str:
    """E.g. ``'one sequence of up to 128 tokens'``."""
    sequence = f'sequence of up to {self.max_tokens} tokens'
    if self.kind == 'sequence':
      return f'one {sequence}'
    k = self.max_sequences_per_user
    plural = 'sequence' if k == 1 else 'sequences'
    return f'one user with up to {k} {plural} (each a {sequence})'


def user_level_epsilon(
    config, max_sequences_per_user: int, *, steps=None
) -> float:
  """User-level epsilon of a per-sequence-clipped run.

  Args:
    config: the run's ``DpsgdExecutionPlanConfig`` over sequences.
    max_sequences_per_user: ``k``, the most sequences one user holds.
    steps: steps run (default: all of the plan's).

  Returns:
    Epsilon at ``config.delta`` for add/remove-one-user neighbours, from
    ``DpsgdTrainingUserLevelAccountant`` (PLD, mixture of Gaussians).

  Privacy:
    Assumes Poisson sampling of sequences and per-sequence clipping; a user
    adds or removes up to ``k`` sequences, whose clipped gradients may all
    point the same way.

  References:
    Charles et al., "Fine-Tuning Large Language Models with User-Level
    Differential Privacy", 2024, arXiv:2407.07737.
  """
  k = _check_int('max_sequences_per_user', max_sequences_per_user, 1)
  steps = config.iterations if steps is None else _check_int('steps', steps, 0)
  if steps == 0:
    return 0.0
  if config.calibrated_noise_multiplier == 0:
    return float('inf')
  params = analysis.DpParams(
      noise_multipliers=config.calibrated_noise_multiplier,
      num_samples=config.num_examples,
      delta=config.delta,
      batch_size=config.expected_batch_size,
      examples_per_user=k,
  )
  accountant = analysis.DpsgdTrainingUserLevelAccountant(
      accountants.PldAccountantConfig(1e-3)
  )
  return float(accountant.compute_epsilon(steps, params))


def privacy_statement(config, unit: PrivacyUnit, *, steps=None) -> str:
  """The run's guarantee as prose, naming the unit of privacy.

  Args:
    config: the run's ``DpsgdExecutionPlanConfig`` (its ``num_examples``
      counts users for per-user clipping, sequences otherwise).
    unit: the :class:`PrivacyUnit`.
    steps: steps run (default: all of the plan's).

  Returns:
    E.g. "(8, 1e-05)-DP for one sequence of up to 128 tokens: DP-SGD ...".

  Raises:
    ValueError: on a bad ``unit`` or ``steps``.

  Privacy:
    Add/remove-one neighbours with Poisson sampling, for the unit stated.
    For ``PrivacyUnit(kind='user', clipping='per_sequence')`` the epsilon is
    the user-level accountant's; the example-level one is stated next to it.
  """
  if not isinstance(unit, PrivacyUnit):
    raise ValueError(f'unit must be a PrivacyUnit, got {unit!r}')
  steps = config.iterations if steps is None else _check_int('steps', steps, 0)
  sigma = config.calibrated_noise_multiplier
  noun = 'users' if unit.kind == 'user' and unit.clipping == 'per_user' else (
      'sequences'
  )
  mechanism = (
      f'DP-SGD with Poisson sampling of {config.expected_batch_size} '
      f'expected {noun} per step out of {config.num_examples}, noise '
      f'multiplier {sigma:.4g}, clip norm {config.l2_clip_norm:g} per '
      f'{noun[:-1]}, {steps} steps; add/remove-one-{unit.kind} neighbours'
  )
  example_epsilon = config.epsilon_after(steps)
  if unit.kind == 'user' and unit.clipping == 'per_sequence':
    epsilon = user_level_epsilon(
        config, unit.max_sequences_per_user, steps=steps
    )
    extra = (
        f' (user-level accountant; the same run is ({example_epsilon:.4g}, '
        f'{config.delta:g})-DP for one sequence)'
    )
  else:
    epsilon, extra = example_epsilon, ''
  return (
      f'({epsilon:.4g}, {config.delta:g})-DP for {unit.description}: '
      f'{mechanism}{extra}.'
  )
