"""Runs one :class:`~.config.ExperimentConfig` on the DP trainer.

``run(config)`` is the pipeline of De et al. 2022 on
:class:`jax_privacy.training.DPTrainer`:

1. The data (``data.load_dataset``) and the model (``models.build_model``,
   optionally from a pretrained checkpoint) are loaded and checked on the
   host: a missing file, a model with batch normalization, a batch larger
   than the data set or images of the wrong size fail here, before anything
   is compiled.
2. The mechanism is a ``DpsgdExecutionPlanConfig``: Poisson sampling with
   expected batch size ``batch_size``, per-example clipping to
   ``clip_norm``, and the noise multiplier calibrated with the PLD
   accountant so that ``num_steps`` steps spend at most ``epsilon`` at
   ``delta`` (or ``noise_multiplier`` as given, e.g. the paper's, refused
   if those steps would spend more than ``epsilon``).
3. The loss of one example is the mean loss of its ``augmult`` augmented
   views (``augmult.make_augmult_loss``), clipped as one gradient by
   ``clipped_grad`` with ``grad_method`` ('auto': ghost clipping where it
   applies). Logical batches are accumulated over physical micro-batches of
   ``physical_batch_size`` examples.
4. The optimizer (SGD with momentum or Adam, optax schedule, weight decay)
   runs after the noise and is wrapped by
   ``averaging.with_parameter_averages`` (EMA and Polyak averages).
5. Every ``eval_every`` steps the raw, EMA and Polyak parameters are
   evaluated on the test set (``metrics.evaluate``: accuracy, per-class
   accuracy, disparities); every ``log_every`` steps a progress line reports
   the epsilon spent.

Checkpoints and resume are the trainer's: a run resumed from
``checkpoint_dir`` ends with the parameters the uninterrupted run would have.

Privacy:
  The guarantee is the plan's: ``(epsilon, delta)``-DP under add/remove-one
  neighbours for the Poisson-sampled DP-SGD run of ``num_steps`` steps (PLD
  accounting). Augmentation multiplicity averages an example's views before
  clipping, so it does not change the sensitivity; parameter averages and
  evaluation on the test set are post-processing. The seeds of the noise,
  sampling and augmentation streams are derived from ``config.seed`` so that
  a paper row can be rerun exactly; a deployment that publishes its config
  must use a secret seed.

References:
  De, Berrada, Hayes, Smith, Balle, "Unlocking High-Accuracy Differentially
  Private Image Classification through Scale", 2022, arXiv:2204.13650.
  Berrada et al., "Unlocking Accuracy and Fairness in Differentially Private
  Image Classification", 2023, arXiv:2308.10888.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx

from experiments.image_classification import augmult as augmult_lib
from experiments.image_classification import averaging
from experiments.image_classification import config as config_lib
from experiments.image_classification import data as data_lib
from experiments.image_classification import metrics as metrics_lib
from experiments.image_classification import models
from jax_privacy import training
from jax_privacy.experimental import execution_plan

PyTree = Any
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Seeds:
  """Independent seeds of a run's random streams, derived from one seed."""

  init: int
  sampling: int
  noise: int
  example: int

  @classmethod
  def from_seed(cls, seed: int) -> 'Seeds':
    init, sampling, noise, example = (
        int(s) for s in np.random.SeedSequence(seed).generate_state(4)
    )
    return cls(init=init, sampling=sampling, noise=noise, example=example)


def _schedule(config: config_lib.ExperimentConfig) -> optax.Schedule:
  lr = config.learning_rate
  if config.lr_schedule == 'constant':
    return optax.constant_schedule(lr)
  if config.lr_schedule == 'cosine':
    return optax.cosine_decay_schedule(lr, config.num_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=lr,
      warmup_steps=config.warmup_steps,
      decay_steps=config.num_steps,
  )


def make_optimizer(
    config: config_lib.ExperimentConfig,
) -> optax.GradientTransformation:
  """The optimizer that runs after the noise, with EMA and Polyak averages.

  SGD (with ``momentum`` when > 0) or Adam on the ``lr_schedule``; weight
  decay adds ``weight_decay * params`` to the noisy gradient. All of it is
  post-processing of the privatized gradient.
  """
  schedule = _schedule(config)
  if config.optimizer == 'sgd':
    base = optax.sgd(schedule, momentum=config.momentum or None)
  else:
    base = optax.adam(schedule)
  if config.weight_decay:
    base = optax.chain(optax.add_decayed_weights(config.weight_decay), base)
  return averaging.with_parameter_averages(
      base,
      ema_decay=config.ema_decay,
      polyak_start_step=config.polyak_start_step,
  )


class NnxFunction:
  """An NNX model as a pure function ``apply(params, images) -> logits``.

  ``params`` is a nested dict of arrays (``nnx.to_pure_dict`` of the
  model's ``nnx.Param`` state), which the trainer, optax and orbax take as
  it is. Non-parameter state (none in the models here) is kept constant.
  """

  def __init__(self, model: nnx.Module):
    self._graphdef, params, self._rest = nnx.split(model, nnx.Param, ...)
    self._template = params
    self.params = nnx.to_pure_dict(params)

  def apply(self, params: PyTree, images: jax.Array) -> jax.Array:
    state = jax.tree_util.tree_map(lambda leaf: leaf, self._template)
    nnx.replace_by_pure_dict(state, params)
    rest = jax.tree_util.tree_map(lambda leaf: leaf, self._rest)
    return nnx.merge(self._graphdef, state, rest)(images)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What :func:`prepare` checked and built on the host (nothing compiled).

  Attributes:
    config: the run's config.
    train: training data ``{'image': [N, H, W, 3], 'label': [N], ...}``.
    test: test data, likewise.
    model: the NNX model (with pretrained parameters when asked).
    function: the model as a pure function of its parameters.
    plan_config: the DP-SGD mechanism (calibrated lazily).
    seeds: the run's random streams.
    num_params: trainable scalars of the model.
    logits: ``logits(params, images)``, jitted (compiled on first use), for
      evaluation.
  """

  config: config_lib.ExperimentConfig
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  model: nnx.Module
  function: NnxFunction
  plan_config: execution_plan.DpsgdExecutionPlanConfig
  seeds: Seeds
  num_params: int
  logits: Callable[[PyTree, jax.Array], jax.Array]


def _normalizer(config) -> Callable[[jax.Array], jax.Array]:
  """Images (uint8 or float in [0, 1]) to standardized float32, on device,
  with the data set's channel statistics."""
  mean, std = data_lib.DATASET_STATS.get(
      config.dataset, (data_lib.NEUTRAL_MEAN, data_lib.NEUTRAL_STD)
  )
  return lambda images: data_lib.normalize(images, mean, std)


def _check_split(name: str, split: dict, config) -> None:
  images, labels = split.get('image'), split.get('label')
  if images is None or labels is None:
    raise ValueError(
        f"the {name} split must have 'image' and 'label' arrays, got keys "
        f'{sorted(split)}'
    )
  expected = (config.image_size, config.image_size, 3)
  if images.ndim != 4 or tuple(images.shape[1:]) != expected:
    raise ValueError(
        f'the {name} images of {config.dataset!r} have shape '
        f'{tuple(images.shape)}; image_size={config.image_size} expects '
        f'[N, {config.image_size}, {config.image_size}, 3] (NHWC, RGB)'
    )
  if len(labels) != len(images):
    raise ValueError(
        f'the {name} split has {len(images)} images but {len(labels)} labels'
    )
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= config.num_classes):
    raise ValueError(
        f'the {name} labels must be in [0, num_classes={config.num_classes})'
        f', got values in [{labels.min()}, {labels.max()}]'
    )


def _check_mesh(config, mesh) -> None:
  if mesh is None:
    return
  devices = mesh.shape[_batch_axis(mesh)]
  if config.physical_batch_size % devices:
    raise ValueError(
        f'physical_batch_size must be a multiple of the {devices} devices of '
        f'the mesh, got {config.physical_batch_size}'
    )


def _batch_axis(mesh) -> str:
  return 'batch' if 'batch' in mesh.shape else mesh.axis_names[0]


def _check_budget(config, plan_config) -> None:
  """A given noise multiplier must keep the whole run within epsilon."""
  if config.noise_multiplier is None:
    return  # calibrated to epsilon by the plan
  spent = plan_config.epsilon_after(config.num_steps)
  if not spent <= config.epsilon:
    raise ValueError(
        f'noise_multiplier {config.noise_multiplier:g} is too small: '
        f'{config.num_steps} steps at expected batch {config.batch_size} '
        f'of {plan_config.num_examples} examples would spend epsilon '
        f'{spent:.4f} > epsilon {config.epsilon:g} at delta '
        f'{config.delta:g}; raise noise_multiplier, lower num_steps, or '
        'leave noise_multiplier out to calibrate it to epsilon'
    )


def prepare(
    config: config_lib.ExperimentConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
    data: tuple[dict, dict] | None = None,
) -> Prepared:
  """Loads and checks the data and the model, and builds the mechanism.

  Everything here runs on the host; no training function is compiled, so
  bad input fails fast.

  Args:
    config: the run.
    mesh: the mesh the run will be sharded over, if any.
    data: ``(train, test)`` dicts of NumPy arrays (``'image'`` NHWC,
      ``'label'``, optionally ``'group'``) to use instead of loading
      ``config.dataset`` (e.g. a data set already in memory).

  Returns:
    The checked run.

  Raises:
    ValueError: on a batch size above the data set size, images of another
      size, labels out of range, a model with batch normalization, a
      physical batch size that does not split over the mesh, a missing
      pretrained checkpoint, or a ``noise_multiplier`` too small for
      ``epsilon``.
    FileNotFoundError: if the data files are missing (the message says what
      to put where).
  """
  if not isinstance(config, config_lib.ExperimentConfig):
    raise ValueError(
        f'config must be an ExperimentConfig, got {type(config).__name__}'
    )
  _check_mesh(config, mesh)
  if config.pretrained_checkpoint is not None and not os.path.isfile(
      config.pretrained_checkpoint
  ):
    raise ValueError(
        f'pretrained_checkpoint {config.pretrained_checkpoint!r} does not '
        'exist: point it to an .npz file written by models.save_params for '
        f'a {config.model!r} model'
    )
  if data is None:
    kwargs = (
        {'image_size': config.image_size}
        if config.dataset == 'image_folder'
        else {}
    )
    train, test = data_lib.load_dataset(
        config.dataset, config.data_dir, **kwargs
    )
  else:
    train, test = data
  if config.train_subset is not None:
    train = {k: v[: config.train_subset] for k, v in train.items()}
  _check_split('train', train, config)
  _check_split('test', test, config)
  num_examples = len(train['label'])
  if config.batch_size > num_examples:
    raise ValueError(
        f'batch_size must be <= the {num_examples} training examples of '
        f'{config.dataset!r}, got {config.batch_size}'
    )
  seeds = Seeds.from_seed(config.seed)
  model = models.build_model(
      config.model, config.num_classes, rngs=nnx.Rngs(seeds.init)
  )
  models.check_per_example_safe(model)
  if config.pretrained_checkpoint is not None:
    models.load_params(
        model, config.pretrained_checkpoint, skip_classifier=True
    )
  plan_config = execution_plan.DpsgdExecutionPlanConfig(
      iterations=config.num_steps,
      num_examples=num_examples,
      expected_batch_size=config.batch_size,
      epsilon=None if config.noise_multiplier is not None else config.epsilon,
      noise_multiplier=config.noise_multiplier,
      delta=config.delta,
      l2_clip_norm=config.clip_norm,
      noise_seed=seeds.noise,
  )
  _check_budget(config, plan_config)
  function = NnxFunction(model)
  normalize = _normalizer(config)
  return Prepared(
      config=config,
      train=train,
      test=test,
      model=model,
      function=function,
      plan_config=plan_config,
      seeds=seeds,
      num_params=models.count_params(model),
      logits=jax.jit(
          lambda params, images: function.apply(params, normalize(images))
      ),
  )


def make_loss(prepared: Prepared) -> Callable[..., jax.Array]:
  """The loss of ONE example: the mean cross-entropy of its augmult views."""
  config = prepared.config
  apply = prepared.function.apply
  normalize = _normalizer(config)

  def per_view_loss(params, images, labels):
    logits = apply(params, normalize(images))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  return augmult_lib.make_augmult_loss(
      per_view_loss,
      num_views=config.augmult,
      crop_padding=config.crop_padding,
      flip=config.flip,
  )


def make_trainer(
    prepared: Prepared, *, mesh: jax.sharding.Mesh | None = None
) -> training.DPTrainer:
  """The DP trainer of a prepared run (jitted lazily, on the first step)."""
  config = prepared.config
  return training.DPTrainer(
      loss_fn=make_loss(prepared),
      clipped_grad_method=config.grad_method,
      config=prepared.plan_config,
      optimizer=make_optimizer(config),
      sampling_seed=prepared.seeds.sampling,
      example_key_seed=prepared.seeds.example,
      physical_batch_size=config.physical_batch_size,
      mesh=mesh,
      batch_axis=_batch_axis(mesh) if mesh is not None else 'batch',
      checkpoint_tag=json.dumps(config.run_settings(), sort_keys=True),
  )


def parameter_sets(state: training.TrainState) -> dict[str, PyTree]:
  """The raw, EMA and Polyak parameters of a train state."""
  averages = averaging.averaged_params(state.opt_state)
  return {
      'raw': state.params,
      'ema': averages['ema'],
      'polyak': averages['polyak'],
  }


def evaluate(prepared: Prepared, state: training.TrainState) -> dict:
  """Test metrics of the raw, EMA and Polyak parameters of ``state``."""
  config = prepared.config
  logits = prepared.logits
  test = prepared.test
  results = {}
  for name, params in parameter_sets(state).items():
    results[name] = metrics_lib.evaluate(
        lambda images, params=params: logits(params, images),
        test['image'],
        test['label'],
        num_classes=config.num_classes,
        batch_size=config.eval_batch_size,
        groups=test.get('group'),
    )
  return results


class _Monitor:
  """The trainer's callback: progress lines, evaluations, step timing."""

  def __init__(self, prepared: Prepared, trainer, log: Log, start_step: int):
    self._prepared = prepared
    self._trainer = trainer
    self._log = log
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self.step_times: list[tuple[int, float]] = []
    self.evaluations: list[dict] = []

  def __call__(self, progress: training.TrainProgress) -> None:
    config = self._prepared.config
    jax.block_until_ready(progress.state.params)
    now = time.perf_counter()
    steps = progress.step - self._last_step
    if steps > 0:
      self.step_times.append((steps, now - self._last_time))
    seconds = (now - self._last_time) / max(steps, 1)
    done = progress.step == config.num_steps
    if progress.step % config.log_every == 0 or done:
      self._log(
          f'step {progress.step}/{config.num_steps}  epsilon spent '
          f'{progress.epsilon:.3f} of {config.epsilon:g} (delta '
          f'{config.delta:g})  {seconds:.2f} s/step'
      )
    if progress.step % config.eval_every == 0 or done:
      results = evaluate(self._prepared, progress.state)
      self.evaluations.append(
          {'step': progress.step, 'epsilon': progress.epsilon, **results}
      )
      self._log(
          f'eval at step {progress.step}: '
          + '  '.join(
              f"{name} accuracy {values['accuracy']:.4f}"
              for name, values in results.items()
          )
      )
    self._last_step = progress.step
    self._last_time = time.perf_counter()

  def seconds_per_step(self) -> float | None:
    """Median time per step over the intervals after the first (which
    includes compilation), or over the first when it is the only one."""
    rates = [t / s for s, t in self.step_times]
    if not rates:
      return None
    return float(np.median(rates[1:] if len(rates) > 1 else rates))


def run(
    config: config_lib.ExperimentConfig,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    log: Log = print,
    stop_after_steps: int | None = None,
    data: tuple[dict, dict] | None = None,
) -> dict[str, Any]:
  """Trains and evaluates one config with DP-SGD.

  Args:
    config: the run.
    checkpoint_dir: save the train state there (every ``eval_every`` steps
      and at the end); a directory that already holds a run is refused
      unless ``resume``.
    resume: continue the run saved in ``checkpoint_dir`` (it must exist and
      have been written with the same settings).
    mesh: a ``jax.sharding.Mesh`` to split each physical batch over (its
      ``'batch'`` axis, or its first axis).
    log: called with each progress and evaluation line.
    stop_after_steps: stop after this many steps of this call (the run can
      be resumed from its checkpoint); None runs to ``num_steps``.
    data: ``(train, test)`` arrays to use instead of loading
      ``config.dataset`` (see :func:`prepare`).

  Returns:
    A dict with ``noise_multiplier``, ``epsilon`` (spent),
    ``target_epsilon``, ``delta``, ``steps``,
    ``evaluations`` (one dict per evaluation: step, epsilon, and the
    metrics of the 'raw', 'ema' and 'polyak' parameters), ``final`` (the
    last evaluation), ``seconds_per_step``, ``num_train_examples``,
    ``num_params`` and ``state`` (the final ``TrainState``).

  Raises:
    ValueError: on bad input (see :func:`prepare`), a ``checkpoint_dir``
      holding another run, or ``resume`` without a checkpoint; all before
      anything is compiled.
    FileNotFoundError: if the data files are missing.
  """
  if resume and checkpoint_dir is None:
    raise ValueError('resume needs a checkpoint_dir to resume from')
  if stop_after_steps is not None and (
      not isinstance(stop_after_steps, int)
      or isinstance(stop_after_steps, bool)
      or stop_after_steps < 0
  ):
    raise ValueError(
        f'stop_after_steps must be None or an integer >= 0, got '
        f'{stop_after_steps!r}'
    )
  existing = (
      training.DPTrainer.latest_checkpoint_step(checkpoint_dir)
      if checkpoint_dir is not None
      else None
  )
  if resume and existing is None:
    raise ValueError(
        f'resume: {checkpoint_dir} holds no checkpoint to resume; start the '
        'run without resume'
    )
  if not resume and existing is not None:
    raise ValueError(
        f'{checkpoint_dir} already holds a run (step {existing}); pass '
        'resume (--resume) to continue it, or use another checkpoint_dir'
    )
  prepared = prepare(config, mesh=mesh, data=data)
  sigma = prepared.plan_config.calibrated_noise_multiplier
  origin = 'calibrated' if config.noise_multiplier is None else 'given'
  log(
      f'{config.model} ({prepared.num_params:,} parameters) on '
      f'{config.dataset} ({len(prepared.train["label"])} training examples)'
      f': {config.num_steps} steps, expected batch {config.batch_size}, '
      f'augmult {config.augmult}, noise multiplier {sigma:.4f} '
      f'({origin}) for ({config.epsilon:g}, {config.delta:g})-DP'
  )
  trainer = make_trainer(prepared, mesh=mesh)
  params = prepared.function.params
  if resume:
    state = trainer.restore(checkpoint_dir, params)
    log(f'resumed from step {int(state.step)} in {checkpoint_dir}')
  else:
    state = trainer.init(params)
  monitor = _Monitor(prepared, trainer, log, int(state.step))
  state = trainer.fit(
      prepared.train,
      state,
      num_steps=stop_after_steps,
      callbacks=[monitor],
      callback_every=math.gcd(config.log_every, config.eval_every),
      checkpoint_dir=checkpoint_dir,
      checkpoint_every=config.eval_every,
  )
  return {
      'noise_multiplier': sigma,
      'epsilon': trainer.epsilon_spent(state),
      'target_epsilon': config.epsilon,
      'delta': config.delta,
      'steps': int(state.step),
      'evaluations': monitor.evaluations,
      'final': monitor.evaluations[-1] if monitor.evaluations else None,
      'seconds_per_step': monitor.seconds_per_step(),
      'num_train_examples': len(prepared.train['label']),
      'num_params': prepared.num_params,
      'state': state,
  }
