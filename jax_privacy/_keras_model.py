"""The private Keras model returned by `keras_api.make_private` (private).

`DPModel` wraps the user's model as its only layer and overrides the public
hooks of Keras 3 on the JAX backend: ``train_step`` (the stateless JAX step
that ``fit`` jit-compiles), ``fit`` (to feed it batches drawn as the
accountant assumes), ``compile`` (to refuse optimizers that would rescale
gradients behind the clipping) and ``get_config`` / ``from_config`` (so that
``model.save`` and ``keras.models.load_model`` keep the DP settings). No
private Keras function is patched; the train step reads two private
attributes of ``keras.Model`` (``_loss_tracker``, to report the loss as
Keras does, and ``_flatten_layers`` in `keras_api`, to find unsupported
layers).
"""

import dataclasses
import logging
import secrets

import jax
import jax.numpy as jnp
import keras
import numpy as np

from jax_privacy import clipping
from jax_privacy import noise_addition
from jax_privacy._keras_config import DPKerasConfig
from jax_privacy._keras_data import BatchPlan
from jax_privacy._keras_data import as_host_arrays
from jax_privacy._keras_data import num_examples

# Device-side streams derived from (stored key, update index) with fold_in;
# the host-side sampling streams are in _keras_data.
_NOISE_STREAM = 0
_DROPOUT_STREAM = 1
_SEED_STATE_SUFFIX = 'seed_generator_state'


def seed_to_key_data(seed: int | None) -> np.ndarray:
  """The two uint32 words of a threefry key for ``seed`` (OS entropy if None).

  For ``seed < 2**32`` this equals ``jax.random.key_data(jax.random.key(
  seed))``; larger seeds use their high word too.
  """
  if seed is None:
    seed = secrets.randbits(64)
    logging.info(
        'DPKerasConfig.seed is None: drew a secret seed from the operating '
        'system; it is stored (as a key) in the model\'s DP state.'
    )
  return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def check_optimizer(optimizer) -> None:
  """Refuses optimizers that rescale the loss or accumulate by themselves."""
  if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
    raise ValueError(
        'optimizer must not be a LossScaleOptimizer (used by the '
        'mixed_float16 policy): loss scaling would scale gradients before '
        'they are clipped. Use float32 or the mixed_bfloat16 policy, or '
        'compile(..., auto_scale_loss=False).'
    )
  if getattr(optimizer, 'loss_scale_factor', None) is not None:
    raise ValueError(
        'optimizer.loss_scale_factor must be None, got '
        f'{optimizer.loss_scale_factor}: loss scaling would scale gradients '
        'before they are clipped'
    )
  steps = getattr(optimizer, 'gradient_accumulation_steps', None)
  if steps not in (None, 1):
    raise ValueError(
        f'optimizer.gradient_accumulation_steps must be None, got {steps}: '
        'accumulate with DPKerasConfig.gradient_accumulation_steps, so that '
        'noise is added once per update and accounted for'
    )


@keras.saving.register_keras_serializable(package='jax_privacy')
class DPModel(keras.Model):
  """A Keras model trained with DP-SGD; build it with `make_private`.

  Attributes:
    private_model: the wrapped model (its weights are this model's weights).
    dp_config: the `DPKerasConfig`, with its noise multiplier.
  """

  def __init__(self, private_model, dp_config, **kwargs):
    super().__init__(**kwargs)
    self.private_model = private_model
    self.dp_config = dp_config
    self._dp_steps = self.add_weight(
        name='dp_steps_taken',
        shape=(),
        dtype='int32',
        initializer='zeros',
        trainable=False,
    )
    self._dp_key = self.add_weight(
        name='dp_rng_key',
        shape=(2,),
        dtype='uint32',
        initializer='zeros',
        trainable=False,
    )
    self._dp_key.assign(seed_to_key_data(dp_config.seed))
    if private_model.built:
      self.built = True

  def call(self, inputs, training=None):
    return self.private_model(inputs, training=training)

  @property
  def dp_steps_taken(self) -> int:
    """DP-SGD updates run so far (saved with the model)."""
    self.jax_state_sync()  # Inside fit, the latest state lives in the step.
    return int(np.asarray(keras.ops.convert_to_numpy(self._dp_steps.value)))

  def epsilon_spent(self) -> float:
    """Epsilon of the updates run so far, for the sampling ``fit`` uses."""
    return self.dp_config.epsilon_after(
        self.dp_steps_taken, poisson=self.dp_config.poisson_sampling_in_fit
    )

  def _batch_plan(self) -> BatchPlan:
    self.jax_state_sync()
    words = np.asarray(keras.ops.convert_to_numpy(self._dp_key.value))
    return BatchPlan(self.dp_config, (int(words[0]), int(words[1])))

  def get_config(self):
    return {
        'name': self.name,
        'trainable': self.trainable,
        'private_model': keras.saving.serialize_keras_object(
            self.private_model
        ),
        'dp_config': dataclasses.asdict(self.dp_config),
    }

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    model = keras.saving.deserialize_keras_object(
        config.pop('private_model'), custom_objects=custom_objects
    )
    dp_config = DPKerasConfig(**config.pop('dp_config'))
    return cls(model, dp_config, **config)

  def compile(
      self,
      optimizer='rmsprop',
      loss=None,
      loss_weights=None,
      metrics=None,
      weighted_metrics=None,
      **kwargs,
  ):
    """As ``keras.Model.compile``; ``metrics`` are compiled as weighted.

    Padded batches mark padding rows with sample weight 0, and Keras applies
    sample weights only to ``weighted_metrics``; so when
    ``weighted_metrics`` is None, ``metrics`` are passed as
    ``weighted_metrics`` (same names in the logs). Given both, ``metrics``
    also count padding rows in the training logs (a warning says so).
    """
    if weighted_metrics is None:
      metrics, weighted_metrics = None, metrics
    elif metrics:
      logging.warning(
          'compile got both metrics and weighted_metrics: the unweighted '
          'metrics also count the padding rows of Poisson batches in the '
          'training logs; pass all metrics as weighted_metrics to avoid it'
      )
    super().compile(
        optimizer=optimizer,
        loss=loss,
        loss_weights=loss_weights,
        metrics=metrics,
        weighted_metrics=weighted_metrics,
        **kwargs,
    )
    check_optimizer(self.optimizer)

  def get_compile_config(self):
    return super().get_compile_config()

  def compile_from_config(self, config):
    """Recompiles from `get_compile_config` (used by ``load_model``)."""
    self.compile(**keras.saving.deserialize_keras_object(config))
    if self.built:
      self.optimizer.build(self.trainable_variables)

  def train_on_batch(self, *args, **kwargs):
    raise RuntimeError(
        'train_on_batch is not available on a private model: its batch would '
        'not be drawn by the DP sampler the accountant assumes, nor counted '
        'against train_steps. Use fit.'
    )

  def fit(
      self,
      x=None,
      y=None,
      batch_size=None,
      epochs=1,
      verbose='auto',
      callbacks=None,
      validation_split=0.0,
      validation_data=None,
      shuffle=True,
      class_weight=None,
      sample_weight=None,
      initial_epoch=0,
      steps_per_epoch=None,
      validation_steps=None,
      validation_batch_size=None,
      validation_freq=1,
  ):
    """Trains with DP-SGD on batches drawn as the accountant assumes.

    As ``keras.Model.fit``, except: ``x`` / ``y`` / ``sample_weight`` must
    be arrays holding the whole training set (``train_size`` examples);
    ``batch_size`` must be None or ``dp_config.batch_size``;
    ``steps_per_epoch`` counts DP-SGD updates (default
    ``dp_config.steps_per_epoch``); ``shuffle`` is ignored (the sampler
    decides); ``validation_split`` and ``class_weight`` are refused.
    ``logs['epsilon']`` holds the epsilon spent after each epoch.

    Raises:
      ValueError: on data that does not match ``dp_config``, or a run that
        would take more than ``dp_config.train_steps`` updates in total
        (checked before any training).
    """
    del shuffle
    config = self.dp_config
    if batch_size is not None and batch_size != config.batch_size:
      raise ValueError(
          f'batch_size must be None or DPKerasConfig.batch_size '
          f'({config.batch_size}), got {batch_size}: the batch size is part '
          'of the privacy analysis'
      )
    if validation_split:
      raise ValueError(
          f'validation_split must be 0, got {validation_split}: it would '
          'change the training set the accountant counts; pass '
          'validation_data instead'
      )
    if class_weight is not None:
      raise ValueError(
          'class_weight must be None on a private model; pass per-example '
          'weights as sample_weight instead'
      )
    x = as_host_arrays('x', x)
    y = as_host_arrays('y', y)
    sample_weight = as_host_arrays('sample_weight', sample_weight)
    size = num_examples(x=x, y=y, sample_weight=sample_weight)
    if size != config.train_size:
      raise ValueError(
          f'DPKerasConfig.train_size ({config.train_size}) must equal the '
          f'number of training examples given to fit, got {size}: the '
          'sampling probability and epsilon are computed from train_size'
      )
    if sample_weight is not None and sample_weight.shape != (size,):
      raise ValueError(
          f'sample_weight must have shape ({size},), got '
          f'{sample_weight.shape}'
      )
    if steps_per_epoch is None:
      steps_per_epoch = config.steps_per_epoch
    elif isinstance(steps_per_epoch, bool) or not isinstance(
        steps_per_epoch, int
    ) or steps_per_epoch < 1:
      raise ValueError(
          f'steps_per_epoch must be None or an integer >= 1, got '
          f'{steps_per_epoch!r}'
      )
    num_epochs = epochs - initial_epoch
    if num_epochs < 1:
      raise ValueError(
          f'epochs must be > initial_epoch ({initial_epoch}), got {epochs}'
      )
    taken = self.dp_steps_taken
    planned = num_epochs * steps_per_epoch
    remaining = config.train_steps - taken
    if planned > remaining:
      raise ValueError(
          f'fit would run {num_epochs} epoch(s) x {steps_per_epoch} updates '
          f'= {planned} DP-SGD updates, but only {remaining} of '
          f'DPKerasConfig.train_steps={config.train_steps} remain '
          f'({taken} taken): the privacy budget pays for train_steps '
          f'updates only. Run at most {remaining // steps_per_epoch} '
          'epoch(s), or pass a smaller steps_per_epoch.'
      )
    if not config.poisson_sampling_in_fit:
      _warn_shuffling(config)
    batches = self._batch_plan().batches(x, y, sample_weight, taken, planned)
    return super().fit(
        batches,
        epochs=epochs,
        verbose=verbose,
        callbacks=[EpsilonReporter()] + list(callbacks or []),
        validation_data=validation_data,
        shuffle=False,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        validation_steps=validation_steps,
        validation_batch_size=validation_batch_size or config.batch_size,
        validation_freq=validation_freq,
    )

  def clipped_gradient_fn(self, batch_size: int):
    """The clipped-sum gradient of one padded batch of ``batch_size`` rows.

    Returns a `clipping.BoundedSensitivityCallable` of ``(trainable,
    x, y, sample_weight, key, non_trainable, metrics_variables,
    optimizer_variables, is_padding_example=...)`` giving ``(sum over
    examples of clipped gradients / effective batch size,
    AuxiliaryOutput(values=per-example loss, aux=per-example y_pred))``.
    """
    config = self.dp_config
    accumulation = config.gradient_accumulation_steps
    microbatch_size = config.microbatch_size
    if microbatch_size is None and accumulation > 1:
      microbatch_size = -(-batch_size // accumulation)
    seed_indices = [
        i
        for i, variable in enumerate(self.non_trainable_variables)
        if variable.path.endswith(_SEED_STATE_SUFFIX)
    ]

    def example_loss(
        trainable, x, y, weight, key, non_trainable, metrics, optimizer
    ):
      # Each example's dropout (and any other Keras random layer) gets its
      # own key, so masks are independent across examples.
      non_trainable = list(non_trainable)
      for i in seed_indices:
        non_trainable[i] = jax.random.key_data(
            jax.random.fold_in(key, i)
        ).astype(non_trainable[i].dtype)
      _, (loss, y_pred, _, _) = self.compute_loss_and_updates(
          trainable,
          non_trainable,
          metrics,
          x,
          y,
          weight,
          training=True,
          optimizer_variables=optimizer,
      )
      return loss, y_pred

    return clipping.clipped_grad(
        example_loss,
        has_aux=True,
        l2_clip_norm=config.clipping_norm,
        rescale_to_unit_norm=config.rescale_to_unit_norm,
        normalize_by=float(config.effective_batch_size),
        batch_argnums=(1, 2, 3),
        return_values=True,
        microbatch_size=microbatch_size,
        prng_argnum=4,
        method='auto',
    )

  def _dp_variable_index(self, variable) -> int:
    for i, candidate in enumerate(self.non_trainable_variables):
      if candidate is variable:
        return i
    raise RuntimeError(f'{variable.path} is not a variable of this model')

  def train_step(self, state, data):
    trainable, non_trainable, optimizer_vars, metrics_vars = state
    x, y, weight = keras.utils.unpack_x_y_sample_weight(data)
    is_padding = weight == 0
    steps_index = self._dp_variable_index(self._dp_steps)
    step = non_trainable[steps_index]
    step_key = jax.random.fold_in(
        jax.random.wrap_key_data(
            non_trainable[self._dp_variable_index(self._dp_key)],
            impl='threefry2x32',
        ),
        step,
    )
    grad_fn = self.clipped_gradient_fn(weight.shape[0])
    summed, aux = grad_fn(
        trainable,
        x,
        y,
        weight,
        jax.random.fold_in(step_key, _DROPOUT_STREAM),
        non_trainable,
        metrics_vars,
        optimizer_vars,
        is_padding_example=is_padding,
    )
    noise = noise_addition.gaussian_noise_like(
        summed,
        jax.random.fold_in(step_key, _NOISE_STREAM),
        self.dp_config.noise_multiplier * grad_fn.sensitivity(),
    )
    grads = [
        (g + n).astype(v.dtype) for g, n, v in zip(summed, noise, trainable)
    ]
    trainable, optimizer_vars = self.optimizer.stateless_apply(
        optimizer_vars, grads, trainable
    )
    non_trainable = list(non_trainable)
    non_trainable[steps_index] = step + 1
    real = jnp.logical_not(is_padding)
    num_real = jnp.sum(real)
    mean_loss = jnp.sum(jnp.where(real, aux.values, 0.0)) / jnp.maximum(
        num_real, 1
    )
    y_pred = jax.tree_util.tree_map(
        lambda a: a.reshape((a.shape[0],) + a.shape[2:]), aux.aux
    )
    logs, metrics_vars = self._updated_metrics(
        metrics_vars, mean_loss, num_real, x, y, y_pred, weight
    )
    return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

  def _updated_metrics(self, metrics_vars, loss, num_real, x, y, y_pred, w):
    """Updates the loss tracker and compiled metrics on the real examples."""
    mapping = list(zip(self.metrics_variables, metrics_vars))
    with keras.StatelessScope(state_mapping=mapping) as scope:
      self._loss_tracker.update_state(loss, sample_weight=num_real)
      logs = self.compute_metrics(x, y, y_pred, w)
    new_values = []
    for variable, old in mapping:
      value = scope.get_current_value(variable)
      new_values.append(old if value is None else value)
    return logs, new_values


class EpsilonReporter(keras.callbacks.Callback):
  """Adds ``logs['epsilon']`` (epsilon spent so far) after every epoch.

  ``fit`` of a private model puts one first in its callbacks, so History,
  the progress bar and the user's callbacks all see the entry.
  """

  def on_epoch_end(self, epoch, logs=None):
    epsilon = self.model.epsilon_spent()
    if logs is not None:
      logs['epsilon'] = epsilon
    config = self.model.dp_config
    logging.info(
        'DP epoch %d: %d of %d updates taken, epsilon spent %.4f of %.4f '
        '(delta=%g, %s sampling)',
        epoch + 1,
        self.model.dp_steps_taken,
        config.train_steps,
        epsilon,
        config.epsilon,
        config.delta,
        'Poisson' if config.poisson_sampling_in_fit else 'shuffled',
    )


def _warn_shuffling(config: DPKerasConfig) -> None:
  proven = config.epsilon_after(config.train_steps, poisson=False)
  logging.warning(
      'poisson_sampling_in_fit=False: fit draws shuffled batches of %d '
      'examples. The target epsilon=%g assumes Poisson sampling; no '
      'amplification by sampling is proven for shuffling as implemented, so '
      'the guarantee that remains is epsilon=%.4g at delta=%g after '
      'train_steps=%d updates (each epoch one Gaussian release, replace-one '
      'neighbours). logs["epsilon"] reports this proven bound.',
      config.effective_batch_size,
      config.epsilon,
      proven,
      config.delta,
      config.train_steps,
  )
