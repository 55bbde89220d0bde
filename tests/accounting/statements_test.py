"""Tests of accounting.statements against independently computed epsilons."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import optimize
from scipy import stats

from jax_privacy.accounting import statements


def _gaussian_dp_epsilon(mu: float, delta: float) -> float:
  """Exact epsilon of mu-GDP at delta (Dong, Roth, Su 2019, Cor. 2.13)."""

  def excess(eps):
    return (stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta)

  if excess(0.0) <= 0:
    return 0.0
  return optimize.brentq(excess, 0.0, 500.0, xtol=1e-12)


def _rdp_poisson(q, noise, steps, delta):
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(noise)), steps))
  return accountant.get_epsilon(delta)


def test_poisson_epsilon_equals_direct_rdp_with_microbatching_halving():
  s = statements.dp_sgd_privacy_statement(
      number_of_examples=60000, batch_size=256, num_epochs=3,
      noise_multiplier=1.1, delta=1e-5, used_microbatching=True)
  steps = math.ceil(3 * 60000 / 256)
  assert s.num_steps == steps
  assert s.epsilon_poisson == pytest.approx(
      _rdp_poisson(256 / 60000, 0.55, steps, 1e-5), rel=1e-9)
  no_micro = statements.dp_sgd_privacy_statement(
      number_of_examples=60000, batch_size=256, num_epochs=3,
      noise_multiplier=1.1, delta=1e-5, used_microbatching=False)
  assert no_micro.epsilon_poisson == pytest.approx(
      _rdp_poisson(256 / 60000, 1.1, steps, 1e-5), rel=1e-9)
  # Doubling the sensitivity can only cost privacy.
  assert s.epsilon_poisson > 2 * no_micro.epsilon_poisson


@pytest.mark.parametrize('epochs', [1, 4])
def test_shuffled_epsilon_is_the_unamplified_gaussian_composition(epochs):
  sigma, delta = 2.0, 1e-5
  s = statements.dp_sgd_privacy_statement(
      number_of_examples=1000, batch_size=100, num_epochs=epochs,
      noise_multiplier=sigma, delta=delta, used_microbatching=False,
      accountant='pld')
  # Replace-one: sensitivity 2C per epoch, noise sigma C: mu = 2 sqrt(E)/sigma.
  exact = _gaussian_dp_epsilon(2 * math.sqrt(epochs) / sigma, delta)
  # PLD is pessimistic and close; never below the exact value.
  assert exact - 1e-6 <= s.epsilon_shuffled <= exact + 0.05
  rdp = statements.dp_sgd_privacy_statement(
      number_of_examples=1000, batch_size=100, num_epochs=epochs,
      noise_multiplier=sigma, delta=delta, used_microbatching=False)
  assert rdp.epsilon_shuffled >= exact - 1e-6
  # Microbatching does not change the replace-one bound.
  micro = statements.dp_sgd_privacy_statement(
      number_of_examples=1000, batch_size=100, num_epochs=epochs,
      noise_multiplier=sigma, delta=delta, used_microbatching=True,
      accountant='pld')
  assert micro.epsilon_shuffled == pytest.approx(s.epsilon_shuffled)


def test_user_level_numbers():
  sigma, delta, k, epochs = 4.0, 1e-6, 3, 2
  s = statements.dp_sgd_privacy_statement(
      number_of_examples=2000, batch_size=50, num_epochs=epochs,
      noise_multiplier=sigma, delta=delta, used_microbatching=False,
      max_examples_per_user=k, accountant='pld')
  exact = _gaussian_dp_epsilon(2 * k * math.sqrt(epochs) / sigma, delta)
  assert exact - 1e-6 <= s.user_epsilon_shuffled <= exact + 0.05
  # A user with k examples is never better protected than one example.
  assert s.user_epsilon_poisson > s.epsilon_poisson
  # ... and group privacy caps the user-level Poisson number from above
  # loosely: it stays below the unamplified k-fold composition.
  steps = s.num_steps
  no_amplification = _gaussian_dp_epsilon(k * math.sqrt(steps) / sigma, delta)
  assert s.user_epsilon_poisson < no_amplification
  assert 'User level' in s.text and f'{k} examples per user' in s.text


def test_text_flags_the_poisson_heuristic_and_names_numbers():
  s = statements.dp_sgd_privacy_statement(
      number_of_examples=60000, batch_size=256, num_epochs=1,
      noise_multiplier=1.1, delta=1e-5)
  text = str(s)
  assert f'{s.epsilon_poisson:.4g}' in text
  assert f'{s.epsilon_shuffled:.4g}' in text
  assert 'heuristic' in text and 'proven' in text
  # Shuffling without amplification is far weaker than the Poisson number.
  assert s.epsilon_shuffled > s.epsilon_poisson
  assert np.isfinite(s.epsilon_shuffled)


@pytest.mark.parametrize('field, kwargs', [
    ('number_of_examples', dict(number_of_examples=0)),
    ('batch_size', dict(batch_size=2000)),
    ('num_epochs', dict(num_epochs=0)),
    ('noise_multiplier', dict(noise_multiplier=-1.0)),
    ('delta', dict(delta=1.0)),
    ('max_examples_per_user', dict(max_examples_per_user=0)),
    ('accountant', dict(accountant='moments')),
])
def test_bad_input_names_the_field(field, kwargs):
  base = dict(number_of_examples=1000, batch_size=10, num_epochs=1,
              noise_multiplier=1.0, delta=1e-5)
  base.update(kwargs)
  with pytest.raises(ValueError, match=field):
    statements.dp_sgd_privacy_statement(**base)
