"""Runs the Flax examples and checks what they promise."""

import importlib.util
import math
import pathlib

import pytest

pytest.importorskip('flax')
pytest.importorskip('sklearn')

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('name', ['flax_linen_example', 'flax_nnx_example'])
def test_digits_examples_reach_85_percent_at_epsilon_3(name):
  result = _load(name).train(epsilon=3.0, seed=0)
  assert result['epsilon'] <= 3.0
  assert result['epsilon'] > 2.9  # The budget is spent, not wasted.
  assert result['noise_multiplier'] > 1.0
  assert result['test_accuracy'] >= 0.85


@pytest.mark.slow
@pytest.mark.parametrize('name', ['flax_linen_example', 'flax_nnx_example'])
@pytest.mark.parametrize('seed', [1, 2])
def test_digits_examples_other_seeds(name, seed):
  result = _load(name).train(epsilon=3.0, seed=seed)
  assert result['epsilon'] <= 3.0
  assert result['test_accuracy'] >= 0.85


@pytest.mark.slow
def test_linen_example_with_dropout():
  result = _load('flax_linen_example').train(
      epsilon=3.0, epochs=8, dropout_rate=0.1
  )
  assert result['epsilon'] <= 3.0
  assert result['test_accuracy'] >= 0.8


def test_corpus_ships_with_the_package():
  example = _load('char_transformer_example')
  text = example.load_corpus()
  assert len(text) > 4000
  vocab, train_set, test_set = example.make_examples(text, seq_len=16)
  assert len(vocab) < 64
  inputs, labels = train_set
  # Labels are the inputs shifted by one character.
  assert (inputs[:, 1:] == labels[:, :-1]).all()
  assert len(inputs) + len(test_set[0]) == len(text) // 17


def test_char_transformer_short_run_lowers_held_out_loss():
  result = _load('char_transformer_example').train(
      epsilon=8.0, iterations=25, seq_len=16, layers=1, batch_size=32
  )
  assert result['epsilon'] <= 8.0
  assert result['steps'] == 25
  # An untrained model is near uniform over the vocabulary.
  assert abs(result['loss_before'] - math.log(result['vocab_size'])) < 0.5
  assert result['loss_after'] < result['loss_before'] - 0.3
  assert math.isclose(
      result['perplexity_after'], math.exp(result['loss_after']), rel_tol=1e-6
  )


@pytest.mark.slow
def test_char_transformer_default_run():
  result = _load('char_transformer_example').train()
  assert result['epsilon'] <= 8.0
  assert result['loss_after'] < 3.0 < result['loss_before']
