"""Host-side batches that a private Keras model's ``fit`` trains on (private).

Every batch is a pure function of the model's stored key and the index of
the update it feeds, so a run that is saved and resumed draws exactly the
batches an uninterrupted run would have drawn, whatever the epochs, the
``fit`` calls and the compiled batch shapes in between.
"""

import dataclasses
import math
from collections.abc import Iterator

import jax
import numpy as np

from jax_privacy import batch_selection
from jax_privacy._keras_config import DPKerasConfig

# Stream ids of the host-side randomness derived from the model's key (the
# device-side noise and dropout streams are separate, see _keras_model).
_POISSON_STREAM = 1
_SHUFFLE_STREAM = 2


def as_host_arrays(name: str, data):
  """``data`` (an array or a list/tuple/dict of arrays) as NumPy arrays.

  Raises:
    ValueError: for data that is not arrays (a generator, a ``PyDataset``,
      a ``tf.data.Dataset``...): private ``fit`` draws its own batches by
      index, so it needs the whole training set.
  """
  if data is None:
    return None
  is_container = isinstance(data, (list, tuple, dict))
  leaves, treedef = (
      jax.tree_util.tree_flatten(data) if is_container else ([data], None)
  )
  if not leaves or not all(hasattr(leaf, '__array__') for leaf in leaves):
    raise ValueError(
        f'{name} must be an array or a list/tuple/dict of arrays holding the '
        f'whole training set, got {type(data).__name__}: a private fit draws '
        'its own Poisson batches by index, so it cannot take a generator, a '
        'PyDataset or a tf.data.Dataset'
    )
  arrays = [np.asarray(leaf) for leaf in leaves]
  if any(array.ndim == 0 for array in arrays):
    raise ValueError(f'{name} must have a leading example axis, got a scalar')
  return jax.tree_util.tree_unflatten(treedef, arrays) if is_container else (
      arrays[0]
  )


def num_examples(**named_data) -> int:
  """The common leading dimension of all arrays given (None ignored)."""
  sizes = {}
  for name, data in named_data.items():
    for leaf in jax.tree_util.tree_leaves(data):
      sizes.setdefault(len(leaf), []).append(name)
  if len(sizes) != 1:
    raise ValueError(
        'x, y and sample_weight must have the same number of examples '
        f'(leading dimension), got {sizes}'
    )
  return next(iter(sizes))


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """Which examples each update uses, and how its batch is padded.

  Attributes:
    config: the DP settings (sampling probability, sizes).
    key_data: the two 32-bit words of the model's stored key; they seed the
      host-side sampling streams.
  """

  config: DPKerasConfig
  key_data: tuple[int, int]

  @property
  def pad_multiple(self) -> int:
    """Padded batch sizes are multiples of this.

    About twice the standard deviation of a Poisson batch's size (so three
    or four compiled shapes cover almost every batch), rounded up to a
    multiple of ``gradient_accumulation_steps`` so the batch splits into
    equal micro-batches.
    """
    steps = self.config.gradient_accumulation_steps
    spread = math.ceil(2 * math.sqrt(self.config.effective_batch_size))
    return steps * math.ceil(spread / steps)

  def _generator(self, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence(
            entropy=list(self.key_data), spawn_key=(stream, index)
        )
    )

  def indices(self, step: int) -> np.ndarray:
    """The sorted example indices of update ``step`` (counted from 0)."""
    config = self.config
    if config.poisson_sampling_in_fit:
      sampler = batch_selection.CyclicPoissonSampling(
          sampling_prob=config.sampling_prob, iterations=1
      )
      return next(
          sampler.batch_iterator(
              config.train_size, rng=self._generator(_POISSON_STREAM, step)
          )
      )
    size = config.effective_batch_size
    epoch, position = divmod(step, config.steps_per_epoch)
    order = self._generator(_SHUFFLE_STREAM, epoch).permutation(
        config.train_size
    )
    return np.sort(order[position * size : (position + 1) * size])

  def padded_indices(self, step: int) -> np.ndarray:
    """``indices(step)`` padded with ``-1`` to a multiple of `pad_multiple`.

    An empty Poisson batch is padded to one full multiple: the update still
    runs and adds its noise, as the accountant assumes.
    """
    indices = self.indices(step)
    if not self.config.poisson_sampling_in_fit:
      return indices
    multiple = self.pad_multiple
    if not len(indices):
      return np.full(multiple, -1, dtype=np.int64)
    return batch_selection.pad_to_multiple_of(indices, multiple)

  def batches(
      self, x, y, sample_weight, first_step: int, num_steps: int
  ) -> Iterator[tuple]:
    """Yields ``(x, y, weight)`` for updates ``first_step, ...``.

    ``weight`` is 0 on padding rows (whose inputs are zeros) and the user's
    sample weight (or 1) on real examples; the train step treats weight 0 as
    padding, which then contributes exactly zero to the update.
    """
    for step in range(first_step, first_step + num_steps):
      padded = self.padded_indices(step)
      is_padding = batch_selection.padding_mask(padded)
      safe = np.where(is_padding, 0, padded)

      def gather(array, safe=safe, is_padding=is_padding):
        rows = array[safe]
        mask = is_padding.reshape((-1,) + (1,) * (rows.ndim - 1))
        return np.where(mask, np.zeros_like(rows), rows)

      weight = (~is_padding).astype(np.float32)
      if sample_weight is not None:
        weight = weight * gather(sample_weight).astype(np.float32)
      yield (
          jax.tree_util.tree_map(gather, x),
          jax.tree_util.tree_map(gather, y),
          weight,
      )
