"""Smoke tests of benchmarks/image_classification.py (tiny model and size)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'benchmarks')


@pytest.fixture(scope='module')
def bench():
  if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
  spec = importlib.util.spec_from_file_location(
      'image_benchmark_under_test',
      os.path.join(BENCH, 'image_classification.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('configs', [
    ['non_private_k4', 'dp_k4'],
    pytest.param(['non_private_k1', 'dp_k1', 'non_private_k4', 'dp_k4'],
                 marks=pytest.mark.slow),
])
def test_tiny_run_reports_every_config_with_sane_ratios(tmp_path, configs):
  pytest.importorskip('flax.nnx')
  js, out = tmp_path / 'results.json', tmp_path / 'table.md'
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH, 'image_classification.py'),
       '--model', 'wrn-10-1', '--image-size', '8', '--batch-size', '4',
       '--steps', '2', '--warmup', '0', '--configs', ','.join(configs),
       '--json', str(js), '--out', str(out)],
      capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads(js.read_text())
  assert [r['config'] for r in results] == configs
  by_config = {r['config']: r for r in results}
  for r in results:
    assert r['model'] == 'wrn-10-1' and r['batch_size'] == 4
    assert r['num_params'] == 77850  # WRN-10-1, 10 classes
    assert r['steps'] == 2
    for key in ('median_ms', 'min_ms', 'compile_s', 'peak_rss_mb'):
      assert r[key] > 0, (r['config'], key)
    assert r['min_ms'] <= r['median_ms']
    assert r['peak_rss_mb'] > 50  # the child's own, a JAX process
    base = by_config[r['baseline']]
    assert r['baseline'] == f"non_private_k{r['num_views']}"
    assert r['median_ratio'] == pytest.approx(r['median_ms'] /
                                              base['median_ms'])
    assert r['peak_ratio'] == pytest.approx(r['peak_rss_mb'] /
                                            base['peak_rss_mb'])
    # Sane: a DP step is neither free nor absurdly slow at this size.
    assert 0.2 < r['median_ratio'] < 50, r
  for r in results:
    assert r['images_per_step'] == 4 * r['num_views']
  table = out.read_text()
  assert table.strip() in proc.stdout
  rows = [l for l in table.splitlines() if l.startswith('| ')]
  assert [r.split('|')[1].strip() for r in rows[1:]] == configs
  assert 'Goal, DP step <= 2x non-private on CPU:' in table
  for config in configs:
    assert (f'- {config}: ' in table) == config.startswith('dp')


def test_bad_arguments_are_refused(bench, capsys):
  with pytest.raises(SystemExit) as exc:
    bench.main(['--configs', 'dp_k1,bogus'])
  assert exc.value.code == 2 and 'bogus' in capsys.readouterr().err
  with pytest.raises(SystemExit) as exc:
    bench.main(['--steps', '0'])
  assert exc.value.code == 2


def test_ratios_and_goal_lines(bench):
  class Args:
    model, batch_size, image_size = 'wrn-16-4', 64, 32

  def rec(ms, rss=100.0):
    return {'median_ms': ms, 'min_ms': ms, 'compile_s': 2.0,
            'peak_rss_mb': rss, 'steps': 3, 'num_params': 2748890,
            'versions': {'jax': 'x'}}

  best = {'non_private_k1': rec(10.0), 'dp_k1': rec(15.0, 150.0),
          'non_private_k4': rec(40.0), 'dp_k4': rec(100.0)}
  results = bench.finish(list(best), best, Args)
  ratios = {r['config']: r['median_ratio'] for r in results}
  assert ratios == pytest.approx({'non_private_k1': 1.0, 'dp_k1': 1.5,
                                  'non_private_k4': 1.0, 'dp_k4': 2.5})
  header, goals = bench.summary(results)
  assert 'wrn-16-4 (2,748,890 parameters), batch 64, 32x32x3' in header
  assert '- dp_k1: 1.50x non_private_k1 (<= 2.0x: met); peak RSS 1.50x' in goals
  assert '- dp_k4: 2.50x non_private_k4 (<= 2.0x: missed by 0.50x)' in goals
  table = bench.markdown_table(results)
  assert '| dp_k4 | 256 | 100.0 | 2.50 |' in table
