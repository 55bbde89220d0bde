"""The `jax-privacy` command line.

Commands:
  train      Train a small classifier with DP-SGD on scikit-learn's digits
             and report its accuracy and the privacy it spent.
  epsilon    Epsilon of a DP-SGD run (RDP and PLD) as a privacy statement.
  calibrate  The noise multiplier, steps or batch size meeting a target.
  audit      Empirical privacy: an epsilon lower bound next to the proven one.

Run `jax-privacy COMMAND --help` for a command's options. Bad options exit
with status 2 and a message naming the option and its accepted range, before
any JAX computation starts.
"""

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Callable, Optional, TextIO

from jax_privacy import cli_accounting
from jax_privacy import cli_audit
from jax_privacy import _digits_demo

_DEFAULTS = _digits_demo.TrainSettings()


def _number_parser(
    kind: type, accepts: Callable[[float], bool], accepted_range: str
) -> Callable[[str], float]:
  """An argparse `type` that parses `kind` and checks it lies in a range."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not (math.isfinite(value) and accepts(value)):
      raise argparse.ArgumentTypeError(
          f'must be {accepted_range}, got {text!r}'
      )
    return value

  return parse


# Beyond this an (epsilon, delta) guarantee says nothing useful, and the
# noise it calibrates to is so small that PLD accounting takes minutes.
_MAX_EPSILON = 100.0

_positive_float = _number_parser(float, lambda v: v > 0, 'a finite number > 0')
_epsilon = _number_parser(
    float, lambda v: 0 < v <= _MAX_EPSILON, f'a number in (0, {_MAX_EPSILON:g}]'
)
_open_unit_interval = _number_parser(
    float, lambda v: 0 < v < 1, 'a number in the open interval (0, 1)'
)
_positive_int = _number_parser(int, lambda v: v >= 1, 'an integer >= 1')
_non_negative_int = _number_parser(int, lambda v: v >= 0, 'an integer >= 0')


def _add_train_command(commands) -> None:
  parser = commands.add_parser(
      'train',
      help='train a digits classifier with DP-SGD',
      description=(
          "Trains a small MLP with DP-SGD on scikit-learn's digits data set"
          ' (1437 training / 360 test images), calibrating the noise with'
          ' the PLD accountant so that the run spends at most --epsilon.'
          ' Batches are Poisson samples, as the accountant assumes.'
      ),
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
      '--epsilon',
      type=_epsilon,
      default=_DEFAULTS.target_epsilon,
      help='privacy budget: the run spends at most this epsilon',
  )
  parser.add_argument(
      '--delta',
      type=_open_unit_interval,
      default=_DEFAULTS.delta,
      help='delta of the (epsilon, delta) guarantee',
  )
  parser.add_argument(
      '--epochs',
      type=_positive_int,
      default=_DEFAULTS.epochs,
      help='passes over the data, each of round(n / batch-size) steps',
  )
  parser.add_argument(
      '--batch-size',
      type=_positive_int,
      default=_DEFAULTS.batch_size,
      help=(
          'expected batch size; each example joins each batch independently'
          ' with probability batch-size / n'
      ),
  )
  parser.add_argument(
      '--clip-norm',
      type=_positive_float,
      default=_DEFAULTS.clip_norm,
      help='L2 norm each per-example gradient is clipped to',
  )
  parser.add_argument(
      '--learning-rate',
      type=_positive_float,
      default=_DEFAULTS.learning_rate,
      help='SGD step size',
  )
  parser.add_argument(
      '--seed',
      type=_non_negative_int,
      default=_DEFAULTS.seed,
      help='seed of the initialization, batch sampling and noise',
  )
  parser.add_argument(
      '--compare-non-private',
      action='store_true',
      help='also train the same model without DP and report its accuracy',
  )
  parser.add_argument(
      '--json',
      action='store_true',
      help='print the result as JSON on stdout (progress goes to stderr)',
  )
  parser.set_defaults(run_command=_train, command_parser=parser)


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='jax-privacy',
      description='Differentially private training with JAX Privacy.',
  )
  commands = parser.add_subparsers(
      title='commands', metavar='COMMAND', required=True
  )
  _add_train_command(commands)
  cli_accounting.add_parsers(commands)
  cli_audit.add_parsers(commands)
  return parser


def _print_plan(
    plan: _digits_demo.PrivacyPlan,
    settings: _digits_demo.TrainSettings,
    out: TextIO,
) -> None:
  print(
      f'Calibrated noise multiplier sigma={plan.noise_multiplier:.4f} for'
      f' epsilon={settings.target_epsilon:g}, delta={settings.delta:g} over'
      f' {plan.num_steps} steps (PLD accountant); Poisson sampling with'
      f' q={plan.sampling_prob:.4f}.',
      file=out,
      flush=True,
  )


def _print_progress(
    progress: _digits_demo.EpochProgress, epochs: int, out: TextIO
) -> None:
  print(
      f'epoch {progress.epoch:>3}/{epochs}  step {progress.step:>5}  test'
      f' accuracy'
      f' {progress.test_accuracy:.4f}  epsilon {progress.epsilon:.4f}',
      file=out,
      flush=True,
  )


def _print_summary(result: _digits_demo.DigitsResult, out: TextIO) -> None:
  rows = [
      ('test accuracy', f'{result.test_accuracy:.4f}'),
  ]
  if result.non_private_test_accuracy is not None:
    rows.append((
        'non-private accuracy',
        f'{result.non_private_test_accuracy:.4f} (same model and batches,'
        ' no clipping or noise)',
    ))
  rows += [
      (
          'epsilon spent',
          f'{result.epsilon_spent:.4f} (target {result.target_epsilon:g},'
          f' {result.accountant} accountant)',
      ),
      ('delta', f'{result.delta:g}'),
      ('noise multiplier', f'{result.noise_multiplier:.4f}'),
      ('steps', f'{result.steps} ({result.epochs} epochs)'),
      (
          'batch size',
          f'{result.expected_batch_size} expected of'
          f' {result.num_train_examples} training examples'
          f' (q={result.sampling_prob:.4f})',
      ),
      ('clip norm', f'{result.clip_norm:g}'),
      ('learning rate', f'{result.learning_rate:g}'),
      ('sampling', result.sampling),
      ('wall time', f'{result.wall_time_seconds:.1f} s'),
  ]
  width = max(len(name) for name, _ in rows)
  print('Result', file=out)
  for name, value in rows:
    print(f'  {name:<{width}}  {value}', file=out)


def _train(args: argparse.Namespace) -> int:
  try:
    data = _digits_demo.load_digits_data()
  except ModuleNotFoundError as error:
    print(
        f'jax-privacy train: {error}. The digits demo needs scikit-learn:'
        " pip install 'jax-privacy[demo]'",
        file=sys.stderr,
    )
    return 1
  if args.batch_size > data.num_train:
    args.command_parser.error(
        f'argument --batch-size: must be an integer in [1,'
        f' {data.num_train}] (the number of training examples), got'
        f' {args.batch_size}'
    )
  settings = _digits_demo.TrainSettings(
      target_epsilon=args.epsilon,
      delta=args.delta,
      epochs=args.epochs,
      batch_size=args.batch_size,
      clip_norm=args.clip_norm,
      learning_rate=args.learning_rate,
      seed=args.seed,
  )
  progress_out = sys.stderr if args.json else sys.stdout
  print(
      f'DP-SGD on digits: {data.num_train} training / {data.num_test} test'
      ' examples, MLP 64-64-10 (tanh).',
      file=progress_out,
      flush=True,
  )
  result = _digits_demo.run(
      data,
      settings,
      compare_non_private=args.compare_non_private,
      on_plan=lambda plan: _print_plan(plan, settings, progress_out),
      on_epoch=lambda p: _print_progress(p, settings.epochs, progress_out),
  )
  if args.json:
    print(json.dumps(dataclasses.asdict(result), indent=2))
  else:
    _print_summary(result, sys.stdout)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status.

  Args:
    argv: The arguments after the program name; `sys.argv[1:]` if None.

  Returns:
    0 on success. Invalid options raise `SystemExit(2)` (argparse's
    convention) after printing the reason to stderr.
  """
  args = _build_parser().parse_args(argv)
  return args.run_command(args)


if __name__ == '__main__':
  sys.exit(main())
