"""DP-SGD linear regression with the accounting and dp_sgd API, in raw JAX.

The example of the "JAX & Flax" guide, step by step:

1. Choose the accounting algorithm (PLD).
2. Create the accountant.
3. Calibrate the noise multiplier for a target epsilon, given the batch size
   and number of updates.
4. Create the gradient computer.
5. Write the loss wrapper for ONE example.
6. In the training step, compute the clipped gradients and add noise.
7. Apply the noisy gradients to the model.

The batches are Poisson-sampled, as the accountant assumes, and padded to a
fixed size so that the training step compiles once.

Run: ``python examples/jax_api_example.py`` (about 10 seconds on a laptop).
"""

# [START example]
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy import batch_selection
from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate
from jax_privacy.dp_sgd import grad_clipping
from jax_privacy.dp_sgd import gradients
from jax_privacy.dp_sgd import typing

TRUE_W, TRUE_B = 2.0, -1.0


def make_data(num_samples: int, seed: int):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1.0, 1.0, size=(num_samples, 1)).astype(np.float32)
  noise = 0.05 * rng.normal(size=(num_samples, 1)).astype(np.float32)
  return x, TRUE_W * x + TRUE_B + noise


def loss_fn(params, network_state, rng, inputs):
  """The loss wrapper: ONE example, with a leading batch axis of size 1."""
  del rng  # The model is deterministic.
  x, y = inputs
  prediction = x @ params['w'] + params['b']
  loss = jnp.mean((prediction - y) ** 2)
  metrics = typing.Metrics(scalars_avg={'mse': loss})
  return loss, (network_state, metrics)


def train(
    *,
    epsilon: float = 1.0,
    delta: float = 1e-5,
    num_samples: int = 10_000,
    batch_size: int = 500,
    num_updates: int = 300,
    learning_rate: float = 0.5,
    seed: int = 0,
) -> dict:
  x, y = make_data(num_samples, seed)

  # Steps 1-3: accountant and calibration of the noise multiplier.
  accountant = analysis.DpsgdTrainingAccountant(
      dp_accountant_config=accountants.PldAccountantConfig()
  )
  noise_multiplier = calibrate.calibrate_noise_multiplier(
      target_epsilon=epsilon,
      accountant=accountant,
      batch_sizes=batch_size,
      num_updates=num_updates,
      num_samples=num_samples,
      target_delta=delta,
  )

  # Step 4: the gradient computer.
  gradient_computer = gradients.DpsgdGradientComputer(
      clipping_norm=1.0,
      noise_multiplier=noise_multiplier,
      rescale_to_unit_norm=True,
      per_example_grad_method=grad_clipping.VECTORIZED,
  )

  params = {'w': jnp.zeros((1, 1)), 'b': jnp.zeros((1,))}
  optimizer = optax.sgd(learning_rate, momentum=0.9)
  opt_state = optimizer.init(params)
  noise_state = gradient_computer.init_noise_state(params)

  # Step 6: the training step (step 5, the loss wrapper, is above).
  @jax.jit
  def train_step(params, opt_state, noise_state, batch, is_padding, key):
    clip_key, noise_key = jax.random.split(key)
    (loss, (_, metrics)), grads = gradient_computer.loss_and_clipped_gradients(
        loss_fn=loss_fn,
        params=params,
        network_state={},
        rng_per_local_microbatch=clip_key,
        inputs=batch,
        is_padding_example=is_padding,
        normalize_by=batch_size,  # Expected batch size: Poisson sampling.
    )
    noisy_grads, _, noise_state = gradient_computer.add_noise_to_grads(
        grads, noise_key, batch_size, noise_state
    )
    # Step 7: apply the noisy gradients.
    updates, opt_state = optimizer.update(noisy_grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, noise_state, loss

  # Poisson sampling with expected size batch_size, padded to a fixed size so
  # that train_step compiles once. Twice the expected size is never reached
  # in practice (it is 22 standard deviations away); if it were, truncating
  # the batch would change the mechanism, so it is an error instead.
  sampler = batch_selection.CyclicPoissonSampling(
      sampling_prob=batch_size / num_samples, iterations=num_updates
  )
  padded_size = 2 * batch_size
  key = jax.random.key(seed)
  for step, indices in enumerate(sampler.batch_iterator(num_samples, rng=seed)):
    if len(indices) > padded_size:
      raise RuntimeError('Poisson batch larger than the padded size')
    padded = np.full(padded_size, -1, dtype=np.int64)
    padded[: len(indices)] = indices
    is_padding = padded < 0
    batch = (x[np.where(is_padding, 0, padded)], y[np.where(is_padding, 0, padded)])
    params, opt_state, noise_state, loss = train_step(
        params, opt_state, noise_state, batch, is_padding,
        jax.random.fold_in(key, step),
    )

  final_mse = float(jnp.mean((x @ params['w'] + params['b'] - y) ** 2))
  spent = accountant.compute_epsilon(
      num_updates,
      analysis.DpParams(
          noise_multipliers=noise_multiplier,
          num_samples=num_samples,
          batch_size=batch_size,
          delta=delta,
      ),
  )
  return {
      'w': float(params['w'][0, 0]),
      'b': float(params['b'][0]),
      'final_loss': final_mse,
      'noise_multiplier': noise_multiplier,
      'epsilon': spent,
      'delta': delta,
  }
# [END example]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epsilon', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  result = train(epsilon=args.epsilon, seed=args.seed)
  print(
      f"learned w={result['w']:.3f} (true {TRUE_W}), "
      f"b={result['b']:.3f} (true {TRUE_B}), "
      f"final loss {result['final_loss']:.4f}"
  )
  print(
      f"epsilon={result['epsilon']:.3f}, delta={result['delta']:g}, "
      f"noise multiplier={result['noise_multiplier']:.3f}"
  )


if __name__ == '__main__':
  main()
