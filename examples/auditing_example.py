"""Auditing a hand-written DP-SGD loop with random-gradient canaries.

One training run of a softmax regression, with `num_canaries` canaries:
random directions of norm equal to the clip norm, each included (with
probability 1/2) as an extra per-example gradient in every step, before the
noise. The auditor sees every privatized gradient (white box) and scores a
canary by the projection of their sum on its direction. The one-run audit
(Steinke, Nasr, Jagielski 2023) turns the scores into an epsilon lower bound
to compare with the epsilon the accountant proves.

With the correct noise the lower bound stays below the proven epsilon; with
`noise_scale=0.1` (a bug: noise 10 times too small, the accountant unaware)
it exceeds it, and the audit catches the bug.

`audit_mislabelled` is the black-box variant: mislabelled-input canaries
(held-out inputs with a wrong label), each inserted into the training set
with probability 1/2, scored after training by minus the model's loss on the
wrong label. It catches a step that forgets to clip (`clip=False`).

Run: ``python examples/auditing_example.py [--noise-scale 0.1]`` or
``python examples/auditing_example.py --mislabelled [--no-clip]`` (a few
seconds each).
"""

import argparse

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy import auditing
from jax_privacy import clipping
from jax_privacy import noise_addition
from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate
from jax_privacy.auditing import canaries
from jax_privacy.auditing import membership

NUM_FEATURES, NUM_CLASSES = 1000, 10


def _loss(params, features, labels):
  logits = features @ params['w'] + params['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _calibrate(target_epsilon, delta, population, steps):
  """Noise multiplier for `steps` full-batch steps (sampling probability 1)."""
  return calibrate.calibrate_noise_multiplier(
      target_epsilon=target_epsilon,
      accountant=analysis.DpsgdTrainingAccountant(
          dp_accountant_config=accountants.PldAccountantConfig()
      ),
      batch_sizes=population,
      num_updates=steps,
      num_samples=population,
      target_delta=delta,
  )


def _proven_epsilon(noise_multiplier, steps, delta):
  accountant = dp_accounting.pld.PLDAccountant()
  accountant.compose(
      dp_accounting.GaussianDpEvent(noise_multiplier), count=steps
  )
  return accountant.get_epsilon(delta)


def audit(
    *,
    noise_scale: float = 1.0,
    target_epsilon: float = 2.0,
    delta: float = 1e-5,
    num_examples: int = 16,
    num_canaries: int = 500,
    steps: int = 8,
    clip_norm: float = 1.0,
    significance: float = 0.05,
    seed: int = 0,
) -> dict:
  """Trains once with canaries and returns the proven and audited epsilons.

  Args:
    noise_scale: Multiplies the noise the accountant assumes; 1 is correct,
      anything below 1 is a bug the audit should catch.
    target_epsilon: The epsilon the noise is calibrated for.
    delta: The delta of the guarantee and of the audit.
    num_examples: Real training examples (every step uses all of them).
    num_canaries: Gradient canaries, each included with probability 1/2.
    steps: Full-batch DP-SGD steps.
    clip_norm: Per-example clip norm, also the canaries' norm.
    significance: Of the audit.
    seed: Seeds data, canaries, membership and noise.
  """
  # Independent streams for the data, the canaries and their membership.
  rng, canary_rng, membership_rng = (
      np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
  )
  features = rng.normal(size=(num_examples, NUM_FEATURES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=num_examples)
  # Canaries are examples too: every step uses everyone (sampling prob 1).
  noise_multiplier = _calibrate(
      target_epsilon, delta, num_examples + num_canaries, steps
  )

  grad_fn = clipping.clipped_grad(
      _loss, l2_clip_norm=clip_norm, batch_argnums=(1, 2)
  )
  sensitivity = grad_fn.sensitivity(
      dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  )
  params = {
      'w': jnp.zeros((NUM_FEATURES, NUM_CLASSES)),
      'b': jnp.zeros(NUM_CLASSES),
  }
  gradient_canaries = canaries.random_gradient_canaries(
      params, num_canaries, l2_norm=clip_norm, seed=canary_rng
  )
  included = canaries.choose_included(num_canaries, seed=membership_rng)
  canary_sum = canaries.canary_gradient_sum(gradient_canaries, included)
  privatizer = noise_addition.gaussian_privatizer(
      stddev=noise_scale * noise_multiplier * sensitivity,
      prng_key=jax.random.key(seed),
  )
  optimizer = optax.sgd(0.1)

  @jax.jit
  def step(params, noise_state, opt_state, observed):
    grads = grad_fn(params, features, labels)
    grads = jax.tree.map(jnp.add, grads, canary_sum)
    noisy, noise_state = privatizer.update(grads, noise_state)
    updates, opt_state = optimizer.update(noisy, opt_state, params)
    observed = jax.tree.map(jnp.add, observed, noisy)
    return optax.apply_updates(params, updates), noise_state, opt_state, observed

  noise_state, opt_state = privatizer.init(params), optimizer.init(params)
  observed = jax.tree.map(jnp.zeros_like, params)
  for _ in range(steps):
    params, noise_state, opt_state, observed = step(
        params, noise_state, opt_state, observed
    )
  scores = canaries.gradient_canary_scores(observed, gradient_canaries)
  auditor = auditing.CanaryScoreAuditor(scores[included], scores[~included])
  return {
      'noise_multiplier': noise_multiplier,
      'proven_epsilon': _proven_epsilon(noise_multiplier, steps, delta),
      'epsilon_one_run': auditor.epsilon_one_run(significance, delta),
      'epsilon_one_run_fdp': auditor.epsilon_one_run_fdp(significance, delta),
      'auc': auditor.attack_auroc(),
  }


MISLABELLED_FEATURES = 50


def _per_example_losses(params, features, labels):
  logits = features @ params['w'] + params['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def audit_mislabelled(
    *,
    clip: bool = True,
    target_epsilon: float = 1.0,
    delta: float = 1e-5,
    num_examples: int = 200,
    num_canaries: int = 200,
    steps: int = 100,
    clip_norm: float = 1.0,
    learning_rate: float = 0.5,
    significance: float = 0.05,
    seed: int = 0,
) -> dict:
  """Black-box audit with mislabelled-input canaries; `clip=False` is a bug.

  Real and canary inputs come from the same 10-class Gaussian mixture; each
  canary gets a wrong label and joins the training set with probability
  1/2. Every step uses the whole training set (sampling probability 1).
  """
  rng, canary_rng, membership_rng = (
      np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
  )
  centres = rng.normal(size=(NUM_CLASSES, MISLABELLED_FEATURES))

  def sample(num):
    labels = rng.integers(0, NUM_CLASSES, num)
    noise = rng.normal(size=(num, MISLABELLED_FEATURES))
    # Norm about 9: unclipped gradients are far above the clip norm.
    features = (centres[labels] + noise) * 9 / np.sqrt(MISLABELLED_FEATURES)
    return features.astype(np.float32), labels

  features, labels = sample(num_examples)
  pool_features, pool_labels = sample(num_canaries)
  canary_x, canary_y = canaries.mislabelled_canaries(
      pool_features, pool_labels, num_classes=NUM_CLASSES,
      num_canaries=num_canaries, seed=canary_rng,
  )
  included = canaries.choose_included(num_canaries, seed=membership_rng)
  train_x = np.concatenate([features, canary_x[included]])
  train_y = np.concatenate([labels, canary_y[included]])
  noise_multiplier = _calibrate(
      target_epsilon, delta, num_examples + num_canaries, steps
  )
  if clip:
    grad_fn = clipping.clipped_grad(
        lambda p, x, y: _per_example_losses(p, x, y).mean(),
        l2_clip_norm=clip_norm,
        batch_argnums=(1, 2),
    )
  else:
    grad_fn = jax.grad(lambda p, x, y: _per_example_losses(p, x, y).sum())
  optimizer = optax.chain(
      noise_addition.gaussian_privatizer(
          stddev=noise_multiplier * clip_norm,
          prng_key=jax.random.key(seed),
      ),
      optax.sgd(learning_rate / len(train_y)),
  )

  @jax.jit
  def step(params, opt_state):
    grads = grad_fn(params, train_x, train_y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = {
      'w': jnp.zeros((MISLABELLED_FEATURES, NUM_CLASSES)),
      'b': jnp.zeros(NUM_CLASSES),
  }
  opt_state = optimizer.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  scores = membership.loss_scores(
      _per_example_losses(params, canary_x, canary_y)
  )
  auditor = auditing.CanaryScoreAuditor(scores[included], scores[~included])
  return {
      'noise_multiplier': noise_multiplier,
      'proven_epsilon': _proven_epsilon(noise_multiplier, steps, delta),
      'epsilon_one_run': auditor.epsilon_one_run(significance, delta),
      'epsilon_one_run_fdp': auditor.epsilon_one_run_fdp(significance, delta),
      'auc': auditor.attack_auroc(),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--noise-scale', type=float, default=1.0)
  parser.add_argument('--mislabelled', action='store_true')
  parser.add_argument('--no-clip', action='store_true')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  if args.mislabelled:
    result = audit_mislabelled(clip=not args.no_clip, seed=args.seed)
  else:
    result = audit(noise_scale=args.noise_scale, seed=args.seed)
  for name, value in result.items():
    print(f'{name:>22}: {value:.4f}')


if __name__ == '__main__':
  main()
