"""Batch selection: which examples take part in each training step.

Host-side NumPy. A strategy's ``batch_iterator(num_examples, rng)`` yields one
sorted ``int64`` array of example indices per step. The privacy accounting of
a run is only valid if the batches really are drawn the way its accountant
assumes, so build the sampler and the ``DpEvent`` from the same settings.

Variable-size batches (Poisson sampling) are padded to a few fixed shapes
with :func:`pad_to_multiple_of` or :func:`split_and_pad_global_batch`; the
padding index is ``-1`` and :func:`padding_mask` turns it into the
``is_padding_example`` argument of ``clipping.clipped_grad``.

Randomness is explicit: every ``batch_iterator`` needs a
``np.random.Generator`` or an int seed, and refuses ``None``. Privacy
amplification by sampling assumes the adversary cannot predict which
examples are sampled, so a built-in default seed would void it, and seeding
from the operating system would make runs impossible to reproduce or resume.
"""

import abc
import dataclasses
import enum
import math
import numbers
from collections.abc import Iterator

import numpy as np

from jax_privacy._padding import PADDING_INDEX as _PADDING_INDEX
from jax_privacy._padding import check_integer as _check_integer
from jax_privacy._padding import pad_to_multiple_of
from jax_privacy._padding import padding_mask
from jax_privacy._padding import split_and_pad_global_batch

__all__ = [
    'BallsInBinsSampling',
    'BatchSelectionStrategy',
    'BMinSepSampling',
    'CyclicPoissonSampling',
    'FixedBatchSampling',
    'PartitionType',
    'pad_to_multiple_of',
    'padding_mask',
    'split_and_pad_global_batch',
    'UserSelectionStrategy',
]


_RngLike = np.random.Generator | int | None


class PartitionType(enum.Enum):
  """How :class:`CyclicPoissonSampling` splits the data into groups.

  Attributes:
    INDEPENDENT: each example joins one of the ``cycle_length`` groups
      uniformly at random, independently of the others (group sizes are
      multinomial).
    EQUAL_SPLIT: the examples are shuffled once and cut into
      ``cycle_length`` groups whose sizes differ by at most one.
  """

  INDEPENDENT = 'independent'
  EQUAL_SPLIT = 'equal_split'


class BatchSelectionStrategy(abc.ABC):
  """A rule for drawing the batch of every training step."""

  @abc.abstractmethod
  def batch_iterator(
      self, num_examples: int, rng: _RngLike = None
  ) -> Iterator[np.ndarray]:
    """Yields the example indices of each step.

    Args:
      num_examples: the number of examples in the data set; indices are
        in ``[0, num_examples)``.
      rng: a ``np.random.Generator`` (advanced in place as batches are
        drawn) or an int seed. ``None`` raises ``ValueError``: sampling
        randomness must be explicit (see the module docstring).

    Returns:
      An iterator over sorted ``int64`` index arrays, one per step.
    """


@dataclasses.dataclass(frozen=True)
class CyclicPoissonSampling(BatchSelectionStrategy):
  """Poisson sampling, optionally within one of several groups per step.

  The examples are split once into ``cycle_length`` disjoint groups
  (see :class:`PartitionType`). Step ``t`` includes every example of group
  ``t mod cycle_length`` independently with probability ``sampling_prob``,
  and examples of other groups not at all. If the batch has more than
  ``truncated_batch_size`` examples, a uniformly random subset of that size
  is kept (the sampler draws the size ``min(Binomial(group size, q), B)``
  and then a uniform subset of that size, which has the same distribution).

  ``cycle_length=1`` is plain Poisson sampling as in DP-SGD;
  ``sampling_prob=1`` with ``cycle_length=k`` visits the ``k`` groups in a
  fixed order, one per step (deterministic epochs).

  Cost per step is O(batch size) time and memory, even for 10^8 examples:
  the batch size is drawn from a binomial and the members without
  replacement, never one coin per example. With ``cycle_length > 1`` the
  partition is built once, O(num_examples) memory for the whole run.

  Privacy:
    With ``cycle_length=1`` and no truncation this is the Poisson
    subsampling that DP-SGD accounting assumes (each example included
    independently with probability ``sampling_prob``, under add/remove
    neighbours). With ``cycle_length=k`` each example can take part only in
    steps ``t = j mod k`` of its group ``j`` and is Poisson-sampled there;
    account for it with the cyclic / min-separation analysis (e.g. amplified
    BandMF with ``num_bands <= k``). Truncation changes the mechanism:
    account for it with the truncated events, which need
    ``truncated_batch_size`` and the largest group size. The guarantee also
    assumes the adversary does not know ``rng``.

  Attributes:
    sampling_prob: inclusion probability ``q`` in ``(0, 1]``.
    iterations: number of steps (batches) to yield, ``>= 1``.
    truncated_batch_size: ``None`` (no truncation) or the largest batch
      size, ``>= 1``.
    cycle_length: number of groups ``k >= 1``.
    partition_type: how the groups are formed.

  References:
    Abadi et al., "Deep Learning with Differential Privacy", 2016,
    arXiv:1607.00133.
    Choquette-Choo et al., "Amplified Banded Matrix Factorization: A
    unified approach to private training", 2023, arXiv:2306.08153.
  """

  sampling_prob: float
  iterations: int
  truncated_batch_size: int | None = None
  cycle_length: int = 1
  partition_type: PartitionType = PartitionType.EQUAL_SPLIT

  def __post_init__(self):
    _check_probability('sampling_prob', self.sampling_prob)
    _check_integer('iterations', self.iterations, minimum=1)
    if self.truncated_batch_size is not None:
      _check_integer(
          'truncated_batch_size', self.truncated_batch_size, minimum=1
      )
    _check_integer('cycle_length', self.cycle_length, minimum=1)
    if not isinstance(self.partition_type, PartitionType):
      raise ValueError(
          'partition_type must be a PartitionType (INDEPENDENT or '
          f'EQUAL_SPLIT), got {self.partition_type!r}'
      )

  def batch_iterator(
      self, num_examples: int, rng: _RngLike = None
  ) -> Iterator[np.ndarray]:
    _check_integer('num_examples', num_examples, minimum=1)
    if num_examples < self.cycle_length:
      raise ValueError(
          f'num_examples must be >= cycle_length ({self.cycle_length}), '
          f'got {num_examples}'
      )
    generator = _as_generator(rng)
    return self._batches(int(num_examples), generator)

  def _batches(self, num_examples, rng):
    groups = self._partition(num_examples, rng)
    for step in range(self.iterations):
      group = groups[step % self.cycle_length]
      group_size = num_examples if group is None else len(group)
      batch_size = int(rng.binomial(group_size, self.sampling_prob))
      if self.truncated_batch_size is not None:
        batch_size = min(batch_size, self.truncated_batch_size)
      positions = _distinct_uniform(rng, group_size, batch_size)
      members = positions if group is None else group[positions]
      yield np.sort(members).astype(np.int64, copy=False)

  def _partition(self, num_examples, rng) -> list[np.ndarray | None]:
    """The groups as index arrays; ``[None]`` stands for all examples."""
    if self.cycle_length == 1:
      return [None]
    index_dtype = _smallest_index_dtype(num_examples)
    if self.partition_type is PartitionType.EQUAL_SPLIT:
      order = np.arange(num_examples, dtype=index_dtype)
      rng.shuffle(order)
      return np.array_split(order, self.cycle_length)
    assignment = rng.integers(
        self.cycle_length,
        size=num_examples,
        dtype=_smallest_index_dtype(self.cycle_length),
    )
    order = np.argsort(assignment, kind='stable').astype(index_dtype)
    sizes = np.bincount(assignment, minlength=self.cycle_length)
    return np.split(order, np.cumsum(sizes)[:-1])


@dataclasses.dataclass(frozen=True)
class FixedBatchSampling(BatchSelectionStrategy):
  """Every step, a uniformly random batch of exactly ``batch_size`` examples.

  Batches are independent across steps. With ``replace=False`` a batch has
  ``batch_size`` distinct examples; with ``replace=True`` its examples are
  drawn independently and uniformly, so one example can appear more than
  once in a batch.

  Privacy:
    Sampling without (or with) replacement of a fixed size: account for it
    with the matching fixed-batch event (``fixed_dpsgd_event(...,
    replace=...)``), whose natural neighbouring relation is replace-one.
    Poisson accounting does not apply. The guarantee assumes the adversary
    does not know ``rng``.

  Attributes:
    batch_size: examples per batch, ``>= 1`` (and ``<= num_examples``
      without replacement).
    iterations: number of batches to yield, ``>= 1``.
    replace: whether each batch is drawn with replacement.

  References:
    Abadi et al., "Deep Learning with Differential Privacy", 2016,
    arXiv:1607.00133.
  """

  batch_size: int
  iterations: int
  replace: bool = False

  def __post_init__(self):
    _check_integer('batch_size', self.batch_size, minimum=1)
    _check_integer('iterations', self.iterations, minimum=1)
    if not isinstance(self.replace, (bool, np.bool_)):
      raise ValueError(f'replace must be a bool, got {self.replace!r}')

  def batch_iterator(
      self, num_examples: int, rng: _RngLike = None
  ) -> Iterator[np.ndarray]:
    _check_integer('num_examples', num_examples, minimum=1)
    if not self.replace and self.batch_size > num_examples:
      raise ValueError(
          f'batch_size must be <= num_examples ({num_examples}) when '
          f'sampling without replacement, got {self.batch_size}'
      )
    generator = _as_generator(rng)
    return self._batches(int(num_examples), generator)

  def _batches(self, num_examples, rng):
    for _ in range(self.iterations):
      if self.replace:
        members = rng.integers(num_examples, size=self.batch_size)
      else:
        members = _distinct_uniform(rng, num_examples, self.batch_size)
      yield np.sort(members).astype(np.int64, copy=False)


@dataclasses.dataclass(frozen=True)
class BallsInBinsSampling(BatchSelectionStrategy):
  """Every epoch, each example is thrown into one of ``cycle_length`` batches.

  At the start of each epoch (every ``cycle_length`` steps) each example is
  assigned to one of the epoch's ``cycle_length`` steps uniformly at random,
  independently of the other examples and of earlier epochs; step ``t``
  trains on the examples assigned to it. Every example therefore takes part
  in exactly one step per epoch, and batch sizes are Binomial(n, 1/k).

  The assignment costs O(num_examples) time and memory once per epoch.

  Privacy:
    Balls-in-bins sampling: each example participates exactly once per epoch
    at a uniformly random step. It is not Poisson sampling: do not account
    for it with the Poisson DP-SGD event. Chua et al. show its privacy is
    close to Poisson sampling with ``q = 1 / cycle_length`` and give a
    Monte Carlo accountant; use a conservative analysis such as cyclic
    (min-separation) accounting if an exact bound is required. The guarantee
    assumes the adversary does not know ``rng``.

  Attributes:
    iterations: number of steps (batches) to yield, ``>= 1``.
    cycle_length: steps per epoch ``k >= 1``.

  References:
    Chua et al., "Balls-and-Bins Sampling for DP-SGD", 2024,
    arXiv:2412.16802.
  """

  iterations: int
  cycle_length: int

  def __post_init__(self):
    _check_integer('iterations', self.iterations, minimum=1)
    _check_integer('cycle_length', self.cycle_length, minimum=1)

  def batch_iterator(
      self, num_examples: int, rng: _RngLike = None
  ) -> Iterator[np.ndarray]:
    _check_integer('num_examples', num_examples, minimum=1)
    return self._batches(int(num_examples), _as_generator(rng))

  def _batches(self, num_examples, rng):
    bins = []
    for step in range(self.iterations):
      if step % self.cycle_length == 0:
        assignment = rng.integers(
            self.cycle_length,
            size=num_examples,
            dtype=_smallest_index_dtype(self.cycle_length),
        )
        order = np.argsort(assignment, kind='stable')
        sizes = np.bincount(assignment, minlength=self.cycle_length)
        bins = np.split(order, np.cumsum(sizes)[:-1])
      yield bins[step % self.cycle_length].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class UserSelectionStrategy:
  """Samples users with a base strategy, then examples of each sampled user.

  ``batch_iterator(user_ids, rng)`` draws each step's users with
  ``base_strategy`` (over the distinct users, in sorted order of their ids)
  and yields a 2-D ``[users, examples_per_user_per_batch]`` array of
  example indices, for per-user clipping (``clipped_grad(...,
  keep_batch_dim=False)`` with inputs gathered as ``x[indices]``). A user
  contributes their examples in turn, wrapping around when all have been
  used; with ``shuffle_per_user`` their order is shuffled once at the start.
  A user with fewer examples than ``examples_per_user_per_batch`` is padded
  with ``-1`` (see :func:`padding_mask` for the padding of whole rows).

  Privacy:
    The guarantee is user-level: neighbouring data sets differ in all the
    examples of one user, and the base strategy's sampling of users is what
    the accountant must assume (e.g. Poisson sampling of users with
    ``q = expected users per batch / number of users``). Each user's
    examples must be clipped together, as one group.

  Attributes:
    base_strategy: how users are sampled each step.
    examples_per_user_per_batch: examples of each sampled user per step.
    shuffle_per_user: shuffle each user's examples once, instead of using
      them in index order.
  """

  base_strategy: BatchSelectionStrategy
  examples_per_user_per_batch: int = 1
  shuffle_per_user: bool = False

  def __post_init__(self):
    if not isinstance(self.base_strategy, BatchSelectionStrategy):
      raise ValueError(
          'base_strategy must be a BatchSelectionStrategy, got '
          f'{self.base_strategy!r}'
      )
    _check_integer(
        'examples_per_user_per_batch',
        self.examples_per_user_per_batch,
        minimum=1,
    )

  def batch_iterator(
      self, user_ids: np.ndarray, rng: _RngLike = None
  ) -> Iterator[np.ndarray]:
    """Yields ``[users, examples_per_user_per_batch]`` index arrays.

    Args:
      user_ids: the user of each example, shape ``[num_examples]``.
      rng: a ``np.random.Generator`` or an int seed (required).

    Returns:
      An iterator over ``int64`` arrays of example indices, one per step;
      rows are users (sorted by user id), ``-1`` marks padding.
    """
    user_ids = np.asarray(user_ids)
    if user_ids.ndim != 1 or user_ids.size == 0:
      raise ValueError(
          'user_ids must be a non-empty 1-D array (the user of each '
          f'example), got shape {user_ids.shape}'
      )
    generator = _as_generator(rng)
    _, user_of_example = np.unique(user_ids, return_inverse=True)
    order = np.argsort(user_of_example, kind='stable')
    counts = np.bincount(user_of_example)
    examples_of_user = np.split(order, np.cumsum(counts)[:-1])
    if self.shuffle_per_user:
      for examples in examples_of_user:
        generator.shuffle(examples)
    return self._batches(examples_of_user, generator)

  def _batches(self, examples_of_user, rng):
    k = self.examples_per_user_per_batch
    next_position = np.zeros(len(examples_of_user), np.int64)
    for users in self.base_strategy.batch_iterator(len(examples_of_user), rng):
      rows = np.full((len(users), k), _PADDING_INDEX, np.int64)
      for row, user in enumerate(users):
        examples = examples_of_user[user]
        take = min(k, len(examples))
        positions = (next_position[user] + np.arange(take)) % len(examples)
        rows[row, :take] = examples[positions]
        next_position[user] = (next_position[user] + take) % len(examples)
      yield rows


@dataclasses.dataclass(frozen=True)
class BMinSepSampling(BatchSelectionStrategy):
  """Poisson sampling with a minimum separation between participations.

  An example that takes part in step ``t`` cannot take part in steps
  ``t + 1, ..., t + min_sep - 1``; at every other step it is included
  independently with probability ``sampling_prob``. With ``warm_start``, the
  run starts from the stationary state of that rule (each example is
  eligible with probability ``1 / (1 + (min_sep - 1) q)`` and otherwise
  waits a uniformly random ``1..min_sep - 1`` steps), so every step has the
  same marginal inclusion probability ``q / (1 + (min_sep - 1) q)``; without
  it, every example is eligible at the first step. Batches larger than
  ``truncated_batch_size`` keep a uniformly random subset of that size.

  Cost per step is O(min_sep x batch size) time and memory: the sampler
  tracks only the examples waiting out their separation.

  Privacy:
    b-min-sep sampling, the participation pattern under which amplified
    matrix-factorization mechanisms (e.g. BandMF with ``num_bands <=
    min_sep``) are analysed by Choquette-Choo et al. (2024). It is not
    plain Poisson sampling: account for it with that analysis. The
    guarantee assumes the adversary does not know ``rng``.

  Attributes:
    sampling_prob: inclusion probability ``q`` of an eligible example, in
      ``(0, 1]``.
    iterations: number of steps (batches) to yield, ``>= 1``.
    min_sep: the least number of steps between two participations of one
      example, ``>= 1`` (1 is plain Poisson sampling).
    warm_start: start from the stationary state instead of all eligible.
    truncated_batch_size: ``None`` or the largest batch size, ``>= 1``.

  References:
    Choquette-Choo et al., "Near Exact Privacy Amplification for Matrix
    Mechanisms", 2024, arXiv:2410.06266.
  """

  sampling_prob: float
  iterations: int
  min_sep: int
  warm_start: bool = True
  truncated_batch_size: int | None = None

  def __post_init__(self):
    _check_probability('sampling_prob', self.sampling_prob)
    _check_integer('iterations', self.iterations, minimum=1)
    _check_integer('min_sep', self.min_sep, minimum=1)
    if self.truncated_batch_size is not None:
      _check_integer(
          'truncated_batch_size', self.truncated_batch_size, minimum=1
      )

  def batch_iterator(
      self, num_examples: int, rng: _RngLike = None
  ) -> Iterator[np.ndarray]:
    _check_integer('num_examples', num_examples, minimum=1)
    if num_examples < self.min_sep:
      raise ValueError(
          f'num_examples must be >= min_sep ({self.min_sep}), got '
          f'{num_examples}: an example takes part at most once in any '
          'min_sep consecutive steps, so with fewer examples some of those '
          'batches are always empty (steps of pure noise); use a smaller '
          'min_sep or more data'
      )
    return self._batches(int(num_examples), _as_generator(rng))

  def _initial_waiting(self, num_examples, rng) -> list[np.ndarray]:
    """``waiting[k]``: examples that become eligible in ``k + 1`` steps."""
    levels = self.min_sep - 1
    if not self.warm_start or levels == 0:
      return [np.zeros(0, np.int64) for _ in range(levels)]
    q = self.sampling_prob
    eligible = 1.0 / (1.0 + levels * q)
    counts = rng.multinomial(num_examples, [eligible] + [q * eligible] * levels)
    waiting_total = int(counts[1:].sum())
    members = _distinct_uniform(rng, num_examples, waiting_total)
    return np.split(members.astype(np.int64), np.cumsum(counts[1:])[:-1])

  def _batches(self, num_examples, rng):
    waiting = self._initial_waiting(num_examples, rng)
    for _ in range(self.iterations):
      blocked = (
          np.concatenate(waiting) if waiting else np.zeros(0, np.int64)
      )
      eligible = num_examples - len(blocked)
      batch_size = int(rng.binomial(eligible, self.sampling_prob))
      if self.truncated_batch_size is not None:
        batch_size = min(batch_size, self.truncated_batch_size)
      batch = np.sort(_distinct_uniform_excluding(
          rng, num_examples, batch_size, blocked
      ))
      if waiting:
        waiting = waiting[1:] + [batch]
      yield batch


def _distinct_uniform_excluding(
    rng, population: int, size: int, excluded: np.ndarray
) -> np.ndarray:
  """``size`` distinct uniform draws from ``range(population)`` minus a set.

  Rejection sampling when the excluded set is at most half the population
  (expected O(size + len(excluded)) work), an explicit complement otherwise.
  """
  if size == 0:
    return np.zeros(0, np.int64)
  if 2 * len(excluded) > population:
    allowed = np.setdiff1d(np.arange(population), excluded)
    return allowed[_distinct_uniform(rng, len(allowed), size)].astype(np.int64)
  chosen = np.zeros(0, np.int64)
  while len(chosen) < size:
    need = size - len(chosen)
    draws = rng.integers(population, size=2 * need + 8)
    draws = draws[~np.isin(draws, excluded)]
    chosen = np.union1d(chosen, draws)
  # union1d sorts, so keep a uniformly random subset of the right size.
  return rng.choice(chosen, size=size, replace=False)


def _distinct_uniform(rng, population: int, size: int) -> np.ndarray:
  """``size`` distinct uniform draws from ``range(population)``, unsorted.

  NumPy's ``Generator.choice`` (no replacement, no shuffle) uses Floyd's
  algorithm with a hash set when ``size <= population / 50``, and otherwise
  a partial shuffle of ``arange(population)``, which is then at most
  ``50 * size`` long: O(size) time and memory either way. The exact draws
  can differ between NumPy versions.
  """
  return rng.choice(population, size=size, replace=False, shuffle=False)


def _smallest_index_dtype(upper: int) -> np.dtype:
  return np.dtype(np.int32 if upper <= np.iinfo(np.int32).max else np.int64)


def _as_generator(rng: _RngLike) -> np.random.Generator:
  if isinstance(rng, np.random.Generator):
    return rng
  if rng is None:
    raise ValueError(
        'rng is required: pass a seed or a np.random.Generator, e.g. '
        'rng=np.random.default_rng(seed) with a secret seed. Privacy '
        'amplification by sampling assumes the batches cannot be '
        'predicted, which a built-in default seed would break, and '
        'batches drawn from operating-system entropy could not be '
        'reproduced or resumed.'
    )
  if isinstance(rng, numbers.Integral) and not isinstance(
      rng, (bool, np.bool_)
  ):
    if rng < 0:
      raise ValueError(f'rng seed must be >= 0, got {rng}')
    return np.random.default_rng(int(rng))
  raise ValueError(
      f'rng must be a np.random.Generator or an int seed, got {rng!r}'
  )


def _check_probability(name: str, value) -> None:
  if (
      not isinstance(value, numbers.Real)
      or isinstance(value, (bool, np.bool_))
      or not math.isfinite(value)
      or not 0.0 < value <= 1.0
  ):
    raise ValueError(f'{name} must be in (0, 1], got {value!r}')
