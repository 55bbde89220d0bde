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

`train --config FILE` reads its options from a JSON or TOML file whose keys
are the option names (`batch_size` or `batch-size`); options given on the
command line override the file. `train --checkpoint-dir DIR` saves the run
after every epoch; `train --checkpoint-dir DIR --resume` continues it, and
refuses a directory holding no run or a run with other settings.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import tomllib
from collections.abc import Sequence
from typing import Any, Callable, Optional, TextIO

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
  parser.add_argument(
      '--checkpoint-dir',
      metavar='DIR',
      help=(
          'save the run (parameters, optimizer and noise state, step) in DIR'
          ' after every epoch and at the end; DIR must be new or empty'
          ' unless --resume is given'
      ),
  )
  parser.add_argument(
      '--resume',
      action='store_true',
      help=(
          'continue the run saved in --checkpoint-dir, which must have the'
          ' same settings; the result equals that of an uninterrupted run'
      ),
  )
  parser.add_argument(
      '--stop-after-steps',
      type=_positive_int,
      metavar='N',
      help=(
          'stop after N steps of this invocation (continue later with'
          ' --resume)'
      ),
  )
  parser.add_argument(
      '--config',
      metavar='FILE',
      help=(
          'read options from a JSON (.json) or TOML (.toml) file whose keys'
          ' are these option names; options on the command line override it'
      ),
  )
  parser.set_defaults(run_command=_train, command_parser=parser)


class _ConfigError(ValueError):
  """A --config file that cannot be used, with the reason."""


def _read_config(path: str) -> dict[str, Any]:
  """The table of options in a .json or .toml file."""
  kind = pathlib.Path(path).suffix.lower()
  if kind not in ('.json', '.toml'):
    raise _ConfigError(f'{path} must be a .json or .toml file')
  try:
    with open(path, 'rb') as file:
      content = tomllib.load(file) if kind == '.toml' else json.load(file)
  except OSError as error:
    raise _ConfigError(f'cannot read {path}: {error.strerror}') from error
  except (ValueError, tomllib.TOMLDecodeError) as error:
    raise _ConfigError(
        f'{path} is not valid {kind[1:].upper()}: {error}'
    ) from error
  if not isinstance(content, dict):
    raise _ConfigError(
        f'{path} must hold a table of options such as {{"epsilon": 3.0}},'
        f' got a {type(content).__name__}'
    )
  return content


def _config_value(key: str, value: Any, action: argparse.Action) -> Any:
  """`value` checked as the option of `action` would check it."""
  if action.nargs == 0:
    if not isinstance(value, bool):
      raise _ConfigError(f'{key} must be true or false, got {value!r}')
    return value
  if action.type is None:
    if not isinstance(value, str) or not value:
      raise _ConfigError(f'{key} must be a non-empty string, got {value!r}')
    return value
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _ConfigError(f'{key} must be a number, got {value!r}')
  try:
    return action.type(repr(value))
  except argparse.ArgumentTypeError as error:
    raise _ConfigError(f'{key} {error}') from error


def _config_defaults(
    parser: argparse.ArgumentParser, path: str
) -> dict[str, Any]:
  """The options of a --config file, checked, keyed by their dest."""
  actions = {
      action.dest: action
      # argparse offers no public list of a parser's options.
      for action in parser._actions  # pylint: disable=protected-access
      if action.option_strings and action.dest not in ('help', 'config')
  }
  values = {}
  for key, value in _read_config(path).items():
    dest = key.replace('-', '_')
    if dest not in actions:
      raise _ConfigError(
          f'{path}: unknown key {key!r}; the keys are the options of'
          f' `jax-privacy train`: {", ".join(sorted(actions))}'
      )
    if dest in values:
      raise _ConfigError(f'{path}: {dest} is given twice')
    values[dest] = _config_value(f'{path}: {key}', value, actions[dest])
  return values


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
      ('steps', _steps_summary(result)),
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


def _steps_summary(result: _digits_demo.DigitsResult) -> str:
  summary = f'{result.steps} ({result.epochs} epochs)'
  if result.steps < result.planned_steps:
    summary = (
        f'{result.steps} of {result.planned_steps} planned (stopped by'
        ' --stop-after-steps)'
    )
  if result.resumed_from_step:
    summary += f', resumed from step {result.resumed_from_step}'
  return summary


# A run directory holds the settings of its run in this file, next to the
# trainer's checkpoints in _CHECKPOINTS.
_RUN_SETTINGS = 'train_settings.json'
_CHECKPOINTS = 'checkpoints'


def _checkpoint_problem(
    directory: str, resume: bool, settings: _digits_demo.TrainSettings
) -> Optional[str]:
  """Why `directory` cannot be used for this run, or None if it can."""
  settings_file = os.path.join(directory, _RUN_SETTINGS)
  if not resume:
    if os.path.exists(directory) and (
        not os.path.isdir(directory) or os.listdir(directory)
    ):
      return (
          f'argument --checkpoint-dir: {directory} is not an empty directory;'
          ' continue the run saved there with --resume, or choose a new'
          ' directory'
      )
    return None
  if not os.path.isfile(settings_file):
    return (
        f'argument --resume: {directory} holds no `jax-privacy train` run to'
        f' resume (no {_RUN_SETTINGS}); start one with --checkpoint-dir'
        ' without --resume'
    )
  with open(settings_file) as file:
    saved = json.load(file)
  here = dataclasses.asdict(settings)
  differences = [
      f'{name} {saved.get(name)!r} there, {here.get(name)!r} here'
      for name in sorted(set(saved) | set(here))
      if saved.get(name) != here.get(name)
  ]
  if differences:
    return (
        f'argument --resume: the run in {directory} has other settings ('
        + '; '.join(differences)
        + '); resume it with its own settings, or start a new run in another'
        ' --checkpoint-dir'
    )
  return None


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
  if args.resume and args.checkpoint_dir is None:
    args.command_parser.error(
        'argument --resume: needs --checkpoint-dir, the directory of the run'
        ' to continue'
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
  checkpoints = None
  if args.checkpoint_dir is not None:
    try:
      # pylint: disable-next=g-import-not-at-top,unused-import
      import orbax.checkpoint
    except ImportError as error:
      print(
          f'jax-privacy train: {error}. --checkpoint-dir needs'
          " orbax-checkpoint: pip install 'jax-privacy[checkpoint]'",
          file=sys.stderr,
      )
      return 1
    problem = _checkpoint_problem(args.checkpoint_dir, args.resume, settings)
    if problem is not None:
      args.command_parser.error(problem)
    if not args.resume:
      os.makedirs(args.checkpoint_dir, exist_ok=True)
      with open(os.path.join(args.checkpoint_dir, _RUN_SETTINGS), 'w') as file:
        json.dump(dataclasses.asdict(settings), file, indent=2)
    checkpoints = os.path.join(args.checkpoint_dir, _CHECKPOINTS)
  progress_out = sys.stderr if args.json else sys.stdout
  print(
      f'DP-SGD on digits: {data.num_train} training / {data.num_test} test'
      ' examples, MLP 64-64-10 (tanh).',
      file=progress_out,
      flush=True,
  )
  if args.resume:
    step = _digits_demo.training.DPTrainer.latest_checkpoint_step(checkpoints)
    print(
        f'Resuming the run in {args.checkpoint_dir} from step {step or 0}.',
        file=progress_out,
        flush=True,
    )
  try:
    result = _digits_demo.run(
        data,
        settings,
        compare_non_private=args.compare_non_private,
        on_plan=lambda plan: _print_plan(plan, settings, progress_out),
        on_epoch=lambda p: _print_progress(p, settings.epochs, progress_out),
        checkpoint_dir=checkpoints,
        stop_after_steps=args.stop_after_steps,
    )
  except ValueError as error:
    print(f'jax-privacy train: {error}', file=sys.stderr)
    return 1
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
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = _build_parser()
  args = parser.parse_args(argv)
  if args.run_command is _train and args.config is not None:
    train_parser = args.command_parser
    try:
      defaults = _config_defaults(train_parser, args.config)
    except _ConfigError as error:
      train_parser.error(f'argument --config: {error}')
    # The file's values become the defaults, so that options given on the
    # command line still win.
    train_parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
  return args.run_command(args)


if __name__ == '__main__':
  sys.exit(main())
