"""Tests of experiments/image_classification/config.py and the shipped TOMLs.

The docs table (docs/image_classification.md) is checked against every
shipped config, so the two cannot drift apart.
"""

import dataclasses
import math
import pathlib
import re

import pytest

from experiments.image_classification import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / 'experiments' / 'image_classification' / 'configs'
DOCS = ROOT / 'docs' / 'image_classification.md'
CONFIGS = sorted(CONFIG_DIR.glob('*.toml'))

_VALID = dict(
    model='wrn-16-4',
    dataset='cifar10',
    num_classes=10,
    image_size=32,
    epsilon=8.0,
    delta=1e-5,
    batch_size=4096,
    num_steps=100,
    learning_rate=4.0,
)


def _config(**changes):
  return config_lib.ExperimentConfig(**{**_VALID, **changes})


def test_valid_config_keeps_its_values():
  config = _config(augmult=16, lr_schedule='cosine')
  assert config.augmult == 16 and config.lr_schedule == 'cosine'
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.epsilon = 1.0  # pytype: disable=not-writable


@pytest.mark.parametrize(
    'field, value, accepted',
    [
        ('model', '', 'non-empty string'),
        ('dataset', 3, 'non-empty string'),
        ('data_dir', '', 'None or a non-empty string'),
        ('num_classes', 1, '>= 2'),
        ('image_size', 4, '>= 8'),
        ('epsilon', 0.0, '(0, 100]'),
        ('epsilon', 101.0, '(0, 100]'),
        ('epsilon', math.nan, '(0, 100]'),
        ('delta', 1.0, '(0, 1)'),
        ('delta', 0, '(0, 1)'),
        ('batch_size', 0, '>= 1'),
        ('batch_size', 2.5, '>= 1'),
        ('physical_batch_size', 0, '>= 1'),
        ('augmult', 0, '>= 1'),
        ('augmult', True, '>= 1'),
        ('crop_padding', -1, '>= 0'),
        ('crop_padding', 32, '[0, image_size=32)'),
        ('flip', 1, 'true or false'),
        ('num_steps', 0, '>= 1'),
        ('learning_rate', 0.0, '(0, inf)'),
        ('learning_rate', math.inf, '(0, inf)'),
        ('lr_schedule', 'step', "['constant', 'cosine'"),
        ('warmup_steps', -1, '>= 0'),
        ('warmup_steps', 5, "unless lr_schedule='linear_warmup_cosine'"),
        ('optimizer', 'rmsprop', "['sgd', 'adam']"),
        ('momentum', 1.0, '[0, 1)'),
        ('weight_decay', -0.1, '[0, inf)'),
        ('clip_norm', 0.0, '(0, inf)'),
        ('ema_decay', 1.0, '(0, 1)'),
        ('ema_decay', 0.0, '(0, 1)'),
        ('polyak_start_step', -1, '>= 0'),
        ('polyak_start_step', 100, '[0, num_steps=100)'),
        ('eval_every', 0, '>= 1'),
        ('log_every', 0, '>= 1'),
        ('eval_batch_size', 0, '>= 1'),
        ('grad_method', 'fast', "['auto', 'vectorized', 'ghost']"),
        ('seed', -1, '>= 0'),
        ('pretrained_checkpoint', '', 'None or a non-empty string'),
        ('train_subset', 0, '>= 1'),
        ('train_subset', 100, 'batch_size must be <= train_subset'),
        ('paper', None, 'string'),
        ('published_accuracy', 120.0, '[0, 100]'),
        ('unverified', ['num_steps'], 'tuple of field names'),
        ('unverified', ('steps',), 'fields of ExperimentConfig'),
    ],
)
def test_bad_field_names_field_and_range(field, value, accepted):
  with pytest.raises(ValueError) as error:
    _config(**{field: value})
  message = str(error.value)
  assert field in message
  assert accepted in message


def test_schedule_dependent_checks():
  assert _config(
      lr_schedule='linear_warmup_cosine', warmup_steps=10
  ).warmup_steps == 10
  with pytest.raises(
      ValueError, match=r'warmup_steps must be in \[0, num_steps'
  ):
    _config(lr_schedule='linear_warmup_cosine', warmup_steps=100)
  with pytest.raises(ValueError, match='momentum must be 0 with optimizer'):
    _config(optimizer='adam', momentum=0.9)


def test_run_settings_leave_out_provenance_and_logging():
  a = _config(paper='x', eval_every=5, data_dir='/a')
  b = _config(paper='y', eval_every=7, data_dir='/b')
  assert a.run_settings() == b.run_settings()
  assert _config(seed=1).run_settings() != _config(seed=2).run_settings()


def _write(tmp_path, text):
  path = tmp_path / 'run.toml'
  path.write_text(text)
  return path


_TOML = '\n'.join(
    f'{k} = {v!r}'.replace("'", '"') for k, v in _VALID.items()
)


def test_load_config_reads_toml_and_overrides(tmp_path):
  path = _write(tmp_path, _TOML + '\nunverified = ["num_steps"]\n')
  config = config_lib.load_config(
      path,
      overrides=[
          'num_steps=7', 'data-dir="/data"', 'lr_schedule=cosine',
          'pretrained_checkpoint=none', 'epsilon=2',
      ],
  )
  assert config.num_steps == 7
  assert config.data_dir == '/data'
  assert config.lr_schedule == 'cosine'
  assert config.pretrained_checkpoint is None
  assert config.epsilon == 2.0 and isinstance(config.epsilon, float)
  assert config.unverified == ('num_steps',)


def test_load_config_refuses_unknown_and_missing_keys(tmp_path):
  with pytest.raises(ValueError, match=r"unknown config keys \['epsilonn'\]"):
    config_lib.load_config(_write(tmp_path, _TOML + '\nepsilonn = 1.0\n'))
  with pytest.raises(ValueError, match="unknown config key 'stepz'"):
    config_lib.load_config(_write(tmp_path, _TOML), overrides=['stepz=3'])
  with pytest.raises(ValueError, match='must be key=value'):
    config_lib.load_config(_write(tmp_path, _TOML), overrides=['num_steps'])
  without_model = _TOML.replace('model = "wrn-16-4"', '')
  with pytest.raises(
      ValueError, match=r"missing required config keys \['model'\]"
  ):
    config_lib.load_config(_write(tmp_path, without_model))


def test_load_config_bad_value_names_file_and_field(tmp_path):
  path = _write(tmp_path, _TOML)
  with pytest.raises(
      ValueError, match=r'run\.toml: augmult must be an integer >= 1'
  ):
    config_lib.load_config(path, overrides=['augmult=0'])


def test_load_config_bad_file(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    config_lib.load_config(tmp_path / 'missing.toml')
  with pytest.raises(ValueError, match='not valid TOML'):
    config_lib.load_config(_write(tmp_path, 'model = '))


def test_the_paper_rows_we_promise_are_shipped():
  names = {path.stem for path in CONFIGS}
  for eps in (1, 2, 4, 8):
    assert f'cifar10_wrn_16_4_eps{eps}' in names
  assert 'cifar10_wrn_40_4_eps8' in names
  assert 'smoke_digits' in names
  assert 'imagenet_nfnet_f3_finetune_eps0.5' in names  # the paper's model


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
  config = config_lib.load_config(path)
  if path.stem.startswith('cifar10_'):
    assert config.dataset == 'cifar10' and config.num_classes == 10
    assert config.delta == 1e-5
    assert config.epsilon == float(re.search(r'eps(\d+)', path.stem)[1])
  if path.stem == 'cifar10_wrn_40_4_eps8':
    assert config.model == 'wrn-40-4' and config.published_accuracy == 81.4
    assert 'published_accuracy' not in config.unverified
  if path.stem.startswith('imagenet_'):
    assert (config.epsilon, config.delta) == (0.5, 8e-7)
    assert config.pretrained_checkpoint is None or isinstance(
        config.pretrained_checkpoint, str
    )


def _docs_tables() -> dict[str, dict[str, tuple[str, str]]]:
  """``{config stem: {field: (paper cell, ours cell)}}`` from the docs."""
  tables = {}
  current = None
  for line in DOCS.read_text().splitlines():
    heading = re.match(r'^#+ .*`configs/([\w.]+)\.toml`', line)
    if heading:
      current = tables.setdefault(heading[1], {})
      continue
    if line.startswith('#'):
      current = None
    if current is None or not line.startswith('| `'):
      continue
    cells = [cell.strip() for cell in line.strip('|').split('|')]
    field = cells[0].strip('`')
    current[field] = (cells[1], cells[2])
  return tables


def _same(cell: str, value) -> bool:
  cell = cell.strip('`')
  if isinstance(value, bool):
    return cell == str(value).lower()
  if isinstance(value, (int, float)):
    return math.isclose(float(cell.replace(',', '')), value)
  if value is None:
    return cell in ('none', '—')
  return cell == value


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_docs_table_matches_config(path):
  tables = _docs_tables()
  assert path.stem in tables, f'docs/image_classification.md lacks {path.name}'
  table = tables[path.stem]
  config = config_lib.load_config(path)
  assert len(table) >= 8
  for field, (paper, ours) in table.items():
    assert _same(ours, getattr(config, field)), (path.stem, field, ours)
    if path.stem.startswith('smoke'):
      continue
    if field in config.unverified:
      assert paper.startswith('not retrieved'), (path.stem, field, paper)
    else:
      assert not paper.startswith('not retrieved'), (path.stem, field, paper)
  for field in config.unverified:
    assert field in table, (path.stem, field)
