"""Tests of the `jax-privacy` command line (`jax_privacy/cli.py`).

The `train` command is run in-process through `cli.main`. The full default
run (the demo's claim: >= 85% test accuracy at epsilon <= 3, delta = 1e-5)
takes about 10 s on two cores, so it is part of the default suite; the
check over several seeds is marked slow. Checkpoint and resume are tested in
training_cli_resume_test.py.
"""

import contextlib
import dataclasses
import io
import json
import re
import time

import dp_accounting
import numpy as np
import pytest

from jax_privacy import _digits_demo
from jax_privacy import batch_selection
from jax_privacy import cli
from jax_privacy import training

_NUM_TRAIN = 1437
_RESULT_KEYS = {
    'test_accuracy',
    'epsilon_spent',
    'target_epsilon',
    'delta',
    'noise_multiplier',
    'steps',
    'planned_steps',
    'resumed_from_step',
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
  """The trainer runs the plan the accountant was given: same sampling
  probability, steps, clip norm and noise multiplier."""
  trainers = []

  class SpyTrainer(training.DPTrainer):

    def __init__(self, **kwargs):
      super().__init__(**kwargs)
      trainers.append(self)

  monkeypatch.setattr(training, 'DPTrainer', SpyTrainer)
  result, _ = _run_json(
      'train', '--epochs', '1', '--batch-size', '64', '--clip-norm', '0.5'
  )
  (trainer,) = trainers
  config = trainer.config
  assert config.sampling_prob == 64 / _NUM_TRAIN
  assert config.iterations == result['steps'] == 22
  assert config.expected_batch_size == 64
  assert config.l2_clip_norm == 0.5
  assert config.calibrated_noise_multiplier == result['noise_multiplier']
  # Noise stddev = sigma x the sensitivity of the clipped sum over 64.
  assert config.sensitivity == 0.5 / 64
  assert trainer.plan.batch_selection_strategy == (
      batch_selection.CyclicPoissonSampling(
          sampling_prob=64 / _NUM_TRAIN, iterations=22
      )
  )
  assert config.epsilon_after(22) == pytest.approx(
      result['epsilon_spent'], abs=1e-9
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
        ('--stop-after-steps', '0', 'integer >= 1'),
        ('--stop-after-steps', '2.5', 'integer >= 1'),
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
      '--checkpoint-dir',
      '--resume',
      '--stop-after-steps',
      '--config',
  ):
    assert option in help_text


class _Captured(Exception):
  pass


def _captured_options(monkeypatch, *argv: str) -> dict:
  """The settings and options `train ARGV` would run with (no training)."""

  def capture(data, settings, **options):
    raise _Captured({**dataclasses.asdict(settings), **options})

  monkeypatch.setattr(_digits_demo, 'run', capture)
  with pytest.raises(_Captured) as captured:
    cli.main(['train', *argv])
  return captured.value.args[0]


_CONFIG_TEXT = {
    '.json': (
        '{"epochs": 3, "batch-size": 64, "learning_rate": 0.5, "seed": 4,'
        ' "delta": 1e-6, "compare_non_private": true}'
    ),
    '.toml': (
        'epochs = 3\nbatch-size = 64\nlearning_rate = 0.5\nseed = 4\n'
        'delta = 1e-6\ncompare_non_private = true\n'
    ),
}


@pytest.mark.parametrize('suffix', ['.json', '.toml'])
def test_config_file_sets_options_and_flags_override_it(
    monkeypatch, tmp_path, suffix
):
  path = tmp_path / f'run{suffix}'
  path.write_text(_CONFIG_TEXT[suffix])
  options = _captured_options(
      monkeypatch, '--epochs', '5', '--config', str(path), '--seed', '0'
  )
  assert options['epochs'] == 5  # the command line wins, before or after
  assert options['seed'] == 0
  assert options['batch_size'] == 64  # from the file
  assert options['learning_rate'] == 0.5
  assert options['delta'] == 1e-6
  assert options['compare_non_private'] is True
  defaults = _digits_demo.TrainSettings()
  assert options['target_epsilon'] == defaults.target_epsilon
  without_file = _captured_options(monkeypatch, '--epochs', '5')
  assert without_file['batch_size'] == 128
  assert without_file['compare_non_private'] is False


def test_config_file_runs_the_same_training_as_flags(tmp_path):
  path = tmp_path / 'run.toml'
  path.write_text('epochs = 1\nbatch_size = 256\nseed = 5\n')
  from_file, _ = _run_json('train', '--config', str(path))
  from_flags, _ = _run_json(
      'train', '--epochs', '1', '--batch-size', '256', '--seed', '5'
  )
  del from_file['wall_time_seconds'], from_flags['wall_time_seconds']
  assert from_file == from_flags
  assert from_file['steps'] == round(_NUM_TRAIN / 256)


@pytest.mark.parametrize(
    'name, text, expected',
    [
        ('a.json', '{"epsilom": 3}', "unknown key 'epsilom'"),
        ('a.json', '{"config": "b.json"}', "unknown key 'config'"),
        ('a.json', '{"epsilon": -1}', 'epsilon must be a number in (0, 100]'),
        ('a.toml', 'delta = 1.0', 'delta must be a number in the open'),
        ('a.json', '{"epochs": 2.5}', 'epochs must be an integer >= 1'),
        ('a.json', '{"epochs": "3"}', 'epochs must be a number'),
        ('a.json', '{"seed": true}', 'seed must be a number'),
        ('a.json', '{"json": 1}', 'json must be true or false'),
        ('a.json', '{"checkpoint_dir": 3}', 'must be a non-empty string'),
        ('a.json', '{"batch-size": 8, "batch_size": 8}', 'given twice'),
        ('a.json', '[1, 2]', 'must hold a table of options'),
        ('a.json', '{"epochs": 3', 'is not valid JSON'),
        ('a.toml', 'epochs = ', 'is not valid TOML'),
        ('a.yaml', 'epochs: 3', 'must be a .json or .toml file'),
    ],
)
def test_bad_config_exits_2_with_the_reason_before_training(
    monkeypatch, capsys, tmp_path, name, text, expected
):
  def must_not_train(*args, **kwargs):
    raise AssertionError('training started despite a bad config')

  monkeypatch.setattr(_digits_demo, 'run', must_not_train)
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['train', '--config', str(path)])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert 'argument --config:' in error
  assert expected in error
  assert str(path) in error


def test_missing_config_file_exits_2(capsys, tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['train', '--config', str(tmp_path / 'missing.json')])
  assert exit_info.value.code == 2
  assert 'cannot read' in capsys.readouterr().err


def test_config_batch_size_beyond_the_data_is_refused(
    monkeypatch, capsys, tmp_path
):
  def must_not_train(*args, **kwargs):
    raise AssertionError('training started despite a bad config')

  monkeypatch.setattr(_digits_demo, 'run', must_not_train)
  path = tmp_path / 'run.json'
  path.write_text(json.dumps({'batch_size': _NUM_TRAIN + 1}))
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['train', '--config', str(path)])
  assert exit_info.value.code == 2
  assert f'[1, {_NUM_TRAIN}]' in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize('seed', range(5))
def test_default_run_meets_the_demo_claim_for_every_seed(seed):
  start = time.perf_counter()
  result, _ = _run_json('train', '--seed', str(seed), '--compare-non-private')
  assert time.perf_counter() - start < 120
  assert result['epsilon_spent'] <= 3.0
  assert result['test_accuracy'] >= 0.85
  assert result['non_private_test_accuracy'] >= result['test_accuracy'] - 0.02
