"""DP-SGD on scikit-learn's digits with a Flax Linen model and DPTrainer.

1. Define an ordinary Linen model (no DP-specific code in it).
2. Calibrate the noise multiplier for the target epsilon with
   ``jax_privacy.accounting`` (PLD accountant, Poisson sampling).
3. Turn model + per-example loss into ``loss(params, example, key)`` with
   ``flax_api.linen_loss``.
4. Train with ``training.DPTrainer``: Poisson batches, per-example clipping,
   Gaussian noise, and a budget it cannot overrun.

The guarantee covers the trained parameters (and the test accuracy computed
from them) with respect to the training split, under add/remove-one
neighbours.

Run: ``python examples/flax_linen_example.py`` (about 15 seconds).
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy import flax_api
from jax_privacy import training
from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate
from jax_privacy.experimental import execution_plan


class MLP(nn.Module):
  """64 pixels -> hidden (tanh) -> 10 classes, with optional dropout."""

  hidden: int = 64
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.tanh(nn.Dense(self.hidden)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(10)(x)


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
    dropout_rate: float = 0.0,
    seed: int = 0,
) -> dict:
  """Trains the MLP with DP-SGD; returns accuracy, epsilon and sigma."""
  train_x, test_x, train_y, test_y = load_digits()
  num_train = len(train_y)
  iterations = epochs * max(1, round(num_train / batch_size))

  # Noise calibration with the accounting API: the smallest sigma such that
  # `iterations` Poisson-sampled steps spend at most `epsilon`.
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
  config = execution_plan.DpsgdExecutionPlanConfig(
      iterations=iterations,
      num_examples=num_train,
      expected_batch_size=batch_size,
      delta=delta,
      noise_multiplier=sigma,
      l2_clip_norm=clip_norm,
      noise_seed=seed + 1,
  )

  model = MLP(dropout_rate=dropout_rate)
  variables = model.init(jax.random.key(seed), train_x[:1])
  params, state = flax_api.linen_split_variables(variables)
  loss = flax_api.linen_loss(
      model,
      optax.softmax_cross_entropy_with_integer_labels,
      state=state,
      apply_kwargs={'train': True},
  )
  trainer = training.DPTrainer(
      loss_fn=loss,
      config=config,
      optimizer=optax.sgd(learning_rate),
      sampling_seed=seed + 2,
      example_key_seed=seed + 3,
  )
  train_state = trainer.fit((train_x, train_y), trainer.init(params))

  logits = model.apply({'params': train_state.params, **state}, test_x)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test_y))
  return {
      'test_accuracy': accuracy,
      'epsilon': trainer.epsilon_spent(train_state),
      'noise_multiplier': sigma,
      'steps': int(train_state.step),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epsilon', type=float, default=3.0)
  parser.add_argument('--epochs', type=int, default=15)
  parser.add_argument('--dropout_rate', type=float, default=0.0)
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
