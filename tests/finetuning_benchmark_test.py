"""Smoke tests of benchmarks/finetuning.py on a tiny model."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('flax')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'benchmarks')
TINY = dict(layers=1, embed_dim=32, heads=2, context=16, batch_size=4, rank=2)


@pytest.fixture(scope='module')
def bench():
  if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
  spec = importlib.util.spec_from_file_location(
      'finetuning_benchmark_under_test', os.path.join(BENCH, 'finetuning.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _lora_parameters(layers, embed_dim, rank, **unused):
  """Adapter parameters: rank x (in + out) for q, k, v, out, up, down."""
  del unused
  mlp = 4 * embed_dim
  per_layer = 4 * rank * 2 * embed_dim + 2 * rank * (embed_dim + mlp)
  return layers * per_layer


def test_quick_run_reports_each_configuration_and_the_goals(tmp_path):
  out, js = tmp_path / 'table.md', tmp_path / 'results.json'
  configs = ['non_private', 'dp_auto']
  command = [
      sys.executable, os.path.join(BENCH, 'finetuning.py'), '--quick',
      '--steps', '2', '--warmup', '0', '--configs', ','.join(configs),
      '--out', str(out), '--json', str(js),
  ]
  for name, value in TINY.items():
    command += ['--' + name.replace('_', '-'), str(value)]
  proc = subprocess.run(
      command, capture_output=True, text=True, timeout=600, check=False
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = out.read_text()
  assert table.strip() in proc.stdout
  assert 'NNX GPT 1x d32, 2 heads, context 16, LoRA rank 2, batch 4' in table
  rows = [l for l in table.splitlines() if l.startswith('| ')]
  assert rows[0].startswith('| config | median ms | ratio')
  body = rows[1:]
  assert [r.split('|')[1].strip() for r in body] == configs
  for row in body:
    cells = [c.strip() for c in row.strip('|').split('|')]
    numbers = [float(c.replace(',', '')) for c in cells[1:]]
    assert len(numbers) == 9 and all(n > 0 for n in numbers), row
    assert numbers[-1] == 2  # timed steps
  assert body[0].split('|')[3].strip() == '1.00'
  assert 'Goals (dp_auto vs non_private): time ' in table

  results = json.loads(js.read_text())
  assert [r['config'] for r in results] == configs
  base, dp = results
  assert base['median_ratio'] == 1.0
  assert dp['median_ratio'] == pytest.approx(
      dp['median_ms'] / base['median_ms']
  )
  assert dp['peak_ratio'] == pytest.approx(
      dp['peak_rss_mb'] / base['peak_rss_mb']
  )
  # The DP step does about the work of the non-private one (XLA's count of
  # floating-point operations, which machine load does not change).
  assert 0.9 < dp['gflop_ratio'] < 1.5
  # Only the adapters are trained, and the DP step used ghost clipping.
  for r in results:
    assert r['trained_parameters'] == _lora_parameters(**TINY)
  assert any('ghost' in line for line in dp['log'])


def test_goals_say_met_or_missed(bench):
  rows = [
      dict(config='non_private', median_ratio=1.0, peak_ratio=1.0),
      dict(config='dp_auto', median_ratio=1.25, peak_ratio=1.5),
  ]
  text = bench.goals(rows)
  assert 'time 1.25x (<= 1.3x: met)' in text
  assert 'peak RSS 1.50x (<= 1.2x: missed by 0.30x)' in text
  assert bench.goals(rows[:1]) == ''


def test_bad_shape_is_refused():
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH, 'finetuning.py'), '--rank', '0'],
      capture_output=True, text=True, timeout=120, check=False,
  )
  assert proc.returncode != 0
  assert '--rank must be >= 1, got 0' in proc.stderr
