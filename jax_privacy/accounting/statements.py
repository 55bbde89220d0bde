"""A privacy statement for a DP-SGD run, from the settings users report.

`dp_sgd_privacy_statement` takes the arguments of TensorFlow Privacy's
`compute_dp_sgd_privacy_statement` (number of examples, batch size, epochs,
noise multiplier, delta, microbatching, examples per user) and states the
guarantee twice, because the two usual ways of drawing batches have
different guarantees:

* as if batches were Poisson samples (each example joins each batch
  independently with probability q = batch_size / number_of_examples):
  amplified by subsampling, add-or-remove-one neighbours. This is the
  number most papers report, and it is proven ONLY when the batches really
  are Poisson samples. Keras' `fit`, `tf.data` pipelines and most loaders
  shuffle instead;
* for shuffled batches, each example in at most one batch per epoch:
  proven, replace-one neighbours, with no amplification: every epoch is one
  Gaussian release of sensitivity 2C.

Our own samplers (`batch_selection.CyclicPoissonSampling`, the trainer and
the Keras front end by default) draw Poisson batches, so the first number
is the proven one for a run made with them.
"""

import dataclasses
import math
from typing import Literal, Optional

from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis

_ACCOUNTANTS = ('rdp', 'pld')


def _config(accountant: str):
  if accountant == 'rdp':
    return accountants.RdpAccountantConfig()
  return accountants.PldAccountantConfig(1e-3)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpsgdPrivacyStatement:
  """The guarantee of a DP-SGD run under both ways of drawing batches.

  Attributes:
    number_of_examples: Examples in the training data.
    batch_size: (Expected) examples per batch.
    num_epochs: Passes over the data (may be fractional).
    noise_multiplier: Noise stddev over the clip norm.
    delta: The delta of every epsilon here.
    used_microbatching: Gradients were clipped per microbatch of several
      examples (their mean), not per example.
    max_examples_per_user: Largest number of examples of one user, or None.
    accountant: 'rdp' or 'pld' (the Poisson numbers; the shuffled ones are
      exact Gaussian compositions, computed with the same accountant).
    num_steps: ceil(num_epochs * number_of_examples / batch_size).
    epsilon_poisson: Example-level epsilon if batches are Poisson samples
      (add-or-remove-one neighbours). Proven only for Poisson batches.
    epsilon_shuffled: Example-level epsilon for shuffled batches, each
      example at most once per epoch (replace-one neighbours). Proven.
    user_epsilon_poisson: Add-or-remove-one-user epsilon with Poisson
      batches (PLD, mixture of Gaussians), or None without users.
    user_epsilon_shuffled: Replace-one-user epsilon with shuffled batches
      (a user's examples move the epoch's releases by at most 2C times the
      number of their examples, in L2 over the epoch), or None.
  """

  number_of_examples: int
  batch_size: int
  num_epochs: float
  noise_multiplier: float
  delta: float
  used_microbatching: bool
  max_examples_per_user: Optional[int]
  accountant: str
  num_steps: int
  epsilon_poisson: float
  epsilon_shuffled: float
  user_epsilon_poisson: Optional[float]
  user_epsilon_shuffled: Optional[float]

  @property
  def text(self) -> str:
    """The statement as prose, for a paper or a model card."""
    micro = (
        'gradients clipped per microbatch (the sensitivity of a microbatch'
        ' mean doubles under add-or-remove-one, so the Poisson numbers use'
        ' half the noise multiplier)'
        if self.used_microbatching
        else 'gradients clipped per example'
    )
    lines = [
        f'DP-SGD over {self.number_of_examples} examples with'
        f' {self.batch_size} examples per step, noise multiplier'
        f' {self.noise_multiplier:g}, {self.num_epochs:g} epochs'
        f' ({self.num_steps} steps), {micro}; delta = {self.delta:g}.',
        f'Epsilon with each example in at most one batch per epoch'
        f' (shuffled batches; replace-one neighbours; proven):'
        f' {self.epsilon_shuffled:.4g}.',
        f'Epsilon assuming Poisson sampling (add-or-remove-one neighbours,'
        f' {self.accountant.upper()} accounting): {self.epsilon_poisson:.4g}.'
        ' This is proven only if every batch was a Poisson sample;'
        ' for shuffled batches it is a heuristic (arXiv:2403.17673).',
    ]
    if self.max_examples_per_user is not None:
      lines.append(
          f'User level, up to {self.max_examples_per_user} examples per user:'
          f' epsilon {self.user_epsilon_shuffled:.4g} with shuffled batches'
          f' (replace-one-user, proven), {self.user_epsilon_poisson:.4g}'
          ' assuming Poisson sampling (add-or-remove-one-user, PLD).'
      )
    return '\n'.join(lines)

  def __str__(self) -> str:
    return self.text


def _check(name: str, value, ok: bool, accepted: str) -> None:
  if not ok:
    raise ValueError(f'{name} must be {accepted}, got {value!r}.')


def dp_sgd_privacy_statement(
    number_of_examples: int,
    batch_size: int,
    num_epochs: float,
    noise_multiplier: float,
    delta: float,
    used_microbatching: bool = True,
    max_examples_per_user: Optional[int] = None,
    accountant: Literal['rdp', 'pld'] = 'rdp',
) -> DpsgdPrivacyStatement:
  """States the (epsilon, delta) guarantee of a DP-SGD run two ways.

  The arguments are those of TensorFlow Privacy's
  `compute_dp_sgd_privacy_statement`, so a migrating user can state the
  same run here. Both numbers are computed with dp_accounting.

  Args:
    number_of_examples: Examples in the training data, an integer >= 1.
    batch_size: Examples per step, an integer in [1, number_of_examples].
    num_epochs: Passes over the data, > 0 (may be fractional).
    noise_multiplier: Noise stddev over the clip norm, > 0.
    delta: In (0, 1).
    used_microbatching: Whether gradients were clipped per microbatch of more
      than one example (TF Privacy's `num_microbatches` < batch size). Under
      add-or-remove-one neighbours this doubles the sensitivity.
    max_examples_per_user: Largest number of examples one user has, for a
      user-level statement too; an integer >= 1 or None.
    accountant: 'rdp' (as TF Privacy's default) or 'pld' (tighter).

  Returns:
    A `DpsgdPrivacyStatement`; `str()` of it is the prose.

  Raises:
    ValueError: a setting outside its range (the message names it).

  Privacy:
    `epsilon_poisson` is what a run made with our samplers (Poisson by
    default) gets. A run whose batches were shuffled, as TF Privacy's Keras
    optimizers train with `model.fit`, is covered by `epsilon_shuffled`
    only: shuffling is not known to amplify like Poisson sampling, and
    reporting the Poisson number for it is the common heuristic we flag.

  References:
    Ponomareva et al., "How to DP-fy ML", 2023. arXiv:2303.00654 (Sec. 5.3
    reporting, Sec. 5.6 microbatching).
    Chua et al., "How Private are DP-SGD Implementations?", 2024.
    arXiv:2403.17673.
  """
  _check('number_of_examples', number_of_examples,
         isinstance(number_of_examples, int) and number_of_examples >= 1,
         'an integer >= 1')
  _check('batch_size', batch_size,
         isinstance(batch_size, int)
         and 1 <= batch_size <= number_of_examples,
         f'an integer in [1, number_of_examples={number_of_examples}]')
  _check('num_epochs', num_epochs,
         isinstance(num_epochs, (int, float)) and math.isfinite(num_epochs)
         and num_epochs > 0, 'a finite number > 0')
  _check('noise_multiplier', noise_multiplier,
         isinstance(noise_multiplier, (int, float))
         and math.isfinite(noise_multiplier) and noise_multiplier > 0,
         'a finite number > 0')
  _check('delta', delta, isinstance(delta, float) and 0 < delta < 1,
         'a float in (0, 1)')
  _check('max_examples_per_user', max_examples_per_user,
         max_examples_per_user is None
         or (isinstance(max_examples_per_user, int)
             and max_examples_per_user >= 1),
         'None or an integer >= 1')
  _check('accountant', accountant, accountant in _ACCOUNTANTS,
         f'one of {_ACCOUNTANTS}')
  num_steps = max(1, math.ceil(num_epochs * number_of_examples / batch_size))
  # Add-or-remove-one with microbatches: one example can move its
  # microbatch's clipped mean by 2C, the same as halving the noise.
  poisson_noise = noise_multiplier / (2.0 if used_microbatching else 1.0)

  def params(noise, method, examples_per_user=None):
    return analysis.DpParams(
        noise_multipliers=noise,
        num_samples=number_of_examples,
        delta=delta,
        batch_size=batch_size,
        sampling_method=method,
        examples_per_user=examples_per_user,
    )

  poisson = analysis.DpsgdTrainingAccountant(_config(accountant))
  epsilon_poisson = poisson.compute_epsilon(
      num_steps, params(poisson_noise, analysis.SamplingMethod.POISSON))
  # Replace-one: one microbatch (or example) moves the sum by at most 2C
  # either way, so microbatching changes nothing here.
  epsilon_shuffled = poisson.compute_epsilon(
      num_steps, params(noise_multiplier, analysis.SamplingMethod.SHUFFLED))
  user_poisson = user_shuffled = None
  if max_examples_per_user is not None:
    k = max_examples_per_user
    user_poisson = analysis.DpsgdTrainingUserLevelAccountant(
        accountants.PldAccountantConfig(1e-3)
    ).compute_epsilon(
        num_steps,
        params(poisson_noise, analysis.SamplingMethod.POISSON, k),
    )
    # A user's k examples sit in at most k batches of an epoch; replacing
    # them moves the epoch's releases by at most 2C * k in L2 (the squares
    # of the per-batch shifts sum to at most (2Ck)^2): one Gaussian release
    # with noise multiplier sigma / k per epoch, at sensitivity 2C.
    user_shuffled = poisson.compute_epsilon(
        num_steps,
        params(noise_multiplier / k, analysis.SamplingMethod.SHUFFLED),
    )
  return DpsgdPrivacyStatement(
      number_of_examples=number_of_examples,
      batch_size=batch_size,
      num_epochs=float(num_epochs),
      noise_multiplier=float(noise_multiplier),
      delta=delta,
      used_microbatching=bool(used_microbatching),
      max_examples_per_user=max_examples_per_user,
      accountant=accountant,
      num_steps=num_steps,
      epsilon_poisson=float(epsilon_poisson),
      epsilon_shuffled=float(epsilon_shuffled),
      user_epsilon_poisson=user_poisson,
      user_epsilon_shuffled=user_shuffled,
  )
