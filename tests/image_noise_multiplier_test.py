"""A config's given noise multiplier (the paper's sigma) and its budget check.

By default the image runner calibrates sigma to (epsilon, delta, steps);
``noise_multiplier`` runs with a given sigma instead, and must be refused
before anything is built when the run would spend more than ``epsilon``.
The epsilon here is recomputed in the test with dp_accounting's PLD and RDP
accountants, independently of the runner.
"""

import dataclasses
import pathlib

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import pytest

pytest.importorskip('flax')
pytest.importorskip('sklearn')

from experiments.image_classification import config as config_lib  # pylint: disable=g-import-not-at-top
from experiments.image_classification import train  # pylint: disable=g-import-not-at-top
import _image_helpers  # pylint: disable=g-import-not-at-top

CONFIGS = (
    pathlib.Path(__file__).resolve().parent.parent
    / 'experiments' / 'image_classification' / 'configs'
)
CIFAR10_TRAIN_SIZE = 50_000

# Two steps of the shared tiny run, without augmentation.
_TINY = dict(
    _image_helpers.TINY, augmult=1, num_steps=2, learning_rate=1.0,
    eval_every=2, log_every=2, polyak_start_step=0,
)


@pytest.fixture(scope='module')
def digits8():
  return _image_helpers.digits(4)


def _event(sigma: float, q: float, steps: int) -> dp_accounting.DpEvent:
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma)
      ),
      steps,
  )


def _pld_epsilon(sigma, q, steps, delta):
  accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
  accountant.compose(_event(sigma, q, steps))
  return accountant.get_epsilon(delta)


def _rdp_epsilon(sigma, q, steps, delta):
  accountant = rdp.RdpAccountant()
  accountant.compose(_event(sigma, q, steps))
  return accountant.get_epsilon(delta)


def test_noise_multiplier_is_validated():
  for bad in (0, -1.0, float('nan'), 'ten'):
    with pytest.raises(ValueError, match=r'noise_multiplier must be in'):
      config_lib.ExperimentConfig(**_TINY, noise_multiplier=bad)
  with pytest.raises(ValueError, match=r'paper_noise_multiplier must be in'):
    config_lib.ExperimentConfig(**_TINY, paper_noise_multiplier=-3.0)
  config = config_lib.ExperimentConfig(**_TINY, noise_multiplier=3)
  assert config.noise_multiplier == 3.0
  # The given sigma decides the trajectory: a checkpoint written with
  # another sigma must not be resumed. The paper's sigma is provenance.
  assert config.run_settings()['noise_multiplier'] == 3.0
  assert 'paper_noise_multiplier' not in config.run_settings()


def test_override_sets_the_noise_multiplier():
  config = config_lib.load_config(
      CONFIGS / 'cifar10_wrn_16_4_eps1.toml', ['noise_multiplier=10']
  )
  assert config.noise_multiplier == 10.0
  cleared = config_lib.load_config(
      CONFIGS / 'cifar10_wrn_16_4_eps1.toml', ['noise_multiplier=none']
  )
  assert cleared.noise_multiplier is None


def test_given_sigma_is_used_and_its_epsilon_reported(digits8):
  sigma = 2.5
  lines = []
  results = train.run(
      config_lib.ExperimentConfig(**_TINY, noise_multiplier=sigma),
      data=digits8,
      log=lines.append,
  )
  q = 128 / len(digits8[0]['label'])
  assert results['noise_multiplier'] == sigma
  assert results['epsilon'] == pytest.approx(
      _pld_epsilon(sigma, q, 2, 1e-5), rel=1e-6
  )
  assert results['epsilon'] < 8.0
  assert any('noise multiplier 2.5000 (given)' in line for line in lines)


def test_calibrated_sigma_is_labelled(digits8):
  prepared = train.prepare(config_lib.ExperimentConfig(**_TINY), data=digits8)
  assert prepared.plan_config.noise_multiplier is None
  assert prepared.plan_config.epsilon == 8.0


def test_too_small_a_sigma_is_refused_before_training(digits8, monkeypatch):
  def refuse(**kwargs):
    raise AssertionError('a trainer was built before the budget was checked')

  monkeypatch.setattr(train.training, 'DPTrainer', refuse)
  config = config_lib.ExperimentConfig(
      **{**_TINY, 'num_steps': 50, 'epsilon': 1.0}, noise_multiplier=0.8
  )
  q = 128 / len(digits8[0]['label'])
  spent = _pld_epsilon(0.8, q, 50, 1e-5)
  assert spent > 1.0  # the independent accountant agrees it overspends
  with pytest.raises(ValueError, match=r'noise_multiplier 0.8 is too small'):
    train.run(config, data=digits8)
  # Just enough noise is accepted: the check is not stricter than the
  # accountant.
  enough = dataclasses.replace(config, noise_multiplier=20.0)
  assert _pld_epsilon(20.0, q, 50, 1e-5) < 1.0
  train.prepare(enough, data=digits8)


@pytest.mark.parametrize(
    'name',
    [
        'cifar10_wrn_16_4_eps1', 'cifar10_wrn_16_4_eps2',
        'cifar10_wrn_16_4_eps4', 'cifar10_wrn_16_4_eps8',
        'cifar10_wrn_40_4_eps8',
    ],
)
def test_paper_sigma_and_steps_meet_the_row_budget(name):
  """The paper's (sigma, steps) must fit the row's epsilon.

  De et al. account with RDP; with their sigma, our step count must spend
  at most the row's epsilon under RDP (and so under the tighter PLD). A
  wrong step count or sigma that overspends fails here.
  """
  config = config_lib.load_config(CONFIGS / f'{name}.toml')
  sigma = config.paper_noise_multiplier
  assert sigma is not None
  q = config.batch_size / CIFAR10_TRAIN_SIZE
  by_rdp = _rdp_epsilon(sigma, q, config.num_steps, config.delta)
  by_pld = _pld_epsilon(sigma, q, config.num_steps, config.delta)
  assert by_pld <= by_rdp <= config.epsilon, (by_pld, by_rdp)
