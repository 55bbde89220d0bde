"""Tests for jax_privacy.experimental.accounting (DpEvent factories)."""

import math

import dp_accounting
import numpy as np
import pytest

from jax_privacy import accounting as accounting_package
from jax_privacy.experimental import accounting

NeighboringRelation = dp_accounting.NeighboringRelation
RdpAccountant = dp_accounting.rdp.RdpAccountant
PLDAccountant = dp_accounting.pld.PLDAccountant
rdp_lib = dp_accounting.rdp.rdp_privacy_accountant
pld_lib = dp_accounting.pld.privacy_loss_distribution


def _epsilon(accountant, event, delta):
  return accountant.compose(event).get_epsilon(delta)


# dpsgd_event ------------------------------------------------------------------


@pytest.mark.parametrize(
    'sigma, steps, q', [(1.1, 1000, 0.01), (0.5, 1, 1.0), (4.0, 7, 1e-4)]
)
def test_dpsgd_event_is_self_composed_poisson_gaussian(sigma, steps, q):
  expected = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma)
      ),
      steps,
  )
  assert accounting.dpsgd_event(sigma, steps, sampling_prob=q) == expected


@pytest.mark.parametrize(
    'q, sigma, steps, delta',
    [
        (0.01, 1.0, 100, 1e-5),
        (0.001, 3.0, 2000, 1e-6),
        (0.2, 0.9, 10, 1e-3),
        (1.0, 5.0, 50, 1e-5),
    ],
)
def test_dpsgd_event_epsilon_equals_direct_computation(q, sigma, steps, delta):
  event = accounting.dpsgd_event(sigma, steps, sampling_prob=q)
  # RDP of one sampled Gaussian step, times the number of steps, converted.
  orders = dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
  # pylint: disable-next=protected-access
  rdp_one_step = rdp_lib._compute_rdp_poisson_subsampled_gaussian(
      q, sigma, orders
  )
  direct_rdp, _ = rdp_lib.compute_epsilon(orders, steps * rdp_one_step, delta)
  assert _epsilon(RdpAccountant(), event, delta) == pytest.approx(
      direct_rdp, rel=1e-9
  )
  # PLD of one sampled Gaussian step, self-composed.
  direct_pld = (
      pld_lib.from_gaussian_mechanism(
          sigma, sampling_prob=q, value_discretization_interval=1e-3
      )
      .self_compose(steps)
      .get_epsilon_for_delta(delta)
  )
  assert _epsilon(
      PLDAccountant(value_discretization_interval=1e-3), event, delta
  ) == pytest.approx(direct_pld, rel=1e-9)


@pytest.mark.parametrize('sigma, steps', [(1.0, 1), (2.0, 10), (5.0, 200)])
@pytest.mark.parametrize('delta', [1e-6, 1e-3])
def test_full_batch_dpsgd_matches_exact_gaussian_mechanism(sigma, steps, delta):
  # With q = 1, T steps of noise sigma are one Gaussian mechanism with noise
  # sigma / sqrt(T), whose exact epsilon is known (Balle & Wang 2018).
  exact = dp_accounting.get_epsilon_gaussian(sigma / math.sqrt(steps), delta)
  event = accounting.dpsgd_event(sigma, steps, sampling_prob=1.0)
  rdp_epsilon = _epsilon(RdpAccountant(), event, delta)
  pld_epsilon = _epsilon(PLDAccountant(), event, delta)
  assert exact <= rdp_epsilon <= 1.25 * exact
  assert exact - 1e-6 <= pld_epsilon <= exact + 1e-2


def test_dpsgd_event_subsampling_amplifies():
  full = accounting.dpsgd_event(1.0, 100, sampling_prob=1.0)
  sampled = accounting.dpsgd_event(1.0, 100, sampling_prob=0.01)
  assert _epsilon(RdpAccountant(), sampled, 1e-5) < (
      _epsilon(RdpAccountant(), full, 1e-5) / 10
  )


def test_zero_noise_is_non_private():
  event = accounting.dpsgd_event(0.0, 10, sampling_prob=0.1)
  assert event == dp_accounting.NonPrivateDpEvent()
  assert _epsilon(RdpAccountant(), event, 1e-5) == math.inf
  assert _epsilon(PLDAccountant(), event, 1e-5) == math.inf


def test_zero_iterations_cost_nothing():
  event = accounting.dpsgd_event(1.0, 0, sampling_prob=0.1)
  assert event == dp_accounting.NoOpDpEvent()
  assert _epsilon(RdpAccountant(), event, 1e-5) == 0
  assert _epsilon(PLDAccountant(), event, 1e-5) == 0


@pytest.mark.parametrize(
    'kwargs, field',
    [
        (dict(noise_multiplier=-1.0), 'noise_multiplier'),
        (dict(noise_multiplier=math.nan), 'noise_multiplier'),
        (dict(noise_multiplier=math.inf), 'noise_multiplier'),
        (dict(noise_multiplier='1'), 'noise_multiplier'),
        (dict(iterations=-1), 'iterations'),
        (dict(iterations=2.5), 'iterations'),
        (dict(sampling_prob=0.0), 'sampling_prob'),
        (dict(sampling_prob=1.5), 'sampling_prob'),
        (dict(sampling_prob=math.nan), 'sampling_prob'),
    ],
)
def test_dpsgd_event_bad_input(kwargs, field):
  args = dict(noise_multiplier=1.0, iterations=10, sampling_prob=0.1) | kwargs
  with pytest.raises(ValueError, match=field):
    accounting.dpsgd_event(
        args['noise_multiplier'],
        args['iterations'],
        sampling_prob=args['sampling_prob'],
    )


# fixed_dpsgd_event ------------------------------------------------------------


def test_fixed_event_structure_halves_noise_for_replace_one():
  event = accounting.fixed_dpsgd_event(
      2.0, 30, dataset_size=1000, batch_size=100
  )
  assert event == dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(
          1000, 100, dp_accounting.GaussianDpEvent(1.0)
      ),
      30,
  )


@pytest.mark.parametrize('sigma, steps', [(2.0, 1), (4.0, 100), (8.0, 10)])
@pytest.mark.parametrize('delta', [1e-5, 1e-3])
def test_fixed_full_batch_matches_gaussian_with_sensitivity_two(
    sigma, steps, delta
):
  # Replacing one example moves the sum of clipped gradients by up to 2C, so
  # T full-batch steps are a Gaussian mechanism with noise sigma*C and
  # sensitivity 2C: noise / sensitivity = sigma / (2 sqrt(T)).
  exact = dp_accounting.get_epsilon_gaussian(
      sigma / 2 / math.sqrt(steps), delta
  )
  event = accounting.fixed_dpsgd_event(
      sigma, steps, dataset_size=100, batch_size=100
  )
  accountant = RdpAccountant(
      neighboring_relation=NeighboringRelation.REPLACE_ONE
  )
  assert exact <= _epsilon(accountant, event, delta) <= 1.2 * exact


def test_fixed_event_epsilon_grows_with_batch_size():
  epsilons = []
  for batch_size in [10, 100, 1000]:
    event = accounting.fixed_dpsgd_event(
        1.0, 100, dataset_size=10_000, batch_size=batch_size
    )
    accountant = RdpAccountant(
        neighboring_relation=NeighboringRelation.REPLACE_ONE
    )
    epsilons.append(_epsilon(accountant, event, 1e-5))
  assert epsilons == sorted(epsilons) and len(set(epsilons)) == 3


def test_fixed_event_with_replacement_is_described_but_not_composable():
  event = accounting.fixed_dpsgd_event(
      1.0, 10, dataset_size=100, batch_size=10, replace=True
  )
  assert isinstance(event.event, dp_accounting.SampledWithReplacementDpEvent)
  for accountant in [
      RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE),
      PLDAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE),
  ]:
    assert not accountant.supports(event)


def test_fixed_event_zero_noise_is_non_private():
  event = accounting.fixed_dpsgd_event(
      0.0, 10, dataset_size=100, batch_size=10
  )
  assert event == dp_accounting.NonPrivateDpEvent()


@pytest.mark.parametrize(
    'kwargs, field',
    [
        (dict(noise_multiplier=-0.1), 'noise_multiplier'),
        (dict(iterations=-2), 'iterations'),
        (dict(dataset_size=0), 'dataset_size'),
        (dict(batch_size=0), 'batch_size'),
        (dict(batch_size=101), 'batch_size'),
        (dict(batch_size=10.5), 'batch_size'),
    ],
)
def test_fixed_event_bad_input(kwargs, field):
  args = dict(
      noise_multiplier=1.0, iterations=10, dataset_size=100, batch_size=10
  ) | kwargs
  with pytest.raises(ValueError, match=field):
    accounting.fixed_dpsgd_event(
        args['noise_multiplier'],
        args['iterations'],
        dataset_size=args['dataset_size'],
        batch_size=args['batch_size'],
    )


# truncated_dpsgd_event --------------------------------------------------------


def test_truncated_event_structure():
  event = accounting.truncated_dpsgd_event(
      1.5, 20, sampling_prob=0.01, num_examples=5000, truncated_batch_size=80
  )
  assert event == dp_accounting.SelfComposedDpEvent(
      dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=5000,
          sampling_probability=0.01,
          truncated_batch_size=80,
          noise_multiplier=1.5,
      ),
      20,
  )


def test_truncation_that_never_happens_equals_plain_poisson():
  # With truncated_batch_size >= num_examples no batch is ever truncated.
  truncated = accounting.truncated_dpsgd_event(
      1.0, 50, sampling_prob=0.05, num_examples=200, truncated_batch_size=200
  )
  plain = accounting.dpsgd_event(1.0, 50, sampling_prob=0.05)
  pld = lambda: PLDAccountant(value_discretization_interval=1e-3)
  assert _epsilon(pld(), truncated, 1e-5) == pytest.approx(
      _epsilon(pld(), plain, 1e-5), rel=1e-9
  )


def test_rare_truncation_is_close_to_plain_poisson():
  # Expected batch 50; truncating at 120 almost never happens.
  truncated = accounting.truncated_dpsgd_event(
      1.0, 50, sampling_prob=0.01, num_examples=5000, truncated_batch_size=120
  )
  plain = accounting.dpsgd_event(1.0, 50, sampling_prob=0.01)
  pld = lambda: PLDAccountant(value_discretization_interval=1e-3)
  assert _epsilon(pld(), truncated, 1e-5) == pytest.approx(
      _epsilon(pld(), plain, 1e-5), rel=1e-2
  )


@pytest.mark.parametrize(
    'kwargs, field',
    [
        (dict(noise_multiplier=math.nan), 'noise_multiplier'),
        (dict(sampling_prob=2.0), 'sampling_prob'),
        (dict(num_examples=0), 'num_examples'),
        (dict(truncated_batch_size=0), 'truncated_batch_size'),
    ],
)
def test_truncated_event_bad_input(kwargs, field):
  args = dict(
      noise_multiplier=1.0,
      iterations=10,
      sampling_prob=0.1,
      num_examples=100,
      truncated_batch_size=20,
  ) | kwargs
  with pytest.raises(ValueError, match=field):
    accounting.truncated_dpsgd_event(
        args.pop('noise_multiplier'), args.pop('iterations'), **args
    )


def test_factories_are_reexported_from_accounting():
  assert accounting_package.dpsgd_event is accounting.dpsgd_event
  assert accounting_package.fixed_dpsgd_event is accounting.fixed_dpsgd_event
  assert (
      accounting_package.truncated_dpsgd_event
      is accounting.truncated_dpsgd_event
  )


def test_events_accept_numpy_scalars():
  event = accounting.dpsgd_event(
      np.float32(1.0), np.int64(5), sampling_prob=np.float64(0.5)
  )
  assert event.count == 5
  assert _epsilon(RdpAccountant(), event, 1e-5) > 0


# amplified_bandmf_event -------------------------------------------------------


def _banded_strategy(rng, n, bands):
  """A random lower-triangular `bands`-banded C with unit-norm columns."""
  strategy = np.tril(rng.uniform(0.2, 1.0, size=(n, n)))
  strategy = np.triu(strategy, -(bands - 1))
  return strategy / np.linalg.norm(strategy, axis=0)


def _monte_carlo_delta(strategy, steps, q, sigma, epsilon, rng, samples):
  """delta(epsilon) of C(x + v) + sigma z, v = sum_j B_j e_steps[j], both ways.

  The example takes part in `steps` (its group's steps), each independently
  with probability q (Poisson sampling within the group). Patterns of
  participation are enumerated exactly; only the output is sampled.
  """
  patterns = np.array(
      [[(i >> j) & 1 for j in range(len(steps))]
       for i in range(2 ** len(steps))], dtype=float)
  weights = np.prod(np.where(patterns == 1, q, 1 - q), axis=1)
  shifts = patterns @ strategy[:, steps].T  # [patterns, n] = C v.
  def log_ratio(y):  # log p_{D'}(y) / p_D(y), p_D = N(0, sigma^2 I).
    exponents = (y @ shifts.T - 0.5 * np.sum(shifts**2, axis=1)) / sigma**2
    return np.log(np.exp(exponents) @ weights)
  n = strategy.shape[0]
  noise = sigma * rng.standard_normal((samples, n))
  chosen = rng.choice(len(weights), size=samples, p=weights)
  # Remove direction: outputs from D' (mixture), loss log p_D'/p_D.
  loss_remove = log_ratio(noise + shifts[chosen])
  # Add direction: outputs from D, loss log p_D/p_D'.
  loss_add = -log_ratio(noise)
  deltas, errors = [], []
  for loss in (loss_remove, loss_add):
    terms = np.maximum(0.0, 1.0 - np.exp(epsilon - loss))
    deltas.append(terms.mean())
    errors.append(terms.std() / math.sqrt(samples))
  return deltas, errors


@pytest.mark.parametrize('bands, iterations', [(2, 4), (3, 7), (1, 3)])
def test_amplified_bandmf_matches_monte_carlo_of_the_banded_mechanism(
    bands, iterations
):
  rng = np.random.default_rng(bands * 100 + iterations)
  sigma, q, epsilon = 1.0, 0.5, 1.0
  strategy = _banded_strategy(rng, iterations, bands)
  steps = list(range(0, iterations, bands))  # Group 0: the most exposed.
  (remove, add), (remove_se, add_se) = _monte_carlo_delta(
      strategy, steps, q, sigma, epsilon, rng, samples=200_000)
  event = accounting.amplified_bandmf_event(
      sigma, iterations, num_bands=bands, sampling_prob=q)
  claimed = PLDAccountant(value_discretization_interval=1e-4).compose(
      event).get_delta(epsilon)
  # Never under-reported, and tight: the claim is the larger direction.
  assert claimed >= max(remove - 4 * remove_se, add - 4 * add_se)
  assert claimed == pytest.approx(max(remove, add), rel=0.05)


def test_overlapping_bands_are_not_covered_by_the_reduction():
  # A negative control: 3 bands with only 2 groups means the blocks of an
  # example's participations overlap; the Monte Carlo delta then differs
  # from the 2-band claim, so the check above does detect a wrong reduction.
  rng = np.random.default_rng(0)
  strategy = _banded_strategy(rng, 6, 3)
  (remove, add), _ = _monte_carlo_delta(
      strategy, [0, 2, 4], 0.5, 1.0, 1.0, rng, samples=100_000)
  claimed = PLDAccountant(value_discretization_interval=1e-4).compose(
      accounting.amplified_bandmf_event(
          1.0, 6, num_bands=2, sampling_prob=0.5)).get_delta(1.0)
  assert max(remove, add) != pytest.approx(claimed, rel=0.05)


@pytest.mark.parametrize('iterations, bands, expected', [
    (10, 1, 10), (10, 3, 4), (9, 3, 3), (0, 4, 0), (2, 5, 1)])
def test_amplified_bandmf_counts_participations(iterations, bands, expected):
  event = accounting.amplified_bandmf_event(
      1.5, iterations, num_bands=bands, sampling_prob=0.1)
  assert event == accounting.dpsgd_event(1.5, expected, sampling_prob=0.1)


def test_truncated_amplified_bandmf_structure():
  event = accounting.truncated_amplified_bandmf_event(
      2.0, 10, num_bands=4, sampling_prob=0.2, largest_group_size=250,
      truncated_batch_size=60)
  assert event == dp_accounting.SelfComposedDpEvent(
      dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=250, sampling_probability=0.2,
          truncated_batch_size=60, noise_multiplier=2.0),
      3)
  # Truncation far above the expected batch (50) changes almost nothing.
  plain = accounting.amplified_bandmf_event(
      2.0, 10, num_bands=4, sampling_prob=0.2)
  loose = accounting.truncated_amplified_bandmf_event(
      2.0, 10, num_bands=4, sampling_prob=0.2, largest_group_size=250,
      truncated_batch_size=250)
  pld = lambda e: _epsilon(PLDAccountant(value_discretization_interval=1e-3),
                           e, 1e-5)
  assert pld(loose) == pytest.approx(pld(plain), rel=1e-3)


@pytest.mark.parametrize('factory, kwargs, field', [
    ('amplified_bandmf_event', dict(num_bands=0, sampling_prob=0.1),
     'num_bands'),
    ('amplified_bandmf_event', dict(num_bands=2, sampling_prob=1.5),
     'sampling_prob'),
    ('truncated_amplified_bandmf_event',
     dict(num_bands=2, sampling_prob=0.1, largest_group_size=0,
          truncated_batch_size=5), 'largest_group_size'),
    ('truncated_amplified_bandmf_event',
     dict(num_bands=2, sampling_prob=0.1, largest_group_size=10,
          truncated_batch_size=0), 'truncated_batch_size'),
])
def test_bandmf_events_bad_input(factory, kwargs, field):
  with pytest.raises(ValueError, match=field):
    getattr(accounting, factory)(1.0, 10, **kwargs)
  with pytest.raises(ValueError, match='noise_multiplier'):
    getattr(accounting, factory)(-1.0, 10, **(kwargs | {field: 1}))


def test_bandmf_factories_are_reexported_from_accounting():
  assert (accounting_package.amplified_bandmf_event
          is accounting.amplified_bandmf_event)
  assert (accounting_package.truncated_amplified_bandmf_event
          is accounting.truncated_amplified_bandmf_event)
