"""Runs examples/keras_api_example.py (DP Keras on the digits)."""

import importlib.util
import os
import pathlib

import pytest

os.environ.setdefault('KERAS_BACKEND', 'jax')
pytest.importorskip('keras')
pytest.importorskip('sklearn')

_EXAMPLE = (
    pathlib.Path(__file__).resolve().parent.parent
    / 'examples'
    / 'keras_api_example.py'
)


def _load_example():
  spec = importlib.util.spec_from_file_location('keras_api_example', _EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_digits_reach_85_percent_at_epsilon_3():
  result = _load_example().run(epsilon=3.0, epochs=10, seed=0)
  assert result['epsilon_spent'] <= 3.0
  assert result['epsilon_spent'] > 2.9  # the budget is used, not wasted
  assert result['test_accuracy'] >= 0.85
  assert result['steps'] == 10 * (1437 // 64)
