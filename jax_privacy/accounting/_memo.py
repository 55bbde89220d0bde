"""An in-process memo of calibrated noise multipliers.

Private: used by `calibrate.calibrate_noise_multiplier`.

Calibration is a pure function of its inputs, and runs, test suites and
notebooks often calibrate the same settings again (every
`DpsgdExecutionPlanConfig` with an `epsilon` calibrates when first asked).
Results are remembered, keyed by every input and by the accountant's type and
full state, for the library's own training accountants only: a subclass may
compute epsilon in its own way (or count its calls), so it is never memoized.

Privacy:
  A remembered noise multiplier is the one calibrated, and checked against
  the target, for exactly the same inputs and accountant state; it carries
  the same guarantee.
"""

import threading
from typing import Any, Hashable, Optional

from jax_privacy.accounting import analysis

# Training accountants whose epsilon depends only on their type and state.
_PURE_ACCOUNTANTS = (
    analysis.DpsgdTrainingAccountant,
    analysis.DpsgdTrainingUserLevelAccountant,
    analysis.SingleReleaseTrainingAccountant,
)
_MAX_ENTRIES = 256

_entries: dict[Hashable, float] = {}
_lock = threading.Lock()


def _freeze(value: Any) -> Hashable:
  """A hashable copy of a number, None, or a (nested) list/tuple of them."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(item) for item in value)
  hash(value)  # Raises TypeError for anything else unhashable.
  return (type(value).__name__, value)


def key(accountant, **inputs) -> Optional[Hashable]:
  """The memo key of a calibration, or None if it must not be memoized."""
  if type(accountant) not in _PURE_ACCOUNTANTS:
    return None
  try:
    state = tuple(
        (name, _freeze(value))
        for name, value in sorted(vars(accountant).items())
    )
    frozen = tuple(
        (name, _freeze(value)) for name, value in sorted(inputs.items())
    )
    result = (type(accountant), state, frozen)
    hash(result)
  except TypeError:
    return None
  return result


def get(memo_key: Optional[Hashable]) -> Optional[float]:
  if memo_key is None:
    return None
  with _lock:
    return _entries.get(memo_key)


def put(memo_key: Optional[Hashable], value: float) -> None:
  if memo_key is None:
    return
  with _lock:
    if len(_entries) >= _MAX_ENTRIES:
      del _entries[next(iter(_entries))]  # The oldest entry.
    _entries[memo_key] = value


def clear() -> None:
  """Forgets every remembered result (for tests and benchmarks)."""
  with _lock:
    _entries.clear()
