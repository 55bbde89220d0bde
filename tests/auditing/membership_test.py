"""Tests of the membership-inference attacks and the ROC plot."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special

from jax_privacy import auditing
from jax_privacy.auditing import membership


def test_scores_match_direct_formulas():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4))
  labels = rng.integers(0, 4, size=6)
  probs = special.softmax(logits, axis=1)
  np.testing.assert_allclose(
      membership.entropy_scores(logits),
      [np.sum(p * np.log(p)) for p in probs],
  )
  p_true = probs[np.arange(6), labels]
  np.testing.assert_allclose(
      membership.logit_confidence(logits, labels),
      np.log(p_true / (1 - p_true)),
      rtol=1e-10,
  )
  losses = -np.log(p_true)
  np.testing.assert_allclose(membership.loss_scores(losses), np.log(p_true))


def test_lira_standardises_against_reference_models():
  target = np.array([0.1, 2.0])
  reference = np.array([[1.0, 2.0], [1.2, 2.2], [0.8, 1.8]])
  phi = lambda loss: math.log(math.exp(-loss) / (1 - math.exp(-loss)))
  scores = membership.lira_offline_scores(target, reference)
  for i in range(2):
    ref_phi = [phi(l) for l in reference[:, i]]
    want = (phi(target[i]) - np.mean(ref_phi)) / np.std(ref_phi, ddof=1)
    assert scores[i] == pytest.approx(want, rel=1e-9)
  assert scores[0] > 0  # far lower loss than the references: a member


def _train(features, labels, *, noise_std, steps, key):
  """Full-batch gradient descent on a wide MLP, optionally noisy (clipped)."""
  num_features = features.shape[1]
  k1, k2, k3 = jax.random.split(key, 3)
  params = {
      'w1': jax.random.normal(k1, (num_features, 128)) / math.sqrt(num_features),
      'w2': jax.random.normal(k2, (128, 2)) / math.sqrt(128),
  }

  def per_example_loss(params, x, y):
    logits = jnp.tanh(x @ params['w1']) @ params['w2']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  def batch_grad(params, key):
    per_example = jax.vmap(
        jax.grad(lambda p, x, y: per_example_loss(p, x[None], y[None])[0]),
        in_axes=(None, 0, 0),
    )(params, features, labels)
    norms = jnp.sqrt(
        sum(jnp.sum(g.reshape(len(labels), -1) ** 2, 1)
            for g in jax.tree.leaves(per_example))
    )
    factor = jnp.minimum(1.0, 1.0 / norms) if noise_std else jnp.ones_like(norms)
    keys = jax.random.split(key, 2)
    return {
        name: (
            jnp.tensordot(factor, g, 1)
            + noise_std * jax.random.normal(k, g.shape[1:])
        ) / len(labels)
        for (name, g), k in zip(sorted(per_example.items()), keys)
    }

  @jax.jit
  def step(params, key):
    grads = batch_grad(params, key)
    return jax.tree.map(lambda p, g: p - 2.0 * g, params, grads)

  for i in range(steps):
    params = step(params, jax.random.fold_in(k3, i))
  return lambda x, y: np.asarray(per_example_loss(params, x, y))


@pytest.mark.parametrize('noise_std,expect_leak', [(0.0, True), (200.0, False)])
def test_loss_attack_separates_overfit_model_only(noise_std, expect_leak):
  rng = np.random.default_rng(1)
  # Random labels: only memorisation can lower the members' loss.
  features = rng.normal(size=(200, 20)).astype(np.float32)
  labels = rng.integers(0, 2, size=200)
  members, non_members = slice(0, 100), slice(100, 200)
  loss_fn = _train(
      features[members], labels[members], noise_std=noise_std, steps=300,
      key=jax.random.key(0),
  )
  auditor = auditing.CanaryScoreAuditor(
      membership.loss_scores(loss_fn(features[members], labels[members])),
      membership.loss_scores(
          loss_fn(features[non_members], labels[non_members])
      ),
  )
  summary = membership.summarize(auditor, fpr=0.05, delta=1e-5)
  if expect_leak:
    assert summary.auc > 0.8
    assert summary.tpr_at_fpr > 0.1
    assert summary.epsilon_lower_bound_gdp > 0.5
  else:
    assert abs(summary.auc - 0.5) < 0.1
    assert summary.epsilon_lower_bound == 0.0
  assert summary.num_members == summary.num_non_members == 100


def test_plot_roc_writes_png(tmp_path):
  pytest.importorskip('matplotlib')
  rng = np.random.default_rng(2)
  auditors = {
      'strong': auditing.CanaryScoreAuditor(
          rng.normal(2, 1, 100), rng.normal(0, 1, 100)
      ),
      'weak': auditing.CanaryScoreAuditor(
          rng.normal(0.2, 1, 100), rng.normal(0, 1, 100)
      ),
  }
  path = tmp_path / 'roc.png'
  membership.plot_roc(auditors, path)
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='auditors'):
    membership.plot_roc({}, path)


def test_bad_inputs_name_the_field():
  with pytest.raises(ValueError, match='losses'):
    membership.loss_scores([])
  with pytest.raises(ValueError, match='losses'):
    membership.loss_scores([1.0, np.nan])
  with pytest.raises(ValueError, match='logits'):
    membership.entropy_scores(np.zeros(3))
  with pytest.raises(ValueError, match='labels'):
    membership.logit_confidence(np.zeros((3, 2)), np.zeros(2, int))
  with pytest.raises(ValueError, match='reference_losses'):
    membership.lira_offline_scores(np.ones(3), np.ones((4, 2)))
  with pytest.raises(ValueError, match='reference models'):
    membership.lira_offline_scores(np.ones(3), np.ones((1, 3)))
