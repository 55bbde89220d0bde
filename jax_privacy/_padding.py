"""Padding of variable-size index batches (private; public in batch_selection).

The padding index is ``-1``; :func:`padding_mask` turns it into the
``is_padding_example`` argument of ``clipping.clipped_grad``.
"""

import numbers

import numpy as np

PADDING_INDEX = -1


def pad_to_multiple_of(indices: np.ndarray, multiple: int) -> np.ndarray:
  """Pads ``indices`` along axis 0 with ``-1`` to a multiple of ``multiple``.

  Args:
    indices: an index array, e.g. a batch from a ``batch_iterator``. A 2-D
      array is padded with rows of ``-1``.
    multiple: the length of the result is the smallest multiple of this
      that is ``>= len(indices)``; ``>= 1``.

  Returns:
    A new ``int64`` array; rows past ``len(indices)`` are ``-1``.
  """
  check_integer('multiple', multiple, minimum=1)
  indices = np.asarray(indices, dtype=np.int64)
  padded_length = -(-len(indices) // multiple) * multiple
  return _pad_rows(indices, padded_length)


def split_and_pad_global_batch(
    indices: np.ndarray, minibatch_size: int, microbatch_size: int | None = None
) -> list[np.ndarray]:
  """Splits a variable-size batch into fixed-size chunks for the device.

  The rows of ``indices`` (axis 0) are cut, in order, into chunks of
  ``minibatch_size`` rows; only the last chunk can be short, and it is
  padded with ``-1``:

  * ``microbatch_size=None``: to ``minibatch_size`` rows, so every chunk has
    the same shape (one compilation).
  * ``microbatch_size=m``: to the next multiple of ``m`` rows
    (``minibatch_size`` must be a multiple of ``m``), which wastes less
    compute at the price of up to ``minibatch_size / m`` chunk shapes.

  An empty batch gives one chunk of padding only (``minibatch_size`` rows,
  or ``m`` rows): a Poisson-sampled step with no examples must still run
  and add its noise, as the accountant assumes.

  Example::

      >>> split_and_pad_global_batch(np.arange(5), 4)
      [array([0, 1, 2, 3]), array([ 4, -1, -1, -1])]
      >>> split_and_pad_global_batch(np.arange(5), 4, microbatch_size=2)
      [array([0, 1, 2, 3]), array([ 4, -1])]

  Args:
    indices: a batch of indices, 1-D (examples) or 2-D (users x examples).
    minibatch_size: rows per chunk, ``>= 1``.
    microbatch_size: ``None`` or a divisor of ``minibatch_size``.

  Returns:
    A non-empty list of ``int64`` arrays whose concatenation, without the
    ``-1`` rows, is ``indices``.
  """
  check_integer('minibatch_size', minibatch_size, minimum=1)
  if microbatch_size is not None:
    check_integer('microbatch_size', microbatch_size, minimum=1)
    if minibatch_size % microbatch_size:
      raise ValueError(
          'minibatch_size must be a multiple of microbatch_size, got '
          f'minibatch_size={minibatch_size}, '
          f'microbatch_size={microbatch_size}'
      )
  indices = np.asarray(indices, dtype=np.int64)
  last_multiple = minibatch_size if microbatch_size is None else microbatch_size
  chunks = [
      indices[start : start + minibatch_size]
      for start in range(0, len(indices), minibatch_size)
  ] or [indices[:0]]
  last = chunks[-1]
  padded_length = max(1, -(-len(last) // last_multiple)) * last_multiple
  chunks[-1] = _pad_rows(last, padded_length)
  return chunks


def padding_mask(indices: np.ndarray) -> np.ndarray:
  """``True`` where ``indices`` is the padding index ``-1``.

  For a 1-D batch this is the ``is_padding_example`` argument of
  ``clipping.clipped_grad``.

  Args:
    indices: an index array from the padding functions of this module.

  Returns:
    A bool array of the same shape.
  """
  return np.asarray(indices) == PADDING_INDEX


def _pad_rows(indices: np.ndarray, length: int) -> np.ndarray:
  padding = np.full(
      (length - len(indices),) + indices.shape[1:], PADDING_INDEX, np.int64
  )
  return np.concatenate([indices, padding])


def check_integer(name: str, value, *, minimum: int) -> None:
  if (
      not isinstance(value, numbers.Integral)
      or isinstance(value, (bool, np.bool_))
      or value < minimum
  ):
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
