"""DP LoRA fine-tuning of keras-hub causal language models (Keras 3, JAX).

A keras-hub causal LM (GPT-2, Gemma, Llama, ...) that the user has as a
local preset directory is fine-tuned with DP-SGD through `keras_api`: only
low-rank adapters are trained, and the unit of privacy is one sequence::

    import keras
    from jax_privacy import keras_api, keras_lm

    lm = keras_lm.load_causal_lm('/data/gpt2_base_en', lora_rank=4)
    x, y = keras_lm.prepare_sequences(lm, texts, sequence_length=128)
    config = keras_api.DPKerasConfig(
        epsilon=8.0, delta=1e-5, clipping_norm=1.0, batch_size=32,
        gradient_accumulation_steps=1, train_steps=200, train_size=len(y),
        seed=0)
    model = keras_api.make_private(lm, config)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras_lm.SequenceCrossentropy(),
                  weighted_metrics=[keras_lm.SequenceAccuracy()])
    model.fit(x, y, epochs=...)
    statement = keras_lm.privacy_statement(model, sequence_length=128)

``x`` is the dict of ``token_ids`` and ``padding_mask`` that keras-hub
backbones take, ``y`` the next-token labels with `IGNORE_LABEL` at padding
positions; `SequenceCrossentropy` sums (or averages) the token losses of one
sequence, padding masked, so each example of the private ``fit`` is one
sequence and its gradient is clipped as a whole.

Adapters: `enable_lora` calls the backbone's own ``enable_lora(rank)``
(keras-hub freezes every weight and adds trainable ``lora_kernel_a`` /
``lora_kernel_b`` to the attention query and value ``EinsumDense`` layers),
and also freezes those layers' biases unless ``train_biases=True``, so the
trainable variables, and therefore the only per-example gradients computed,
are the adapters'. Frozen weights enter the per-example loss as constants.

Nothing is downloaded: `load_causal_lm` reads a local directory only.

Privacy:
  Example-level (epsilon, delta)-DP of the trained weights (the adapters;
  frozen weights are public inputs), where one example is one sequence of
  ``x``/``y`` of at most ``sequence_length`` predicted tokens, under
  add-or-remove-one-sequence neighbours and the assumptions of `keras_api`
  (Poisson sampling in ``fit``, secret seed). A document split into several
  sequences, or a user with several documents, is protected only per
  sequence; for user-level DP use `jax_privacy.lm_finetuning`.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
  arXiv:2106.09685.
  Yu et al., "Differentially Private Fine-tuning of Language Models", 2021,
  arXiv:2110.06500.
  Abadi et al., "Deep Learning with Differential Privacy", 2016,
  arXiv:1607.00133.
"""

import logging
import numbers
import os
import pathlib
from collections.abc import Sequence

# Importing keras_api first sets KERAS_BACKEND=jax when keras is not loaded.
from jax_privacy import keras_api  # pylint: disable=g-bad-import-order,unused-import

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
import numpy as np

try:
  import keras_hub
except ImportError as error:
  raise ImportError(
      'jax_privacy.keras_lm needs keras-hub. It runs on the JAX backend '
      'without TensorFlow: pip install --no-deps keras-hub && pip install '
      'regex tokenizers'
  ) from error

from jax_privacy import lm_finetuning
from jax_privacy._keras_lm_data import IGNORE_LABEL
from jax_privacy._keras_lm_data import check_length
from jax_privacy._keras_lm_data import context_length
from jax_privacy._keras_lm_data import from_texts
from jax_privacy._keras_lm_data import from_token_ids
from jax_privacy._keras_model import DPModel

__all__ = [
    'IGNORE_LABEL',
    'SequenceAccuracy',
    'SequenceCrossentropy',
    'enable_lora',
    'generate',
    'load_causal_lm',
    'perplexity',
    'prepare_sequences',
    'privacy_statement',
]

_TOKEN_REDUCTIONS = ('sum', 'mean')
_WEIGHT_FILES = (
    'model.weights.h5',
    'model.weights.json',
    'model.safetensors',
    'model.safetensors.index.json',
)


def _check_rank(name: str, rank) -> int:
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
    raise ValueError(f'{name} must be an integer >= 1, got {rank!r}')
  if rank < 1:
    raise ValueError(
        f'{name} must be an integer >= 1, got {rank}: the rank of the '
        'LoRA update (typically 4 to 16); use a positive rank, or skip '
        'enable_lora to fine-tune all weights'
    )
  return int(rank)


def _check_causal_lm(causal_lm) -> None:
  if not isinstance(causal_lm, keras_hub.models.CausalLM):
    raise ValueError(
        'causal_lm must be a keras_hub.models.CausalLM (e.g. from '
        'load_causal_lm or keras_hub.models.GPT2CausalLM(backbone=...)), '
        f'got {type(causal_lm).__name__}'
    )


def load_causal_lm(
    preset_dir: str | os.PathLike,
    *,
    lora_rank: int | None = None,
    train_biases: bool = False,
    dtype=None,
) -> keras_hub.models.CausalLM:
  """Loads a keras-hub causal LM from a local preset directory.

  Wraps ``keras_hub.models.CausalLM.from_preset`` on a local path only:
  nothing is downloaded. The directory is one written by
  ``causal_lm.save_to_preset(dir)`` (or ``backbone.save_to_preset``), or a
  Kaggle / Hugging Face keras-hub preset downloaded beforehand; it holds
  ``config.json`` and the weights (``model.weights.h5``), and, if the model
  has one, its tokenizer (then ``causal_lm.preprocessor`` turns text into
  token ids).

  Args:
    preset_dir: the local preset directory.
    lora_rank: if given, `enable_lora` with this rank.
    train_biases: passed to `enable_lora`.
    dtype: optional dtype policy of the loaded weights (e.g. ``'float32'``).

  Returns:
    The loaded ``keras_hub.models.CausalLM``.

  Raises:
    ValueError: if the directory does not exist or lacks ``config.json`` or
      the weights, or ``lora_rank`` is not a positive integer.
  """
  if lora_rank is not None:
    _check_rank('lora_rank', lora_rank)
  path = pathlib.Path(preset_dir).expanduser()
  how = (
      'Save one with `causal_lm.save_to_preset(dir)`, or download a keras-hub '
      'preset (Kaggle or Hugging Face) into it beforehand: nothing is '
      'downloaded at run time.'
  )
  if not path.is_dir():
    raise ValueError(
        f'preset_dir {str(preset_dir)!r} is not an existing directory. {how}'
    )
  if not (path / 'config.json').is_file():
    raise ValueError(
        f'preset_dir {str(path)!r} has no config.json, so it is not a '
        f'keras-hub preset directory. {how}'
    )
  if not any((path / name).is_file() for name in _WEIGHT_FILES):
    raise ValueError(
        f'preset_dir {str(path)!r} has no model weights (one of '
        f'{", ".join(_WEIGHT_FILES)}). {how}'
    )
  kwargs = {} if dtype is None else {'dtype': dtype}
  causal_lm = keras_hub.models.CausalLM.from_preset(str(path), **kwargs)
  logging.info('Loaded %s from %s', type(causal_lm).__name__, path)
  if lora_rank is not None:
    enable_lora(causal_lm, lora_rank, train_biases=train_biases)
  return causal_lm


def _lora_layers(backbone) -> list:
  return [
      layer
      for layer in backbone._flatten_layers(include_self=False)  # pylint: disable=protected-access
      if getattr(layer, 'lora_enabled', False)
  ]


def enable_lora(
    causal_lm: keras_hub.models.CausalLM,
    rank: int,
    *,
    train_biases: bool = False,
) -> keras_hub.models.CausalLM:
  """Makes the LoRA adapters of ``causal_lm`` its only trainable weights.

  Calls ``causal_lm.backbone.enable_lora(rank)``: keras-hub freezes every
  weight of the backbone and adds a rank-``rank`` update ``A @ B`` (scaled
  by ``lora_alpha / rank``, ``B`` initialised to zero, so the model is
  unchanged at first) to the kernel of each attention query and value
  layer. keras-hub leaves those layers' biases trainable; they are frozen
  too unless ``train_biases``.

  Args:
    causal_lm: a keras-hub causal LM whose LoRA is not enabled yet.
    rank: the LoRA rank, an integer >= 1.
    train_biases: also train the biases of the LoRA layers.

  Returns:
    ``causal_lm`` (modified in place).

  Raises:
    ValueError: for a rank that is not a positive integer, a model that is
      not a keras-hub ``CausalLM``, LoRA already enabled, or a backbone with
      no layer LoRA applies to.
  """
  rank = _check_rank('rank', rank)
  _check_causal_lm(causal_lm)
  backbone = causal_lm.backbone
  if _lora_layers(backbone):
    raise ValueError(
        f'LoRA is already enabled on {backbone.name!r}; enable it once, '
        'right after building or loading the model'
    )
  backbone.enable_lora(rank)
  lora_layers = _lora_layers(backbone)
  if not lora_layers:
    raise ValueError(
        f'no layer of {backbone.name!r} has LoRA after enable_lora: none is '
        f'named as in backbone.default_lora_layer_names() '
        f'({backbone.default_lora_layer_names()}); call '
        'causal_lm.backbone.enable_lora(rank, target_layer_names=[...]) '
        'with the names of its attention projections instead'
    )
  if not train_biases:
    for layer in lora_layers:
      if getattr(layer, 'bias', None) is not None:
        layer.bias.trainable = False
  num_trainable = sum(
      int(np.prod(v.shape)) for v in causal_lm.trainable_weights
  )
  num_total = sum(int(np.prod(v.shape)) for v in causal_lm.weights)
  logging.info(
      'LoRA rank %d on %d layers: %d of %d weights trainable (%.3f%%)',
      rank, len(lora_layers), num_trainable, num_total,
      100.0 * num_trainable / max(num_total, 1),
  )
  return causal_lm


@keras.saving.register_keras_serializable(package='jax_privacy')
class SequenceCrossentropy(keras.losses.Loss):
  """Next-token cross-entropy of each sequence, padding masked.

  ``y_true`` holds integer labels of shape ``[batch, length]`` with
  `IGNORE_LABEL` (-1) at positions that predict nothing (padding);
  ``y_pred`` holds logits ``[batch, length, vocabulary]``. The per-token
  cross-entropies of one sequence are summed (``token_reduction='sum'``)
  or averaged over its real tokens (``'mean'``); the result per sequence is
  then reduced over the batch as any Keras loss. Inside a private ``fit``
  each example is one sequence, so this is the loss whose gradient is
  clipped.

  Privacy:
    Padding positions contribute exactly zero loss and gradient, so a
    sequence's gradient depends on its own tokens only. 'sum' weighs long
    sequences more before clipping; the clipping norm bounds each
    sequence's influence either way.
  """

  def __init__(
      self,
      token_reduction: str = 'sum',
      name: str = 'sequence_crossentropy',
      **kwargs,
  ):
    if token_reduction not in _TOKEN_REDUCTIONS:
      raise ValueError(
          f'token_reduction must be one of {_TOKEN_REDUCTIONS}, got '
          f'{token_reduction!r}'
      )
    super().__init__(name=name, **kwargs)
    self.token_reduction = token_reduction

  def call(self, y_true, y_pred):
    y_true = keras.ops.convert_to_tensor(y_true)
    real = keras.ops.greater_equal(y_true, 0)
    labels = keras.ops.where(real, y_true, 0)
    token_losses = keras.losses.sparse_categorical_crossentropy(
        labels, keras.ops.cast(y_pred, 'float32'), from_logits=True
    )
    weights = keras.ops.cast(real, 'float32')
    total = keras.ops.sum(token_losses * weights, axis=-1)
    if self.token_reduction == 'sum':
      return total
    return total / keras.ops.maximum(keras.ops.sum(weights, axis=-1), 1.0)

  def get_config(self):
    return {**super().get_config(), 'token_reduction': self.token_reduction}


def _sequence_accuracy(y_true, y_pred):
  y_true = keras.ops.convert_to_tensor(y_true)
  real = keras.ops.cast(keras.ops.greater_equal(y_true, 0), 'float32')
  hits = keras.ops.cast(
      keras.ops.equal(
          keras.ops.argmax(y_pred, axis=-1),
          keras.ops.cast(y_true, 'int32'),
      ),
      'float32',
  )
  return keras.ops.sum(hits * real, axis=-1) / keras.ops.maximum(
      keras.ops.sum(real, axis=-1), 1.0
  )


@keras.saving.register_keras_serializable(package='jax_privacy')
class SequenceAccuracy(keras.metrics.MeanMetricWrapper):
  """Per sequence, the fraction of real tokens predicted exactly (argmax).

  Averaged over sequences. Labels equal to `IGNORE_LABEL` are skipped, which
  Keras' ``SparseCategoricalAccuracy`` (the metric keras-hub tasks compile
  with, and that ``make_private`` copies) does not do: compile the private
  model with ``weighted_metrics=[SequenceAccuracy()]`` instead.
  """

  def __init__(self, name: str = 'sequence_accuracy', dtype=None):
    super().__init__(_sequence_accuracy, name=name, dtype=dtype)

  def get_config(self):
    return {'name': self.name, 'dtype': self.dtype}


def prepare_sequences(
    causal_lm: keras_hub.models.CausalLM,
    data: Sequence,
    *,
    sequence_length: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Inputs and next-token labels, one row per sequence, for ``fit``.

  Args:
    causal_lm: the model (its context length, vocabulary and, for text,
      its preprocessor are used).
    data: a non-empty list of strings (tokenised by ``causal_lm``'s
      preprocessor, which truncates them to ``sequence_length``), or of 1-D
      integer token-id sequences (each of ``n + 1`` tokens gives ``n``
      predicted positions; rows are right-padded).
    sequence_length: the padded length of the rows; at most the model's
      ``max_sequence_length``. Default: the longest token sequence, or the
      preprocessor's ``sequence_length`` (capped at the context) for text.

  Returns:
    ``(x, y)``: ``x = {'token_ids', 'padding_mask'}`` arrays of shape
    ``[num_sequences, sequence_length]`` and ``y`` the labels, with
    `IGNORE_LABEL` at padding positions.

  Raises:
    ValueError: for empty data, a sequence longer than ``sequence_length``
      or the model's context, a too-short sequence or out-of-vocabulary ids.
  """
  _check_causal_lm(causal_lm)
  if isinstance(data, (str, bytes)) or len(data) == 0:
    raise ValueError(
        'data must be a non-empty list of strings or of token-id sequences, '
        f'got {"a single string" if isinstance(data, (str, bytes)) else "none"}'
        ': give at least one training sequence'
    )
  context = context_length(causal_lm)
  if sequence_length is not None:
    sequence_length = check_length(
        'sequence_length', sequence_length, 1, context
    )
  if all(isinstance(item, str) for item in data):
    x, y = from_texts(causal_lm, data, sequence_length)
  else:
    x, y = from_token_ids(causal_lm, data, sequence_length)
  if context is not None and y.shape[1] > context:
    raise ValueError(
        f'sequences have {y.shape[1]} predicted positions, more than the '
        f'model\'s context (max_sequence_length={context}): pass '
        f'sequence_length <= {context} and split longer texts'
    )
  return x, y


def perplexity(
    causal_lm: keras_hub.models.CausalLM,
    x: dict[str, np.ndarray],
    y: np.ndarray,
    *,
    batch_size: int = 64,
) -> float:
  """``exp`` of the mean next-token cross-entropy over all real tokens.

  Args:
    causal_lm: the model (e.g. ``private_model.private_model`` or the
      model given to ``make_private``: they share weights).
    x: inputs from `prepare_sequences`.
    y: labels from `prepare_sequences` (`IGNORE_LABEL` positions skipped).
    batch_size: sequences per forward pass.

  Raises:
    ValueError: for labels with no real token or a batch size below 1.

  Privacy:
    Computed on whatever data is given without noise: on training data it
    is not covered by the DP guarantee; report it on held-out data.
  """
  if isinstance(batch_size, bool) or not isinstance(
      batch_size, numbers.Integral
  ) or batch_size < 1:
    raise ValueError(f'batch_size must be an integer >= 1, got {batch_size!r}')
  y = np.asarray(y)
  if y.size == 0 or not np.any(y >= 0):
    raise ValueError('y must hold at least one real (non-padding) label')
  loss = SequenceCrossentropy(token_reduction='sum')
  total = 0.0
  for start in range(0, len(y), batch_size):
    rows = slice(start, start + batch_size)
    logits = causal_lm.predict_on_batch({k: v[rows] for k, v in x.items()})
    per_sequence = keras.ops.convert_to_numpy(loss.call(y[rows], logits))
    total += float(np.sum(per_sequence))
  return float(np.exp(total / np.sum(y >= 0)))


def generate(
    causal_lm: keras_hub.models.CausalLM,
    prompts: Sequence,
    *,
    max_length: int,
    sampler='greedy',
    stop_token_ids=None,
) -> list:
  """Continues each prompt with ``causal_lm`` (greedy decoding or sampling).

  Args:
    causal_lm: the (fine-tuned) model.
    prompts: a non-empty list of strings (needs the model's preprocessor;
      strings are returned) or of 1-D token-id sequences (token-id arrays
      are returned, prompt included).
    max_length: the length of prompt plus continuation, at most the model's
      ``max_sequence_length``.
    sampler: ``'greedy'``, another keras-hub sampler name (``'top_k'``,
      ``'top_p'``, ...) or a ``keras_hub.samplers.Sampler`` (e.g.
      ``TopKSampler(k=10, seed=0)`` for reproducible sampling). Set with
      ``causal_lm.compile(sampler=...)``, which recompiles ``causal_lm``
      itself (not the private model that wraps it).
    stop_token_ids: token ids that end a continuation; for strings the
      tokenizer's end token is used when None.

  Raises:
    ValueError: for empty prompts, an empty prompt, or a prompt or
      ``max_length`` that does not fit the model's context.
  """
  _check_causal_lm(causal_lm)
  context = context_length(causal_lm)
  max_length = check_length('max_length', max_length, 2, context)
  if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
    raise ValueError('prompts must be a non-empty list of prompts')
  causal_lm.compile(sampler=sampler)
  if all(isinstance(prompt, str) for prompt in prompts):
    if causal_lm.preprocessor is None:
      raise ValueError(
          'prompts are strings but causal_lm has no preprocessor (tokenizer): '
          'pass token-id prompts'
      )
    return list(
        causal_lm.generate(
            list(prompts),
            max_length=max_length,
            stop_token_ids='auto' if stop_token_ids is None else stop_token_ids,
        )
    )
  prompts = [np.asarray(prompt) for prompt in prompts]
  token_ids = np.zeros((len(prompts), max_length), np.int32)
  padding_mask = np.zeros((len(prompts), max_length), bool)
  for i, prompt in enumerate(prompts):
    if prompt.ndim != 1 or not 1 <= len(prompt) < max_length:
      raise ValueError(
          f'prompt {i} must be a 1-D token-id sequence of 1 to '
          f'{max_length - 1} tokens (max_length={max_length}), got shape '
          f'{prompt.shape}'
      )
    token_ids[i, : len(prompt)] = prompt
    padding_mask[i, : len(prompt)] = True
  out = causal_lm.generate(
      {'token_ids': token_ids, 'padding_mask': padding_mask},
      max_length=max_length,
      stop_token_ids=stop_token_ids,
  )
  ids = np.asarray(out['token_ids'])
  mask = np.asarray(out['padding_mask'])
  return [row[keep] for row, keep in zip(ids, mask)]


def privacy_statement(private_model, *, sequence_length: int) -> str:
  """One paragraph stating what a private LM run protects, for its report.

  Args:
    private_model: a model returned by ``keras_api.make_private``.
    sequence_length: the padded length of the training rows (``y.shape[1]``).
  """
  if not isinstance(private_model, DPModel):
    raise ValueError(
        'private_model must be returned by keras_api.make_private, got '
        f'{type(private_model).__name__}'
    )
  config = private_model.dp_config
  unit = lm_finetuning.PrivacyUnit(kind='sequence', max_tokens=sequence_length)
  trainable = sum(
      int(np.prod(v.shape)) for v in private_model.trainable_weights
  )
  if config.poisson_sampling_in_fit:
    sampling = (
        'add-or-remove-one neighbours, Poisson sampling with '
        f'q={config.sampling_prob:.4g}'
    )
  else:
    sampling = (
        'replace-one neighbours, shuffled batches (no amplification by '
        'sampling)'
    )
  return (
      f'({private_model.epsilon_spent():.3g}, {config.delta:g})-DP after '
      f'{private_model.dp_steps_taken} of {config.train_steps} DP-SGD updates '
      f'(target epsilon {config.epsilon:g}); unit of privacy: '
      f'{unit.description}, {sampling}; '
      f'each sequence\'s gradient of the '
      f'{trainable} trainable (adapter) weights clipped to L2 norm '
      f'{config.clipping_norm:g}, Gaussian noise multiplier '
      f'{config.noise_multiplier:.4g}.'
  )
