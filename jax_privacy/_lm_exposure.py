"""Canary secrets and their exposure (Carlini et al., "The Secret Sharer").

Private helpers of :mod:`jax_privacy.lm_finetuning`, which re-exports the
public names; import them from there.

A canary is a sentence ``prefix + secret`` whose secret is drawn uniformly
from a randomness space ``R`` of known size (e.g. six digits: ``|R| =
10**6``). After training, every candidate ``prefix + r`` (``r`` in ``R``) is
scored by the model's log-perplexity (minus the log-probability of the
sequence). The canary's rank is its position when the candidates are sorted
from the most to the least likely, and its exposure is

    exposure = log2 |R| - log2 rank,

between 0 and ``log2 |R|``: a model that never saw the canary ranks it in
the middle on average (exposure about 1), a model that memorised it ranks it
first (exposure ``log2 |R|``).

References:
  Carlini, Liu, Erlingsson, Kos, Song, "The Secret Sharer: Evaluating and
  Testing Unintended Memorization in Neural Networks", USENIX Security 2019,
  arXiv:1802.08232.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import numpy as np
from scipy import stats

# Enumerating more candidates than this is refused (use sampled candidates
# and estimated_exposure instead).
_MAX_ENUMERATED = 10**7


@dataclasses.dataclass(frozen=True, kw_only=True)
class Canary:
  """A secret sentence ``prefix + ' ' + secret`` inserted into a corpus.

  Attributes:
    prefix: the fixed, known part, e.g. ``'my secret code is'``.
    secret: the random part, as indices into ``alphabet`` (one per symbol).
    alphabet: the symbols a secret is made of, e.g. ``'0123456789'``.
    separator: written between the symbols of the secret (``' '`` gives
      ``'4 8 1 5 9 2'``).
  """

  prefix: str
  secret: tuple[int, ...]
  alphabet: str = '0123456789'
  separator: str = ' '

  def __post_init__(self):
    if not isinstance(self.prefix, str):
      raise ValueError(f'prefix must be a str, got {self.prefix!r}')
    if not isinstance(self.alphabet, str) or len(set(self.alphabet)) < 2 or (
        len(set(self.alphabet)) != len(self.alphabet)
    ):
      raise ValueError(
          'alphabet must be a str of at least 2 distinct symbols, got '
          f'{self.alphabet!r}'
      )
    if not isinstance(self.separator, str):
      raise ValueError(f'separator must be a str, got {self.separator!r}')
    if not self.secret or not all(
        isinstance(s, numbers.Integral) and 0 <= s < len(self.alphabet)
        for s in self.secret
    ):
      raise ValueError(
          'secret must be a non-empty tuple of indices in '
          f'[0, {len(self.alphabet)}), got {self.secret!r}'
      )

  @property
  def num_symbols(self) -> int:
    return len(self.secret)

  @property
  def space_size(self) -> int:
    """``|R|``: the number of possible secrets."""
    return len(self.alphabet) ** self.num_symbols

  @property
  def text(self) -> str:
    """The canary sentence."""
    return self.format(self.secret)

  def format(self, secret: Sequence[int]) -> str:
    """The sentence with ``secret`` (indices into the alphabet) in it."""
    symbols = self.separator.join(self.alphabet[int(s)] for s in secret)
    return f'{self.prefix} {symbols}' if self.prefix else symbols

  def all_secrets(self) -> np.ndarray:
    """Every secret of the space, int32 ``[space_size, num_symbols]``.

    Row ``i`` is ``i`` written in base ``len(alphabet)``, most significant
    symbol first.

    Raises:
      ValueError: if the space has more than 10**7 secrets (sample with
        :meth:`sample_secrets` and use ``estimated_exposure``).
    """
    if self.space_size > _MAX_ENUMERATED:
      raise ValueError(
          f'the space has {self.space_size} secrets, more than '
          f'{_MAX_ENUMERATED} to enumerate; sample candidates with '
          'sample_secrets and use estimated_exposure'
      )
    base = len(self.alphabet)
    index = np.arange(self.space_size, dtype=np.int64)
    powers = base ** np.arange(self.num_symbols - 1, -1, -1, dtype=np.int64)
    return ((index[:, None] // powers) % base).astype(np.int32)

  def index_of(self, secret: Sequence[int]) -> int:
    """The row of ``secret`` in :meth:`all_secrets`."""
    value = 0
    for symbol in secret:
      value = value * len(self.alphabet) + int(symbol)
    return value

  def sample_secrets(self, rng, num_samples: int) -> np.ndarray:
    """``num_samples`` secrets drawn uniformly (with replacement).

    Args:
      rng: a ``np.random.Generator`` or an int seed.
      num_samples: an integer >= 1.

    Returns:
      int32 ``[num_samples, num_symbols]``.
    """
    if isinstance(num_samples, bool) or not isinstance(
        num_samples, numbers.Integral
    ) or num_samples < 1:
      raise ValueError(
          f'num_samples must be an integer >= 1, got {num_samples!r}'
      )
    rng = np.random.default_rng(rng)
    return rng.integers(
        0, len(self.alphabet), (num_samples, self.num_symbols)
    ).astype(np.int32)


def make_canaries(
    seed,
    num_canaries: int,
    *,
    num_symbols: int = 6,
    prefixes: str | Sequence[str] = 'my secret code is',
    alphabet: str = '0123456789',
    separator: str = ' ',
) -> list[Canary]:
  """Canaries with distinct secrets drawn uniformly from a known space.

  Example::

      canaries = make_canaries(0, 3, num_symbols=6)
      canaries[0].text        # e.g. 'my secret code is 4 8 1 5 9 2'
      canaries[0].space_size  # 10**6

  Args:
    seed: an int seed or a ``np.random.Generator``.
    num_canaries: how many, an integer >= 1 (at most the space size).
    num_symbols: symbols per secret, an integer >= 1; the space has
      ``len(alphabet) ** num_symbols`` secrets.
    prefixes: one prefix for all canaries, or one per canary (e.g. a name
      each, so that each secret is measured on its own).
    alphabet: the symbols of a secret (at least 2, distinct).
    separator: written between the symbols.

  Returns:
    ``num_canaries`` canaries whose secrets are independent, uniform and
    pairwise distinct.

  Raises:
    ValueError: on a bad argument (the message names it).
  """
  for name, value in (('num_canaries', num_canaries),
                      ('num_symbols', num_symbols)):
    if isinstance(value, bool) or not isinstance(
        value, numbers.Integral
    ) or value < 1:
      raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
  if isinstance(prefixes, str):
    prefixes = [prefixes] * num_canaries
  prefixes = list(prefixes)
  if len(prefixes) != num_canaries:
    raise ValueError(
        f'prefixes must be one str or {num_canaries} (num_canaries) of them, '
        f'got {len(prefixes)}'
    )
  if not isinstance(alphabet, str) or len(set(alphabet)) < 2:
    raise ValueError(
        f'alphabet must be a str of at least 2 distinct symbols, got '
        f'{alphabet!r}'
    )
  space_size = len(alphabet) ** num_symbols
  if num_canaries > space_size:
    raise ValueError(
        f'num_canaries ({num_canaries}) must be <= the space size '
        f'{space_size} (len(alphabet) ** num_symbols) for distinct secrets'
    )
  rng = np.random.default_rng(seed)
  secrets: list[tuple[int, ...]] = []
  while len(secrets) < num_canaries:
    secret = tuple(int(s) for s in rng.integers(0, len(alphabet), num_symbols))
    if secret not in secrets:
      secrets.append(secret)
  return [
      Canary(prefix=p, secret=s, alphabet=alphabet, separator=separator)
      for p, s in zip(prefixes, secrets)
  ]


def _as_finite_scalar(name: str, value) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{name} must be a finite number, got {value!r}') from e
  if not math.isfinite(value):
    raise ValueError(f'{name} must be a finite number, got {value!r}')
  return value


def _as_finite_vector(name: str, values) -> np.ndarray:
  values = np.asarray(values, np.float64).reshape(-1)
  if values.size == 0:
    raise ValueError(f'{name} must hold at least one value, got none')
  if not np.all(np.isfinite(values)):
    bad = values[~np.isfinite(values)][:3]
    raise ValueError(f'{name} must be finite, got values such as {bad}')
  return values


def canary_rank(canary_log_perplexity, reference_log_perplexities) -> float:
  """The canary's rank among all candidates (1 = the most likely).

  Args:
    canary_log_perplexity: the canary's log-perplexity.
    reference_log_perplexities: those of every OTHER candidate of the space
      (all ``|R| - 1`` of them).

  Returns:
    ``1 + #{references below the canary} + #{references equal to it} / 2``
    (ties share their ranks evenly).
  """
  canary = _as_finite_scalar('canary_log_perplexity', canary_log_perplexity)
  refs = _as_finite_vector(
      'reference_log_perplexities', reference_log_perplexities
  )
  below, ties = np.sum(refs < canary), np.sum(refs == canary)
  return 1.0 + float(below) + 0.5 * float(ties)


def canary_exposure(canary_log_perplexity, reference_log_perplexities) -> float:
  """Exact exposure ``log2 |R| - log2 rank`` over an enumerated space.

  Args:
    canary_log_perplexity: the log-perplexity of the canary sentence (or of
      its secret given the prefix: the prefix's part is the same for every
      candidate, so either gives the same rank), in any log base.
    reference_log_perplexities: those of every OTHER candidate of the
      space, in the same base; ``|R|`` is their number plus one.

  Returns:
    The exposure in bits, in ``[0, log2 |R|]``.

  Raises:
    ValueError: on an empty or non-finite input.

  References:
    Carlini et al., "The Secret Sharer", 2019, arXiv:1802.08232 (Def. 4).
  """
  rank = canary_rank(canary_log_perplexity, reference_log_perplexities)
  space_size = np.asarray(reference_log_perplexities).size + 1
  return math.log2(space_size) - math.log2(rank)


def estimated_exposure(
    canary_log_perplexity,
    sampled_log_perplexities,
    *,
    space_size: int | None = None,
) -> float:
  """Exposure estimated from sampled candidates (too many to enumerate).

  The paper's extrapolation: the log-perplexities of random candidates are
  well described by a skew-normal distribution; fit one (maximum
  likelihood) to the samples, and the fraction of the space more likely
  than the canary is its CDF at the canary's log-perplexity, so

      exposure ~= -log2 CDF(canary_log_perplexity).

  Unlike counting samples, this extends past ``log2(number of samples)``.

  Args:
    canary_log_perplexity: the canary's log-perplexity.
    sampled_log_perplexities: those of candidates drawn uniformly from the
      space (at least 10, with some spread).
    space_size: ``|R|``, if known: the estimate is capped at ``log2 |R|``,
      the largest exposure there is.

  Returns:
    The estimated exposure in bits (>= 0).

  Raises:
    ValueError: on too few, constant or non-finite samples, or a bad
      ``space_size``.

  References:
    Carlini et al., "The Secret Sharer", 2019, arXiv:1802.08232 (Sec. 4.3,
    approximating exposure by distribution modeling).
  """
  canary = _as_finite_scalar('canary_log_perplexity', canary_log_perplexity)
  samples = _as_finite_vector(
      'sampled_log_perplexities', sampled_log_perplexities
  )
  if samples.size < 10 or np.ptp(samples) == 0:
    raise ValueError(
        'sampled_log_perplexities must hold at least 10 values that are not '
        f'all equal to fit a distribution, got {samples.size} values with '
        f'range {np.ptp(samples):g}'
    )
  if space_size is not None and (
      isinstance(space_size, bool)
      or not isinstance(space_size, numbers.Integral)
      or space_size < 2
  ):
    raise ValueError(
        f'space_size must be None or an integer >= 2, got {space_size!r}'
    )
  shape, loc, scale = stats.skewnorm.fit(samples)
  log_cdf = float(stats.skewnorm.logcdf(canary, shape, loc=loc, scale=scale))
  exposure = max(0.0, -log_cdf / math.log(2.0))
  if space_size is not None:
    exposure = min(exposure, math.log2(space_size))
  return exposure
