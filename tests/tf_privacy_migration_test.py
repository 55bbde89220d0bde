"""Runs the TF Privacy migration examples and checks what the page claims."""

import importlib.util
import pathlib

import pytest

_DIR = pathlib.Path(__file__).resolve().parent.parent / (
    'examples/tf_privacy_migration')


def _load(name):
  spec = importlib.util.spec_from_file_location(name, _DIR / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_privacy_statement_example_prints_both_numbers(capsys):
  _load('privacy_statement').main()
  out = capsys.readouterr().out
  # The numbers docs/migrating_from_tf_privacy.md quotes for these settings.
  assert 'Poisson sampling (add-or-remove-one neighbours, RDP accounting):'\
      ' 1.281' in out
  assert 'proven): 59.74' in out
  sigma = float(out.strip().rsplit(' ', 1)[-1])
  # Calibrating back from the Poisson epsilon recovers (at least) 1.1.
  assert 1.1 <= sigma < 1.12


def test_membership_inference_example(capsys):
  _load('membership_inference').main()
  out = capsys.readouterr().out
  auc = float(out.split('AUC ')[1].split(',')[0])
  assert 0.65 < auc < 0.8


def test_keras_optimizer_example_trains_within_the_statement():
  pytest.importorskip('keras')
  pytest.importorskip('sklearn')
  result = _load('keras_optimizer').run(epochs=10, seed=0)
  assert result['test_accuracy'] >= 0.85
  # Same settings: the epsilon fit reports (Poisson batches, PLD) is within
  # the statement's Poisson number (RDP, looser) and far below shuffling's.
  statement = result['statement']
  assert result['epsilon_spent'] <= statement.epsilon_poisson
  assert result['epsilon_spent'] > 0.8 * statement.epsilon_poisson
  assert statement.epsilon_shuffled > 5 * result['epsilon_spent']
