"""Tests of the `jax-privacy` command line (`jax_privacy/cli.py`).

The `train` command is run in-process through `cli.main`. The full default
run (the demo's claim: >= 85% test accuracy at epsilon <= 3, delta = 1e-5)
takes about 10 s on two cores, so it is part of the default suite; the
check over several seeds is marked slow.
"""

import contextlib
import io
import json
import re
import time

import dp_accounting
import numpy as np
import pytest

from jax_privacy import _digits_demo
from jax_privacy import cli

_NUM_TRAIN = 1437
_RESULT_KEYS = {
    'test_accuracy',
    'epsilon_spent',
    'target_epsilon',
    'delta',
    'noise_multiplier',
    'steps',
    'epochs',
    'expected_batch_size',
    'sampling_prob',
    'clip_norm',
    'learning_rate',
    'seed',
    'num_train_examples',
    'num_test_examples',
    'sampling',
    'accountant',
    'non_private_test_accuracy',
    'wall_time_seconds',
}


def _run(*args: str) -> tuple[int, str, str]:
  """Runs `jax-privacy ARGS` in-process; returns (status, stdout, stderr)."""
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    status = cli.main(list(args))
  return status, stdout.getvalue(), stderr.getvalue()


def _run_json(*args: str) -> tuple[dict, str]:
  status, stdout, stderr = _run(*args, '--json')
  assert status == 0
  return json.loads(stdout), stderr


def _independent_epsilon(result: dict) -> float:
  """Epsilon of the run from dp_accounting alone, on the default 1e-4 grid."""
  accountant = dp_accounting.pld.PLDAccountant(
      dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
      value_discretization_interval=1e-4,
  )
  accountant.compose(
      dp_accounting.PoissonSampledDpEvent(
          result['expected_batch_size'] / result['num_train_examples'],
          dp_accounting.GaussianDpEvent(result['noise_multiplier']),
      ),
      result['steps'],
  )
  return accountant.get_epsilon(result['delta'])


@pytest.fixture(scope='module')
def default_run():
  start = time.perf_counter()
  result, progress = _run_json('train')
  return result, progress, time.perf_counter() - start


def test_default_run_meets_the_demo_claim(default_run):
  result, _, seconds = default_run
  assert set(result) == _RESULT_KEYS
  assert result['target_epsilon'] == 3.0
  assert result['delta'] == 1e-5
  assert result['epsilon_spent'] <= 3.0
  assert result['test_accuracy'] >= 0.85
  assert seconds < 120


def test_default_run_reports_the_epsilon_of_the_steps_run(default_run):
  result, _, _ = default_run
  steps_per_epoch = round(_NUM_TRAIN / result['expected_batch_size'])
  assert result['steps'] == result['epochs'] * steps_per_epoch
  assert result['sampling_prob'] == pytest.approx(
      result['expected_batch_size'] / _NUM_TRAIN
  )
  independent = _independent_epsilon(result)
  # The demo's coarser PLD grid is pessimistic: never below, barely above.
  assert independent <= result['epsilon_spent'] <= independent + 1e-2
  # Calibrated, not just safe: the budget is nearly used up.
  assert result['epsilon_spent'] > 0.95 * result['target_epsilon']


def test_progress_shows_epsilon_growing_to_the_reported_value(default_run):
  result, progress, _ = default_run
  lines = re.findall(
      r'epoch +(\d+)/(\d+) +step +(\d+) +test accuracy'
      r' +([\d.]+) +epsilon +([\d.]+)',
      progress,
  )
  assert len(lines) == result['epochs']
  epsilons = [float(line[-1]) for line in lines]
  assert epsilons == sorted(epsilons)
  assert epsilons[-1] == pytest.approx(result['epsilon_spent'], abs=1e-4)
  assert int(lines[-1][2]) == result['steps']
  assert 'Calibrated noise multiplier sigma=' in progress


def test_short_run_prints_a_readable_summary():
  status, stdout, _ = _run(
      'train', '--epochs', '2', '--seed', '3', '--compare-non-private'
  )
  assert status == 0
  summary = stdout[stdout.index('Result') :]
  rows = dict(
      re.match(r' +(\S.*?)  +(\S.*)', line).groups()
      for line in summary.splitlines()[1:]
  )
  assert float(rows['test accuracy']) > 0.6
  assert float(rows['non-private accuracy'].split()[0]) > 0.8
  assert float(rows['epsilon spent'].split()[0]) <= 3.0
  assert rows['delta'] == '1e-05'
  assert float(rows['noise multiplier']) > 0
  assert rows['steps'].startswith('22 ')
  assert rows['clip norm'] == '1'
  assert re.fullmatch(
      r'Poisson sampling with q=0\.08907, add/remove-one neighbouring'
      r' relation',
      rows['sampling'],
  )


def test_mechanism_is_the_one_accounted_for(monkeypatch):
  """The sampler, clip norm and noise stddev agree with the accountant."""
  calls = {}

  def spy(module, name):
    original = getattr(module, name)

    def record(*args, **kwargs):
      calls[name] = kwargs
      return original(*args, **kwargs)

    monkeypatch.setattr(module, name, record)

  spy(_digits_demo.batch_selection, 'CyclicPoissonSampling')
  spy(_digits_demo.clipping, 'clipped_grad')
  spy(_digits_demo.noise_addition, 'gaussian_privatizer')
  result, _ = _run_json(
      'train', '--epochs', '1', '--batch-size', '64', '--clip-norm', '0.5'
  )
  sampler = calls['CyclicPoissonSampling']
  assert sampler == {'sampling_prob': 64 / _NUM_TRAIN, 'iterations': 22}
  assert result['steps'] == 22
  assert calls['clipped_grad']['l2_clip_norm'] == 0.5
  assert calls['clipped_grad']['normalize_by'] == 64
  assert calls['gaussian_privatizer']['stddev'] == pytest.approx(
      result['noise_multiplier'] * 0.5 / 64
  )
  assert result['epsilon_spent'] <= 3.0


def test_same_seed_same_result():
  first, _ = _run_json('train', '--epochs', '1', '--seed', '7')
  second, _ = _run_json('train', '--epochs', '1', '--seed', '7')
  del first['wall_time_seconds'], second['wall_time_seconds']
  assert first == second


def test_padded_batches_keep_the_poisson_batches():
  batches = _digits_demo._padded_batches(0.1, 50, 300, np.random.default_rng(0))
  expected = _digits_demo.batch_selection.CyclicPoissonSampling(
      sampling_prob=0.1, iterations=50
  ).batch_iterator(300, rng=np.random.default_rng(0))
  sizes = {len(indices) for indices, _ in batches}
  assert len(sizes) == 1 and sizes.pop() % 32 == 0
  for (indices, is_padding), sampled in zip(batches, expected, strict=True):
    np.testing.assert_array_equal(indices[~is_padding], sampled)
    assert not is_padding[: len(sampled)].any()


@pytest.mark.parametrize(
    'option, value, expected',
    [
        ('--epsilon', '-1', '(0, 100]'),
        ('--epsilon', '0', '(0, 100]'),
        ('--epsilon', 'nan', '(0, 100]'),
        ('--epsilon', 'inf', '(0, 100]'),
        ('--epsilon', '1e5', '(0, 100]'),
        ('--delta', '0', '(0, 1)'),
        ('--delta', '1', '(0, 1)'),
        ('--delta', '-1e-5', '(0, 1)'),
        ('--delta', 'nan', '(0, 1)'),
        ('--clip-norm', '-1', 'finite number > 0'),
        ('--clip-norm', 'nan', 'finite number > 0'),
        ('--clip-norm', '0', 'finite number > 0'),
        ('--learning-rate', '-0.1', 'finite number > 0'),
        ('--epochs', '0', 'integer >= 1'),
        ('--epochs', '-3', 'integer >= 1'),
        ('--epochs', '1.5', 'integer >= 1'),
        ('--batch-size', '0', 'integer >= 1'),
        ('--batch-size', str(_NUM_TRAIN + 1), f'[1, {_NUM_TRAIN}]'),
        ('--seed', '-1', 'integer >= 0'),
    ],
)
def test_bad_option_exits_2_naming_it_before_training(
    monkeypatch, capsys, option, value, expected
):
  def must_not_train(*args, **kwargs):
    raise AssertionError('training started despite a bad option')

  monkeypatch.setattr(_digits_demo, 'run', must_not_train)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['train', f'{option}={value}'])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert f'argument {option}: must be' in error
  assert expected in error
  assert repr(value) in error or value in error


def test_whole_training_set_as_batch_size_is_accepted():
  result, _ = _run_json(
      'train', '--batch-size', str(_NUM_TRAIN), '--epochs', '1'
  )
  assert result['sampling_prob'] == 1.0
  assert result['steps'] == 1
  assert result['epsilon_spent'] <= 3.0


def test_no_command_exits_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([])
  assert exit_info.value.code == 2
  assert 'COMMAND' in capsys.readouterr().err


def test_train_help_lists_every_option(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['train', '--help'])
  assert exit_info.value.code == 0
  help_text = capsys.readouterr().out
  for option in (
      '--epsilon',
      '--delta',
      '--epochs',
      '--batch-size',
      '--clip-norm',
      '--learning-rate',
      '--seed',
      '--compare-non-private',
      '--json',
  ):
    assert option in help_text


@pytest.mark.slow
@pytest.mark.parametrize('seed', range(5))
def test_default_run_meets_the_demo_claim_for_every_seed(seed):
  start = time.perf_counter()
  result, _ = _run_json('train', '--seed', str(seed), '--compare-non-private')
  assert time.perf_counter() - start < 120
  assert result['epsilon_spent'] <= 3.0
  assert result['test_accuracy'] >= 0.85
  assert result['non_private_test_accuracy'] >= result['test_accuracy'] - 0.02
