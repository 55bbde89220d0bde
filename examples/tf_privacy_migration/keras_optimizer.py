"""TensorFlow Privacy's DP Keras optimizer, here.

TF Privacy:

    optimizer = tensorflow_privacy.DPKerasSGDOptimizer(
        l2_norm_clip=1.0, noise_multiplier=1.1, num_microbatches=64,
        learning_rate=0.5)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.losses.Reduction.NONE)
    model.compile(optimizer=optimizer, loss=loss, metrics=['accuracy'])
    model.fit(x, y, epochs=10, batch_size=64)

JAX Privacy: the same clip norm, noise multiplier, batch size and learning
rate, with any Keras optimizer. `fit` draws Poisson batches, so the epsilon
it reports is proven for the batches it trained on, and it refuses to train
past the budget.

Run: python examples/tf_privacy_migration/keras_optimizer.py
"""

import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
import numpy as np
from sklearn import datasets
from sklearn import model_selection

from jax_privacy import accounting
from jax_privacy import keras_api


def run(epochs: int = 10, seed: int = 0) -> dict:
  """Trains the digits classifier; returns accuracy and both epsilons."""
  images, labels = datasets.load_digits(return_X_y=True)
  x = ((images - 8.0) / 8.0).astype(np.float32)  # Public pixel range 0..16.
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, labels, test_size=0.2, stratify=labels, random_state=0)
  batch_size, noise_multiplier, delta = 64, 1.1, 1e-5
  steps = epochs * (len(x_train) // batch_size)
  # TF Privacy's statement for the same settings (per-example clipping:
  # num_microbatches == batch_size, so no microbatching).
  statement = accounting.statements.dp_sgd_privacy_statement(
      number_of_examples=len(x_train), batch_size=batch_size,
      num_epochs=steps * batch_size / len(x_train),
      noise_multiplier=noise_multiplier, delta=delta,
      used_microbatching=False)
  config = keras_api.DPKerasConfig(
      epsilon=statement.epsilon_poisson,  # A budget the run must respect.
      delta=delta,
      clipping_norm=1.0,  # l2_norm_clip
      noise_multiplier=noise_multiplier,  # Checked against the budget.
      batch_size=batch_size,
      gradient_accumulation_steps=1,
      train_steps=steps,
      train_size=len(x_train),
      rescale_to_unit_norm=False,  # TF Privacy's scale: noisy sum / batch.
      seed=seed,
  )
  keras.utils.set_random_seed(seed)
  model = keras.Sequential([
      keras.Input(shape=(64,)),
      keras.layers.Dense(64, activation='tanh'),
      keras.layers.Dense(10),
  ])
  model = keras_api.make_private(model, config)
  model.compile(
      optimizer=keras.optimizers.SGD(learning_rate=0.5),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=['accuracy'],
  )
  history = model.fit(x_train, y_train, epochs=epochs, verbose=0)
  _, accuracy = model.evaluate(x_test, y_test, verbose=0)
  return {
      'test_accuracy': float(accuracy),
      'epsilon_spent': float(history.history['epsilon'][-1]),
      'statement': statement,
  }


def main() -> None:
  result = run()
  print(result['statement'])
  print(f"test accuracy {result['test_accuracy']:.4f}; epsilon spent"
        f" {result['epsilon_spent']:.4f} (Poisson batches, PLD accounting)")


if __name__ == '__main__':
  main()
