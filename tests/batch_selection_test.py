"""Tests for jax_privacy.batch_selection."""

import dataclasses
import tracemalloc

import numpy as np
import pytest
from scipy import stats

from jax_privacy import batch_selection as bs

P_REJECT = 1e-4


def _poisson(sampling_prob, iterations, **kwargs):
  return bs.CyclicPoissonSampling(
      sampling_prob=sampling_prob, iterations=iterations, **kwargs
  )


def _batches(strategy, num_examples, seed=0):
  return list(strategy.batch_iterator(num_examples, rng=seed))


def _inclusion_counts(batches, num_examples):
  return np.bincount(np.concatenate(batches), minlength=num_examples)


def _check_well_formed(batches, num_examples):
  for batch in batches:
    assert batch.dtype == np.int64 and batch.ndim == 1
    assert np.all(np.diff(batch) > 0)  # Sorted and distinct.
    assert batch.size == 0 or (batch[0] >= 0 and batch[-1] < num_examples)


# Poisson sampling.


def test_poisson_batch_sizes_are_binomial():
  n, q, steps = 1000, 0.05, 2000
  batches = _batches(_poisson(q, steps), n)
  assert len(batches) == steps
  _check_well_formed(batches, n)
  sizes = np.array([len(b) for b in batches])
  assert abs(sizes.sum() - n * q * steps) < 5 * np.sqrt(n * q * (1 - q) * steps)
  # Chi-square of the batch-size histogram against Binomial(n, q).
  edges = np.arange(35, 67)
  observed = np.histogram(sizes, np.concatenate([[-1], edges, [n + 1]]))[0]
  cdf = stats.binom.cdf(np.concatenate([[-1], edges, [n]]) - 1, n, q)
  expected = steps * np.diff(cdf)
  assert stats.chisquare(observed, expected).pvalue > P_REJECT


def test_poisson_each_example_is_included_with_probability_q():
  n, q, steps = 500, 0.1, 2000
  batches = _batches(_poisson(q, steps), n)
  counts = _inclusion_counts(batches, n)
  mean, var = steps * q, steps * q * (1 - q)
  chi2 = np.sum((counts - mean) ** 2 / var)
  assert stats.chi2.sf(chi2, df=n) > P_REJECT
  assert stats.chi2.cdf(chi2, df=n) > P_REJECT  # Not suspiciously regular.
  # Every single example, Bonferroni-corrected over the n examples.
  lo, hi = stats.binom.ppf([P_REJECT / n, 1 - P_REJECT / n], steps, q)
  assert lo <= counts.min() and counts.max() <= hi


def test_poisson_inclusions_are_independent_across_steps():
  n, q, steps = 500, 0.2, 1000
  batches = _batches(_poisson(q, steps), n)
  included = np.zeros((steps, n), bool)
  for t, batch in enumerate(batches):
    included[t, batch] = True
  both = np.sum(included[1:] & included[:-1])
  pairs = n * (steps - 1)
  assert abs(both - pairs * q * q) < 5 * np.sqrt(pairs * q * q)
  sizes = included.sum(axis=1)
  assert abs(np.corrcoef(sizes[1:], sizes[:-1])[0, 1]) < 5 / np.sqrt(steps)


def test_same_seed_same_batches_different_seed_different_batches():
  strategy = _poisson(0.1, 20, cycle_length=2)
  first = _batches(strategy, 1000, seed=1)
  again = _batches(strategy, 1000, seed=1)
  generator = list(strategy.batch_iterator(1000, rng=np.random.default_rng(1)))
  other = _batches(strategy, 1000, seed=2)
  for a, b, c in zip(first, again, generator):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  assert any(not np.array_equal(a, d) for a, d in zip(first, other))


def test_generator_is_advanced_so_later_iterators_differ():
  rng = np.random.default_rng(0)
  strategy = bs.CyclicPoissonSampling(sampling_prob=0.5, iterations=1)
  first = next(strategy.batch_iterator(100, rng=rng))
  second = next(strategy.batch_iterator(100, rng=rng))
  assert not np.array_equal(first, second)


@pytest.mark.parametrize('partition_type', list(bs.PartitionType))
def test_cyclic_steps_sample_only_their_group(partition_type):
  n, k, seed = 1003, 4, 5

  def strategy(q, steps):
    return bs.CyclicPoissonSampling(
        sampling_prob=q, iterations=steps, cycle_length=k,
        partition_type=partition_type,
    )

  # With q = 1 a step's batch is its whole group; the partition is drawn
  # first from the generator, so the same seed gives the same groups at
  # any sampling_prob.
  groups = _batches(strategy(1.0, 2 * k), n, seed)
  for t in range(k):
    np.testing.assert_array_equal(groups[t], groups[t + k])
  np.testing.assert_array_equal(
      np.sort(np.concatenate(groups[:k])), np.arange(n)
  )
  sizes = [len(g) for g in groups[:k]]
  if partition_type is bs.PartitionType.EQUAL_SPLIT:
    assert max(sizes) - min(sizes) <= 1
  else:
    assert max(sizes) - min(sizes) > 1  # Multinomial sizes, not equal.
    assert stats.chisquare(sizes).pvalue > P_REJECT

  q, steps = 0.2, 400
  batches = _batches(strategy(q, steps), n, seed)
  _check_well_formed(batches, n)
  for t, batch in enumerate(batches):
    assert np.all(np.isin(batch, groups[t % k]))
  counts = _inclusion_counts(batches, n)
  lo, hi = stats.binom.ppf([P_REJECT / n, 1 - P_REJECT / n], steps // k, q)
  assert lo <= counts.min() and counts.max() <= hi


def test_sampling_prob_one_gives_fixed_order_epochs():
  n, k = 10, 3
  strategy = _poisson(1.0, 6, cycle_length=k)
  batches = _batches(strategy, n, seed=3)
  assert [len(b) for b in batches] == [4, 3, 3, 4, 3, 3]
  np.testing.assert_array_equal(
      np.sort(np.concatenate(batches[:k])), np.arange(n)
  )
  plain = _batches(bs.CyclicPoissonSampling(sampling_prob=1.0, iterations=2), n)
  for batch in plain:
    np.testing.assert_array_equal(batch, np.arange(n))


def test_truncation_caps_the_batch_and_keeps_a_uniform_subset():
  n, cap, steps = 200, 20, 2000
  strategy = bs.CyclicPoissonSampling(
      sampling_prob=0.5, iterations=steps, truncated_batch_size=cap
  )
  batches = _batches(strategy, n)
  _check_well_formed(batches, n)
  assert all(len(b) == cap for b in batches)  # Binomial(200, .5) >> 20.
  counts = _inclusion_counts(batches, n)
  rate = cap / n
  lo, hi = stats.binom.ppf([P_REJECT / n, 1 - P_REJECT / n], steps, rate)
  assert lo <= counts.min() and counts.max() <= hi
  small = bs.CyclicPoissonSampling(
      sampling_prob=0.01, iterations=200, truncated_batch_size=cap
  )
  sizes = [len(b) for b in _batches(small, n)]
  assert max(sizes) <= 8  # Untruncated: Binomial(200, 0.01) sizes.


def test_huge_dataset_uses_memory_of_the_batch_not_the_dataset():
  n = 10**8
  strategy = bs.CyclicPoissonSampling(sampling_prob=1e-6, iterations=5)
  tracemalloc.start()
  try:
    batches = _batches(strategy, n)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 1_000_000  # An n-sized int64 array would be 800 MB.
  _check_well_formed(batches, n)
  total = sum(len(b) for b in batches)
  assert abs(total - 5 * n * 1e-6) < 5 * np.sqrt(5 * n * 1e-6)


def test_large_batches_from_a_huge_dataset_stay_batch_sized():
  n, q = 10**8, 1e-3
  strategy = bs.CyclicPoissonSampling(sampling_prob=q, iterations=2)
  tracemalloc.start()
  try:
    batches = _batches(strategy, n)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert all(abs(len(b) - n * q) < 5 * np.sqrt(n * q) for b in batches)
  assert peak < 40 * n * q * 8  # A few copies of the batch, not of the data.
  _check_well_formed(batches, n)


# Fixed-size sampling.


def test_fixed_batches_without_replacement():
  n, size, steps = 100, 10, 2000
  strategy = bs.FixedBatchSampling(batch_size=size, iterations=steps)
  batches = _batches(strategy, n)
  _check_well_formed(batches, n)
  assert all(len(b) == size for b in batches)
  counts = _inclusion_counts(batches, n)
  assert stats.chisquare(counts).pvalue > P_REJECT
  assert len({tuple(b) for b in batches}) > steps - 5  # Independent draws.
  full = _batches(bs.FixedBatchSampling(batch_size=n, iterations=1), n)
  np.testing.assert_array_equal(full[0], np.arange(n))


def test_fixed_batches_with_replacement():
  n, size, steps = 10, 10, 200
  strategy = bs.FixedBatchSampling(
      batch_size=size, iterations=steps, replace=True
  )
  batches = _batches(strategy, n)
  for batch in batches:
    assert batch.dtype == np.int64 and len(batch) == size
    assert np.all(np.diff(batch) >= 0) and 0 <= batch[0] and batch[-1] < n
  # Without replacement every batch would be 0..9; with it, repeats appear.
  assert sum(len(np.unique(b)) < size for b in batches) > steps - 5
  counts = _inclusion_counts(batches, n)
  assert stats.chisquare(counts).pvalue > P_REJECT
  bigger_than_data = bs.FixedBatchSampling(
      batch_size=25, iterations=1, replace=True
  )
  assert len(_batches(bigger_than_data, n)[0]) == 25


def test_fixed_batch_larger_than_the_dataset_is_refused():
  strategy = bs.FixedBatchSampling(batch_size=11, iterations=1)
  message = r'batch_size must be <= num_examples \(10\)'
  with pytest.raises(ValueError, match=message):
    strategy.batch_iterator(10, rng=0)


# Validation.


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'sampling_prob': 0.0}, r'sampling_prob must be in \(0, 1\], got 0.0'),
        ({'sampling_prob': 1.5}, r'sampling_prob must be in \(0, 1\], got 1.5'),
        ({'sampling_prob': -0.1}, 'sampling_prob'),
        ({'sampling_prob': float('nan')}, 'sampling_prob'),
        ({'sampling_prob': '0.1'}, 'sampling_prob'),
        ({'iterations': 0}, 'iterations must be an integer >= 1, got 0'),
        ({'iterations': 2.5}, 'iterations must be an integer >= 1'),
        ({'iterations': True}, 'iterations'),
        (
            {'truncated_batch_size': 0},
            'truncated_batch_size must be an integer >= 1',
        ),
        ({'cycle_length': 0}, 'cycle_length must be an integer >= 1'),
        (
            {'partition_type': 'equal_split'},
            'partition_type must be a PartitionType',
        ),
    ],
)
def test_invalid_poisson_settings_are_refused(kwargs, message):
  settings = {'sampling_prob': 0.1, 'iterations': 10, **kwargs}
  with pytest.raises(ValueError, match=message):
    bs.CyclicPoissonSampling(**settings)


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'batch_size': 0}, 'batch_size must be an integer >= 1'),
        ({'iterations': -1}, 'iterations must be an integer >= 1'),
        ({'replace': 'yes'}, 'replace must be a bool'),
    ],
)
def test_invalid_fixed_settings_are_refused(kwargs, message):
  settings = {'batch_size': 4, 'iterations': 10, **kwargs}
  with pytest.raises(ValueError, match=message):
    bs.FixedBatchSampling(**settings)


@pytest.mark.parametrize(
    'strategy',
    [
        _poisson(0.1, 3, cycle_length=4),
        bs.FixedBatchSampling(batch_size=2, iterations=3),
    ],
)
@pytest.mark.parametrize(
    'num_examples, rng, message',
    [
        (100, None, r'rng is required.*default_rng\(seed\)'),
        (100, 'seed', 'rng must be a np.random.Generator or an int seed'),
        (100, -1, 'rng seed must be >= 0'),
        (100, 1.0, 'rng must be'),
        (0, 1, 'num_examples must be an integer >= 1, got 0'),
        (10.0, 1, 'num_examples must be an integer'),
    ],
)
def test_invalid_iterator_arguments_are_refused_eagerly(
    strategy, num_examples, rng, message
):
  # Raised by the call itself, not at the first next().
  with pytest.raises(ValueError, match=message):
    strategy.batch_iterator(num_examples, rng=rng)


def test_fewer_examples_than_groups_is_refused():
  strategy = _poisson(0.1, 3, cycle_length=4)
  message = r'num_examples must be >= cycle_length \(4\), got 3'
  with pytest.raises(ValueError, match=message):
    strategy.batch_iterator(3, rng=0)


def test_strategies_are_frozen_and_replaceable():
  strategy = bs.CyclicPoissonSampling(0.1, 10)
  with pytest.raises(dataclasses.FrozenInstanceError):
    strategy.sampling_prob = 0.5
  assert dataclasses.replace(strategy, sampling_prob=0.5).sampling_prob == 0.5
  with pytest.raises(ValueError, match='sampling_prob'):
    dataclasses.replace(strategy, sampling_prob=2.0)
  assert isinstance(strategy, bs.BatchSelectionStrategy)
  assert isinstance(bs.FixedBatchSampling(1, 1), bs.BatchSelectionStrategy)


# Padding helpers.


@pytest.mark.parametrize(
    'length, multiple, expected_length',
    [(0, 4, 0), (1, 4, 4), (4, 4, 4), (5, 4, 8), (7, 1, 7)],
)
def test_pad_to_multiple_of(length, multiple, expected_length):
  indices = np.arange(10, 10 + length)
  padded = bs.pad_to_multiple_of(indices, multiple)
  assert padded.dtype == np.int64 and len(padded) == expected_length
  np.testing.assert_array_equal(padded[:length], indices)
  assert np.all(padded[length:] == -1)


def test_pad_to_multiple_of_pads_rows_of_a_2d_batch():
  users = np.arange(6).reshape(3, 2)
  padded = bs.pad_to_multiple_of(users, 4)
  assert padded.shape == (4, 2)
  np.testing.assert_array_equal(padded[3], [-1, -1])
  with pytest.raises(ValueError, match='multiple must be an integer >= 1'):
    bs.pad_to_multiple_of(users, 0)


@pytest.mark.parametrize(
    'length, minibatch, microbatch, expected_lengths',
    [
        (10, 4, None, [4, 4, 4]),
        (8, 4, None, [4, 4]),
        (3, 4, None, [4]),
        (0, 4, None, [4]),
        (10, 4, 2, [4, 4, 2]),
        (9, 8, 2, [8, 2]),
        (11, 8, 4, [8, 4]),
        (0, 8, 2, [2]),
        (16, 8, 8, [8, 8]),
    ],
)
def test_split_and_pad_global_batch(
    length, minibatch, microbatch, expected_lengths
):
  indices = np.arange(100, 100 + length)
  chunks = bs.split_and_pad_global_batch(indices, minibatch, microbatch)
  assert [len(c) for c in chunks] == expected_lengths
  assert all(c.dtype == np.int64 for c in chunks)
  joined = np.concatenate(chunks)
  np.testing.assert_array_equal(joined[~bs.padding_mask(joined)], indices)
  # Padding only at the end of the last chunk.
  for chunk in chunks[:-1]:
    assert not np.any(bs.padding_mask(chunk))
  if microbatch is not None:
    assert all(len(c) % microbatch == 0 for c in chunks)


def test_split_and_pad_global_batch_of_users():
  users = np.arange(10).reshape(5, 2)
  chunks = bs.split_and_pad_global_batch(users, 4)
  assert [c.shape for c in chunks] == [(4, 2), (4, 2)]
  np.testing.assert_array_equal(chunks[1][1:], -np.ones((3, 2)))


@pytest.mark.parametrize(
    'minibatch, microbatch, message',
    [
        (0, None, 'minibatch_size must be an integer >= 1'),
        (8, 0, 'microbatch_size must be an integer >= 1'),
        (8, 3, 'minibatch_size must be a multiple of microbatch_size'),
    ],
)
def test_split_and_pad_global_batch_refuses_bad_sizes(
    minibatch, microbatch, message
):
  with pytest.raises(ValueError, match=message):
    bs.split_and_pad_global_batch(np.arange(5), minibatch, microbatch)


def test_padding_mask():
  mask = bs.padding_mask(np.array([3, 0, -1, -1]))
  np.testing.assert_array_equal(mask, [False, False, True, True])
  assert mask.dtype == bool
  two_d = bs.padding_mask(np.array([[1, -1], [-1, -1]]))
  np.testing.assert_array_equal(two_d, [[False, True], [True, True]])


# Balls-in-bins and user-level selection.


def test_balls_in_bins_each_example_once_per_epoch():
  sampler = bs.BallsInBinsSampling(iterations=12, cycle_length=4)
  batches = list(sampler.batch_iterator(1000, rng=0))
  assert len(batches) == 12
  for epoch in range(3):
    epoch_batches = batches[4 * epoch : 4 * epoch + 4]
    joined = np.concatenate(epoch_batches)
    np.testing.assert_array_equal(np.sort(joined), np.arange(1000))
  # Assignments are redrawn each epoch, not repeated.
  assert not np.array_equal(batches[0], batches[4])


def test_balls_in_bins_batch_sizes_are_binomial():
  n, k = 2000, 5
  sampler = bs.BallsInBinsSampling(iterations=k * 200, cycle_length=k)
  sizes = np.array([len(b) for b in sampler.batch_iterator(n, rng=1)])
  expected_std = np.sqrt(n * (1 / k) * (1 - 1 / k))
  assert abs(sizes.mean() - n / k) < 1e-9  # each epoch sums to n exactly
  assert 0.85 < sizes.std() / expected_std < 1.15
  # Example 0's step within the epoch is uniform over the k steps.
  batches = list(
      bs.BallsInBinsSampling(
          iterations=k * 2000, cycle_length=k
      ).batch_iterator(3, rng=2)
  )
  positions = [
      step % k for step, b in enumerate(batches) if 0 in b
  ]
  counts = np.bincount(positions, minlength=k)
  assert stats.chisquare(counts).pvalue > 1e-4


def test_balls_in_bins_is_reproducible_and_validates():
  sampler = bs.BallsInBinsSampling(iterations=3, cycle_length=2)
  a = list(sampler.batch_iterator(50, rng=7))
  b = list(sampler.batch_iterator(50, rng=7))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match='cycle_length'):
    bs.BallsInBinsSampling(iterations=3, cycle_length=0)
  with pytest.raises(ValueError, match='rng'):
    next(sampler.batch_iterator(50))


def test_user_selection_yields_examples_of_sampled_users():
  user_ids = np.array([10, 10, 10, 20, 30, 30, 10, 20])
  strategy = bs.UserSelectionStrategy(
      bs.FixedBatchSampling(batch_size=2, iterations=50),
      examples_per_user_per_batch=2,
  )
  seen = {10: [], 20: [], 30: []}
  for rows in strategy.batch_iterator(user_ids, rng=0):
    assert rows.shape == (2, 2)
    for row in rows:
      real = row[row >= 0]
      users = set(user_ids[real])
      assert len(users) == 1  # a row holds one user's examples
      seen[users.pop()].extend(real.tolist())
  # Each user's examples are all used, in turn.
  assert set(seen[10]) == {0, 1, 2, 6}
  assert set(seen[20]) == {3, 7}
  assert set(seen[30]) == {4, 5}


def test_user_selection_pads_users_with_few_examples():
  user_ids = np.array([0, 1, 1, 1])
  strategy = bs.UserSelectionStrategy(
      bs.FixedBatchSampling(batch_size=2, iterations=1),
      examples_per_user_per_batch=3,
  )
  (rows,) = list(strategy.batch_iterator(user_ids, rng=0))
  np.testing.assert_array_equal(rows[0], [0, -1, -1])
  np.testing.assert_array_equal(np.sort(rows[1]), [1, 2, 3])
  np.testing.assert_array_equal(
      bs.padding_mask(rows[0]), [False, True, True]
  )


def test_user_selection_shuffle_per_user_and_validation():
  user_ids = np.repeat(np.arange(3), 20)
  shuffled = bs.UserSelectionStrategy(
      bs.FixedBatchSampling(batch_size=3, iterations=1),
      examples_per_user_per_batch=5,
      shuffle_per_user=True,
  )
  (rows,) = list(shuffled.batch_iterator(user_ids, rng=0))
  assert not all(np.array_equal(r, np.sort(r)) and r[-1] - r[0] == 4 for r in rows)
  with pytest.raises(ValueError, match='examples_per_user_per_batch'):
    bs.UserSelectionStrategy(
        bs.FixedBatchSampling(batch_size=3, iterations=1),
        examples_per_user_per_batch=0,
    )
  with pytest.raises(ValueError, match='base_strategy'):
    bs.UserSelectionStrategy('poisson')
  with pytest.raises(ValueError, match='user_ids'):
    next(shuffled.batch_iterator(np.array([]), rng=0))


# b-min-sep sampling.


def _participation_matrix(batches, n):
  matrix = np.zeros((len(batches), n), bool)
  for t, b in enumerate(batches):
    matrix[t, b] = True
  return matrix


@pytest.mark.parametrize('min_sep', [1, 3, 6])
@pytest.mark.parametrize('warm_start', [True, False])
def test_bminsep_separation_and_rates(min_sep, warm_start):
  n, q, steps = 3000, 0.2, 60
  sampler = bs.BMinSepSampling(
      sampling_prob=q, iterations=steps, min_sep=min_sep, warm_start=warm_start
  )
  batches = list(sampler.batch_iterator(n, rng=5))
  m = _participation_matrix(batches, n)
  for t in range(steps):
    assert len(np.unique(batches[t])) == len(batches[t])
    # No example takes part twice within min_sep steps.
    window = m[max(0, t - min_sep + 1) : t + 1]
    assert window.sum(axis=0).max() <= 1
  stationary = q / (1 + (min_sep - 1) * q)
  first_rate = m[0].mean()
  expected_first = stationary if warm_start else q
  sd = np.sqrt(expected_first * (1 - expected_first) / n)
  assert abs(first_rate - expected_first) < 5 * sd
  late = m[steps // 2 :].mean()
  assert abs(late - stationary) < 0.01
  # An eligible example is included with probability q.
  eligible = np.ones((steps, n), bool)
  for t in range(steps):
    for s in range(1, min_sep):
      if t - s >= 0:
        eligible[t] &= ~m[t - s]
  rows = slice(min_sep, steps)
  rate = m[rows][eligible[rows]].mean()
  assert abs(rate - q) < 0.01


def test_bminsep_truncation_reproducibility_and_errors():
  sampler = bs.BMinSepSampling(
      sampling_prob=0.5, iterations=20, min_sep=2, truncated_batch_size=10
  )
  a = list(sampler.batch_iterator(100, rng=1))
  b = list(sampler.batch_iterator(100, rng=1))
  assert all(len(x) <= 10 for x in a)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  for kwargs, field in [
      (dict(sampling_prob=0.0, iterations=1, min_sep=2), 'sampling_prob'),
      (dict(sampling_prob=0.5, iterations=1, min_sep=0), 'min_sep'),
      (dict(sampling_prob=0.5, iterations=0, min_sep=2), 'iterations'),
      (
          dict(sampling_prob=0.5, iterations=1, min_sep=2, truncated_batch_size=0),
          'truncated_batch_size',
      ),
  ]:
    with pytest.raises(ValueError, match=field):
      bs.BMinSepSampling(**kwargs)


def test_bminsep_large_population_is_cheap():
  sampler = bs.BMinSepSampling(sampling_prob=1e-6, iterations=5, min_sep=4)
  tracemalloc.start()
  batches = list(sampler.batch_iterator(10**8, rng=0))
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < 10 * 2**20
  assert all(np.all((b >= 0) & (b < 10**8)) for b in batches)
