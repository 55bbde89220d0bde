"""`jax-privacy train --checkpoint-dir DIR [--resume]` (jax_privacy/cli.py).

A run stopped after some steps and resumed ends with the same parameters,
accuracy and epsilon as an uninterrupted run; --resume refuses a directory
with no run or a run with other settings, before training and without
touching the directory.
"""

import contextlib
import io
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jax_privacy import _digits_demo
from jax_privacy import cli

_SETTINGS = _digits_demo.TrainSettings(epochs=2, batch_size=64, seed=3)
_CONFIG = 'epochs = 2\nbatch_size = 64\nseed = 3\n'
_PLANNED_STEPS = 2 * round(1437 / 64)


def _run(*args: str) -> tuple[int, str, str]:
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    status = cli.main(list(args))
  return status, stdout.getvalue(), stderr.getvalue()


def _run_json(*args: str) -> tuple[dict, str]:
  status, stdout, stderr = _run(*args, '--json')
  assert status == 0, stderr
  result = json.loads(stdout)
  del result['wall_time_seconds']
  return result, stderr


def _final_params(directory):
  data = _digits_demo.load_digits_data()
  plan = _digits_demo.plan_privacy(
      _SETTINGS, data.num_train, _digits_demo.make_accountant()
  )
  trainer = _digits_demo.make_trainer(_SETTINGS, plan, data.num_train)
  template = _digits_demo.init_mlp(jax.random.key(0))
  state = trainer.restore(os.path.join(directory, 'checkpoints'), template)
  return state.params, int(state.step)


def _snapshot(directory):
  """Every file under `directory` with its size and modification time."""
  return sorted(
      (os.path.relpath(os.path.join(root, name), directory),
       os.stat(os.path.join(root, name)).st_size,
       os.stat(os.path.join(root, name)).st_mtime_ns)
      for root, _, names in os.walk(directory)
      for name in names
  )


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('runs')
  config = base / 'run.toml'
  config.write_text(_CONFIG)
  full_dir, resumed_dir = str(base / 'full'), str(base / 'resumed')
  full, _ = _run_json(
      'train', '--config', str(config), '--checkpoint-dir', full_dir
  )
  part, _ = _run_json(
      'train', '--config', str(config), '--checkpoint-dir', resumed_dir,
      '--stop-after-steps', '13',
  )
  rest, progress = _run_json(
      'train', '--config', str(config), '--checkpoint-dir', resumed_dir,
      '--resume',
  )
  return dict(
      config=str(config), full=full, part=part, rest=rest, progress=progress,
      full_dir=full_dir, resumed_dir=resumed_dir,
  )


def test_resumed_run_equals_the_uninterrupted_run(runs):
  full, part, rest = runs['full'], runs['part'], runs['rest']
  assert full['steps'] == full['planned_steps'] == _PLANNED_STEPS
  assert (part['steps'], part['planned_steps']) == (13, _PLANNED_STEPS)
  assert rest['resumed_from_step'] == 13
  assert full['resumed_from_step'] == part['resumed_from_step'] == 0
  # Every step is counted once: the resumed run spent what the full run did.
  assert rest['epsilon_spent'] == full['epsilon_spent'] <= 3.0
  assert part['epsilon_spent'] < full['epsilon_spent']
  different = {'resumed_from_step'}
  assert {k: v for k, v in rest.items() if k not in different} == {
      k: v for k, v in full.items() if k not in different
  }
  full_params, full_step = _final_params(runs['full_dir'])
  rest_params, rest_step = _final_params(runs['resumed_dir'])
  assert full_step == rest_step == _PLANNED_STEPS
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, full_params, rest_params
  )


def test_partial_run_reports_the_epsilon_of_its_steps(runs):
  data = _digits_demo.load_digits_data()
  accountant = _digits_demo.make_accountant()
  plan = _digits_demo.plan_privacy(_SETTINGS, data.num_train, accountant)
  assert runs['part']['epsilon_spent'] == pytest.approx(
      accountant.compute_epsilon(13, plan.dp_params), abs=1e-12
  )
  assert 'from step 13' in runs['progress']
  assert f'step {_PLANNED_STEPS:>5}' in runs['progress']


def _refused(capsys, *argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['train', *argv])
  assert exit_info.value.code == 2
  return capsys.readouterr().err


def test_resume_refuses_a_run_with_other_settings(runs, capsys):
  before = _snapshot(runs['resumed_dir'])
  error = _refused(
      capsys, '--config', runs['config'], '--checkpoint-dir',
      runs['resumed_dir'], '--resume', '--learning-rate', '0.5',
  )
  assert 'argument --resume' in error
  assert 'other settings (learning_rate 1.0 there, 0.5 here)' in error
  error = _refused(
      capsys, '--checkpoint-dir', runs['resumed_dir'], '--resume',
  )
  assert 'epochs 2 there, 15 here' in error
  assert 'seed 3 there, 0 here' in error
  assert _snapshot(runs['resumed_dir']) == before


def test_a_tampered_settings_file_is_caught_by_the_checkpoint(
    runs, tmp_path, capsys
):
  directory = str(tmp_path / 'copy')
  shutil.copytree(runs['resumed_dir'], directory)
  settings_file = os.path.join(directory, 'train_settings.json')
  with open(settings_file) as file:
    saved = json.load(file)
  saved['learning_rate'] = 0.5
  with open(settings_file, 'w') as file:
    json.dump(saved, file)
  before = _snapshot(directory)
  status, _, error = _run(
      'train', '--config', runs['config'], '--checkpoint-dir', directory,
      '--resume', '--learning-rate', '0.5',
  )
  assert status == 1
  assert 'checkpoint_tag' in error and 'privacy' in error
  assert _snapshot(directory) == before


def test_resume_refuses_a_directory_without_a_run(tmp_path, capsys):
  missing = str(tmp_path / 'missing')
  error = _refused(capsys, '--checkpoint-dir', missing, '--resume')
  assert 'holds no `jax-privacy train` run to resume' in error
  assert not os.path.exists(missing)
  empty = tmp_path / 'empty'
  empty.mkdir()
  error = _refused(capsys, '--checkpoint-dir', str(empty), '--resume')
  assert 'holds no' in error


def test_resume_needs_a_checkpoint_dir(capsys):
  error = _refused(capsys, '--resume')
  assert 'argument --resume: needs --checkpoint-dir' in error


def test_a_new_run_refuses_a_non_empty_directory(runs, tmp_path, capsys):
  before = _snapshot(runs['full_dir'])
  error = _refused(capsys, '--checkpoint-dir', runs['full_dir'])
  assert 'is not an empty directory' in error and '--resume' in error
  assert _snapshot(runs['full_dir']) == before
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  error = _refused(capsys, '--checkpoint-dir', str(a_file))
  assert 'is not an empty directory' in error


def test_stop_after_steps_beyond_the_plan_runs_the_plan(tmp_path):
  result, _ = _run_json(
      'train', '--config', str(_write(tmp_path)), '--epochs', '1',
      '--batch-size', '512', '--stop-after-steps', '100',
  )
  assert result['steps'] == result['planned_steps'] == round(1437 / 512)


def _write(tmp_path):
  path = tmp_path / 'run.toml'
  path.write_text(_CONFIG)
  return path


def test_summary_says_when_a_run_stopped_early_or_resumed(runs):
  def summary(result):
    out = io.StringIO()
    cli._print_summary(
        _digits_demo.DigitsResult(**result, wall_time_seconds=1.0), out
    )
    return out.getvalue()

  assert (
      f'13 of {_PLANNED_STEPS} planned (stopped by --stop-after-steps)'
      in summary(runs['part'])
  )
  assert (
      f'{_PLANNED_STEPS} (2 epochs), resumed from step 13'
      in summary(runs['rest'])
  )
