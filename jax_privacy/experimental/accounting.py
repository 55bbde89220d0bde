"""DpEvent factories: the mechanisms of DP training, as dp_accounting events.

Each factory describes `iterations` steps of a training mechanism as a
`dp_accounting.DpEvent`, which any dp_accounting accountant that supports it
composes into an (epsilon, delta) guarantee:

>>> import dp_accounting
>>> from jax_privacy.experimental import accounting
>>> event = accounting.dpsgd_event(1.1, 1000, sampling_prob=0.01)
>>> accountant = dp_accounting.rdp.RdpAccountant()
>>> epsilon = accountant.compose(event).get_epsilon(1e-5)

Convention: `noise_multiplier` is always the standard deviation of the
Gaussian noise added to the sum of clipped per-example gradients, divided by
the clip norm C (the DP-SGD convention, stddev = noise_multiplier * C). A
noise multiplier of 0 adds no noise; the factories then return
`dp_accounting.NonPrivateDpEvent`, for which every accountant reports an
infinite epsilon.

References:
  Abadi et al., "Deep Learning with Differential Privacy", 2016.
  arXiv:1607.00133.
  Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian
  Mechanism", 2019. arXiv:1908.10530.
  Wang, Balle, Kasiviswanathan, "Subsampled Renyi Differential Privacy and
  Analytical Moments Accountant", AISTATS 2019. arXiv:1808.00087.
"""

import math
import numbers

import dp_accounting


def _check_noise_multiplier(noise_multiplier) -> None:
  if (
      isinstance(noise_multiplier, bool)
      or not isinstance(noise_multiplier, numbers.Real)
      or not math.isfinite(noise_multiplier)
      or noise_multiplier < 0
  ):
    raise ValueError(
        'noise_multiplier must be a finite number >= 0, got'
        f' {noise_multiplier!r}.'
    )


def _check_integer(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  if value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value}.')
  return int(value)


def _check_sampling_prob(sampling_prob) -> float:
  if (
      isinstance(sampling_prob, bool)
      or not isinstance(sampling_prob, numbers.Real)
      or not 0 < sampling_prob <= 1
  ):
    raise ValueError(
        f'sampling_prob must be in (0, 1], got {sampling_prob!r}.'
    )
  return float(sampling_prob)


def _repeat(event: dp_accounting.DpEvent, iterations: int):
  if iterations == 0:
    return dp_accounting.NoOpDpEvent()
  return dp_accounting.SelfComposedDpEvent(event, iterations)


def dpsgd_event(
    noise_multiplier: float, iterations: int, *, sampling_prob: float
) -> dp_accounting.DpEvent:
  """DP-SGD with Poisson sampling, as a DpEvent.

  At each of `iterations` steps every example joins the batch independently
  with probability `sampling_prob`; the clipped gradients of the batch are
  summed and Gaussian noise of standard deviation `noise_multiplier * C` is
  added.

  Privacy:
    Assumes Poisson sampling exactly as described (the batch size is random)
    and add-or-remove-one neighbouring data sets, under which the sum of
    gradients clipped to norm C has L2 sensitivity C. Compose the event with
    `NeighboringRelation.ADD_OR_REMOVE_ONE` (the accountants' default).

  Args:
    noise_multiplier: Noise standard deviation over clip norm, >= 0.
    iterations: Number of steps, an integer >= 0.
    sampling_prob: Probability that an example is in a given batch, in (0, 1].

  Returns:
    `SelfComposedDpEvent(PoissonSampledDpEvent(sampling_prob,
    GaussianDpEvent(noise_multiplier)), iterations)`; a `NoOpDpEvent` for 0
    iterations; a `NonPrivateDpEvent` for a zero noise multiplier.

  Raises:
    ValueError: If an argument is outside the range given above.

  References:
    Abadi et al., 2016. arXiv:1607.00133.
    Mironov, Talwar, Zhang, 2019. arXiv:1908.10530.
  """
  _check_noise_multiplier(noise_multiplier)
  iterations = _check_integer('iterations', iterations, 0)
  sampling_prob = _check_sampling_prob(sampling_prob)
  if iterations and noise_multiplier == 0:
    return dp_accounting.NonPrivateDpEvent()
  step = dp_accounting.PoissonSampledDpEvent(
      sampling_prob, dp_accounting.GaussianDpEvent(float(noise_multiplier))
  )
  return _repeat(step, iterations)


def fixed_dpsgd_event(
    noise_multiplier: float,
    iterations: int,
    *,
    dataset_size: int,
    batch_size: int,
    replace: bool = False,
) -> dp_accounting.DpEvent:
  """DP-SGD with batches of fixed size, as a DpEvent.

  At each of `iterations` steps a batch of exactly `batch_size` examples is
  drawn uniformly from the `dataset_size` examples (without replacement by
  default), and Gaussian noise of standard deviation `noise_multiplier * C` is
  added to the sum of their clipped gradients.

  Privacy:
    With a fixed batch size the size of the data set is public, so the
    guarantee is for replace-one neighbours: compose the event with
    `NeighboringRelation.REPLACE_ONE`. Replacing one example changes the sum
    of gradients clipped to norm C by up to 2C, so the Gaussian event inside
    carries `noise_multiplier / 2` (dp_accounting's Gaussian events are
    normalised by the sensitivity under the accountant's relation). Among
    dp_accounting's accountants only the RDP accountant composes sampling
    without replacement (Wang, Balle, Kasiviswanathan 2019), and none composes
    sampling with replacement (`replace=True`): the event then describes the
    mechanism but composing it raises `dp_accounting.UnsupportedEventError`.

  Args:
    noise_multiplier: Noise standard deviation over clip norm, >= 0.
    iterations: Number of steps, an integer >= 0.
    dataset_size: Number of examples, an integer >= 1.
    batch_size: Examples per batch, an integer in [1, dataset_size].
    replace: Whether batches are drawn with replacement.

  Returns:
    `SelfComposedDpEvent(SampledWithoutReplacementDpEvent(dataset_size,
    batch_size, GaussianDpEvent(noise_multiplier / 2)), iterations)` (or the
    with-replacement event); a `NoOpDpEvent` for 0 iterations; a
    `NonPrivateDpEvent` for a zero noise multiplier.

  Raises:
    ValueError: If an argument is outside the range given above.

  References:
    Wang, Balle, Kasiviswanathan, 2019. arXiv:1808.00087.
  """
  _check_noise_multiplier(noise_multiplier)
  iterations = _check_integer('iterations', iterations, 0)
  dataset_size = _check_integer('dataset_size', dataset_size, 1)
  batch_size = _check_integer('batch_size', batch_size, 1)
  if batch_size > dataset_size:
    raise ValueError(
        f'batch_size must be in [1, dataset_size={dataset_size}], got'
        f' {batch_size}.'
    )
  if iterations and noise_multiplier == 0:
    return dp_accounting.NonPrivateDpEvent()
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2.0)
  if replace:
    step = dp_accounting.SampledWithReplacementDpEvent(
        dataset_size, batch_size, gaussian
    )
  else:
    step = dp_accounting.SampledWithoutReplacementDpEvent(
        dataset_size, batch_size, gaussian
    )
  return _repeat(step, iterations)


def truncated_dpsgd_event(
    noise_multiplier: float,
    iterations: int,
    *,
    sampling_prob: float,
    num_examples: int,
    truncated_batch_size: int,
) -> dp_accounting.DpEvent:
  """DP-SGD with Poisson sampling truncated to a maximum batch size.

  At each step every example joins the batch independently with probability
  `sampling_prob`; if more than `truncated_batch_size` examples joined, a
  uniformly random subset of `truncated_batch_size` of them is kept. Gaussian
  noise of standard deviation `noise_multiplier * C` is added to the sum of
  the kept examples' clipped gradients. Truncation bounds the memory of a step
  at the price of a slightly different privacy analysis.

  Privacy:
    Assumes add-or-remove-one neighbours and that truncation keeps a
    uniformly random subset (keeping, e.g., the first examples in data order
    is a different mechanism). dp_accounting composes this event with its PLD
    accountant only.

  Args:
    noise_multiplier: Noise standard deviation over clip norm, >= 0.
    iterations: Number of steps, an integer >= 0.
    sampling_prob: Probability that an example is sampled, in (0, 1].
    num_examples: Number of examples in the data set, an integer >= 1.
    truncated_batch_size: Largest batch kept, an integer >= 1.

  Returns:
    `SelfComposedDpEvent(TruncatedSubsampledGaussianDpEvent(num_examples,
    sampling_prob, truncated_batch_size, noise_multiplier), iterations)`; a
    `NoOpDpEvent` for 0 iterations; a `NonPrivateDpEvent` for a zero noise
    multiplier.

  Raises:
    ValueError: If an argument is outside the range given above.

  References:
    The truncated Poisson subsampled Gaussian analysis of dp_accounting's
    `TruncatedSubsampledGaussianDpEvent`, arXiv:2508.15089.
  """
  _check_noise_multiplier(noise_multiplier)
  iterations = _check_integer('iterations', iterations, 0)
  sampling_prob = _check_sampling_prob(sampling_prob)
  num_examples = _check_integer('num_examples', num_examples, 1)
  truncated_batch_size = _check_integer(
      'truncated_batch_size', truncated_batch_size, 1
  )
  if iterations and noise_multiplier == 0:
    return dp_accounting.NonPrivateDpEvent()
  step = dp_accounting.TruncatedSubsampledGaussianDpEvent(
      dataset_size=num_examples,
      sampling_probability=sampling_prob,
      truncated_batch_size=truncated_batch_size,
      noise_multiplier=float(noise_multiplier),
  )
  return _repeat(step, iterations)


def _bandmf_participations(iterations: int, num_bands: int) -> int:
  """Participations of the most exposed group: ceil(iterations / bands)."""
  return -(-iterations // num_bands)


def amplified_bandmf_event(
    noise_multiplier: float,
    iterations: int,
    *,
    num_bands: int,
    sampling_prob: float,
) -> dp_accounting.DpEvent:
  """Banded matrix factorization with cyclic Poisson sampling, as a DpEvent.

  The mechanism releases C x + z for a lower-triangular, `num_bands`-banded
  strategy matrix C whose columns have L2 norm at most 1 (sensitivity-
  normalised), where x stacks the summed clipped gradients of the
  `iterations` steps and z is i.i.d. Gaussian of standard deviation
  `noise_multiplier * C_clip`. The data is split into b = `num_bands`
  groups; step t Poisson-samples group t mod b with probability
  `sampling_prob` (`batch_selection.CyclicPoissonSampling` with
  cycle_length=b).

  Derivation (Choquette-Choo et al. 2023, amplified BandMF): an example of
  group k can only take part in steps k, k + b, k + 2b, ...; participation at
  step s changes x in coordinate s only, hence C x in rows s .. s + b - 1 (C is
  b-banded). These row blocks are disjoint for different participations, so
  the output splits into independent blocks, each a Poisson-subsampled
  Gaussian mechanism whose sensitivity is the column norm (<= 1) and whose
  later blocks may depend adaptively on earlier ones. The mechanism is thus
  dominated by DP-SGD with the same `sampling_prob` and noise multiplier
  for ceil(iterations / b) steps. `num_bands=1` is DP-SGD itself.

  Privacy:
    Add-or-remove-one neighbours; columns of C normalised to norm <= 1
    (the factorization's noise is scaled by that sensitivity); cyclic
    Poisson sampling with each example in exactly one of the b groups.

  Args:
    noise_multiplier: Noise standard deviation over (clip norm x column
      norm bound), >= 0.
    iterations: Number of steps, an integer >= 0.
    num_bands: Number of bands b of C and of groups, an integer >= 1.
    sampling_prob: Probability that an example of the sampled group joins
      the batch, in (0, 1].

  Returns:
    `dpsgd_event(noise_multiplier, ceil(iterations / num_bands),
    sampling_prob=sampling_prob)`.

  Raises:
    ValueError: If an argument is outside the range given above.

  References:
    Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta, Xu,
    "(Amplified) Banded Matrix Factorization: A unified approach to private
    training", NeurIPS 2023. arXiv:2306.08153.
  """
  _check_noise_multiplier(noise_multiplier)
  iterations = _check_integer('iterations', iterations, 0)
  num_bands = _check_integer('num_bands', num_bands, 1)
  sampling_prob = _check_sampling_prob(sampling_prob)
  return dpsgd_event(
      noise_multiplier,
      _bandmf_participations(iterations, num_bands),
      sampling_prob=sampling_prob,
  )


def truncated_amplified_bandmf_event(
    noise_multiplier: float,
    iterations: int,
    *,
    num_bands: int,
    sampling_prob: float,
    largest_group_size: int,
    truncated_batch_size: int,
) -> dp_accounting.DpEvent:
  """Amplified banded matrix factorization with truncated Poisson batches.

  As `amplified_bandmf_event`, but a sampled batch larger than
  `truncated_batch_size` keeps a uniformly random subset of that size. The
  same block argument reduces the mechanism to ceil(iterations / b) steps of
  truncated Poisson-subsampled Gaussians on one group, whose size is taken
  to be `largest_group_size` (the group an accountant must assume).

  Privacy:
    As `amplified_bandmf_event`, plus: truncation keeps a uniformly random
    subset. PLD accounting only (dp_accounting's
    `TruncatedSubsampledGaussianDpEvent`). The truncated analysis is not
    monotone in the group size: when groups differ in size, evaluate the
    event for each size and keep the larger epsilon (as
    `analysis.DpsgdTrainingAccountant` does).

  Args:
    noise_multiplier: Noise standard deviation over (clip norm x column
      norm bound), >= 0.
    iterations: Number of steps, an integer >= 0.
    num_bands: Number of bands and groups, an integer >= 1.
    sampling_prob: Poisson sampling probability within a group, in (0, 1].
    largest_group_size: Number of examples in the largest group, >= 1.
    truncated_batch_size: Largest batch kept, an integer >= 1.

  Returns:
    `truncated_dpsgd_event(noise_multiplier, ceil(iterations / num_bands),
    sampling_prob=..., num_examples=largest_group_size,
    truncated_batch_size=...)`.

  Raises:
    ValueError: If an argument is outside the range given above.

  References:
    Choquette-Choo et al., 2023. arXiv:2306.08153.
    The truncated Poisson analysis of dp_accounting, arXiv:2508.15089.
  """
  _check_noise_multiplier(noise_multiplier)
  iterations = _check_integer('iterations', iterations, 0)
  num_bands = _check_integer('num_bands', num_bands, 1)
  sampling_prob = _check_sampling_prob(sampling_prob)
  largest_group_size = _check_integer(
      'largest_group_size', largest_group_size, 1
  )
  return truncated_dpsgd_event(
      noise_multiplier,
      _bandmf_participations(iterations, num_bands),
      sampling_prob=sampling_prob,
      num_examples=largest_group_size,
      truncated_batch_size=truncated_batch_size,
  )
