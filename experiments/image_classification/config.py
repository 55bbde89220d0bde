"""One DP image-classification run, as a validated frozen config.

An :class:`ExperimentConfig` holds everything a run needs: the model, the
data, the privacy target, the logical and physical batch sizes, the
augmentation multiplicity, the optimizer and its schedule, parameter
averaging, evaluation and seeds, plus the provenance of the values (paper,
table, row, published accuracy, and which values the paper did not give
us). Each shipped table row is a TOML file in ``configs/``::

    config = load_config('experiments/image_classification/configs/'
                         'cifar10_wrn_16_4_eps8.toml',
                         overrides=['num_steps=10', 'data_dir=/data'])

Privacy:
  The privacy-relevant fields are ``epsilon``, ``delta``, ``batch_size``
  (the expected size of a Poisson-sampled batch), ``num_steps``,
  ``clip_norm`` and the optional ``noise_multiplier``. By default the runner
  calibrates the noise multiplier with the PLD accountant so that
  ``num_steps`` steps spend at most ``epsilon`` at ``delta``; a config that
  sets ``noise_multiplier`` (e.g. the paper's sigma, for an exact rerun)
  uses it as given, and the runner refuses it before compiling anything if
  ``num_steps`` steps at that sigma would spend more than ``epsilon``. ``physical_batch_size``, ``augmult``,
  ``grad_method``, the optimizer and averaging change speed, memory or
  accuracy, never the guarantee.

References:
  De, Berrada, Hayes, Smith, Balle, "Unlocking High-Accuracy Differentially
  Private Image Classification through Scale", 2022, arXiv:2204.13650.
  Berrada et al., "Unlocking Accuracy and Fairness in Differentially Private
  Image Classification", 2023, arXiv:2308.10888.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import tomllib
from typing import Any, Iterable, Sequence

LR_SCHEDULES = ('constant', 'cosine', 'linear_warmup_cosine')
OPTIMIZERS = ('sgd', 'adam')
GRAD_METHODS = ('auto', 'vectorized', 'ghost')
# Fields that describe where the values come from; they never change a run.
PROVENANCE_FIELDS = (
    'paper', 'table', 'row', 'published_accuracy', 'paper_noise_multiplier',
    'unverified', 'notes',
)
# Fields that change neither the mechanism nor the trajectory of a run (so
# a checkpoint may be resumed with other values).
_NON_RUN_FIELDS = PROVENANCE_FIELDS + ('data_dir', 'eval_every', 'log_every')


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return (
      isinstance(value, numbers.Real)
      and not isinstance(value, bool)
      and math.isfinite(value)
  )


def _check_int(name: str, value, minimum: int) -> None:
  if not _is_int(value) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')


def _check_real(name: str, value, accepts, accepted_range: str) -> None:
  if not _is_real(value) or not accepts(value):
    raise ValueError(f'{name} must be in {accepted_range}, got {value!r}')


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f'{name} must be one of {list(choices)}, got {value!r}')


def _check_str(name: str, value, *, optional: bool) -> None:
  if optional and value is None:
    return
  if not isinstance(value, str) or not value:
    what = 'None or a non-empty string' if optional else 'a non-empty string'
    raise ValueError(f'{name} must be {what}, got {value!r}')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
  """A DP-SGD image-classification run (one row of a paper's table).

  Attributes:
    model: a name ``models.build_model`` knows ('wrn-16-4', 'wrn-40-4',
      'wrn-D-K', 'nf-resnet-50', 'nfnet-f0' to 'nfnet-f3').
    dataset: the data set name ``data.load_dataset`` knows ('cifar10',
      'digits32', ...).
    data_dir: where the data files are (None: the loader's default; the
      digits data is bundled with scikit-learn and needs none).
    num_classes: number of classes, ``>= 2``.
    image_size: height and width of the (square) images, ``>= 8``.
    epsilon: target epsilon of the whole run, in ``(0, 100]``.
    delta: the delta of the guarantee, in ``(0, 1)``.
    batch_size: the logical (expected) batch size of Poisson sampling,
      ``>= 1`` (the papers use 4096).
    physical_batch_size: examples per compiled gradient call, ``>= 1``;
      larger batches are accumulated over several calls.
    augmult: augmentation multiplicity K, ``>= 1`` (views per example,
      averaged before clipping).
    crop_padding: reflect padding of the random crop, ``>= 0`` (0: none).
    flip: random horizontal flips.
    num_steps: number of DP-SGD steps, ``>= 1``.
    learning_rate: peak learning rate, ``> 0``.
    lr_schedule: one of :data:`LR_SCHEDULES` (optax schedules).
    warmup_steps: linear warm-up steps of 'linear_warmup_cosine', in
      ``[0, num_steps)``; must be 0 for the other schedules.
    optimizer: 'sgd' (with ``momentum``) or 'adam'.
    momentum: SGD momentum in ``[0, 1)`` (0: plain SGD); must be 0 with
      'adam'.
    weight_decay: L2 weight decay, ``>= 0``: ``weight_decay * params`` is
      added to the noisy gradient before the optimizer (post-processing).
    clip_norm: per-example L2 clipping norm, ``> 0``.
    noise_multiplier: None (default: calibrated with the PLD accountant to
      spend ``epsilon`` in ``num_steps`` steps), or the noise standard
      deviation over the clip norm, ``> 0``, used as given (the run is
      refused if it would spend more than ``epsilon``).
    ema_decay: decay of the exponential moving average of the parameters,
      in ``(0, 1)`` (with the warm-up ``min(ema_decay, (1 + t) / (10 + t))``
      of ``averaging.with_parameter_averages``).
    polyak_start_step: the Polyak (uniform) average starts at this step,
      in ``[0, num_steps)``.
    eval_every: evaluate every this many steps (and after the last), ``>= 1``.
    log_every: progress line every this many steps, ``>= 1``.
    eval_batch_size: examples per evaluation call, ``>= 1``.
    grad_method: per-example gradient algorithm of ``clipped_grad``
      ('auto': the fastest available); speed only, never the guarantee.
    seed: the run's seed (model init, sampling, noise and augmentation
      streams are derived from it, separately).
    pretrained_checkpoint: parameters to start from (fine-tuning), or None.
    train_subset: use only the first this many training examples (for
      smoke runs), or None for all of them.
    paper: the paper the row comes from (provenance only).
    table: the table in that paper.
    row: the row of that table.
    published_accuracy: the accuracy the paper reports for the row, in
      percent, or None.
    paper_noise_multiplier: the noise multiplier the paper used for the
      row, or None (provenance only: set ``noise_multiplier`` to run with
      it).
    unverified: names of fields whose value we could not check against the
      paper (our choice, documented as such).
    notes: free text: what differs from the paper and why.
  """

  model: str
  dataset: str
  num_classes: int
  image_size: int
  epsilon: float
  delta: float
  batch_size: int
  num_steps: int
  learning_rate: float
  data_dir: str | None = None
  physical_batch_size: int = 64
  augmult: int = 1
  crop_padding: int = 4
  flip: bool = True
  lr_schedule: str = 'constant'
  warmup_steps: int = 0
  optimizer: str = 'sgd'
  momentum: float = 0.0
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  noise_multiplier: float | None = None
  ema_decay: float = 0.999
  polyak_start_step: int = 0
  eval_every: int = 100
  log_every: int = 10
  eval_batch_size: int = 256
  grad_method: str = 'auto'
  seed: int = 0
  pretrained_checkpoint: str | None = None
  train_subset: int | None = None
  paper: str = ''
  table: str = ''
  row: str = ''
  published_accuracy: float | None = None
  paper_noise_multiplier: float | None = None
  unverified: tuple[str, ...] = ()
  notes: str = ''

  def __post_init__(self):
    _check_str('model', self.model, optional=False)
    _check_str('dataset', self.dataset, optional=False)
    _check_str('data_dir', self.data_dir, optional=True)
    _check_int('num_classes', self.num_classes, 2)
    _check_int('image_size', self.image_size, 8)
    _check_real('epsilon', self.epsilon, lambda v: 0 < v <= 100, '(0, 100]')
    _check_real('delta', self.delta, lambda v: 0 < v < 1, '(0, 1)')
    _check_int('batch_size', self.batch_size, 1)
    _check_int('physical_batch_size', self.physical_batch_size, 1)
    _check_int('augmult', self.augmult, 1)
    _check_int('crop_padding', self.crop_padding, 0)
    if self.crop_padding >= self.image_size:
      raise ValueError(
          f'crop_padding must be in [0, image_size={self.image_size}), got '
          f'{self.crop_padding}'
      )
    if not isinstance(self.flip, bool):
      raise ValueError(f'flip must be true or false, got {self.flip!r}')
    _check_int('num_steps', self.num_steps, 1)
    _check_real(
        'learning_rate', self.learning_rate, lambda v: v > 0, '(0, inf)'
    )
    _check_choice('lr_schedule', self.lr_schedule, LR_SCHEDULES)
    _check_int('warmup_steps', self.warmup_steps, 0)
    if self.lr_schedule == 'linear_warmup_cosine':
      if self.warmup_steps >= self.num_steps:
        raise ValueError(
            f'warmup_steps must be in [0, num_steps={self.num_steps}), got '
            f'{self.warmup_steps}'
        )
    elif self.warmup_steps:
      raise ValueError(
          "warmup_steps must be 0 unless lr_schedule='linear_warmup_cosine', "
          f'got {self.warmup_steps} with {self.lr_schedule!r}'
      )
    _check_choice('optimizer', self.optimizer, OPTIMIZERS)
    _check_real('momentum', self.momentum, lambda v: 0 <= v < 1, '[0, 1)')
    if self.optimizer == 'adam' and self.momentum:
      raise ValueError(
          f"momentum must be 0 with optimizer='adam' (Adam has its own "
          f'moments), got {self.momentum}'
      )
    _check_real(
        'weight_decay', self.weight_decay, lambda v: v >= 0, '[0, inf)'
    )
    _check_real('clip_norm', self.clip_norm, lambda v: v > 0, '(0, inf)')
    for name in ('noise_multiplier', 'paper_noise_multiplier'):
      if getattr(self, name) is not None:
        _check_real(
            name, getattr(self, name), lambda v: v > 0,
            '(0, inf) or absent (none)',
        )
    _check_real('ema_decay', self.ema_decay, lambda v: 0 < v < 1, '(0, 1)')
    _check_int('polyak_start_step', self.polyak_start_step, 0)
    if self.polyak_start_step >= self.num_steps:
      raise ValueError(
          f'polyak_start_step must be in [0, num_steps={self.num_steps}), '
          f'got {self.polyak_start_step}'
      )
    _check_int('eval_every', self.eval_every, 1)
    _check_int('log_every', self.log_every, 1)
    _check_int('eval_batch_size', self.eval_batch_size, 1)
    _check_choice('grad_method', self.grad_method, GRAD_METHODS)
    if not _is_int(self.seed) or self.seed < 0:
      raise ValueError(f'seed must be an integer >= 0, got {self.seed!r}')
    _check_str(
        'pretrained_checkpoint', self.pretrained_checkpoint, optional=True
    )
    if self.train_subset is not None:
      _check_int('train_subset', self.train_subset, 1)
      if self.batch_size > self.train_subset:
        raise ValueError(
            f'batch_size must be <= train_subset ({self.train_subset}), got '
            f'{self.batch_size}'
        )
    for name in ('paper', 'table', 'row', 'notes'):
      if not isinstance(getattr(self, name), str):
        raise ValueError(
            f'{name} must be a string, got {getattr(self, name)!r}'
        )
    if self.published_accuracy is not None:
      _check_real(
          'published_accuracy',
          self.published_accuracy,
          lambda v: 0 <= v <= 100,
          '[0, 100] (percent) or absent',
      )
    if not isinstance(self.unverified, tuple):
      raise ValueError(
          f'unverified must be a tuple of field names, got {self.unverified!r}'
      )
    names = {field.name for field in dataclasses.fields(self)}
    unknown = [n for n in self.unverified if n not in names]
    if unknown:
      raise ValueError(
          f'unverified must name fields of ExperimentConfig, got {unknown}'
      )

  def run_settings(self) -> dict[str, Any]:
    """The fields that decide the run's trajectory (not its provenance,
    data location or logging), for checkpoint compatibility."""
    return {
        field.name: getattr(self, field.name)
        for field in dataclasses.fields(self)
        if field.name not in _NON_RUN_FIELDS
    }


def _field_types() -> dict[str, Any]:
  return {field.name: field for field in dataclasses.fields(ExperimentConfig)}


def _coerce(name: str, value: Any) -> Any:
  """TOML values to field values (lists to tuples, ints to floats)."""
  if name == 'unverified' and isinstance(value, list):
    return tuple(value)
  float_fields = (
      'epsilon', 'delta', 'learning_rate', 'momentum', 'weight_decay',
      'clip_norm', 'ema_decay', 'published_accuracy', 'noise_multiplier',
      'paper_noise_multiplier',
  )
  if name in float_fields and _is_int(value):
    return float(value)
  return value


def _parse_override(text: str) -> tuple[str, Any]:
  """``key=value``: the value is read as a TOML value, or as a bare string."""
  if '=' not in text:
    raise ValueError(f'an override must be key=value, got {text!r}')
  key, raw = (part.strip() for part in text.split('=', 1))
  key = key.replace('-', '_')
  if key not in _field_types():
    raise ValueError(
        f'unknown config key {key!r} in override {text!r}; known keys: '
        f'{sorted(_field_types())}'
    )
  if raw.lower() in ('none', 'null'):
    return key, None
  try:
    value = tomllib.loads(f'value = {raw}')['value']
  except tomllib.TOMLDecodeError:
    value = raw
  return key, value


def config_from_dict(
    values: dict[str, Any], *, source: str = 'config'
) -> ExperimentConfig:
  """An :class:`ExperimentConfig` from a mapping; unknown keys are refused.

  Raises:
    ValueError: on an unknown or missing key, or a bad value (naming the
      field and its accepted range).
  """
  known = _field_types()
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ValueError(
        f'{source}: unknown config keys {unknown}; known keys: '
        f'{sorted(known)}'
    )
  missing = sorted(
      name
      for name, field in known.items()
      if field.default is dataclasses.MISSING and name not in values
  )
  if missing:
    raise ValueError(f'{source}: missing required config keys {missing}')
  kwargs = {name: _coerce(name, value) for name, value in values.items()}
  try:
    return ExperimentConfig(**kwargs)
  except ValueError as error:
    raise ValueError(f'{source}: {error}') from None


def load_config(
    path: str | os.PathLike, overrides: Iterable[str] = ()
) -> ExperimentConfig:
  """Reads a TOML config and applies ``key=value`` overrides.

  Args:
    path: a ``.toml`` file whose top-level keys are the fields of
      :class:`ExperimentConfig`.
    overrides: ``key=value`` strings (command-line ``--set``); values are
      parsed as TOML values (``num_steps=10``, ``data_dir="/data"``;
      a bare word is a string, ``none`` is None).

  Returns:
    The validated config.

  Raises:
    ValueError: if the file is missing or not valid TOML, or on an unknown
      key or a bad value.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f'config file {path} does not exist')
  try:
    with open(path, 'rb') as file:
      values = tomllib.load(file)
  except tomllib.TOMLDecodeError as error:
    raise ValueError(f'{path} is not valid TOML: {error}') from None
  for text in overrides:
    key, value = _parse_override(text)
    values[key] = value
  return config_from_dict(values, source=path)
