"""DP-SGD on scikit-learn's digits with a Flax NNX model and the dp_sgd API.

1. Define an ordinary NNX model, with dropout (no DP-specific code in it).
2. Calibrate the noise multiplier for the target epsilon with
   ``jax_privacy.accounting`` (PLD accountant, Poisson sampling).
3. Split the model's parameters out (``flax_api.nnx_split_params``) and turn
   the model into the guide's loss wrapper (``flax_api.nnx_loss_wrapper``):
   ``nnx.split`` / ``nnx.merge`` and the per-example dropout keys are handled
   there.
4. Each step: Poisson-sample a batch, pad it to a multiple of 32 (padding
   examples contribute nothing), compute the mean clipped gradient with
   ``DpsgdGradientComputer``, add noise, apply SGD.
5. Write the trained parameters back into the module
   (``flax_api.nnx_update_params``) and evaluate it in eval mode.

The guarantee covers the trained parameters (and the test accuracy computed
from them) with respect to the training split, under add/remove-one
neighbours. The training loss the computer returns is not private and is not
printed.

Run: ``python examples/flax_nnx_example.py`` (about 15 seconds).
"""

import argparse

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy import batch_selection
from jax_privacy import flax_api
from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate
from jax_privacy.dp_sgd import grad_clipping
from jax_privacy.dp_sgd import gradients

_PAD_MULTIPLE = 32


class MLP(nnx.Module):
  """64 pixels -> hidden (tanh) -> dropout -> 10 classes."""

  def __init__(self, *, hidden: int, dropout_rate: float, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, hidden, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(jnp.tanh(self.hidden(x))))


def load_digits(seed: int = 0):
  """The 8x8 digits, pixels scaled to [0, 1], split 80/20 (stratified)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  return model_selection.train_test_split(
      x, y, test_size=0.2, random_state=seed, stratify=y
  )


def train(
    *,
    epsilon: float = 3.0,
    delta: float = 1e-5,
    epochs: int = 15,
    batch_size: int = 128,
    clip_norm: float = 1.0,
    learning_rate: float = 1.0,
    dropout_rate: float = 0.05,
    seed: int = 0,
) -> dict:
  """Trains the NNX MLP with DP-SGD; returns accuracy, epsilon and sigma."""
  train_x, test_x, train_y, test_y = load_digits()
  num_train = len(train_y)
  iterations = epochs * max(1, round(num_train / batch_size))

  accountant = analysis.DpsgdTrainingAccountant(
      accountants.PldAccountantConfig()
  )
  sigma = calibrate.calibrate_noise_multiplier(
      target_epsilon=epsilon,
      accountant=accountant,
      batch_sizes=batch_size,
      num_updates=iterations,
      num_samples=num_train,
      target_delta=delta,
  )

  model = MLP(hidden=64, dropout_rate=dropout_rate, rngs=nnx.Rngs(seed))
  model.train()  # Dropout on; the loss wrapper snapshots this mode.
  params, network_state = flax_api.nnx_split_params(model)
  loss_fn = flax_api.nnx_loss_wrapper(
      model, optax.softmax_cross_entropy_with_integer_labels
  )
  computer = gradients.DpsgdGradientComputer(
      clipping_norm=clip_norm,
      noise_multiplier=sigma,
      rescale_to_unit_norm=False,
      per_example_grad_method=grad_clipping.VECTORIZED,
  )
  optimizer = optax.sgd(learning_rate)
  opt_state = optimizer.init(params)
  noise_state = computer.init_noise_state(params)

  @jax.jit
  def step(params, opt_state, noise_state, batch, is_padding, key):
    example_key, noise_key = jax.random.split(key)
    _, grads = computer.loss_and_clipped_gradients(
        loss_fn=loss_fn,
        params=params,
        network_state=network_state,
        rng_per_local_microbatch=example_key,
        inputs=batch,
        is_padding_example=is_padding,
        normalize_by=batch_size,  # Expected size: sensitivity fixed.
    )
    grads, _, noise_state = computer.add_noise_to_grads(
        grads, noise_key, batch_size, noise_state
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, noise_state

  sampler = batch_selection.CyclicPoissonSampling(
      sampling_prob=batch_size / num_train, iterations=iterations
  )
  keys = jax.random.split(jax.random.key(seed + 1), iterations)
  for t, indices in enumerate(
      sampler.batch_iterator(num_train, rng=seed + 2)
  ):
    padded = batch_selection.pad_to_multiple_of(indices, _PAD_MULTIPLE)
    is_padding = padded < 0
    gather = np.where(is_padding, 0, padded)
    batch = (train_x[gather], train_y[gather])
    params, opt_state, noise_state = step(
        params, opt_state, noise_state, batch, is_padding, keys[t]
    )

  steps_run = t + 1
  epsilon_spent = accountant.compute_epsilon(
      steps_run,
      analysis.DpParams(
          noise_multipliers=sigma,
          num_samples=num_train,
          batch_size=batch_size,
          delta=delta,
      ),
  )
  flax_api.nnx_update_params(model, params)
  model.eval()
  logits = model(test_x)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test_y))
  return {
      'test_accuracy': accuracy,
      'epsilon': float(epsilon_spent),
      'noise_multiplier': sigma,
      'steps': steps_run,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epsilon', type=float, default=3.0)
  parser.add_argument('--epochs', type=int, default=15)
  parser.add_argument('--dropout_rate', type=float, default=0.05)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  result = train(
      epsilon=args.epsilon,
      epochs=args.epochs,
      dropout_rate=args.dropout_rate,
      seed=args.seed,
  )
  print(
      f"steps {result['steps']}  noise multiplier "
      f"{result['noise_multiplier']:.3f}  epsilon {result['epsilon']:.3f}  "
      f"test accuracy {result['test_accuracy']:.3f}"
  )


if __name__ == '__main__':
  main()
