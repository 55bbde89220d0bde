"""Smoke tests of benchmarks/clipping.py (no peers, no venv creation)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'benchmarks')


def _load(name, filename):
  if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(BENCH, filename)
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def bench():
  return _load('clipping_benchmark_under_test', 'clipping.py')


def test_quick_run_prints_expected_rows_with_positive_numbers(tmp_path):
  out, js = tmp_path / 'table.md', tmp_path / 'results.json'
  configs = ['non_private', 'dp_auto']
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH, 'clipping.py'), '--quick',
       '--model', 'mlp', '--batch-size', '8', '--steps', '2', '--warmup', '0',
       '--configs', ','.join(configs), '--out', str(out), '--json', str(js)],
      capture_output=True, text=True, timeout=600, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = out.read_text()
  assert table.strip() in proc.stdout
  rows = [l for l in table.splitlines() if l.startswith('| ')]
  assert rows[0].startswith('| model, batch | config | median ms | ratio')
  body = rows[1:]
  assert [r.split('|')[2].strip() for r in body] == configs
  assert body[0].split('|')[1].strip() == 'MLP 784-512-512-10, 8'
  for row in body:
    cells = [c.strip() for c in row.strip('|').split('|')]
    numbers = [float(c.replace(',', '')) for c in cells[2:]]
    assert len(numbers) == 7 and all(n > 0 for n in numbers), row
    assert numbers[-1] == 2  # timed steps
  assert [c.strip() for c in body[0].strip('|').split('|')][3] == '1.00'

  results = json.loads(js.read_text())
  assert [r['config'] for r in results] == configs
  base = results[0]
  for r in results:
    assert r['model'] == 'mlp' and r['batch_size'] == 8
    assert r['baseline'] == 'non_private'
    for key in ('median_ms', 'min_ms', 'compile_s', 'peak_rss_mb'):
      assert r[key] > 0, (r['config'], key)
    assert r['min_ms'] <= r['median_ms']
    assert r['median_ratio'] == pytest.approx(
        r['median_ms'] / base['median_ms'])
    assert r['peak_ratio'] == pytest.approx(
        r['peak_rss_mb'] / base['peak_rss_mb'])
    # A JAX process holds far more than 50 MB; the RSS is the child's.
    assert r['peak_rss_mb'] > 50


def test_unknown_config_is_refused(bench, capsys):
  with pytest.raises(SystemExit) as exc:
    bench.main(['--configs', 'non_private,bogus'])
  assert exc.value.code == 2
  assert 'bogus' in capsys.readouterr().err


def test_children_report_their_own_peak_rss(bench):
  # The larger child first: a maximum over all children so far, or the
  # parent's RSS (which Linux counts in a child's ru_maxrss), would report
  # the same for both.
  own, maxrss = [], []
  for megabytes in (500, 50):
    code, out, _, rss = bench.run_child(
        [sys.executable, '-c',
         f"import sys; sys.path.insert(0, {BENCH!r}); import _models;"
         f" b = b'x' * ({megabytes} * 2**20);"
         " print(_models.own_peak_rss_mb())"],
    )
    assert code == 0
    own.append(float(out.strip()))
    maxrss.append(rss)
  assert own[0] >= 500
  assert own[0] - own[1] == pytest.approx(450, abs=40)
  # ru_maxrss bounds the child's own peak from above.
  assert maxrss[0] >= own[0] - 1 and maxrss[1] >= own[1] - 1


def test_run_child_reports_failure(bench):
  code, _, err, _ = bench.run_child(
      [sys.executable, '-c', "import sys; sys.exit('boom')"]
  )
  assert code == 1 and 'boom' in err


def test_time_loop_counts_steps_and_stops_on_time():
  models = _load('clipping_benchmark_models', '_models.py')
  calls = []
  result = models.time_loop(lambda: calls.append(1), steps=5, warmup=2,
                            max_seconds=60.0)
  assert len(calls) == 7 and result['steps'] == 5
  assert 0 <= result['min_ms'] <= result['median_ms']

  # max_seconds=0: stops after the minimum of 3 timed steps.
  calls.clear()
  result = models.time_loop(lambda: calls.append(1), steps=50, warmup=0,
                            max_seconds=0.0)
  assert result['steps'] == 3 and len(calls) == 3


def test_markdown_table_ratios_and_baselines(bench):
  def rec(ms):
    return {'median_ms': ms, 'compile_s': None, 'peak_rss_mb': 100.0,
            'steps': 4}

  best = {'non_private': rec(10.0), 'opacus_non_private': rec(4.0),
          'opacus_ghost': rec(6.0), 'dp_auto': rec(12.0)}
  results = bench.finish(
      'mlp', 256, ['non_private', 'dp_auto', 'opacus_non_private',
                   'opacus_ghost'], best)
  ratios = {r['config']: r['median_ratio'] for r in results}
  assert ratios == pytest.approx({
      'non_private': 1.0, 'dp_auto': 1.2, 'opacus_non_private': 1.0,
      'opacus_ghost': 1.5})
  table = bench.markdown_table(results)
  assert re.search(r'\| opacus_ghost \| 6\.0 \| 1\.50 \| - \| - \| 100 \|',
                   table)
  assert table.count('MLP 784-512-512-10, 256') == 1


def test_goals_compare_fastest_row_with_limits_and_peers(bench):
  def rec(config, ms, rss=100.0, compile_s=1.0):
    return {'median_ms': ms, 'compile_s': compile_s, 'peak_rss_mb': rss,
            'steps': 4}

  best = {
      'non_private': rec('non_private', 10.0),
      'dp_auto': rec('dp_auto', 14.0, rss=120.0, compile_s=3.0),
      'dp_ghost': rec('dp_ghost', 12.0, rss=140.0, compile_s=1.5),
      'jax_privacy_2.0': rec('jax_privacy_2.0', 500.0),
      'opacus_non_private': rec('opacus_non_private', 10.0),
      'opacus_ghost': rec('opacus_ghost', 11.0),
  }
  results = bench.finish('mlp', 256, list(best), best)
  text = bench.goals(results)
  # dp_ghost (1.2x) beats dp_auto (1.4x) and is the row checked.
  assert '- mlp (`dp_ghost`): time 1.20x (<= 1.3x: met)' in text
  assert 'peak RSS 1.40x (<= 1.3x: missed by 0.10x)' in text
  assert 'compile 1.50x (<= 2.0x: met)' in text
  assert 'vs jax_privacy_2.0 50.00x: faster' in text
  assert 'vs opacus_ghost 1.10x: NOT faster' in text
