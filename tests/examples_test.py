"""Runs the scripts in examples/ and checks the outcomes they promise."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_jax_api_example_learns_the_line_at_epsilon_one():
  example = _load('jax_api_example')
  result = example.train(epsilon=1.0, seed=0)
  assert result['epsilon'] <= 1.0
  assert result['epsilon'] > 0.95  # the budget is used, not wasted
  assert abs(result['w'] - example.TRUE_W) < 0.3
  assert abs(result['b'] - example.TRUE_B) < 0.3
  assert result['final_loss'] < 0.05
  assert result['noise_multiplier'] > 1.0


@pytest.mark.slow
@pytest.mark.parametrize('seed', [1, 2, 3])
def test_jax_api_example_other_seeds(seed):
  example = _load('jax_api_example')
  result = example.train(epsilon=1.0, seed=seed)
  assert abs(result['w'] - example.TRUE_W) < 0.3
  assert abs(result['b'] - example.TRUE_B) < 0.3
