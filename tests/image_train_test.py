"""Tests of the image-classification runner (train.py) and its command line.

The training tests run a WRN-10-1 on scikit-learn's digits at their native
8x8 resolution (the ``digits32`` images subsampled back), so that a DP run
of a dozen steps is fast on a CPU; a slow test runs the 32x32 pipeline with
a WRN-16-4.
"""

import dataclasses
import math
import pathlib
import shutil
import time

import jax
import numpy as np
import pytest

pytest.importorskip('flax')
pytest.importorskip('sklearn')
pytest.importorskip('orbax.checkpoint')

from flax import nnx  # pylint: disable=g-import-not-at-top

from experiments.image_classification import __main__ as cli  # pylint: disable=g-import-not-at-top
from experiments.image_classification import config as config_lib  # pylint: disable=g-import-not-at-top
from experiments.image_classification import train  # pylint: disable=g-import-not-at-top
import _image_helpers  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE = (
    ROOT / 'experiments' / 'image_classification' / 'configs'
    / 'smoke_digits.toml'
)

_TINY = _image_helpers.TINY


def _tiny(**changes):
  return config_lib.ExperimentConfig(**{**_TINY, **changes})


_digits = _image_helpers.digits


@pytest.fixture(scope='module')
def digits8():
  return _digits(4)


@pytest.fixture(scope='module')
def trained(digits8, tmp_path_factory):
  """One tiny DP run with checkpoints, shared by the tests that read it."""
  directory = str(tmp_path_factory.mktemp('tiny_run'))
  lines = []
  results = train.run(
      _tiny(), checkpoint_dir=directory, log=lines.append, data=digits8
  )
  return results, lines, directory


def test_tiny_wrn_learns_within_budget(trained):
  results, lines, _ = trained
  assert results['steps'] == 12
  assert 0 < results['epsilon'] <= 8.0
  assert results['noise_multiplier'] > 0.3
  assert [e['step'] for e in results['evaluations']] == [6, 12]
  final = results['final']
  for name in ('raw', 'ema', 'polyak'):
    # Chance is 0.1 on ten balanced classes.
    assert final[name]['accuracy'] > 0.3, (name, final[name]['accuracy'])
    assert len(final[name]['per_class_accuracy']) == 10
    assert 'accuracy_gap' in final[name]
  assert any('epsilon spent' in line for line in lines)
  assert results['epsilon'] == pytest.approx(
      results['evaluations'][-1]['epsilon']
  )
  assert any(line.startswith('eval at step 12') for line in lines)
  assert results['seconds_per_step'] > 0


def test_averages_differ_from_raw_parameters(trained):
  results, _, _ = trained
  sets = train.parameter_sets(results['state'])
  raw = jax.tree_util.tree_leaves(sets['raw'])
  for name in ('ema', 'polyak'):
    other = jax.tree_util.tree_leaves(sets[name])
    assert any(not np.allclose(a, b) for a, b in zip(raw, other)), name


@pytest.mark.slow
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(
    trained, digits8, tmp_path
):
  results, _, directory = trained
  # The run kept the checkpoints of steps 6 and 12; resume from step 6.
  resumed_dir = tmp_path / 'resumed'
  resumed_dir.mkdir()
  shutil.copytree(pathlib.Path(directory) / '6', resumed_dir / '6')
  lines = []
  resumed = train.run(
      _tiny(), checkpoint_dir=str(resumed_dir), resume=True,
      log=lines.append, data=digits8,
  )
  assert 'resumed from step 6' in '\n'.join(lines)
  assert resumed['steps'] == 12
  assert resumed['epsilon'] == pytest.approx(results['epsilon'])
  for a, b in zip(
      jax.tree_util.tree_leaves(resumed['state']),
      jax.tree_util.tree_leaves(results['state']),
  ):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert resumed['final']['raw']['accuracy'] == pytest.approx(
      results['final']['raw']['accuracy']
  )


def test_checkpoint_dir_rules(trained, digits8, tmp_path):
  _, _, directory = trained
  with pytest.raises(ValueError, match='already holds a run'):
    train.run(_tiny(), checkpoint_dir=directory, data=digits8)
  with pytest.raises(ValueError, match='holds no checkpoint to resume'):
    train.run(
        _tiny(), checkpoint_dir=str(tmp_path), resume=True, data=digits8
    )
  with pytest.raises(ValueError, match='resume needs a checkpoint_dir'):
    train.run(_tiny(), resume=True, data=digits8)


@pytest.mark.slow
def test_resume_under_other_settings_is_refused(trained, digits8):
  _, _, directory = trained
  with pytest.raises(ValueError, match='other privacy, sampling or run'):
    train.run(
        _tiny(learning_rate=2.0), checkpoint_dir=directory, resume=True,
        data=digits8,
    )


@pytest.fixture
def no_trainer(monkeypatch):
  """Fails the test if a trainer (and so any training function) is built."""

  def refuse(**kwargs):
    raise AssertionError('a trainer was built before the bad input was found')

  monkeypatch.setattr(train.training, 'DPTrainer', refuse)


class _BatchNormNet(nnx.Module):

  def __init__(self, *, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(self.norm(self.conv(x)).mean(axis=(1, 2)))


def test_batch_norm_model_is_refused_before_compilation(
    no_trainer, digits8, monkeypatch
):
  monkeypatch.setattr(
      train.models, 'build_model',
      lambda name, num_classes, *, rngs: _BatchNormNet(rngs=rngs),
  )
  with pytest.raises(ValueError, match='GroupNorm'):
    train.run(_tiny(), data=digits8)


@pytest.mark.parametrize(
    'changes, error, message',
    [
        (dict(batch_size=5000, physical_batch_size=64), ValueError,
         r'batch_size must be <= the 1438 training examples'),
        (dict(image_size=16), ValueError, r'image_size=16 expects'),
        (dict(num_classes=5), ValueError,
         r'labels must be in \[0, num_classes=5\)'),
        (dict(pretrained_checkpoint='/nonexistent/f0.npz'), ValueError,
         'pretrained_checkpoint'),
        (dict(model='resnet-9'), ValueError, 'name must be one of'),
    ],
)
def test_bad_input_fails_before_compilation(
    no_trainer, digits8, changes, error, message
):
  with pytest.raises(error, match=message):
    train.run(_tiny(**changes), data=digits8)


def test_missing_data_files_say_what_to_put_where(no_trainer, tmp_path):
  config = _tiny(dataset='cifar10', image_size=32, data_dir=str(tmp_path / 'x'))
  with pytest.raises(FileNotFoundError, match='cifar-10-python'):
    train.run(config)
  with pytest.raises(ValueError, match='data_dir must name the directory'):
    train.run(dataclasses.replace(config, data_dir=None))


def test_augmult_below_one_is_refused():
  with pytest.raises(ValueError, match=r'augmult must be an integer >= 1'):
    _tiny(augmult=0)


def test_seeds_are_distinct_and_reproducible():
  a, b = train.Seeds.from_seed(0), train.Seeds.from_seed(0)
  assert a == b
  values = dataclasses.astuple(a)
  assert len(set(values)) == 4
  assert train.Seeds.from_seed(1) != a


@pytest.mark.parametrize('schedule', config_lib.LR_SCHEDULES)
def test_learning_rate_schedule(schedule):
  warmup = 10 if schedule == 'linear_warmup_cosine' else 0
  config = _tiny(
      lr_schedule=schedule, warmup_steps=warmup, num_steps=100,
      learning_rate=2.0, momentum=0.0,
  )
  optimizer = train.make_optimizer(config)
  params = {'w': np.zeros(3, np.float32)}
  state = optimizer.init(params)
  grads = {'w': np.ones(3, np.float32)}
  steps = []
  for _ in range(60):
    updates, state = optimizer.update(grads, state, params)
    steps.append(-float(updates['w'][0]))
  if schedule == 'constant':
    expected = [2.0] * 60
  elif schedule == 'cosine':
    expected = [1.0 + math.cos(math.pi * t / 100) for t in range(60)]
  else:
    expected = [0.2 * t if t < 10 else
                1.0 + math.cos(math.pi * (t - 10) / 90) for t in range(60)]
  np.testing.assert_allclose(steps, expected, rtol=1e-5, atol=1e-6)


def test_optimizer_momentum_adam_and_weight_decay():
  params = {'w': np.full(2, 1.0, np.float32)}
  grads = {'w': np.full(2, 0.5, np.float32)}

  def first_two(**changes):
    optimizer = train.make_optimizer(_tiny(**changes))
    state = optimizer.init(params)
    out = []
    for _ in range(2):
      updates, state = optimizer.update(grads, state, params)
      out.append(float(updates['w'][0]))
    return out

  lr = 0.1
  assert first_two(learning_rate=lr) == pytest.approx([-0.05, -0.05])
  assert first_two(learning_rate=lr, momentum=0.9) == pytest.approx(
      [-0.05, -0.05 * 1.9]
  )
  assert first_two(learning_rate=lr, weight_decay=0.5) == pytest.approx(
      [-0.1, -0.1]
  )
  adam = first_two(optimizer='adam', learning_rate=lr)
  assert adam == pytest.approx([-lr, -lr], rel=1e-4)


def test_cli_bad_input_exits_2(capsys, tmp_path):
  assert cli.main(['--config', str(SMOKE), '--set', 'augmult=0']) == 2
  assert 'augmult must be an integer >= 1' in capsys.readouterr().err
  assert cli.main(['--config', str(SMOKE), '--set', 'stepz=1']) == 2
  assert "unknown config key 'stepz'" in capsys.readouterr().err
  assert cli.main(['--config', str(tmp_path / 'none.toml')]) == 2
  assert 'does not exist' in capsys.readouterr().err
  assert cli.main([
      '--config', str(SMOKE), '--set', 'dataset="cifar10"',
      '--data-dir', str(tmp_path / 'missing'),
  ]) == 2
  assert 'cifar-10-python' in capsys.readouterr().err
  assert cli.main(['--config', str(SMOKE), '--resume']) == 2
  assert '--resume needs --checkpoint-dir' in capsys.readouterr().err


@pytest.mark.slow
def test_wrn_16_4_smoke_run_on_32x32_images_under_five_minutes():
  start = time.perf_counter()
  config = config_lib.load_config(
      SMOKE,
      ['model="wrn-16-4"', 'num_steps=4', 'batch_size=48',
       'physical_batch_size=64', 'augmult=2', 'crop_padding=4',
       'eval_every=4', 'log_every=1',
       'polyak_start_step=0'],
  )
  results = train.run(config, log=lambda line: None)
  elapsed = time.perf_counter() - start
  assert results['steps'] == 4 and results['epsilon'] <= 8.0
  assert results['num_params'] > 2_000_000
  assert elapsed < 300, elapsed


@pytest.mark.slow
def test_auto_method_matches_vectorized_clipped_sum(digits8):
  """The fastest method gives the same clipped gradient sum as vmap."""
  sums = {}
  for method in ('auto', 'vectorized'):
    prepared = train.prepare(_tiny(grad_method=method), data=digits8)
    trainer = train.make_trainer(prepared)
    batch = {k: v[:16] for k, v in prepared.train.items()}
    sums[method] = trainer._grad_fn(  # pylint: disable=protected-access
        prepared.function.params, batch, jax.random.key(3),
        is_padding_example=np.zeros(16, bool),
    )
  for a, b in zip(
      jax.tree_util.tree_leaves(sums['auto']),
      jax.tree_util.tree_leaves(sums['vectorized']),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_cli_runs_sharded_over_two_devices(tmp_path):
  """--devices all splits each physical batch over a 2-device CPU mesh."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  output = tmp_path / 'results.json'
  completed = subprocess.run(
      [sys.executable, '-m', 'experiments.image_classification',
       '--config', str(SMOKE), '--devices', 'all',
       '--set', 'num_steps=2', '--set', 'batch_size=32',
       '--set', 'physical_batch_size=48', '--set', 'augmult=1',
       '--set', 'eval_every=2', '--set', 'polyak_start_step=0',
       '--output', str(output)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
      check=False,
  )
  assert completed.returncode == 0, completed.stderr[-2000:]
  assert 'done: 2 steps' in completed.stdout
  import json  # pylint: disable=g-import-not-at-top
  results = json.loads(output.read_text())
  assert results['steps'] == 2 and results['epsilon'] <= 8.0
  assert 0.0 <= results['final']['ema']['accuracy'] <= 1.0
