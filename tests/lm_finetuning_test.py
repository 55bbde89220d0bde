"""Tests of jax_privacy.lm_finetuning: losses, user grouping, exposure."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jax_privacy import clipping
from jax_privacy import lm_finetuning as lm
from jax_privacy.accounting import accountants
from jax_privacy.experimental import execution_plan


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------
# sequence_loss
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('reduction', ['sum', 'mean'])
def test_sequence_loss_matches_hand_computation(reduction):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (3, 5))
  mask = np.array(
      [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32
  )
  targets[1, 2:] = -1  # Padding targets may hold anything.
  expected = []
  for b in range(3):
    nll = [
        -_log_softmax(logits[b, t].astype(np.float64))[targets[b, t]]
        for t in range(5)
        if mask[b, t]
    ]
    total = float(np.sum(nll)) if nll else 0.0
    expected.append(
        total if reduction == 'sum' else (total / len(nll) if nll else 0.0)
    )
  got = lm.sequence_loss(logits, targets, mask, reduction=reduction)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_sequence_loss_all_masked_is_zero_with_zero_gradient():
  logits = jnp.full((2, 4, 5), 1e3)
  targets = jnp.full((2, 4), 99)  # Out of the vocabulary, but masked.
  mask = jnp.zeros((2, 4), bool)
  for reduction in ('sum', 'mean'):
    value, grad = jax.value_and_grad(
        lambda l: jnp.sum(lm.sequence_loss(l, targets, mask,
                                           reduction=reduction))
    )(logits)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_sequence_loss_bad_shapes():
  logits = jnp.zeros((2, 4, 5))
  with pytest.raises(ValueError, match='mask must have the shape of targets'):
    lm.sequence_loss(logits, jnp.zeros((2, 4), int), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match='targets must have shape'):
    lm.sequence_loss(logits, jnp.zeros((2, 5), int), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match='reduction'):
    lm.sequence_loss(logits, jnp.zeros((2, 4), int), jnp.ones((2, 4)),
                     reduction='max')


# ----------------------------------------------------------------------------
# make_lm_examples
# ----------------------------------------------------------------------------


def test_make_lm_examples_layout_and_split():
  examples, source = lm.make_lm_examples(
      [[1, 2, 3], list(range(10, 20))], context_length=4,
      long_sequences='split', pad_id=7,
  )
  np.testing.assert_array_equal(source, [0, 1, 1, 1])
  np.testing.assert_array_equal(examples['inputs'][0], [1, 2, 7, 7])
  np.testing.assert_array_equal(examples['targets'][0], [2, 3, 7, 7])
  np.testing.assert_array_equal(examples['mask'][0], [1, 1, 0, 0])
  # Every token of the long sequence but the first is predicted exactly once.
  predicted = examples['targets'][1:][examples['mask'][1:] > 0]
  np.testing.assert_array_equal(predicted, np.arange(11, 20))


def test_make_lm_examples_truncate():
  examples, source = lm.make_lm_examples(
      [list(range(10))], context_length=3, long_sequences='truncate'
  )
  np.testing.assert_array_equal(source, [0])
  np.testing.assert_array_equal(examples['inputs'], [[0, 1, 2]])
  np.testing.assert_array_equal(examples['targets'], [[1, 2, 3]])


def test_make_lm_examples_bad_input():
  with pytest.raises(ValueError, match='corpus is empty'):
    lm.make_lm_examples([], context_length=4)
  with pytest.raises(ValueError, match="long_sequences='truncate'.*split"):
    lm.make_lm_examples([list(range(6))], context_length=4)
  with pytest.raises(ValueError, match='at least 2'):
    lm.make_lm_examples([[3]], context_length=4)
  with pytest.raises(ValueError, match='context_length'):
    lm.make_lm_examples([[1, 2]], context_length=0)
  with pytest.raises(ValueError, match='long_sequences'):
    lm.make_lm_examples([[1, 2]], context_length=4, long_sequences='drop')


# ----------------------------------------------------------------------------
# group_by_user and per-user clipping
# ----------------------------------------------------------------------------


def test_group_by_user_layout():
  examples, _ = lm.make_lm_examples(
      [[1, 2], [3, 4, 5], [6, 7], [8, 9]], context_length=3
  )
  grouped = lm.group_by_user(['b', 'a', 'b', 'c'], examples,
                             max_sequences_per_user=2)
  np.testing.assert_array_equal(grouped.user_ids, ['a', 'b', 'c'])
  np.testing.assert_array_equal(grouped.num_sequences, [1, 2, 1])
  assert grouped.examples['inputs'].shape == (3, 2, 3)
  np.testing.assert_array_equal(grouped.examples['inputs'][1, :, 0], [1, 6])
  np.testing.assert_array_equal(grouped.examples['mask'][0, 1], 0)
  assert grouped.num_dropped == 0


def test_group_by_user_too_many():
  examples, _ = lm.make_lm_examples([[1, 2]] * 3 + [[4, 5]], context_length=2)
  ids = [0, 0, 0, 1]
  with pytest.raises(ValueError, match="too_many='truncate'"):
    lm.group_by_user(ids, examples, max_sequences_per_user=2)
  grouped = lm.group_by_user(ids, examples, max_sequences_per_user=2,
                             too_many='truncate')
  assert grouped.num_dropped == 1
  np.testing.assert_array_equal(grouped.num_sequences, [2, 1])


def test_group_by_user_bad_input():
  examples, _ = lm.make_lm_examples([[1, 2]], context_length=2)
  with pytest.raises(ValueError, match='corpus is empty'):
    lm.group_by_user([], examples, max_sequences_per_user=1)
  with pytest.raises(ValueError, match='leading axis of 2'):
    lm.group_by_user([0, 1], examples, max_sequences_per_user=1)
  with pytest.raises(ValueError, match="'mask'"):
    lm.group_by_user([0], {'inputs': examples['inputs']},
                     max_sequences_per_user=1)
  with pytest.raises(ValueError, match='max_sequences_per_user'):
    lm.group_by_user([0], examples, max_sequences_per_user=0)


VOCAB, LENGTH = 6, 4


def _apply(params, tokens, key):
  del key
  return params['embed'][tokens] @ params['head']


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'embed': jnp.asarray(rng.normal(size=(VOCAB, 3)), jnp.float32),
      'head': jnp.asarray(rng.normal(size=(3, VOCAB)), jnp.float32),
  }


def _norm(tree):
  return math.sqrt(sum(float(jnp.sum(x**2))
                       for x in jax.tree_util.tree_leaves(tree)))


def test_per_user_clipping_bounds_each_users_whole_contribution():
  rng = np.random.default_rng(1)
  num_sequences, clip = 24, 0.5
  seqs = [rng.integers(0, VOCAB, rng.integers(2, LENGTH + 2))
          for _ in range(num_sequences)]
  users = rng.integers(0, 5, num_sequences)
  users[:6] = 0  # User 0 holds many sequences.
  examples, _ = lm.make_lm_examples(seqs, context_length=LENGTH)
  grouped = lm.group_by_user(users, examples, max_sequences_per_user=10)
  loss = lm.causal_lm_loss(_apply, reduction='sum')
  grad_fn = jax.jit(clipping.clipped_grad(
      loss, l2_clip_norm=clip, batch_argnums=1, prng_argnum=2))
  params = _params()
  key = jax.random.key(0)
  data = grouped.examples
  full = grad_fn(params, data, key)
  for user in range(grouped.num_users):
    without = jax.tree_util.tree_map(
        lambda x, u=user: np.delete(x, u, axis=0), data
    )
    diff = jax.tree_util.tree_map(jnp.subtract, full,
                                  grad_fn(params, without, key))
    assert _norm(diff) <= clip * (1 + 1e-5)
  # Unclipped, user 0's sequences together move the sum by more than clip.
  user0 = jax.tree_util.tree_map(lambda x: x[:1], data)
  raw = jax.grad(loss)(params, user0, key)
  assert _norm(raw) > 2 * clip


def test_padding_sequences_contribute_nothing():
  examples, _ = lm.make_lm_examples([[1, 2, 3], [4, 5]], context_length=LENGTH)
  grouped = lm.group_by_user([0, 0], examples, max_sequences_per_user=5)
  loss = lm.causal_lm_loss(_apply, reduction='mean')
  params = _params(2)
  one_user = jax.tree_util.tree_map(lambda x: x[:1], grouped.examples)
  padded = jax.grad(loss)(params, one_user, None)
  unpadded = jax.grad(loss)(
      params, jax.tree_util.tree_map(lambda x: x[None], examples), None
  )
  for a, b in zip(jax.tree_util.tree_leaves(padded),
                  jax.tree_util.tree_leaves(unpadded)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert float(loss(params, one_user)) == pytest.approx(
      float(np.sum(lm.sequence_loss(
          _apply(params, examples['inputs'], None), examples['targets'],
          examples['mask'], reduction='mean'))), rel=1e-6)


# ----------------------------------------------------------------------------
# canaries and exposure
# ----------------------------------------------------------------------------


def test_make_canaries_space_and_text():
  canaries = lm.make_canaries(3, 20, num_symbols=3, prefixes='code is')
  assert len({c.secret for c in canaries}) == 20
  canary = canaries[0]
  assert canary.space_size == 1000
  assert canary.text == 'code is ' + ' '.join(str(d) for d in canary.secret)
  secrets = canary.all_secrets()
  assert secrets.shape == (1000, 3)
  assert len({tuple(s) for s in secrets}) == 1000
  np.testing.assert_array_equal(secrets[canary.index_of(canary.secret)],
                                canary.secret)
  again = lm.make_canaries(3, 20, num_symbols=3, prefixes='code is')
  assert [c.secret for c in again] == [c.secret for c in canaries]
  named = lm.make_canaries(0, 2, num_symbols=2, prefixes=['a', 'b'],
                           alphabet='xyz', separator='-')
  assert named[1].text.startswith('b ') and named[1].space_size == 9


def test_make_canaries_bad_input():
  with pytest.raises(ValueError, match='num_canaries'):
    lm.make_canaries(0, 0)
  with pytest.raises(ValueError, match='space size'):
    lm.make_canaries(0, 11, num_symbols=1)
  with pytest.raises(ValueError, match='prefixes'):
    lm.make_canaries(0, 2, prefixes=['a'])
  with pytest.raises(ValueError, match='more than'):
    lm.make_canaries(0, 1, num_symbols=8)[0].all_secrets()


def test_exposure_hand_ranks():
  refs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # |R| = 8
  assert lm.canary_rank(0.5, refs) == 1
  assert lm.canary_exposure(0.5, refs) == pytest.approx(3.0)
  assert lm.canary_rank(3.5, refs) == 4
  assert lm.canary_exposure(3.5, refs) == pytest.approx(1.0)
  assert lm.canary_exposure(100.0, refs) == pytest.approx(0.0)
  assert lm.canary_rank(3.0, refs) == 3.5  # A tie shares ranks 3 and 4.
  with pytest.raises(ValueError, match='reference_log_perplexities'):
    lm.canary_exposure(1.0, [])
  with pytest.raises(ValueError, match='canary_log_perplexity'):
    lm.canary_exposure(float('nan'), refs)


def test_estimated_exposure_matches_the_distribution():
  dist = stats.skewnorm(4.0, loc=20.0, scale=3.0)
  samples = dist.rvs(size=20_000, random_state=0)
  for canary in (19.0, 21.0, 25.0):
    expected = -math.log2(dist.cdf(canary))
    assert lm.estimated_exposure(canary, samples) == pytest.approx(
        expected, rel=0.05, abs=0.05)
  # Close to the exact exposure over a fully enumerated space.
  space = dist.rvs(size=4095, random_state=1)
  canary = np.quantile(space, 0.01)
  exact = lm.canary_exposure(canary, space)
  assert lm.estimated_exposure(canary, space[:1000]) == pytest.approx(
      exact, abs=0.5)
  assert lm.estimated_exposure(-1e3, samples, space_size=1024) == 10.0
  with pytest.raises(ValueError, match='at least 10'):
    lm.estimated_exposure(1.0, np.ones(50))
  with pytest.raises(ValueError, match='space_size'):
    lm.estimated_exposure(1.0, samples, space_size=1)


# ----------------------------------------------------------------------------
# privacy statements
# ----------------------------------------------------------------------------


def _config(iterations=200, **kwargs):
  return execution_plan.DpsgdExecutionPlanConfig(
      iterations=iterations, num_examples=2000, expected_batch_size=64,
      delta=1e-5, noise_seed=0,
      accountant=accountants.PldAccountantConfig(1e-3), **kwargs)


def test_statement_per_sequence_and_per_user():
  config = _config(epsilon=4.0)
  text = lm.privacy_statement(config, lm.PrivacyUnit(max_tokens=128))
  epsilon = config.epsilon_after(200)
  assert epsilon <= 4.0
  assert text.startswith(f'({epsilon:.4g}, 1e-05)-DP for one sequence of up '
                         'to 128 tokens')
  assert 'per sequence' in text and '200 steps' in text
  user = lm.PrivacyUnit(kind='user', max_tokens=64, max_sequences_per_user=8)
  text = lm.privacy_statement(config, user, steps=100)
  assert text.startswith(
      f'({config.epsilon_after(100):.4g}, 1e-05)-DP for one user with up to 8 '
      'sequences')
  assert 'per user' in text and 'users per step' in text


def test_statement_per_sequence_clipping_uses_user_level_accounting():
  config = _config(iterations=20, noise_multiplier=1.2)
  k = 3
  unit = lm.PrivacyUnit(kind='user', max_tokens=64, max_sequences_per_user=k,
                        clipping='per_sequence')
  # Independently: the mixture of Gaussians with shifts 0..k, Binomial(k, q).
  q = 64 / 2000
  probs = stats.binom.pmf(np.arange(k + 1), k, q)
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.dp_event.MixtureOfGaussiansDpEvent(
          1.2, list(range(k + 1)), list(probs / probs.sum())), 20)
  accountant = dp_accounting.pld.PLDAccountant(
      value_discretization_interval=1e-3)
  accountant.compose(event)
  expected = accountant.get_epsilon(1e-5)
  got = lm.user_level_epsilon(config, k)
  assert got == pytest.approx(expected, rel=0.02)
  assert got > config.epsilon_after(20)
  text = lm.privacy_statement(config, unit)
  assert text.startswith(f'({got:.4g}, 1e-05)-DP for one user with up to 3')
  assert 'user-level accountant' in text


def test_privacy_unit_bad_input():
  with pytest.raises(ValueError, match='kind'):
    lm.PrivacyUnit(kind='token', max_tokens=4)
  with pytest.raises(ValueError, match='max_tokens'):
    lm.PrivacyUnit(max_tokens=0)
  with pytest.raises(ValueError, match='max_sequences_per_user'):
    lm.PrivacyUnit(kind='user', max_tokens=4)
  with pytest.raises(ValueError, match='max_sequences_per_user'):
    lm.PrivacyUnit(max_tokens=4, max_sequences_per_user=2)
  with pytest.raises(ValueError, match='clipping'):
    lm.PrivacyUnit(kind='user', max_tokens=4, max_sequences_per_user=2,
                   clipping='none')
  with pytest.raises(ValueError, match='unit must be a PrivacyUnit'):
    lm.privacy_statement(_config(epsilon=1.0), 'sequence')
