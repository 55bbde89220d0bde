"""DP fine-tuning of language models: sequence and user privacy, exposure.

The privacy unit of DP training is whatever one "example" of the clipped
gradient is. For a language model this module offers two:

* **one sequence** (:func:`make_lm_examples`, :func:`causal_lm_loss`): an
  example is one sequence of up to ``context_length`` predicted tokens; its
  per-token cross-entropies are summed or averaged inside it
  (:func:`sequence_loss`), padding tokens masked out. Each sequence's
  gradient is clipped, and the usual DP-SGD guarantee protects one sequence.
* **one user** (:func:`group_by_user`): an example is one user holding up to
  ``k`` sequences (padded with fully masked sequences). The loss of the
  example is the sum of its sequences' losses, so clipping bounds the
  user's whole contribution; users are Poisson-sampled and the ordinary
  DP-SGD accountant runs over the number of users. The alternative, clipping
  per sequence and accounting a user's ``k`` sequences with
  ``accounting.analysis.DpsgdTrainingUserLevelAccountant``, is stated by
  :func:`privacy_statement` too (``PrivacyUnit(kind='user',
  clipping='per_sequence')``).

Typical use with :class:`jax_privacy.training.DPTrainer`::

    examples, _ = make_lm_examples(token_lists, context_length=128)
    loss = causal_lm_loss(apply_fn, reduction='mean')
    config = DpsgdExecutionPlanConfig(
        iterations=500, num_examples=len(examples['inputs']),
        expected_batch_size=64, epsilon=8.0, delta=1e-5, noise_seed=1)
    trainer = DPTrainer(loss_fn=loss, config=config,
                        optimizer=optax.adam(1e-3), sampling_seed=2)
    state = trainer.fit(examples, trainer.init(params))
    statement = privacy_statement(config, PrivacyUnit(max_tokens=128))

Memorisation is measured with canaries (:func:`make_canaries`) and their
exposure (:func:`canary_exposure`, :func:`estimated_exposure`). The guide is
``docs/lm_finetuning.md``.

Privacy:
  The guarantee is DP-SGD's (Poisson sampling, add/remove-one neighbours)
  with "one" being one example of the data given to the trainer: a sequence
  for :func:`make_lm_examples` output, a user for :func:`group_by_user`
  output. Fully masked (padding) sequences contribute exactly zero loss and
  gradient. A record split into several sequences
  (``long_sequences='split'``) is protected per sequence, not per record:
  group the sequences by record with :func:`group_by_user` to protect the
  record.

References:
  Abadi et al., "Deep Learning with Differential Privacy", 2016,
  arXiv:1607.00133.
  McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
  Language Models", 2018, arXiv:1710.06963 (user-level DP).
  Charles et al., "Fine-Tuning Large Language Models with User-Level
  Differential Privacy", 2024, arXiv:2407.07737.
  Carlini et al., "The Secret Sharer", 2019, arXiv:1802.08232.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_privacy._lm_exposure import Canary
from jax_privacy._lm_exposure import canary_exposure
from jax_privacy._lm_exposure import canary_rank
from jax_privacy._lm_exposure import estimated_exposure
from jax_privacy._lm_exposure import make_canaries
from jax_privacy._lm_statement import PrivacyUnit
from jax_privacy._lm_statement import privacy_statement
from jax_privacy._lm_statement import user_level_epsilon

__all__ = [
    'Canary',
    'PrivacyUnit',
    'UserGroupedExamples',
    'canary_exposure',
    'canary_rank',
    'causal_lm_loss',
    'estimated_exposure',
    'group_by_user',
    'make_canaries',
    'make_lm_examples',
    'nnx_causal_lm_loss',
    'privacy_statement',
    'sequence_loss',
    'user_level_epsilon',
]

PyTree = Any
_REDUCTIONS = ('sum', 'mean')


def _check_reduction(reduction) -> None:
  if reduction not in _REDUCTIONS:
    raise ValueError(
        f'reduction must be one of {_REDUCTIONS}, got {reduction!r}'
    )


def sequence_loss(
    logits, targets, mask, *, reduction: str = 'sum'
) -> jax.Array:
  """Per-sequence cross-entropy over the sequence's non-padding tokens.

  Args:
    logits: ``[..., T, V]`` next-token logits.
    targets: ``[..., T]`` integer next tokens (any value where masked).
    mask: ``[..., T]``, 1 (or True) for tokens that count, 0 for padding.
    reduction: ``'sum'`` (the sequence's negative log-likelihood, its
      log-perplexity in nats) or ``'mean'`` (per counted token).

  Returns:
    ``[...]`` one loss per sequence. A fully masked sequence gives exactly 0
    (and a zero gradient), never NaN.

  Raises:
    ValueError: if the shapes do not match (checked before tracing).

  Privacy:
    Summing or averaging inside the sequence makes the sequence the unit:
    clip the gradient of this loss per sequence (or of a user's sum of it,
    per user).
  """
  _check_reduction(reduction)
  logits_shape = jnp.shape(logits)
  if len(logits_shape) < 2:
    raise ValueError(
        f'logits must have shape [..., T, V], got {tuple(logits_shape)}'
    )
  if tuple(jnp.shape(targets)) != tuple(logits_shape[:-1]):
    raise ValueError(
        f'targets must have shape {tuple(logits_shape[:-1])} (logits without '
        f'the vocabulary axis), got {tuple(jnp.shape(targets))}'
    )
  if tuple(jnp.shape(mask)) != tuple(logits_shape[:-1]):
    raise ValueError(
        f'mask must have the shape of targets {tuple(logits_shape[:-1])}, got '
        f'{tuple(jnp.shape(mask))}: one entry per target token, 1 for tokens '
        'that count and 0 for padding (make_lm_examples builds it)'
    )
  logits = jnp.asarray(logits)
  mask = jnp.asarray(mask).astype(jnp.float32)
  vocab = logits_shape[-1]
  # Masked targets may hold anything (padding ids, -1): clamp them to a
  # valid index so the gather stays finite; the mask then zeroes them.
  safe_targets = jnp.clip(jnp.asarray(targets).astype(jnp.int32), 0, vocab - 1)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_nll = -jnp.take_along_axis(
      log_probs, safe_targets[..., None], axis=-1
  )[..., 0]
  total = jnp.sum(jnp.where(mask > 0, token_nll, 0.0) * mask, axis=-1)
  if reduction == 'sum':
    return total
  count = jnp.sum(mask, axis=-1)
  return total / jnp.maximum(count, 1.0)


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < minimum
  ):
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
  return int(value)


_LONG = ('error', 'truncate', 'split')


def make_lm_examples(
    sequences: Sequence[Sequence[int]],
    *,
    context_length: int,
    pad_id: int = 0,
    long_sequences: str = 'error',
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Next-token examples, one per sequence, padded to the model's context.

  A sequence of ``n`` tokens gives the inputs ``tokens[:-1]`` and targets
  ``tokens[1:]`` (``n - 1`` predictions); it fits if ``n - 1 <=
  context_length``. Prepend a start token to have the first token
  predicted too.

  Args:
    sequences: token-id sequences (lists or 1-D int arrays), each with at
      least 2 tokens.
    context_length: the model's context (positions it takes), >= 1.
    pad_id: the token written in padding positions (masked out).
    long_sequences: what to do with a sequence longer than the context:
      ``'error'`` (the default) refuses it; ``'truncate'`` keeps its first
      ``context_length + 1`` tokens; ``'split'`` cuts it into consecutive
      windows of ``context_length`` predictions (each token predicted once),
      each window one example.

  Returns:
    ``(examples, source)``: ``examples`` is ``{'inputs': int32[N, T],
    'targets': int32[N, T], 'mask': float32[N, T]}`` with ``T =
    context_length``; ``source[i]`` is the index of the sequence example
    ``i`` came from (use it as the user id of :func:`group_by_user` to
    protect whole sequences after ``'split'``).

  Raises:
    ValueError: on an empty corpus, a sequence with fewer than 2 tokens, or
      (with ``long_sequences='error'``) a sequence longer than the context;
      the message says what to do.

  Privacy:
    The unit of the returned examples is one (window of a) sequence. With
    ``'split'``, one input sequence can become several examples, and each is
    protected on its own.
  """
  context_length = _check_int('context_length', context_length, 1)
  pad_id = _check_int('pad_id', pad_id, 0)
  if long_sequences not in _LONG:
    raise ValueError(
        f'long_sequences must be one of {_LONG}, got {long_sequences!r}'
    )
  sequences = [np.asarray(s).reshape(-1) for s in sequences]
  if not sequences:
    raise ValueError(
        'the corpus is empty: give at least one sequence of 2 or more tokens '
        '(check that the files or records you read are not empty)'
    )
  windows, source = [], []
  for i, tokens in enumerate(sequences):
    if tokens.size < 2:
      raise ValueError(
          f'sequence {i} has {tokens.size} token(s); each needs at least 2 '
          '(nothing to predict otherwise): drop it or prepend a start token'
      )
    if not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(
          f'sequence {i} must hold integer token ids, got dtype {tokens.dtype}'
      )
    if tokens.size - 1 > context_length:
      if long_sequences == 'error':
        raise ValueError(
            f'sequence {i} has {tokens.size} tokens ({tokens.size - 1} '
            f'predictions) but the model\'s context_length is '
            f'{context_length}; pass long_sequences=\'truncate\' to keep the '
            f'first {context_length + 1} tokens or long_sequences=\'split\' '
            'to cut it into windows (or split your records yourself)'
        )
      if long_sequences == 'truncate':
        tokens = tokens[: context_length + 1]
      else:
        for start in range(0, tokens.size - 1, context_length):
          piece = tokens[start : start + context_length + 1]
          if piece.size >= 2:
            windows.append(piece)
            source.append(i)
        continue
    windows.append(tokens)
    source.append(i)
  num = len(windows)
  inputs = np.full((num, context_length), pad_id, np.int32)
  targets = np.full((num, context_length), pad_id, np.int32)
  mask = np.zeros((num, context_length), np.float32)
  for row, tokens in enumerate(windows):
    length = tokens.size - 1
    inputs[row, :length] = tokens[:-1]
    targets[row, :length] = tokens[1:]
    mask[row, :length] = 1.0
  examples = {'inputs': inputs, 'targets': targets, 'mask': mask}
  return examples, np.asarray(source, np.int64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserGroupedExamples:
  """Sequences grouped by user: one example per user.

  Attributes:
    examples: the input pytree with each leaf reshaped to ``[U, k, ...]``
      (``U`` users, ``k`` = max_sequences_per_user slots); empty slots hold
      zeros, so their ``'mask'`` is 0 and they contribute nothing.
    user_ids: ``[U]`` the user of each row, in sorted order.
    num_sequences: ``[U]`` the sequences kept for each user (<= ``k``).
    num_dropped: sequences dropped by ``too_many='truncate'`` (0 otherwise).
  """

  examples: dict[str, np.ndarray]
  user_ids: np.ndarray
  num_sequences: np.ndarray
  num_dropped: int

  @property
  def num_users(self) -> int:
    return int(self.user_ids.shape[0])

  @property
  def max_sequences_per_user(self) -> int:
    return int(self.examples['mask'].shape[1])


_TOO_MANY = ('error', 'truncate')


def group_by_user(
    user_ids,
    examples: Mapping[str, Any],
    *,
    max_sequences_per_user: int,
    too_many: str = 'error',
) -> UserGroupedExamples:
  """Lays sequences out so that one example of the trainer is one user.

  Pass ``result.examples`` as the data set of
  :class:`~jax_privacy.training.DPTrainer` (with ``num_examples =
  result.num_users``) and :func:`causal_lm_loss` as the loss: each user's
  loss is the sum of their sequences' losses, so the per-example clipping
  of the trainer clips each user's whole gradient, and users (not
  sequences) are Poisson-sampled.

  Args:
    user_ids: ``[N]`` the user (any integer or string id) of each sequence.
    examples: ``{'inputs', 'targets', 'mask', ...}`` arrays with a leading
      axis of ``N`` sequences (e.g. from :func:`make_lm_examples`).
    max_sequences_per_user: ``k``, the most sequences one user may hold.
    too_many: a user with more than ``k`` sequences is refused
      (``'error'``, the default) or keeps their first ``k`` in data order
      (``'truncate'``; the number dropped is returned and logged).

  Returns:
    A :class:`UserGroupedExamples`.

  Raises:
    ValueError: on an empty corpus, a missing ``'mask'``, mismatched
      lengths, or (``too_many='error'``) a user with more than ``k``
      sequences.

  Privacy:
    With per-user clipping at norm ``C`` one user moves the clipped sum by
    at most ``C``, however many sequences they have; the DP-SGD accountant
    over ``num_users`` examples then gives user-level (add/remove-one-user)
    DP. Truncation discards data, it never weakens the guarantee.
  """
  k = _check_int('max_sequences_per_user', max_sequences_per_user, 1)
  if too_many not in _TOO_MANY:
    raise ValueError(f'too_many must be one of {_TOO_MANY}, got {too_many!r}')
  if not isinstance(examples, Mapping) or 'mask' not in examples:
    raise ValueError(
        "examples must be a mapping with a 'mask' entry (e.g. the examples "
        'of make_lm_examples): empty slots are recognised by their zero mask'
    )
  user_ids = np.asarray(user_ids).reshape(-1)
  if user_ids.size == 0:
    raise ValueError('the corpus is empty: user_ids holds no sequence')
  leaves = {name: np.asarray(value) for name, value in examples.items()}
  for name, leaf in leaves.items():
    if leaf.ndim < 1 or leaf.shape[0] != user_ids.size:
      raise ValueError(
          f'examples[{name!r}] must have a leading axis of {user_ids.size} '
          f'sequences (one per user id), got shape {leaf.shape}'
      )
  users, inverse, counts = np.unique(
      user_ids, return_inverse=True, return_counts=True
  )
  if too_many == 'error' and counts.max() > k:
    worst = int(np.argmax(counts))
    raise ValueError(
        f'user {users[worst]!r} has {counts[worst]} sequences, more than '
        f'max_sequences_per_user={k} ({int(np.sum(counts > k))} users do); '
        "raise max_sequences_per_user, or pass too_many='truncate' to keep "
        "each user's first k sequences"
    )
  slot = np.zeros(user_ids.size, np.int64)
  seen = np.zeros(users.size, np.int64)
  for i, user in enumerate(inverse):
    slot[i] = seen[user]
    seen[user] += 1
  keep = slot < k
  grouped = {}
  for name, leaf in leaves.items():
    out = np.zeros((users.size, k) + leaf.shape[1:], leaf.dtype)
    out[inverse[keep], slot[keep]] = leaf[keep]
    grouped[name] = out
  num_dropped = int(np.sum(~keep))
  if num_dropped:
    logging.warning(
        'group_by_user: dropped %d sequences of %d users holding more than '
        'max_sequences_per_user=%d', num_dropped, int(np.sum(counts > k)), k,
    )
  return UserGroupedExamples(
      examples=grouped,
      user_ids=users,
      num_sequences=np.minimum(counts, k),
      num_dropped=num_dropped,
  )


def causal_lm_loss(
    apply_fn: Callable[[PyTree, jax.Array, Any], jax.Array],
    *,
    reduction: str = 'mean',
) -> Callable[..., jax.Array]:
  """The loss of ONE example (a sequence or a user) for the trainer.

  Args:
    apply_fn: ``apply_fn(params, tokens, key) -> logits``: ``tokens`` is
      ``int32[n, T]``, the logits ``[n, T, V]``; ``key`` a PRNG key or None.
    reduction: how each sequence's token losses are combined (see
      :func:`sequence_loss`).

  Returns:
    ``loss(params, example, key=None)`` where ``example`` is a dict with
    ``'inputs'``, ``'targets'`` and ``'mask'`` of shape ``[1, T]`` (one
    sequence) or ``[1, k, T]`` (one user of :func:`group_by_user`). The
    value is the sum of the example's per-sequence losses. Use it with
    ``DPTrainer(loss_fn=...)`` or ``clipped_grad(..., batch_argnums=1,
    prng_argnum=2)``.

  Privacy:
    The trainer clips the gradient of this value per example, so per
    sequence or per user according to the layout of the data.
  """
  _check_reduction(reduction)

  def loss(params, example, key=None):
    inputs, targets, mask = _flat_example(example)
    logits = apply_fn(params, inputs, key)
    return jnp.sum(sequence_loss(logits, targets, mask, reduction=reduction))

  return loss


def _flat_example(example):
  if not isinstance(example, Mapping) or not {
      'inputs', 'targets', 'mask'
  } <= set(example):
    raise ValueError(
        "example must be a dict with 'inputs', 'targets' and 'mask' (the "
        'layout of make_lm_examples / group_by_user), got '
        f'{type(example).__name__}'
    )
  length = jnp.shape(example['inputs'])[-1]
  return tuple(
      jnp.reshape(example[name], (-1, length))
      for name in ('inputs', 'targets', 'mask')
  )


def nnx_causal_lm_loss(
    module, *, reduction: str = 'mean', **nnx_loss_kwargs
) -> Callable[..., jax.Array]:
  """:func:`causal_lm_loss` for a Flax NNX model called as ``module(tokens)``.

  Args:
    module: the NNX language model (``tokens [n, T] -> logits [n, T, V]``),
      snapshotted as by ``flax_api.nnx_loss``.
    reduction: see :func:`sequence_loss`.
    **nnx_loss_kwargs: passed to ``flax_api.nnx_loss`` (e.g. the filter of
      the trainable parameters, or ``call_kwargs``); the parameters the
      loss takes are those of the matching ``flax_api.nnx_split_params``.

  Returns:
    ``loss(params, example, key=None)`` as :func:`causal_lm_loss`.
  """
  from jax_privacy import flax_api  # pylint: disable=g-import-not-at-top

  _check_reduction(reduction)

  def per_example_loss(logits, labels):
    targets, mask = labels
    return jnp.sum(sequence_loss(logits, targets, mask, reduction=reduction))

  inner = flax_api.nnx_loss(module, per_example_loss, **nnx_loss_kwargs)

  def loss(params, example, key=None):
    inputs, targets, mask = _flat_example(example)
    return inner(params, (inputs, (targets, mask)), key)

  return loss
