"""Rows of token ids and labels for `jax_privacy.keras_lm` (private).

Turns texts (through a keras-hub preprocessor) or token-id sequences into
the ``x = {'token_ids', 'padding_mask'}`` inputs of keras-hub backbones and
next-token labels, `IGNORE_LABEL` where a position predicts nothing.
"""

import numbers

import numpy as np

IGNORE_LABEL = -1


def context_length(causal_lm) -> int | None:
  """The backbone's ``max_sequence_length``; None for models without one.

  Position-embedding models (GPT-2) have a fixed context; rotary ones
  (Gemma, Llama) have no ``max_sequence_length`` attribute.
  """
  length = getattr(causal_lm.backbone, 'max_sequence_length', None)
  return None if length is None else int(length)


def check_length(name: str, value, minimum: int, context) -> int:
  """``value`` as an int in ``[minimum, context]`` (no bound if None)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < minimum or (context is not None and value > context)
  ):
    bound = (
        f'in [{minimum}, {context}] (the model\'s max_sequence_length)'
        if context is not None
        else f'>= {minimum}'
    )
    raise ValueError(f'{name} must be an integer {bound}, got {value!r}')
  return int(value)


def from_texts(causal_lm, texts, sequence_length):
  """Rows of ``texts`` tokenised (and truncated) by the preprocessor."""
  preprocessor = causal_lm.preprocessor
  if preprocessor is None:
    raise ValueError(
        'data are strings but causal_lm has no preprocessor (tokenizer): '
        'load a preset that includes its tokenizer, or pass token ids'
    )
  if sequence_length is None:
    sequence_length = preprocessor.sequence_length
    context = context_length(causal_lm)
    if context is not None:
      sequence_length = min(sequence_length, context)
  x, labels, weights = preprocessor(
      list(texts), sequence_length=sequence_length
  )
  x = {key: np.asarray(value) for key, value in x.items()}
  labels = np.where(np.asarray(weights) > 0, np.asarray(labels), IGNORE_LABEL)
  return x, labels.astype(np.int32)


def from_token_ids(causal_lm, sequences, sequence_length):
  """Rows of token-id sequences, right-padded; refuses too long ones."""
  sequences = [np.asarray(s) for s in sequences]
  vocabulary = int(causal_lm.backbone.vocabulary_size)
  for i, tokens in enumerate(sequences):
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(
          f'sequence {i} must be a 1-D array of integer token ids, got '
          f'shape {tokens.shape} and dtype {tokens.dtype}'
      )
    if len(tokens) < 2:
      raise ValueError(
          f'sequence {i} has {len(tokens)} token(s): a sequence needs at '
          'least 2 (an input and the next token to predict); drop it or '
          'join it with its neighbours'
      )
    if tokens.min() < 0 or tokens.max() >= vocabulary:
      raise ValueError(
          f'sequence {i} has token ids outside [0, {vocabulary}) (the '
          'vocabulary_size of the backbone)'
      )
  longest = max(len(tokens) - 1 for tokens in sequences)
  length = longest if sequence_length is None else sequence_length
  for i, tokens in enumerate(sequences):
    if len(tokens) - 1 > length:
      raise ValueError(
          f'sequence {i} has {len(tokens)} tokens, so {len(tokens) - 1} '
          f'predicted positions, more than sequence_length={length}: split '
          'long texts into chunks of at most sequence_length + 1 tokens '
          '(each chunk is then its own unit of privacy)'
      )
  token_ids = np.zeros((len(sequences), length), np.int32)
  padding_mask = np.zeros((len(sequences), length), bool)
  labels = np.full((len(sequences), length), IGNORE_LABEL, np.int32)
  for i, tokens in enumerate(sequences):
    n = len(tokens) - 1
    token_ids[i, :n] = tokens[:-1]
    padding_mask[i, :n] = True
    labels[i, :n] = tokens[1:]
  return {'token_ids': token_ids, 'padding_mask': padding_mask}, labels
