"""Tests of `jax-privacy audit`."""

import json

import numpy as np
import pytest

from jax_privacy import auditing
from jax_privacy import cli


def _write_scores(tmp_path, kind):
  rng = np.random.default_rng(0)
  in_scores, out_scores = rng.normal(3, 1, 300), rng.normal(0, 1, 300)
  if kind == 'json':
    path = tmp_path / 'scores.json'
    path.write_text(json.dumps(
        {'in_scores': in_scores.tolist(), 'out_scores': out_scores.tolist()}
    ))
  else:
    path = tmp_path / 'scores.npz'
    np.savez(path, in_scores=in_scores, out_scores=out_scores)
  return path, auditing.CanaryScoreAuditor(in_scores, out_scores)


@pytest.mark.parametrize('kind', ['json', 'npz'])
def test_audit_of_a_scores_file_reports_the_auditors_numbers(
    tmp_path, capsys, kind
):
  path, auditor = _write_scores(tmp_path, kind)
  status = cli.main([
      'audit', '--scores', str(path), '--proven-epsilon', '1.0', '--json',
      '--delta', '1e-5',
  ])
  assert status == 0
  result = json.loads(capsys.readouterr().out)
  assert result['proven_epsilon'] == 1.0
  attack = result['attacks']['scores']
  assert attack['auc'] == pytest.approx(auditor.attack_auroc())
  assert attack['epsilon_lower_bound'] == pytest.approx(
      auditor.epsilon_clopper_pearson(0.05, 1e-5, one_sided=False)
  )
  # These scores separate far better than epsilon = 1 allows.
  assert attack['epsilon_lower_bound'] > 1.0


def test_text_output_and_roc(tmp_path, capsys):
  pytest.importorskip('matplotlib')
  path, _ = _write_scores(tmp_path, 'npz')
  roc = tmp_path / 'roc.png'
  assert cli.main(['audit', '--scores', str(path), '--roc', str(roc)]) == 0
  out = capsys.readouterr().out
  assert 'epsilon lower bound (CP)' in out and 'not given' in out
  assert roc.read_bytes()[:4] == b'\x89PNG'


def test_bad_scores_file_fails_with_a_message(tmp_path, capsys):
  path = tmp_path / 'scores.json'
  path.write_text(json.dumps({'in_scores': [1.0, float('nan')]}))
  assert cli.main(['audit', '--scores', str(path)]) == 1
  assert 'out_scores' in capsys.readouterr().err
  path.write_text(json.dumps({'in_scores': [1.0, 'nan'], 'out_scores': [0]}))
  assert cli.main(['audit', '--scores', str(path)]) == 1
  assert 'in_canary_scores' in capsys.readouterr().err
  assert cli.main(['audit', '--scores', str(tmp_path / 'missing.npz')]) == 1


def test_bad_significance_exits_with_usage_error(capsys):
  with pytest.raises(SystemExit) as error:
    cli.main(['audit', '--significance', '1.5'])
  assert error.value.code == 2
  assert '--significance' in capsys.readouterr().err


@pytest.mark.slow
def test_audit_of_the_demo_stays_below_the_proven_epsilon(capsys):
  pytest.importorskip('sklearn')
  status = cli.main(['audit', '--epochs', '1', '--json', '--epsilon', '2'])
  assert status == 0
  result = json.loads(capsys.readouterr().out)
  assert 0 < result['proven_epsilon'] <= 2.0
  attack = result['attacks']['DP-SGD']
  assert attack['num_members'] == 1437 and attack['num_non_members'] == 360
  assert attack['epsilon_lower_bound'] < result['proven_epsilon']
  assert abs(attack['auc'] - 0.5) < 0.1
