"""DP-SGD vs BandMF vs BLT on logistic regression, at the same epsilon.

Synthetic data, ``epochs`` passes in a fixed shuffled order (every example
participates once per epoch, so participations are ``steps_per_epoch``
steps apart). Every mechanism is a Gaussian mechanism on the whole stream
``C x`` with L2 sensitivity ``clip_norm * sens(C)`` under that pattern, so
one noise multiplier ``sigma`` (calibrated for one Gaussian release at
``(epsilon, delta)``) gives all three the same privacy, with noise
``stddev = sigma * clip_norm * sens(C)``:

* DP-SGD: ``C = I``, ``sens^2 = epochs`` (no amplification by sampling,
  which a fixed order does not give).
* BandMF: an optimised banded Toeplitz ``C`` with ``bands <= steps_per_epoch``,
  ``sens^2 = epochs * ||c||^2`` (Choquette-Choo et al. 2023, arXiv:2306.08153).
* BLT: an optimised buffered-linear Toeplitz ``C`` (Dvijotham et al. 2024,
  arXiv:2404.16706) with its exact min-separation sensitivity.

Run ``python examples/dpmf_logistic_regression.py --epsilon 2``; it prints
the noise stddev and the test accuracy of each.
"""

import argparse

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy import clipping
from jax_privacy import noise_addition
from jax_privacy.matrix_factorization import buffered_toeplitz
from jax_privacy.matrix_factorization import streaming_matrix
from jax_privacy.matrix_factorization import toeplitz


def _data(num_examples, dim, seed):
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=dim)
  features = rng.normal(size=(2 * num_examples, dim)).astype(np.float32)
  labels = features @ weights + 0.5 * rng.normal(size=2 * num_examples) > 0
  labels = labels.astype(np.float32)
  return (
      features[:num_examples],
      labels[:num_examples],
      features[num_examples:],
      labels[num_examples:],
  )


def _loss(params, x, y):
  logits = x @ params['w'] + params['b']
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))


def _gaussian_sigma(epsilon, delta):
  """Noise multiplier of one Gaussian release meeting (epsilon, delta)."""
  return dp_accounting.calibrate_dp_mechanism(
      dp_accounting.pld.PLDAccountant,
      dp_accounting.GaussianDpEvent,
      epsilon,
      delta,
      dp_accounting.LowerEndpointAndGuess(0.1, 1.0),
      tol=1e-4,
  )


def _strategies(steps, steps_per_epoch, epochs, bands, buffers):
  """(name, noising streaming matrix C^{-1}, sensitivity of C) per mechanism."""
  band_coefs = toeplitz.optimize_banded_toeplitz(
      steps,
      min(bands, steps_per_epoch),
      min_sep=steps_per_epoch,
      max_participations=epochs,
      max_optimizer_steps=100,
  )
  blt = buffered_toeplitz.optimize(
      n=steps,
      min_sep=steps_per_epoch,
      max_participations=epochs,
      num_buffers=buffers,
      max_optimizer_steps=100,
  )
  blt_sens = buffered_toeplitz.sensitivity_squared(
      blt, steps, min_sep=steps_per_epoch, max_participations=epochs
  )
  return [
      ('DP-SGD', streaming_matrix.identity(), np.sqrt(epochs)),
      (
          f'BandMF ({len(band_coefs)} bands)',
          toeplitz.inverse_as_streaming_matrix(band_coefs),
          np.sqrt(epochs * np.sum(band_coefs**2)),
      ),
      (
          f'BLT ({buffers} buffers)',
          blt.inverse_as_streaming_matrix(),
          np.sqrt(blt_sens),
      ),
  ]


def train(
    noising, stddev, data, *, epochs, batch_size, clip_norm, learning_rate, seed
):
  """Trains with the given privatizer; returns the test accuracy."""
  train_x, train_y, test_x, test_y = data
  params = {'w': jnp.zeros(train_x.shape[1]), 'b': jnp.zeros([])}
  grad_fn = clipping.clipped_grad(
      _loss, l2_clip_norm=clip_norm, batch_argnums=(1, 2)
  )
  optimizer = optax.chain(
      noise_addition.matrix_factorization_privatizer(
          noising, stddev=stddev, prng_key=jax.random.key(seed)
      ),
      optax.sgd(learning_rate / batch_size),
  )
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, x, y):
    updates, state = optimizer.update(grad_fn(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  order = np.random.default_rng(seed).permutation(train_x.shape[0])
  for _ in range(epochs):
    for start in range(0, len(order), batch_size):
      batch = order[start : start + batch_size]
      params, state = step(params, state, train_x[batch], train_y[batch])
  logits = test_x @ params['w'] + params['b']
  return float(np.mean((np.asarray(logits) > 0) == test_y))


def main(argv=None) -> list[tuple[str, float, float]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epsilon', type=float, default=2.0)
  parser.add_argument('--delta', type=float, default=1e-5)
  parser.add_argument('--num_examples', type=int, default=2000)
  parser.add_argument('--dim', type=int, default=20)
  parser.add_argument('--epochs', type=int, default=4)
  parser.add_argument('--batch_size', type=int, default=50)
  parser.add_argument('--bands', type=int, default=8)
  parser.add_argument('--buffers', type=int, default=3)
  parser.add_argument('--learning_rate', type=float, default=0.5)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  data = _data(args.num_examples, args.dim, args.seed)
  steps_per_epoch = args.num_examples // args.batch_size
  steps = steps_per_epoch * args.epochs
  sigma = _gaussian_sigma(args.epsilon, args.delta)
  clip_norm = 1.0
  results = []
  print(
      f'epsilon={args.epsilon} delta={args.delta}: Gaussian sigma={sigma:.3f}, '
      f'{steps} steps, participations {steps_per_epoch} steps apart'
  )
  for name, noising, sens in _strategies(
      steps, steps_per_epoch, args.epochs, args.bands, args.buffers
  ):
    stddev = sigma * clip_norm * sens
    accuracy = train(
        noising,
        stddev,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        clip_norm=clip_norm,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    results.append((name, stddev, accuracy))
    print(
        f'{name:24s} noise stddev {stddev:8.3f}   test accuracy {accuracy:.3f}'
    )
  return results


if __name__ == '__main__':
  main()
