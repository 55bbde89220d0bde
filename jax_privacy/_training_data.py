"""Reading a step's sampled examples from where the data lives.

:class:`~jax_privacy.training.DPTrainer` asks for the examples of each
batch by index, so the sampler decides what is read:

* a pytree of arrays (NumPy or JAX) whose leaves share a leading example
  axis; memory-mapped ``.npy`` files (``np.load(path, mmap_mode='r')``) are
  arrays too, and only the sampled rows are read from disk;
* a random-access source: any object with ``__len__`` and ``__getitem__``
  that returns one record (a pytree of arrays without the example axis) per
  integer index, such as ``grain.MapDataset.source(...).map(decode)``, a
  ``grain.python.RandomAccessDataSource`` or a TFDS ``data_source``. Only
  the records of the batch are read, one ``source[i]`` call each.

Privacy:
  Reading does not change the mechanism: the examples of a step are exactly
  the sampler's indices, in the sampler's order, whatever the storage.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

PyTree = Any
BatchReader = Callable[[np.ndarray], PyTree]


def _is_record_source(dataset: Any) -> bool:
  """A single object (not an array, not a pytree container) with random
  access by index."""
  if isinstance(dataset, (np.ndarray, jax.Array)) or hasattr(dataset, 'shape'):
    return False
  leaves = jax.tree_util.tree_leaves(dataset)
  if len(leaves) != 1 or leaves[0] is not dataset:
    return False
  return hasattr(dataset, '__len__') and hasattr(dataset, '__getitem__')


def batch_reader(dataset: Any, num_examples: int) -> BatchReader:
  """A function from example indices to the batch of those examples.

  Args:
    dataset: a pytree of arrays with a leading axis of ``num_examples``, or
      a random-access source of ``num_examples`` records (see the module
      docstring).
    num_examples: the data set size the plan was made for.

  Returns:
    ``read(indices)``: the examples at ``indices`` (an int array, in that
    order), as a pytree of NumPy arrays with a leading axis of
    ``len(indices)``.

  Raises:
    ValueError: if the data set's size is not ``num_examples``, a leaf lacks
      the example axis, or the object is neither arrays nor a source.
  """
  if _is_record_source(dataset):
    size = len(dataset)
    if size != num_examples:
      raise ValueError(
          f'the data source has {size} records; the plan was made for '
          f'num_examples={num_examples}'
      )
    return lambda indices: _read_records(dataset, indices)
  leaves = jax.tree_util.tree_leaves(dataset)
  if not leaves or any(
      not hasattr(leaf, 'shape') or not leaf.shape
      or leaf.shape[0] != num_examples
      for leaf in leaves
  ):
    raise ValueError(
        'dataset must be a pytree of arrays whose leaves all have a leading '
        f'axis of num_examples={num_examples}, or a random-access source '
        '(with __len__ and __getitem__, e.g. grain.MapDataset.source(records))'
        f'; got leaf shapes {[getattr(l, "shape", type(l)) for l in leaves]}'
    )
  host = jax.tree_util.tree_map(np.asarray, dataset)
  return lambda indices: jax.tree_util.tree_map(lambda a: a[indices], host)


def _read_records(source: Any, indices: np.ndarray) -> PyTree:
  records = [source[int(index)] for index in indices]
  if not records:
    raise ValueError('cannot read an empty batch of records')
  return jax.tree_util.tree_map(
      lambda *fields: np.stack([np.asarray(f) for f in fields]), *records
  )


def pad_batch(batch: PyTree, size: int) -> PyTree:
  """Appends zero examples to ``batch`` up to ``size`` examples.

  The trainer marks them as padding, so they contribute exactly nothing;
  zeros (rather than copies of a real example) keep the reads to the
  batch's own records.
  """

  def pad(leaf):
    missing = size - leaf.shape[0]
    if missing == 0:
      return leaf
    zeros = np.zeros((missing,) + leaf.shape[1:], leaf.dtype)
    return np.concatenate([leaf, zeros])

  return jax.tree_util.tree_map(pad, batch)
