"""Tests of `jax-privacy epsilon` and `jax-privacy calibrate`.

Run in-process through `cli.main`; epsilons are checked against
dp_accounting's accountants applied to events built here by hand.
"""

import contextlib
import io
import json
import math

import dp_accounting
import pytest

from jax_privacy import cli


def _run(*args):
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    try:
      status = cli.main(list(args))
    except SystemExit as exit_:
      status = exit_.code
  return status, stdout.getvalue(), stderr.getvalue()


def _json(*args):
  status, stdout, stderr = _run(*args, '--json')
  assert status == 0, stderr
  return json.loads(stdout)


def _reference(q, sigma, steps, delta, interval=1e-4):
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma)), steps)
  pld = dp_accounting.pld.PLDAccountant(
      value_discretization_interval=interval).compose(event)
  return pld.get_epsilon(delta)


_BASE = ('--noise-multiplier', '1.0', '--batch-size', '100',
         '--num-samples', '10000', '--delta', '1e-6')


def test_epsilon_json_matches_dp_accounting_and_has_the_statement_fields():
  result = _json('epsilon', *_BASE, '--steps', '300')
  assert result['steps'] == 300
  assert result['epsilon_pld'] == pytest.approx(
      _reference(0.01, 1.0, 300, 1e-6), rel=1e-9)
  assert result['epsilon_rdp'] >= result['epsilon_pld']
  assert result['neighbouring_relation'] == 'add-or-remove-one-example'
  assert not result['heuristic']
  for text in ('Poisson sampling', 'delta = 1e-06', '300 steps',
               'add-or-remove-one-example', 'RDP', 'PLD'):
    assert text in result['statement']


def test_epsilon_text_output_and_epochs():
  status, stdout, _ = _run('epsilon', *_BASE, '--epochs', '2')
  assert status == 0
  assert '200 steps (2 epochs)' in stdout
  assert 'epsilon_pld' in stdout


def test_user_level_epsilon_is_reported_and_larger():
  result = _json('epsilon', '--noise-multiplier', '3', '--batch-size', '100',
                 '--num-samples', '10000', '--steps', '20',
                 '--examples-per-user', '2', '--pld-interval', '1e-2')
  assert result['user_level_epsilon_pld'] > result['epsilon_pld']
  assert 'user contributing up to 2 examples' in result['statement']


def test_shuffled_heuristic_is_labelled_and_proven_shuffled_is_larger():
  heuristic = _json('epsilon', *_BASE, '--steps', '200', '--sampling',
                    'shuffled-heuristic')
  assert heuristic['heuristic']
  assert 'HEURISTIC' in heuristic['statement']
  proven = _json('epsilon', *_BASE, '--steps', '200', '--sampling',
                 'shuffled')
  assert not proven['heuristic']
  assert proven['neighbouring_relation'] == 'replace-one-example'
  assert proven['epsilon_pld'] > 5 * heuristic['epsilon_pld']


def test_fixed_batches_report_rdp_only():
  result = _json('epsilon', *_BASE, '--steps', '50', '--sampling', 'fixed')
  assert result['epsilon_pld'] is None
  assert result['epsilon_rdp'] > 0
  assert 'n/a' in result['statement']


def test_calibrate_noise_meets_target():
  result = _json('calibrate', '--target-epsilon', '2', '--batch-size', '100',
                 '--num-samples', '10000', '--steps', '200',
                 '--pld-interval', '1e-3')
  assert result['calibrated'] == 'noise_multiplier'
  sigma = result['noise_multiplier']
  assert _reference(0.01, sigma, 200, 1e-5, 1e-3) <= 2.0
  assert _reference(0.01, sigma - 1e-3, 200, 1e-5, 1e-3) > 2.0
  assert result['epsilon_pld'] <= 2.0


def test_calibrate_steps_and_batch_size_meet_target():
  steps = _json('calibrate', '--target-epsilon', '1', '--noise-multiplier',
                '1.0', '--batch-size', '100', '--num-samples', '10000',
                '--pld-interval', '1e-3')
  n = steps['steps']
  assert _reference(0.01, 1.0, n, 1e-5, 1e-3) <= 1.0
  assert _reference(0.01, 1.0, n + 1, 1e-5, 1e-3) > 1.0
  batch = _json('calibrate', '--target-epsilon', '1', '--noise-multiplier',
                '1.0', '--steps', '100', '--num-samples', '10000',
                '--pld-interval', '1e-3')
  b = batch['batch_size']
  assert _reference(b / 1e4, 1.0, 100, 1e-5, 1e-3) <= 1.0
  assert _reference((b + 1) / 1e4, 1.0, 100, 1e-5, 1e-3) > 1.0


@pytest.mark.slow  # About 8 s: 12 points by RDP and PLD.
def test_plot_is_written(tmp_path):
  pytest.importorskip('matplotlib')
  out = tmp_path / 'eps.png'
  result = _json('epsilon', *_BASE, '--steps', '100', '--plot', str(out))
  assert result['plot'] == str(out)
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('args, option', [
    (('epsilon', '--noise-multiplier', '-1', '--batch-size', '10',
      '--num-samples', '100', '--steps', '5'), '--noise-multiplier'),
    (('epsilon', '--noise-multiplier', '1', '--batch-size', '10',
      '--num-samples', '100', '--steps', '-3'), '--steps'),
    (('epsilon', '--noise-multiplier', '1', '--batch-size', '10',
      '--num-samples', '100', '--steps', '5', '--delta', '1'), '--delta'),
    (('epsilon', '--noise-multiplier', '1', '--batch-size', '500',
      '--num-samples', '100', '--steps', '5'), '--batch-size'),
    (('epsilon', '--noise-multiplier', '1', '--batch-size', '10',
      '--num-samples', '100', '--steps', '5', '--sampling', 'fixed',
      '--cycle-length', '2'), '--cycle-length'),
    (('calibrate', '--target-epsilon', '0', '--batch-size', '10',
      '--num-samples', '100', '--steps', '5'), '--target-epsilon'),
    (('calibrate', '--target-epsilon', '1', '--num-samples', '100',
      '--steps', '5'), '--noise-multiplier/--batch-size/--steps'),
])
def test_bad_input_exits_2_naming_the_option(args, option):
  status, _, stderr = _run(*args)
  assert status == 2
  assert option in stderr


def test_unreachable_target_says_what_is_reachable():
  status, _, stderr = _run('calibrate', '--target-epsilon', '1e-3',
                           '--noise-multiplier', '0.3', '--batch-size', '100',
                           '--num-samples', '100', '--pld-interval', '1e-2')
  assert status == 2
  assert 'unreachable' in stderr and 'smallest epsilon reachable' in stderr
  assert math.isfinite(float(stderr.split(' is ')[-1].split('.')[0] or 0))
