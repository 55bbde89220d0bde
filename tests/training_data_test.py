"""Tests of the trainer's data input (jax_privacy/_training_data.py).

The sampler's indices drive what is read: a random-access source is asked
for exactly the records of each batch, and gives the same run as arrays.
"""

import jax
import numpy as np
import optax
import pytest

from jax_privacy import _training_data
from jax_privacy import batch_selection
from jax_privacy import training
import training_test as setup  # the model, data and trainer of those tests


class CountingSource:
  """A random-access source (``__len__``, ``__getitem__``) that logs reads."""

  def __init__(self, x, y):
    self._x, self._y = x, y
    self.reads = []

  def __len__(self):
    return len(self._y)

  def __getitem__(self, index):
    assert isinstance(index, int)
    self.reads.append(index)
    return self._x[index], self._y[index]


def _sampled_batches(config, sampling_seed=11):
  return list(
      config.plan.batch_selection_strategy.batch_iterator(
          config.num_examples, rng=np.random.default_rng(sampling_seed)
      )
  )


def test_source_reads_only_the_sampled_records_and_matches_arrays():
  x, y = setup._data()
  config = setup._config(iterations=6)
  source = CountingSource(x, y)
  trainer = setup._trainer(config, physical_batch_size=16)
  from_source = trainer.fit(source, trainer.init(setup._params()))
  from_arrays = trainer.fit((x, y), trainer.init(setup._params()))
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, from_source.params, from_arrays.params
  )
  # Each step reads its batch, in the sampler's order, and nothing else.
  expected = np.concatenate(_sampled_batches(config))
  np.testing.assert_array_equal(source.reads, expected)
  assert len(source.reads) < 6 * 60  # about 6 x 40 of the 400 records


def test_resume_reads_nothing_for_the_steps_already_run():
  x, y = setup._data()
  config = setup._config(iterations=6)
  trainer = setup._trainer(config)
  part = trainer.fit((x, y), trainer.init(setup._params()), num_steps=4)
  source = CountingSource(x, y)
  trainer.fit(source, part)
  np.testing.assert_array_equal(
      source.reads, np.concatenate(_sampled_batches(config)[4:])
  )


def test_grain_map_dataset_is_a_source():
  grain = pytest.importorskip('grain')
  x, y = setup._data()
  config = setup._config(iterations=3)
  records = grain.MapDataset.source(range(setup.N)).map(
      lambda i: {'x': x[i], 'y': y[i]}
  )

  def dict_loss(params, example, key):
    return setup._loss(params, (example['x'], example['y']), key)

  trainer = setup._trainer(config)
  by_dict = training.DPTrainer(
      loss_fn=dict_loss,
      config=config,
      optimizer=optax.sgd(0.5),
      sampling_seed=11,
  )
  from_grain = by_dict.fit(records, by_dict.init(setup._params()))
  from_arrays = trainer.fit((x, y), trainer.init(setup._params()))
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, from_grain.params, from_arrays.params
  )


def test_empty_batches_read_nothing():
  x, y = setup._data()
  # q = 1/400: each batch is empty with probability about e^-1.
  config = setup._config(iterations=8, expected_batch_size=1)
  batches = _sampled_batches(config)
  assert any(len(b) == 0 for b in batches)
  source = CountingSource(x, y)
  trainer = setup._trainer(config)
  state = trainer.fit(source, trainer.init(setup._params()))
  assert int(state.step) == 8
  np.testing.assert_array_equal(source.reads, np.concatenate(batches))


def test_read_and_pad_layout():
  x, y = setup._data()
  read = _training_data.batch_reader(CountingSource(x, y), setup.N)
  batch = _training_data.pad_batch(read(np.array([5, 2])), 4)
  np.testing.assert_array_equal(batch[0][:2], x[[5, 2]])
  np.testing.assert_array_equal(batch[0][2:], 0.0)
  np.testing.assert_array_equal(batch[1], [y[5], y[2], 0.0, 0.0])
  assert batch[0].dtype == x.dtype


@pytest.mark.parametrize(
    'make_dataset, message',
    [
        (lambda x, y: CountingSource(x[:10], y[:10]), 'num_examples=400'),
        (lambda x, y: list(zip(x, y)), 'random-access source'),
        (lambda x, y: (x, y[:-1]), 'leading axis of num_examples=400'),
        (lambda x, y: {'x': x, 'label': 3}, 'leading axis'),
        (lambda x, y: (), 'leading axis'),
    ],
)
def test_bad_datasets_are_refused_before_training(make_dataset, message):
  x, y = setup._data()
  trainer = setup._trainer()
  with pytest.raises(ValueError, match=message):
    trainer.fit(make_dataset(x, y), trainer.init(setup._params()))


@pytest.mark.parametrize('num_examples, min_sep', [(3, 4), (1, 2), (9, 10)])
def test_bminsep_refuses_a_data_set_smaller_than_min_sep(
    num_examples, min_sep
):
  sampler = batch_selection.BMinSepSampling(
      sampling_prob=0.5, iterations=5, min_sep=min_sep
  )
  with pytest.raises(ValueError, match=rf'num_examples must be >= min_sep'):
    sampler.batch_iterator(num_examples, rng=0)


def test_bminsep_accepts_exactly_min_sep_examples():
  sampler = batch_selection.BMinSepSampling(
      sampling_prob=0.5, iterations=12, min_sep=4
  )
  batches = list(sampler.batch_iterator(4, rng=0))
  for t in range(len(batches) - 3):
    window = np.concatenate(batches[t : t + 4])
    assert len(np.unique(window)) == len(window)
