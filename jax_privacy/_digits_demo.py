"""The demo behind `jax-privacy train`: DP-SGD on scikit-learn's digits.

A small multi-layer perceptron (64 pixels -> 64 tanh units -> 10 classes,
parameters in a dict) is trained with DP-SGD by `training.DPTrainer`:

* `accounting` calibrates the noise multiplier with the PLD accountant for
  the planned number of steps, and reports the epsilon of the steps run.
* An `experimental.execution_plan.DpsgdExecutionPlanConfig` with that noise
  builds the mechanism: Poisson batches (each step, every training example
  joins independently with probability q = batch_size / n), per-example
  gradients clipped to `clip_norm` and summed over the expected batch size,
  and Gaussian noise of stddev noise_multiplier x the sensitivity of that
  sum, chained before `optax.sgd`.
* The trainer pads the variable Poisson batches to one compiled size, saves
  and resumes checkpoints (`checkpoint_dir`), and stops at the plan's end.

Privacy:
  The guarantee covers the trained parameters (and anything computed from
  them, such as the test accuracy) with respect to the training split, under
  Poisson sampling and add-or-remove-one neighbouring data sets. Nothing
  else computed from the training examples is reported: a noiseless training
  loss would not be covered by the guarantee.

References:
  Abadi et al., "Deep Learning with Differential Privacy", 2016.
  arXiv:1607.00133.
"""

import dataclasses
import json
import math
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy import batch_selection
from jax_privacy import training
from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate
from jax_privacy.experimental import execution_plan

# The split is fixed (not drawn from --seed) so that runs with different seeds
# are evaluated on the same test examples.
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2
_HIDDEN_UNITS = 64
_NUM_CLASSES = 10
_NUM_FEATURES = 64
_PAD_MULTIPLE = 32
_MODEL = 'MLP 64-64-10 (tanh), SGD'
_PLD_GRID = 1e-3

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DigitsData:
  """The digits data set, split into training (private) and test examples."""

  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray

  @property
  def num_train(self) -> int:
    return len(self.train_y)

  @property
  def num_test(self) -> int:
    return len(self.test_y)


def load_digits_data() -> DigitsData:
  """Loads the 8x8 digits bundled with scikit-learn, split 80/20 stratified.

  Raises:
    ModuleNotFoundError: If scikit-learn is not installed.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  images, labels = datasets.load_digits(return_X_y=True)
  # Pixels are counts in the public range 0..16, so they are scaled to
  # [-1, 1] by that range. Standardizing with the mean and variance of the
  # training split instead would use the private data outside the DP
  # mechanism, and the model would no longer be covered by the guarantee.
  features = ((images - 8.0) / 8.0).astype(np.float32)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      features,
      labels.astype(np.int32),
      test_size=_TEST_FRACTION,
      stratify=labels,
      random_state=_SPLIT_SEED,
  )
  return DigitsData(train_x, train_y, test_x, test_y)


@jax.jit
def init_mlp(key: jax.Array) -> Params:
  """Returns LeCun-normal weights and zero biases for the MLP."""
  hidden_key, output_key = jax.random.split(key)
  return {
      'hidden_w': jax.random.normal(hidden_key, (_NUM_FEATURES, _HIDDEN_UNITS))
      / math.sqrt(_NUM_FEATURES),
      'hidden_b': jnp.zeros(_HIDDEN_UNITS),
      'output_w': jax.random.normal(output_key, (_HIDDEN_UNITS, _NUM_CLASSES))
      / math.sqrt(_HIDDEN_UNITS),
      'output_b': jnp.zeros(_NUM_CLASSES),
  }


def mlp_logits(params: Params, features: jax.Array) -> jax.Array:
  hidden = jnp.tanh(features @ params['hidden_w'] + params['hidden_b'])
  return hidden @ params['output_w'] + params['output_b']


def cross_entropy(params: Params, features: jax.Array, labels: jax.Array):
  """Mean cross-entropy over the leading axis (of size 1 for one example)."""
  return optax.softmax_cross_entropy_with_integer_labels(
      mlp_logits(params, features), labels
  ).mean()


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """What the user chose; validated by the command line before any JAX work.

  Attributes:
    target_epsilon: The privacy budget epsilon the run must not exceed.
    delta: The delta of the (epsilon, delta) guarantee.
    epochs: Number of passes, each of round(n / batch_size) steps.
    batch_size: Expected batch size; the sampling probability is
      batch_size / n.
    clip_norm: L2 norm each example's gradient is clipped to.
    learning_rate: Step size of SGD.
    seed: Seeds the initialization, the batch sampling and the noise, each
      through its own stream.
  """

  target_epsilon: float = 3.0
  delta: float = 1e-5
  epochs: int = 15
  batch_size: int = 128
  clip_norm: float = 1.0
  learning_rate: float = 1.0
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """The mechanism a run executes, fixed before training starts.

  Attributes:
    noise_multiplier: Noise stddev over the clip norm, calibrated so that
      `num_steps` steps spend at most the target epsilon.
    num_steps: Number of DP-SGD steps, a whole number of epochs.
    steps_per_epoch: Steps between two progress reports.
    sampling_prob: Probability q that an example joins a batch.
    dp_params: The accountant's description of the run.
  """

  noise_multiplier: float
  num_steps: int
  steps_per_epoch: int
  sampling_prob: float
  dp_params: analysis.DpParams


def make_accountant() -> analysis.DpsgdTrainingAccountant:
  """PLD accounting on a 1e-3 grid.

  The accountant's discretization is pessimistic, so a coarser grid can only
  overstate epsilon; for this run it does so by about 1e-4 against the 1e-4
  grid, and is about 8 times faster, which matters because calibration and
  the per-epoch progress each query the accountant many times.
  """
  return analysis.DpsgdTrainingAccountant(
      dp_accountant_config=accountants.PldAccountantConfig(
          value_discretization_interval=_PLD_GRID
      )
  )


def plan_privacy(
    settings: TrainSettings,
    num_train: int,
    accountant: analysis.DpsgdTrainingAccountant,
) -> PrivacyPlan:
  """Calibrates the noise multiplier for the run's number of steps.

  Raises:
    ValueError: If the settings cannot meet the budget.
    RuntimeError: If the calibrated plan would exceed the budget (a bug).
  """
  steps_per_epoch = max(1, round(num_train / settings.batch_size))
  num_steps = settings.epochs * steps_per_epoch
  noise_multiplier = calibrate.calibrate_noise_multiplier(
      target_epsilon=settings.target_epsilon,
      accountant=accountant,
      batch_sizes=settings.batch_size,
      num_updates=num_steps,
      num_samples=num_train,
      target_delta=settings.delta,
      tol=0.001,
  )
  dp_params = analysis.DpParams(
      noise_multipliers=noise_multiplier,
      num_samples=num_train,
      delta=settings.delta,
      batch_size=settings.batch_size,
  )
  planned_epsilon = accountant.compute_epsilon(num_steps, dp_params)
  if planned_epsilon > settings.target_epsilon:
    raise RuntimeError(
        f'Calibration returned noise_multiplier={noise_multiplier}, which'
        f' spends epsilon={planned_epsilon} > target'
        f' {settings.target_epsilon} over {num_steps} steps; refusing to'
        ' train.'
    )
  return PrivacyPlan(
      noise_multiplier=noise_multiplier,
      num_steps=num_steps,
      steps_per_epoch=steps_per_epoch,
      sampling_prob=settings.batch_size / num_train,
      dp_params=dp_params,
  )


@dataclasses.dataclass(frozen=True)
class EpochProgress:
  """What `train_private` reports after each epoch.

  Attributes:
    epoch: The epoch just finished, from 1.
    step: Steps run so far.
    test_accuracy: Accuracy of the current parameters on the test split.
    epsilon: Epsilon spent by the steps run so far.
  """

  epoch: int
  step: int
  test_accuracy: float
  epsilon: float


def _padded_batches(
    sampling_prob: float,
    num_steps: int,
    num_examples: int,
    rng: np.random.Generator,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Draws the run's Poisson batches and pads them all to one size.

  The batches are drawn up front so that every one can be padded to the
  largest size in the run (rounded up to a multiple of _PAD_MULTIPLE): the
  train step then compiles once. Padding only changes shapes; padding
  examples contribute nothing to the update.

  Returns:
    One `(indices, is_padding)` pair per step; padding slots hold index 0.
  """
  sampler = batch_selection.CyclicPoissonSampling(
      sampling_prob=sampling_prob, iterations=num_steps
  )
  batches = list(sampler.batch_iterator(num_examples, rng=rng))
  largest = max(1, max(len(indices) for indices in batches))
  size = _PAD_MULTIPLE * math.ceil(largest / _PAD_MULTIPLE)
  padded = []
  for indices in batches:
    indices = np.concatenate(
        [indices, np.full(size - len(indices), -1, dtype=indices.dtype)]
    )
    is_padding = indices < 0
    padded.append((np.where(is_padding, 0, indices), is_padding))
  return padded


def _accuracy_fn(data: DigitsData) -> Callable[[Params], float]:
  test_x, test_y = jnp.asarray(data.test_x), jnp.asarray(data.test_y)
  num_correct = jax.jit(
      lambda params: jnp.sum(
          jnp.argmax(mlp_logits(params, test_x), axis=-1) == test_y
      )
  )
  return lambda params: int(num_correct(params)) / data.num_test


def _streams(seed: int) -> tuple[jax.Array, int, int]:
  """Independent seeds for initialization, noise and batch sampling."""
  init_seed, noise_seed, sampling_seed = (
      int(s) for s in np.random.SeedSequence(seed).generate_state(3)
  )
  return jax.random.key(init_seed), noise_seed, sampling_seed


def _physical_batch_size(batch_size: int, num_train: int) -> int:
  """The compiled batch size: the expected size plus three standard
  deviations of the Poisson batch size, rounded up to a multiple of
  _PAD_MULTIPLE. The rare larger batch is processed in two chunks whose
  clipped sums are added, with the same result."""
  q = batch_size / num_train
  largest = batch_size + 3.0 * math.sqrt(batch_size * (1.0 - q))
  return _PAD_MULTIPLE * math.ceil(largest / _PAD_MULTIPLE)


def _example_loss(params: Params, example, key: jax.Array) -> jax.Array:
  del key  # The model has no randomness of its own (no dropout).
  features, labels = example
  return cross_entropy(params, features, labels)


def make_trainer(
    settings: TrainSettings, plan: PrivacyPlan, num_train: int
) -> training.DPTrainer:
  """The DP-SGD trainer of a run: the plan's mechanism and SGD.

  Its checkpoints record every setting of the run (through the trainer's
  `checkpoint_tag`), so a checkpoint is only resumed by the same run.
  """
  _, noise_seed, sampling_seed = _streams(settings.seed)
  config = execution_plan.DpsgdExecutionPlanConfig(
      iterations=plan.num_steps,
      num_examples=num_train,
      expected_batch_size=settings.batch_size,
      delta=settings.delta,
      noise_multiplier=plan.noise_multiplier,
      l2_clip_norm=settings.clip_norm,
      noise_seed=noise_seed,
      accountant=accountants.PldAccountantConfig(
          value_discretization_interval=_PLD_GRID
      ),
  )
  return training.DPTrainer(
      loss_fn=_example_loss,
      config=config,
      optimizer=optax.sgd(settings.learning_rate),
      sampling_seed=sampling_seed,
      physical_batch_size=_physical_batch_size(settings.batch_size, num_train),
      checkpoint_tag=json.dumps(
          {'model': _MODEL, **dataclasses.asdict(settings)}, sort_keys=True
      ),
  )


def train_private(
    data: DigitsData,
    settings: TrainSettings,
    plan: PrivacyPlan,
    accountant: analysis.DpsgdTrainingAccountant,
    on_epoch: Optional[Callable[[EpochProgress], None]] = None,
    *,
    checkpoint_dir: Optional[str] = None,
    stop_after_steps: Optional[int] = None,
) -> tuple[Params, int]:
  """Runs DP-SGD as planned; returns the parameters and the steps run.

  Args:
    data: The digits split.
    settings: The run's settings.
    plan: The calibrated plan.
    accountant: Unused (the trainer accounts with the same PLD grid); kept
      so that callers can pass the accountant they calibrated with.
    on_epoch: Called with progress after each epoch.
    checkpoint_dir: If given, the run continues from the latest checkpoint
      there (if any) and saves one after every epoch and at the end.
    stop_after_steps: Run at most this many steps in this call (the rest can
      be run later from the checkpoint).

  Returns:
    The parameters and the number of steps run so far, in total.
  """
  del accountant
  init_key, _, _ = _streams(settings.seed)
  trainer = make_trainer(settings, plan, data.num_train)
  params = init_mlp(init_key)
  if checkpoint_dir is None:
    state = trainer.init(params)
  else:
    state = trainer.restore(checkpoint_dir, params)
  callbacks = []
  if on_epoch is not None:
    accuracy = _accuracy_fn(data)

    def report(progress: training.TrainProgress) -> None:
      if progress.step % plan.steps_per_epoch == 0:
        on_epoch(
            EpochProgress(
                epoch=progress.step // plan.steps_per_epoch,
                step=progress.step,
                test_accuracy=accuracy(progress.state.params),
                epsilon=progress.epsilon,
            )
        )

    callbacks.append(report)
  state = trainer.fit(
      (data.train_x, data.train_y),
      state,
      num_steps=stop_after_steps,
      callbacks=callbacks,
      callback_every=plan.steps_per_epoch,
      checkpoint_dir=checkpoint_dir,
      checkpoint_every=plan.steps_per_epoch,
  )
  return state.params, int(state.step)


def train_non_private(
    data: DigitsData, settings: TrainSettings, plan: PrivacyPlan
) -> Params:
  """Trains the same model on the same batches without clipping or noise."""
  init_key, _, sampling_seed = _streams(settings.seed)
  optimizer = optax.sgd(settings.learning_rate)

  def batch_loss(params, features, labels, is_padding):
    losses = optax.softmax_cross_entropy_with_integer_labels(
        mlp_logits(params, features), labels
    )
    real = jnp.logical_not(is_padding)
    return jnp.sum(jnp.where(real, losses, 0.0)) / jnp.maximum(real.sum(), 1)

  @jax.jit
  def train_step(params, opt_state, features, labels, is_padding):
    grads = jax.grad(batch_loss)(params, features, labels, is_padding)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = init_mlp(init_key)
  opt_state = optimizer.init(params)
  batches = _padded_batches(
      plan.sampling_prob,
      plan.num_steps,
      data.num_train,
      np.random.default_rng(sampling_seed),
  )
  for indices, is_padding in batches:
    params, opt_state = train_step(
        params,
        opt_state,
        data.train_x[indices],
        data.train_y[indices],
        is_padding,
    )
  return params


@dataclasses.dataclass(frozen=True)
class DigitsResult:
  """The outcome of a demo run: what the command line prints.

  Attributes:
    test_accuracy: Accuracy of the privately trained model on the test split.
    epsilon_spent: Epsilon of the steps actually run (PLD accountant).
    target_epsilon: The budget; `epsilon_spent` never exceeds it.
    delta: Delta of the guarantee.
    noise_multiplier: Calibrated noise stddev over the clip norm.
    steps: DP-SGD steps run so far (with a resumed run: in total).
    planned_steps: Steps of the whole plan; fewer were run only when the run
      was asked to stop early (to be resumed from its checkpoint).
    resumed_from_step: The checkpoint's step the run continued from (0 for
      a fresh run).
    epochs: Epochs planned.
    expected_batch_size: Expected size of a Poisson batch.
    sampling_prob: Probability q that an example joins a batch.
    clip_norm: Per-example gradient clip norm.
    learning_rate: SGD step size.
    seed: The seed of the run.
    num_train_examples: Size of the private training split.
    num_test_examples: Size of the test split.
    sampling: The sampling and neighbouring relation the guarantee assumes.
    accountant: The accountant that computed epsilon.
    non_private_test_accuracy: Accuracy of the same model trained without
      DP, if requested.
    wall_time_seconds: Time of the whole run.
  """

  test_accuracy: float
  epsilon_spent: float
  target_epsilon: float
  delta: float
  noise_multiplier: float
  steps: int
  planned_steps: int
  resumed_from_step: int
  epochs: int
  expected_batch_size: int
  sampling_prob: float
  clip_norm: float
  learning_rate: float
  seed: int
  num_train_examples: int
  num_test_examples: int
  sampling: str
  accountant: str
  non_private_test_accuracy: Optional[float]
  wall_time_seconds: float


def run(
    data: DigitsData,
    settings: TrainSettings,
    *,
    compare_non_private: bool = False,
    on_plan: Optional[Callable[[PrivacyPlan], None]] = None,
    on_epoch: Optional[Callable[[EpochProgress], None]] = None,
    checkpoint_dir: Optional[str] = None,
    stop_after_steps: Optional[int] = None,
) -> DigitsResult:
  """Plans, trains and accounts for one run of the demo.

  Args:
    data: The digits split.
    settings: The run's settings (already validated).
    compare_non_private: Also train the model without DP.
    on_plan: Called with the calibrated plan before training.
    on_epoch: Called with progress after each epoch.
    checkpoint_dir: Save checkpoints there, continuing from the latest one
      if there is one (it must be of the same settings).
    stop_after_steps: Run at most this many steps in this call.

  Raises:
    ValueError: If the settings cannot meet the budget, or the checkpoint
      in `checkpoint_dir` is of another run.
    RuntimeError: If the run spent more than the target epsilon, or stopped
      short of the plan unasked (a bug).
  """
  start = time.perf_counter()
  accountant = make_accountant()
  plan = plan_privacy(settings, data.num_train, accountant)
  if on_plan is not None:
    on_plan(plan)
  resumed_from = 0
  if checkpoint_dir is not None:
    latest = training.DPTrainer.latest_checkpoint_step(checkpoint_dir)
    resumed_from = latest or 0
  params, steps = train_private(
      data,
      settings,
      plan,
      accountant,
      on_epoch,
      checkpoint_dir=checkpoint_dir,
      stop_after_steps=stop_after_steps,
  )
  epsilon_spent = accountant.compute_epsilon(steps, plan.dp_params)
  stopped_early = stop_after_steps is not None and steps < plan.num_steps
  if (
      steps != plan.num_steps and not stopped_early
  ) or epsilon_spent > settings.target_epsilon:
    raise RuntimeError(
        f'The run took {steps} of {plan.num_steps} planned steps and spent'
        f' epsilon={epsilon_spent} against a target of'
        f' {settings.target_epsilon}.'
    )
  non_private_accuracy = None
  if compare_non_private:
    non_private_accuracy = _accuracy_fn(data)(
        train_non_private(data, settings, plan)
    )
  return DigitsResult(
      test_accuracy=_accuracy_fn(data)(params),
      epsilon_spent=epsilon_spent,
      target_epsilon=settings.target_epsilon,
      delta=settings.delta,
      noise_multiplier=plan.noise_multiplier,
      steps=steps,
      planned_steps=plan.num_steps,
      resumed_from_step=resumed_from,
      epochs=settings.epochs,
      expected_batch_size=settings.batch_size,
      sampling_prob=plan.sampling_prob,
      clip_norm=settings.clip_norm,
      learning_rate=settings.learning_rate,
      seed=settings.seed,
      num_train_examples=data.num_train,
      num_test_examples=data.num_test,
      sampling=(
          f'Poisson sampling with q={plan.sampling_prob:.4g},'
          ' add/remove-one neighbouring relation'
      ),
      accountant='PLD (dp_accounting)',
      non_private_test_accuracy=non_private_accuracy,
      wall_time_seconds=time.perf_counter() - start,
  )
