"""Trains a Keras model on the scikit-learn digits with DP-SGD.

Run with ``python examples/keras_api_example.py``; it prints the test
accuracy and the epsilon spent. Needs keras and scikit-learn (bundled data,
no download).
"""

import argparse
import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
import numpy as np
from sklearn import datasets
from sklearn import model_selection

from jax_privacy import keras_api


def load_digits():
  """The 8x8 digits, split 80/20 (stratified), pixels scaled to [-1, 1].

  The pixel range 0..16 is public, so scaling by it uses no private data.
  """
  images, labels = datasets.load_digits(return_X_y=True)
  features = ((images - 8.0) / 8.0).astype(np.float32)
  return model_selection.train_test_split(
      features,
      labels.astype(np.int32),
      test_size=0.2,
      stratify=labels,
      random_state=0,
  )


def build_model(seed: int) -> keras.Model:
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input(shape=(64,)),
      keras.layers.Dense(64, activation='tanh'),
      keras.layers.Dense(10),
  ])


def run(
    *, epsilon: float = 3.0, epochs: int = 10, seed: int = 0, verbose: int = 0
) -> dict:
  """Trains privately; returns test accuracy, epsilon spent and more."""
  train_x, test_x, train_y, test_y = load_digits()
  batch_size = 64
  steps_per_epoch = len(train_x) // batch_size
  config = keras_api.DPKerasConfig(
      epsilon=epsilon,
      delta=1e-5,
      clipping_norm=1.0,
      batch_size=batch_size,
      gradient_accumulation_steps=1,
      train_steps=epochs * steps_per_epoch,
      train_size=len(train_x),
      seed=seed,
  )
  model = keras_api.make_private(build_model(seed), config)
  model.compile(
      optimizer=keras.optimizers.SGD(learning_rate=1.0),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=['accuracy'],
  )
  history = model.fit(
      train_x,
      train_y,
      epochs=epochs,
      validation_data=(test_x, test_y),
      verbose=verbose,
  )
  _, test_accuracy = model.evaluate(test_x, test_y, verbose=0)
  return {
      'test_accuracy': float(test_accuracy),
      'epsilon_spent': float(history.history['epsilon'][-1]),
      'target_epsilon': epsilon,
      'noise_multiplier': keras_api.get_noise_multiplier(model),
      'steps': model.dp_steps_taken,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--epsilon', type=float, default=3.0)
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  result = run(epsilon=args.epsilon, epochs=args.epochs, seed=args.seed,
               verbose=2)
  print(f"noise multiplier: {result['noise_multiplier']:.4f}")
  print(f"DP-SGD updates: {result['steps']}")
  print(f"test accuracy: {result['test_accuracy']:.4f}")
  print(
      f"epsilon spent: {result['epsilon_spent']:.4f} "
      f"(target {result['target_epsilon']}, delta=1e-5)"
  )


if __name__ == '__main__':
  main()
