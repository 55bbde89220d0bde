"""Differentially private training of Keras 3 models (JAX backend).

Three lines turn a Keras model into one that ``fit`` trains with DP-SGD::

    import os
    os.environ['KERAS_BACKEND'] = 'jax'  # before keras is first imported
    import keras
    from jax_privacy import keras_api

    config = keras_api.DPKerasConfig(
        epsilon=3.0, delta=1e-5, clipping_norm=1.0, batch_size=64,
        gradient_accumulation_steps=1, train_steps=400, train_size=len(x),
        seed=0)
    model = keras_api.make_private(model, config)
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss='sparse_categorical_crossentropy',
                  metrics=['accuracy'])
    history = model.fit(x, y, epochs=10, validation_data=(x_val, y_val))
    history.history['epsilon']  # epsilon spent after each epoch

What ``fit`` does differently from ``keras.Model.fit``:

* Batches: each update is an independent Poisson sample of the training
  set (each example joins with probability ``q = batch_size *
  gradient_accumulation_steps / train_size``), drawn on the host from the
  model's stored key and the update's index, padded with ``-1`` to a
  multiple of about two standard deviations of the batch size (a few
  compiled shapes); padding rows are zeros with weight 0 and contribute
  exactly zero. ``poisson_sampling_in_fit=False`` gives shuffled batches of
  fixed size instead, with a warning stating the (much weaker) guarantee
  that remains.
* Gradients: per-example gradients of the compiled loss (plus the model's
  added losses), each clipped to L2 norm ``clipping_norm``
  (`jax_privacy.clipping.clipped_grad`, ``method='auto'``), summed, with
  i.i.d. Gaussian noise of stddev ``noise_multiplier * clipping_norm``
  (``noise_multiplier`` with ``rescale_to_unit_norm``) added once per
  update and the result divided by the effective batch size. Gradient
  accumulation runs the micro-batches inside one jit-compiled step (a
  ``lax.scan``), so one Keras step is one DP-SGD update.
* Budget: ``fit`` refuses, before training, a call that would take the
  total number of updates past ``train_steps``; ``logs['epsilon']`` (and a
  log line) reports the epsilon spent after every epoch.
* State: the number of updates taken and the key of all the run's
  randomness (sampling, noise, per-example dropout keys) are non-trainable
  variables of the model, so ``model.save`` and ``keras.models.load_model``
  (after ``import jax_privacy.keras_api``) resume the run exactly.

Importing this module sets ``KERAS_BACKEND=jax`` if Keras has not been
imported yet and the variable is unset.

Privacy:
  Example-level (epsilon, delta)-DP of the weights after at most
  ``train_steps`` updates, under add-or-remove-one neighbours, assuming the
  seed is secret and the model has no layer whose training output depends on
  other examples of the batch (BatchNormalization is refused). Training
  metrics and the training loss that ``fit`` logs are computed on the
  private batches without noise: they are not covered by the guarantee. A
  saved model holds the run's key; treat the file as private, and release
  only the weights.

References:
  Abadi et al., "Deep Learning with Differential Privacy", 2016,
  arXiv:1607.00133.
"""

import os
import sys

if 'keras' not in sys.modules:
  os.environ.setdefault('KERAS_BACKEND', 'jax')

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras

from jax_privacy._keras_config import DPKerasConfig
from jax_privacy._keras_model import DPModel

__all__ = ['DPKerasConfig', 'make_private', 'get_noise_multiplier']

_UNSUPPORTED_LAYERS = {
    'BatchNormalization': (
        'its batch statistics mix the examples of a batch, so per-example '
        'gradients (and their clipping) do not bound one example\'s '
        'influence. Use keras.layers.GroupNormalization or '
        'keras.layers.LayerNormalization instead.'
    ),
}


def _check_backend() -> None:
  backend = keras.backend.backend()
  if backend != 'jax':
    raise ValueError(
        'jax_privacy.keras_api needs the JAX backend of Keras, got '
        f'{backend!r}. Set KERAS_BACKEND=jax before keras is first imported '
        "(e.g. os.environ['KERAS_BACKEND'] = 'jax' at the top of your "
        'script, or `export KERAS_BACKEND=jax`).'
    )


def _check_layers(model: keras.Model) -> None:
  for layer in model._flatten_layers(include_self=True, recursive=True):  # pylint: disable=protected-access
    for base in type(layer).__mro__:
      if base.__name__ in _UNSUPPORTED_LAYERS:
        raise ValueError(
            f'model contains layer {layer.name!r} ({type(layer).__name__}), '
            f'which DP training does not support: '
            f'{_UNSUPPORTED_LAYERS[base.__name__]}'
        )


def make_private(model: keras.Model, config: DPKerasConfig) -> DPModel:
  """Returns a model whose ``compile`` / ``fit`` train ``model`` with DP-SGD.

  The returned model wraps ``model`` (sharing its weights) and adds the DP
  state. Compile the returned model (if ``model`` was already compiled, its
  compile settings are copied), then call its ``fit`` (see the module
  docstring for what it does differently). ``evaluate``, ``predict`` and
  ``save`` work as usual; ``train_on_batch`` is refused.

  Args:
    model: a built Keras 3 model (Sequential, functional or subclassed) on
      the JAX backend, without BatchNormalization.
    config: the DP settings.

  Returns:
    A `keras.Model` trained with DP-SGD by ``fit``.

  Raises:
    ValueError: for a non-JAX Keras backend, a model that is not a built
      ``keras.Model`` or is already private, an unsupported layer, or a
      ``config`` that is not a `DPKerasConfig`.

  Privacy:
    See the module docstring and `DPKerasConfig`.
  """
  _check_backend()
  if not isinstance(config, DPKerasConfig):
    raise ValueError(
        f'config must be a DPKerasConfig, got {type(config).__name__}'
    )
  if not isinstance(model, keras.Model):
    raise ValueError(f'model must be a keras.Model, got {type(model).__name__}')
  if isinstance(model, DPModel):
    raise ValueError('model is already private (returned by make_private)')
  if not model.built:
    raise ValueError(
        f'model {model.name!r} must be built before make_private, so that '
        'its weights exist: start it with keras.Input(shape=...) or call '
        'model.build(input_shape)'
    )
  _check_layers(model)
  private = DPModel(model, config, name=f'dp_{model.name}')
  if model.compiled:
    private.compile_from_config(model.get_compile_config())
  return private


def get_noise_multiplier(model: keras.Model) -> float:
  """The noise multiplier (stddev over clipping norm) a private model uses.

  Args:
    model: a model returned by `make_private` (or loaded from one).

  Raises:
    ValueError: if ``model`` is not private.
  """
  if not isinstance(model, DPModel):
    raise ValueError(
        'model must be a private model returned by make_private, got '
        f'{type(model).__name__}'
    )
  return model.dp_config.noise_multiplier
