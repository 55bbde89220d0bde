"""Command line: run one image-classification config with DP-SGD.

    python -m experiments.image_classification \\
        --config experiments/image_classification/configs/smoke_digits.toml \\
        [--data-dir DIR] [--checkpoint-dir DIR] [--resume] \\
        [--set key=value ...] [--devices all|1] [--stop-after-steps N] \\
        [--output results.json]

Bad input (an unknown key or a bad value in the config or ``--set``, a
missing data file or checkpoint, a model with batch normalization, a batch
larger than the data set) exits with status 2 and a message, before
anything is compiled. ``--devices all`` splits every physical batch over
all local devices (a ``jax.sharding.Mesh`` with one ``'batch'`` axis);
multi-host runs are described in docs/image_classification.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

_EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m experiments.image_classification',
      description=(
          'Train an image classifier with DP-SGD (De et al. 2022 pipeline: '
          'augmentation multiplicity, parameter averaging) from a TOML '
          'config, and report test metrics and the privacy spent.'
      ),
  )
  parser.add_argument(
      '--config', required=True, help='a TOML file of ExperimentConfig keys'
  )
  parser.add_argument(
      '--data-dir', help='where the data set files are (overrides data_dir)'
  )
  parser.add_argument(
      '--checkpoint-dir', help='save checkpoints there (resume with --resume)'
  )
  parser.add_argument(
      '--resume',
      action='store_true',
      help='continue the run saved in --checkpoint-dir',
  )
  parser.add_argument(
      '--set',
      dest='overrides',
      action='append',
      default=[],
      metavar='KEY=VALUE',
      help='override a config key (TOML value syntax); repeatable',
  )
  parser.add_argument(
      '--devices',
      choices=('all', '1'),
      default='1',
      help="'all': shard each physical batch over all local devices",
  )
  parser.add_argument(
      '--stop-after-steps',
      type=int,
      help='stop after this many steps (resume later with --resume)',
  )
  parser.add_argument(
      '--output', help='also write the results (without parameters) as JSON'
  )
  return parser


def _mesh(devices: str):
  import jax  # pylint: disable=g-import-not-at-top

  if devices == '1' or jax.local_device_count() == 1:
    return None
  return jax.make_mesh(
      (jax.local_device_count(),),
      ('batch',),
      axis_types=(jax.sharding.AxisType.Auto,),
      devices=jax.local_devices(),
  )


def _summary(results: dict) -> dict:
  return {key: value for key, value in results.items() if key != 'state'}


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  args = _parser().parse_args(argv)
  # Imported here so that --help and argument errors need no JAX start-up.
  from experiments.image_classification import config as config_lib  # pylint: disable=g-import-not-at-top
  from experiments.image_classification import train  # pylint: disable=g-import-not-at-top

  overrides = list(args.overrides)
  if args.data_dir is not None:
    overrides.append(f'data_dir={json.dumps(args.data_dir)}')
  try:
    config = config_lib.load_config(args.config, overrides)
    if args.checkpoint_dir is None and args.resume:
      raise ValueError('--resume needs --checkpoint-dir')
    results = train.run(
        config,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        mesh=_mesh(args.devices),
        log=lambda line: print(line, flush=True),
        stop_after_steps=args.stop_after_steps,
    )
  except (ValueError, FileNotFoundError) as error:
    print(f'error: {error}', file=sys.stderr)
    return _EXIT_BAD_INPUT
  summary = _summary(results)
  print(
      f"done: {summary['steps']} steps, epsilon spent "
      f"{summary['epsilon']:.3f} (target {summary['target_epsilon']:g})"
  )
  if args.output:
    with open(args.output, 'w') as file:
      json.dump(summary, file, indent=2, default=_to_json)
  return 0


def _to_json(value):
  """NumPy and JAX scalars and arrays in the metrics, as JSON values."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  array = np.asarray(value)
  return array.item() if array.ndim == 0 else array.tolist()


if __name__ == '__main__':
  sys.exit(main())
