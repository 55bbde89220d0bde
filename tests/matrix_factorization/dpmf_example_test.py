"""Runs examples/dpmf_strategy_optimization.py and checks its conclusions."""

import importlib.util
import pathlib

import pytest

_PATH = (
    pathlib.Path(__file__).parents[2]
    / 'examples'
    / 'dpmf_strategy_optimization.py'
)


def _example(path=_PATH):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
@pytest.mark.parametrize(
    'argv',
    [
        ['--n', '1024', '--min_sep', '256', '--max_participations', '4'],
        ['--n', '1024', '--min_sep', '1024', '--max_participations', '1'],
    ],
)
def test_optimised_strategies_beat_identity_and_tree_at_n_1024(argv, capsys):
  rows = {
      name.split(' ')[0]: sens * worst
      for name, sens, _, worst in _example().main(argv)
  }
  assert 'RMSE' in capsys.readouterr().out
  assert rows['BLT'] < rows['DP-SGD'] and rows['BLT'] < rows['tree']
  assert rows['banded'] < rows['DP-SGD'] and rows['banded'] < rows['tree']
  assert rows['BLT'] < 1.1 * rows['optimal']


@pytest.mark.slow
def test_logistic_regression_example_runs_all_mechanisms(capsys):
  example = _example(_PATH.with_name('dpmf_logistic_regression.py'))
  results = example.main(['--num_examples', '1000', '--epochs', '2'])
  assert [name.split(' ')[0] for name, _, _ in results] == [
      'DP-SGD',
      'BandMF',
      'BLT',
  ]
  assert all(0.6 < accuracy <= 1.0 for _, _, accuracy in results)
  # Same sigma for all: correlated strategies have a larger stddev (their
  # sensitivity) and still train.
  assert results[1][1] > results[0][1] and results[2][1] > results[0][1]
  assert 'test accuracy' in capsys.readouterr().out
