"""`DPKerasConfig` and its accounting (private; public in `keras_api`).

Kept free of Keras imports so that the privacy settings can be built, and
calibrated, without the optional dependency.
"""

import dataclasses
import functools
import math
import numbers

from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate

# PLD on a 1e-3 grid: pessimistic (it can only overstate epsilon) and several
# times faster than the 1e-4 default, which matters because epsilon is
# recomputed after every epoch.
_VALUE_DISCRETIZATION_INTERVAL = 1e-3
# Calibration tolerance in noise multiplier; the result always meets the
# target, this only bounds how much noise is wasted.
_CALIBRATION_TOL = 1e-3


@functools.lru_cache(maxsize=1)
def make_accountant() -> analysis.DpsgdTrainingAccountant:
  """The accountant that calibrates, checks and reports epsilon."""
  return analysis.DpsgdTrainingAccountant(
      dp_accountant_config=accountants.PldAccountantConfig(
          value_discretization_interval=_VALUE_DISCRETIZATION_INTERVAL
      )
  )


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int) -> None:
  if not _is_int(value) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')


def _check_positive(name: str, value) -> None:
  if not (_is_real(value) and math.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be a finite number > 0, got {value!r}')


@dataclasses.dataclass(frozen=True)
class DPKerasConfig:
  """The DP-SGD settings of a Keras model made private by `make_private`.

  One update of the model is one DP-SGD step: a Poisson sample of the
  training set with expected size ``batch_size * gradient_accumulation_steps``
  (the *effective batch size*), each example's gradient clipped to L2 norm
  ``clipping_norm``, the clipped gradients summed, Gaussian noise of stddev
  ``noise_multiplier * clipping_norm`` added, and the result divided by the
  effective batch size before the optimizer sees it.

  Validated on construction. With ``noise_multiplier=None`` the smallest
  noise multiplier meeting ``(epsilon, delta)`` over ``train_steps`` updates
  is calibrated and stored in the field; a given ``noise_multiplier`` is
  checked against the target instead, and refused if it would exceed it.

  Attributes:
    epsilon: the privacy budget epsilon of the whole run, finite and > 0.
    delta: the delta of the (epsilon, delta) guarantee, in (0, 1); usually
      well below ``1 / train_size``.
    clipping_norm: the L2 norm every example's gradient is clipped to, > 0.
    batch_size: the expected number of examples per micro-batch, an integer
      in ``[1, train_size]``.
    gradient_accumulation_steps: number of micro-batches whose clipped
      gradients are summed before one noisy update, an integer >= 1. The
      effective (expected) batch size of an update is ``batch_size *
      gradient_accumulation_steps`` and must not exceed ``train_size``.
    train_steps: number of DP-SGD updates the budget pays for, an integer
      >= 1; ``fit`` refuses to run past it.
    train_size: number of examples in the training set, an integer >= 1;
      ``fit`` checks its data against it.
    poisson_sampling_in_fit: ``True`` (the default): ``fit`` draws Poisson
      batches, as the accountant assumes. ``False``: plain shuffled batches
      of fixed size; epsilon is then reported without amplification by
      sampling (see `keras_api`), usually far above ``epsilon``.
    noise_multiplier: noise stddev over the clipping norm, finite and > 0,
      or ``None`` to calibrate it from ``epsilon``.
    rescale_to_unit_norm: divide each clipped gradient by ``clipping_norm``
      (so the update does not scale with it; the learning rate then plays
      the role of ``clipping_norm * learning_rate``).
    microbatch_size: ``None`` or the number of examples whose per-example
      gradients are materialised at once on the device (memory only; the
      result is the same). By default it is the micro-batch of gradient
      accumulation (the whole batch when ``gradient_accumulation_steps=1``).
    seed: an integer >= 0 that seeds the batch sampling, the noise and the
      per-example dropout keys, or ``None`` to draw one from the operating
      system in `make_private`. The resulting key is stored in the model's
      state either way, so a saved model resumes reproducibly.

  Privacy:
    Example-level (epsilon, delta)-DP of the model weights released after at
    most ``train_steps`` updates, under add-or-remove-one neighbours,
    assuming the batches are Poisson samples with probability ``q =
    batch_size * gradient_accumulation_steps / train_size`` (what ``fit``
    draws by default) and that the seed stays secret. Accounted with
    dp_accounting's PLD accountant (pessimistic discretisation).

  References:
    Abadi et al., "Deep Learning with Differential Privacy", 2016,
    arXiv:1607.00133.
  """

  epsilon: float
  delta: float
  clipping_norm: float
  batch_size: int
  gradient_accumulation_steps: int
  train_steps: int
  train_size: int
  poisson_sampling_in_fit: bool = True
  noise_multiplier: float | None = None
  rescale_to_unit_norm: bool = True
  microbatch_size: int | None = None
  seed: int | None = None

  def __post_init__(self):
    _check_positive('epsilon', self.epsilon)
    if not (_is_real(self.delta) and 0 < self.delta < 1):
      raise ValueError(f'delta must be in (0, 1), got {self.delta!r}')
    _check_positive('clipping_norm', self.clipping_norm)
    _check_int('batch_size', self.batch_size, 1)
    _check_int(
        'gradient_accumulation_steps', self.gradient_accumulation_steps, 1
    )
    _check_int('train_steps', self.train_steps, 1)
    _check_int('train_size', self.train_size, 1)
    if self.batch_size > self.train_size:
      raise ValueError(
          f'batch_size must be <= train_size ({self.train_size}), got '
          f'{self.batch_size}: a batch is drawn from the training set'
      )
    if self.effective_batch_size > self.train_size:
      raise ValueError(
          'batch_size * gradient_accumulation_steps must be <= train_size '
          f'({self.train_size}), got {self.batch_size} * '
          f'{self.gradient_accumulation_steps} = {self.effective_batch_size}; '
          'lower gradient_accumulation_steps or batch_size'
      )
    for name in ('poisson_sampling_in_fit', 'rescale_to_unit_norm'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(
            f'{name} must be True or False, got {getattr(self, name)!r}'
        )
    if self.microbatch_size is not None:
      _check_int('microbatch_size', self.microbatch_size, 1)
    if self.seed is not None:
      _check_int('seed', self.seed, 0)
    if self.noise_multiplier is None:
      object.__setattr__(self, 'noise_multiplier', self._calibrate())
    else:
      _check_positive('noise_multiplier', self.noise_multiplier)
      object.__setattr__(
          self, 'noise_multiplier', float(self.noise_multiplier)
      )
      planned = self.epsilon_after(self.train_steps, poisson=True)
      if planned > self.epsilon:
        raise ValueError(
            f'noise_multiplier={self.noise_multiplier} spends epsilon='
            f'{planned:.4f} > epsilon={self.epsilon} over train_steps='
            f'{self.train_steps} updates of expected size '
            f'{self.effective_batch_size} out of train_size='
            f'{self.train_size}; raise noise_multiplier, or pass '
            'noise_multiplier=None to calibrate it'
        )

  @property
  def effective_batch_size(self) -> int:
    """Expected number of examples per update (with accumulation)."""
    return self.batch_size * self.gradient_accumulation_steps

  @property
  def sampling_prob(self) -> float:
    """Probability that an example takes part in one update (Poisson)."""
    return self.effective_batch_size / self.train_size

  @property
  def steps_per_epoch(self) -> int:
    """Updates per epoch: ``floor(train_size / effective_batch_size)``."""
    return self.train_size // self.effective_batch_size

  def dp_params(self, *, poisson: bool) -> analysis.DpParams:
    """The accountant's description of the run.

    Args:
      poisson: describe Poisson batches (True) or shuffled batches of fixed
        size, accounted without amplification (False).
    """
    method = analysis.SamplingMethod
    return analysis.DpParams(
        noise_multipliers=self.noise_multiplier,
        num_samples=self.train_size,
        delta=self.delta,
        batch_size=self.effective_batch_size,
        sampling_method=method.POISSON if poisson else method.SHUFFLED,
    )

  def epsilon_after(self, num_updates: int, *, poisson: bool) -> float:
    """Epsilon spent by ``num_updates`` updates (0 for none)."""
    if num_updates <= 0:
      return 0.0
    return _epsilon(self, int(num_updates), poisson)

  def _calibrate(self) -> float:
    return _calibrated_noise_multiplier(
        self.epsilon,
        self.delta,
        self.effective_batch_size,
        self.train_steps,
        self.train_size,
    )


# Both are pure functions of their arguments; caching them makes rebuilding a
# config (e.g. when a saved model is loaded) and per-epoch reports cheap.
@functools.lru_cache(maxsize=256)
def _calibrated_noise_multiplier(
    epsilon, delta, batch_size, num_updates, num_samples
) -> float:
  return calibrate.calibrate_noise_multiplier(
      target_epsilon=epsilon,
      accountant=make_accountant(),
      batch_sizes=batch_size,
      num_updates=num_updates,
      num_samples=num_samples,
      target_delta=delta,
      tol=_CALIBRATION_TOL,
  )


@functools.lru_cache(maxsize=1024)
def _epsilon(config: 'DPKerasConfig', num_updates: int, poisson: bool) -> float:
  return make_accountant().compute_epsilon(
      num_updates, config.dp_params(poisson=poisson)
  )
