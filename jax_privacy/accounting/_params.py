"""The privacy settings of a training run (`DpParams`) and their schedules.

Private: the public names are re-exported by `jax_privacy.accounting.analysis`.
"""

import dataclasses
import enum
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import dp_accounting
import numpy as np

Schedule = Union[float, Sequence[tuple[int, float]], Mapping[int, float]]
"""A number, or pieces `[(start_step, value), ...]` starting at step 0."""


class SamplingMethod(enum.Enum):
  """How the examples of each batch are drawn.

  Attributes:
    POISSON: Every example joins each batch independently with probability
      q = batch_size / num_samples (q = batch_size * cycle_length /
      num_samples with cyclic Poisson sampling); the batch size is random.
      Accounted for under add-or-remove-one neighbours, with amplification
      by subsampling (proven).
    FIXED_BATCH_SIZE: Each batch is exactly batch_size examples drawn
      uniformly without replacement, independently at every step. Accounted
      for under replace-one neighbours, with the RDP accountant only
      (proven).
    SHUFFLED: The data is shuffled (once or at every epoch) and cut into
      consecutive batches of batch_size examples, so that an example is in
      at most one batch per epoch of floor(num_samples / batch_size) steps.
      Accounted for WITHOUT amplification: every epoch an example is in is
      one Gaussian release of sensitivity 2C under replace-one neighbours.
      This is a proven upper bound, usually far above the Poisson number.
    SHUFFLED_POISSON_HEURISTIC: The same shuffled batches, accounted for AS
      IF they were Poisson samples with q = batch_size / num_samples. This is
      common practice but NOT a proven guarantee: shuffling can leak more
      than Poisson sampling (arXiv:2403.17673), so results are labelled as
      heuristic.
  """

  POISSON = 'poisson'
  FIXED_BATCH_SIZE = 'fixed_batch_size'
  SHUFFLED = 'shuffled'
  SHUFFLED_POISSON_HEURISTIC = 'shuffled_poisson_heuristic'

  @property
  def is_heuristic(self) -> bool:
    """Whether epsilon under this sampling is a heuristic, not a bound."""
    return self is SamplingMethod.SHUFFLED_POISSON_HEURISTIC


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_count(name: str, value, minimum: int) -> int:
  """Returns `value` as an int, accepting integral floats such as 256.0."""
  if _is_real(value) and math.isfinite(value) and float(value).is_integer():
    if value >= minimum:
      return int(value)
  raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')


def _as_noise(name: str, value) -> float:
  if not (_is_real(value) and math.isfinite(value) and value >= 0):
    raise ValueError(f'{name} must be finite and >= 0, got {value!r}.')
  return float(value)


def _as_batch_size(name: str, value) -> int:
  return _as_count(name, value, 1)


def _as_scale(name: str, value) -> float:
  if not (_is_real(value) and math.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be finite and > 0, got {value!r}.')
  return float(value)


def _normalize_schedule(name: str, schedule, as_value):
  """Validates a number or a piecewise schedule; returns it immutable."""
  if hasattr(schedule, 'shape'):  # A NumPy or JAX scalar or array.
    schedule = np.asarray(schedule).tolist()
  if _is_real(schedule):
    return as_value(name, schedule)
  if isinstance(schedule, Mapping):
    schedule = sorted(schedule.items())
  if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
    raise ValueError(
        f'{name} must be a number or a schedule [(start_step, value), ...],'
        f' got {schedule!r}.'
    )
  if not schedule:
    raise ValueError(f'{name} schedule must not be empty.')
  pieces = []
  for piece in schedule:
    if not (isinstance(piece, Sequence) and len(piece) == 2):
      raise ValueError(
          f'{name} schedule entries must be (start_step, value) pairs, got'
          f' {piece!r}.'
      )
    start = _as_count(f'{name} start_step', piece[0], 0)
    if not pieces and start != 0:
      raise ValueError(
          f'{name} schedule must start at step 0, got first start_step'
          f' {start}.'
      )
    if pieces and start <= pieces[-1][0]:
      raise ValueError(
          f'{name} schedule start steps must increase strictly, got {start}'
          f' after {pieces[-1][0]}.'
      )
    pieces.append((start, as_value(name, piece[1])))
  return tuple(pieces)


def _pieces(schedule) -> tuple[tuple[int, float], ...]:
  return schedule if isinstance(schedule, tuple) else ((0, schedule),)


def _merge(*schedules) -> list[tuple[int, tuple[float, ...]]]:
  """Merges schedules into pieces `(start_step, (value_1, value_2, ...))`."""
  all_pieces = [_pieces(s) for s in schedules]
  starts = sorted({start for pieces in all_pieces for start, _ in pieces})
  merged = []
  for step in starts:
    values = tuple(
        [v for start, v in pieces if start <= step][-1] for pieces in all_pieces
    )
    merged.append((step, values))
  return merged


@dataclasses.dataclass(frozen=True)
class DpParams:
  """The privacy-relevant settings of a training run.

  Validated on construction: a bad value raises `ValueError` naming the field
  and the accepted range. Schedules are stored as tuples of pairs.

  Attributes:
    noise_multipliers: Standard deviation of the Gaussian noise over the clip
      norm (stddev = noise_multiplier * l2_clip_norm), finite and >= 0: a
      number or a schedule.
    num_samples: Number of examples in the data set, an integer >= 1.
    delta: Target delta of the (epsilon, delta) guarantee, in (0, 1).
    batch_size: Batch size for the whole run (the expected batch size with
      Poisson sampling), an integer in [1, num_samples]. Give this or
      `batch_sizes`, not both.
    batch_size_scale_schedule: Optional multipliers of the batch size, > 0:
      a number or a schedule. The batch size at step t is
      batch_size(t) * scale(t), which must stay <= num_samples (and be a
      whole number with FIXED_BATCH_SIZE sampling).
    is_finite_guarantee: Whether the run promises a finite epsilon. If True
      (the default), a noise multiplier of 0 anywhere in the schedule is
      rejected here, since it releases gradients without protection. Set it
      to False to account for runs with noiseless steps; their epsilon is
      then `inf`.
    batch_sizes: Batch sizes as a number or a schedule, values in
      [1, num_samples]. Give this or `batch_size`, not both.
    examples_per_user: Largest number of examples one user contributes, for
      user-level accounting; an integer >= 1 or None.
    cycle_length: Number of disjoint groups the data is split into for cyclic
      Poisson sampling; an integer >= 1 or None (1 and None are plain
      Poisson sampling).
    sampling_method: How batches are drawn, a `SamplingMethod`.
    truncated_batch_size: Largest batch kept when Poisson batches are
      truncated; an integer >= 1 or None (no truncation).
  """

  noise_multipliers: Schedule
  num_samples: int
  delta: float
  batch_size: Optional[int] = None
  batch_size_scale_schedule: Optional[Schedule] = None
  is_finite_guarantee: bool = True
  batch_sizes: Optional[Schedule] = None
  examples_per_user: Optional[int] = None
  cycle_length: Optional[int] = None
  sampling_method: SamplingMethod = SamplingMethod.POISSON
  truncated_batch_size: Optional[int] = None

  def __post_init__(self):
    set_field = lambda name, value: object.__setattr__(self, name, value)
    set_field('num_samples', _as_count('num_samples', self.num_samples, 1))
    if not (_is_real(self.delta) and 0 < self.delta < 1):
      raise ValueError(f'delta must be in (0, 1), got {self.delta!r}.')
    set_field('delta', float(self.delta))
    set_field(
        'noise_multipliers',
        _normalize_schedule(
            'noise_multipliers', self.noise_multipliers, _as_noise
        ),
    )
    if not isinstance(self.is_finite_guarantee, bool):
      raise ValueError(
          'is_finite_guarantee must be True or False, got'
          f' {self.is_finite_guarantee!r}.'
      )
    if self.is_finite_guarantee and any(
        sigma == 0 for _, sigma in _pieces(self.noise_multipliers)
    ):
      raise ValueError(
          'noise_multipliers must be > 0 when is_finite_guarantee=True, got'
          f' {self.noise_multipliers!r}: a step without noise has no finite'
          ' epsilon. Pass is_finite_guarantee=False to account for it'
          ' (epsilon is then inf).'
      )
    for name in ('batch_size', 'batch_sizes'):
      if getattr(self, name) is not None:
        set_field(
            name,
            _normalize_schedule(name, getattr(self, name), _as_batch_size),
        )
    if isinstance(self.batch_size, tuple):
      raise ValueError(
          'batch_size must be a single integer; give a schedule as'
          f' batch_sizes, got batch_size={self.batch_size!r}.'
      )
    if self.batch_size is not None and self.batch_sizes is not None:
      raise ValueError(
          'Give batch_size or batch_sizes, not both; got'
          f' batch_size={self.batch_size!r},'
          f' batch_sizes={self.batch_sizes!r}.'
      )
    if self.batch_size_scale_schedule is not None:
      set_field(
          'batch_size_scale_schedule',
          _normalize_schedule(
              'batch_size_scale_schedule',
              self.batch_size_scale_schedule,
              _as_scale,
          ),
      )
    for name in ('examples_per_user', 'cycle_length', 'truncated_batch_size'):
      if getattr(self, name) is not None:
        set_field(name, _as_count(name, getattr(self, name), 1))
    if not isinstance(self.sampling_method, SamplingMethod):
      raise ValueError(
          'sampling_method must be a SamplingMethod, one of'
          f' {[m.name for m in SamplingMethod]}, got {self.sampling_method!r}.'
      )
    self._check_batch_sizes()

  def _check_batch_sizes(self) -> None:
    """Checks that every effective batch size fits in the data set."""
    if self.batch_schedule() is None:
      if self.batch_size_scale_schedule is not None:
        raise ValueError(
            'batch_size_scale_schedule needs batch_size or batch_sizes.'
        )
      return
    name = 'batch_sizes' if self.batch_sizes is not None else 'batch_size'
    if self.batch_size_scale_schedule is not None:
      name += ' * batch_size_scale_schedule'
    fixed = self.sampling_method in (
        SamplingMethod.FIXED_BATCH_SIZE,
        SamplingMethod.SHUFFLED,
        SamplingMethod.SHUFFLED_POISSON_HEURISTIC,
    )
    for step, (_, batch_size) in self.schedule_pieces():
      if batch_size > self.num_samples:
        raise ValueError(
            f'{name} must be in [1, num_samples={self.num_samples}] at every'
            f' step, got {batch_size:g} at step {step}.'
        )
      if fixed and not float(batch_size).is_integer():
        raise ValueError(
            f'{name} must be a whole number of examples with'
            f' sampling_method={self.sampling_method.name}, got'
            f' {batch_size:g} at step {step}.'
        )

  def batch_schedule(self) -> Optional[Schedule]:
    """Returns `batch_sizes` or `batch_size`, whichever was given."""
    return self.batch_sizes if self.batch_sizes is not None else self.batch_size

  def schedule_pieces(self) -> list[tuple[int, tuple[float, float]]]:
    """Returns the run as pieces `(start_step, (noise, batch_size))`.

    The batch size includes `batch_size_scale_schedule`. Consecutive pieces
    with the same values are merged.

    Raises:
      ValueError: If neither batch_size nor batch_sizes was given.
    """
    base = self.batch_schedule()
    if base is None:
      raise ValueError(
          'This accountant needs batch sizes: give batch_size or batch_sizes.'
      )
    scale = self.batch_size_scale_schedule
    scale = 1.0 if scale is None else scale
    pieces = []
    for step, (noise, batch, factor) in _merge(
        self.noise_multipliers, base, scale
    ):
      values = (noise, batch * factor)
      if not pieces or pieces[-1][1] != values:
        pieces.append((step, values))
    return pieces


def _segments(
    dp_params: DpParams, num_updates: int
) -> list[tuple[int, float, float]]:
  """Returns `(num_steps, noise, batch_size)` for the first num_updates."""
  pieces = [p for p in dp_params.schedule_pieces() if p[0] < num_updates]
  ends = [start for start, _ in pieces[1:]] + [num_updates]
  return [
      (end - start, noise, batch)
      for (start, (noise, batch)), end in zip(pieces, ends)
  ]


def _compose(events: list[dp_accounting.DpEvent]) -> dp_accounting.DpEvent:
  if not events:
    return dp_accounting.NoOpDpEvent()
  if len(events) == 1:
    return events[0]
  return dp_accounting.ComposedDpEvent(events)


def _check_num_updates(num_updates) -> int:
  if isinstance(num_updates, bool) or not isinstance(
      num_updates, numbers.Integral
  ):
    raise ValueError(
        f'num_updates must be an integer >= 0, got {num_updates!r}.'
    )
  if num_updates < 0:
    raise ValueError(f'num_updates must be an integer >= 0, got {num_updates}.')
  return int(num_updates)
