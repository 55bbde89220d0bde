"""The `jax-privacy epsilon` and `jax-privacy calibrate` commands.

`epsilon` prints the privacy guarantee of a DP-SGD run as a statement one can
paste into a paper (mechanism, sampling, neighbouring relation, epsilon by
RDP and by PLD, delta, steps and epochs, and user-level epsilon when
--examples-per-user is given); `calibrate` first finds the noise
multiplier, batch size or number of steps that meets --target-epsilon. Both
print JSON with --json; `epsilon --plot out.png` draws epsilon against the
number of steps (needs matplotlib).

Bad options exit with status 2 and a message naming the option, before any
accounting starts (argparse's convention, as for `jax-privacy train`).
"""

import argparse
import dataclasses
import json
import logging
import math
import sys
from typing import Callable, Optional

from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate

_SAMPLING = {
    'poisson': analysis.SamplingMethod.POISSON,
    'fixed': analysis.SamplingMethod.FIXED_BATCH_SIZE,
    'shuffled': analysis.SamplingMethod.SHUFFLED,
    'shuffled-heuristic': analysis.SamplingMethod.SHUFFLED_POISSON_HEURISTIC,
}

_SAMPLING_TEXT = {
    analysis.SamplingMethod.POISSON: 'Poisson sampling (each example joins'
    ' each batch independently with probability q)',
    analysis.SamplingMethod.FIXED_BATCH_SIZE: 'batches of fixed size drawn'
    ' uniformly without replacement at every step',
    analysis.SamplingMethod.SHUFFLED: 'shuffled batches of fixed size, each'
    ' example in at most one batch per epoch, accounted for without'
    ' amplification by sampling (a proven upper bound)',
    analysis.SamplingMethod.SHUFFLED_POISSON_HEURISTIC: 'shuffled batches of'
    ' fixed size accounted for AS IF Poisson sampled (HEURISTIC: not a proven'
    ' guarantee, shuffling can leak more, arXiv:2403.17673)',
}

_RELATION_TEXT = {
    analysis.NeighboringRelation.ADD_OR_REMOVE_ONE: 'add-or-remove-one-example',
    analysis.NeighboringRelation.REPLACE_ONE: 'replace-one-example',
}


def _number(kind: type, accepts: Callable[[float], bool], accepted: str):
  """An argparse `type` that parses `kind` and checks its range."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not (math.isfinite(value) and accepts(value)):
      raise argparse.ArgumentTypeError(f'must be {accepted}, got {text!r}')
    return value

  return parse


_positive = _number(float, lambda v: v > 0, 'a finite number > 0')
_unit = _number(float, lambda v: 0 < v < 1, 'a number in (0, 1)')
_count = _number(int, lambda v: v >= 1, 'an integer >= 1')
_interval = _number(float, lambda v: 0 < v <= 0.1, 'a number in (0, 0.1]')


def _add_common(parser: argparse.ArgumentParser, *, calibrating: bool):
  """Options shared by `epsilon` and `calibrate`."""
  optional = ' (calibrated if omitted)' if calibrating else ''
  parser.add_argument('--noise-multiplier', type=_positive,
                      required=not calibrating,
                      help='noise stddev over clip norm' + optional)
  parser.add_argument('--batch-size', type=_count, required=not calibrating,
                      help='(expected) batch size' + optional)
  parser.add_argument('--num-samples', type=_count, required=True,
                      help='number of training examples')
  steps = parser.add_mutually_exclusive_group(required=not calibrating)
  steps.add_argument('--steps', type=_count,
                     help='number of training steps' + optional)
  steps.add_argument('--epochs', type=_positive,
                     help='passes over the data; steps = ceil(epochs *'
                     ' num-samples / batch-size)')
  parser.add_argument('--delta', type=_unit, default=1e-5,
                      help='delta of the (epsilon, delta) guarantee')
  parser.add_argument('--sampling', choices=sorted(_SAMPLING),
                      default='poisson', help='how batches are drawn')
  parser.add_argument('--cycle-length', type=_count, default=None,
                      help='cyclic Poisson sampling over this many groups')
  parser.add_argument('--truncated-batch-size', type=_count, default=None,
                      help='Poisson batches are truncated to this size')
  parser.add_argument('--examples-per-user', type=_count, default=None,
                      help='also report user-level epsilon for users with up'
                      ' to this many examples')
  parser.add_argument('--pld-interval', type=_interval, default=1e-4,
                      help='discretisation interval of the PLD accountant')
  parser.add_argument('--json', action='store_true',
                      help='print the result as JSON')


def add_parsers(subparsers) -> None:
  """Registers the `epsilon` and `calibrate` commands on `subparsers`."""
  epsilon = subparsers.add_parser(
      'epsilon',
      help='epsilon of a DP-SGD run, as a privacy statement',
      description='Computes the (epsilon, delta) guarantee of DP-SGD with'
      ' the given settings, by RDP and by PLD accounting (dp_accounting),'
      ' and prints a statement for a paper.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  _add_common(epsilon, calibrating=False)
  epsilon.add_argument('--plot', metavar='OUT.png', default=None,
                       help='draw epsilon against steps (needs matplotlib)')
  epsilon.set_defaults(handler=_epsilon_command, run_command=_epsilon_command,
                       command_parser=epsilon)
  calibrate_parser = subparsers.add_parser(
      'calibrate',
      help='noise, batch size or steps meeting a target epsilon',
      description='Give --target-epsilon and two of --noise-multiplier,'
      ' --batch-size, --steps/--epochs; the third is calibrated (with the PLD'
      ' accountant, or RDP if PLD cannot account for the sampling) so that'
      ' epsilon <= target, and the guarantee is printed.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  calibrate_parser.add_argument('--target-epsilon', type=_positive,
                                required=True, help='epsilon to meet')
  _add_common(calibrate_parser, calibrating=True)
  calibrate_parser.set_defaults(
      handler=_calibrate_command, run_command=_calibrate_command,
      command_parser=calibrate_parser)


def _params(args, *, noise, batch_size) -> analysis.DpParams:
  return analysis.DpParams(
      noise_multipliers=noise,
      num_samples=args.num_samples,
      delta=args.delta,
      batch_size=batch_size,
      cycle_length=args.cycle_length,
      truncated_batch_size=args.truncated_batch_size,
      sampling_method=_SAMPLING[args.sampling],
  )


def _steps(args, batch_size: int) -> int:
  if args.steps is not None:
    return args.steps
  return max(1, math.ceil(args.epochs * args.num_samples / batch_size))


def _main_accountant(args) -> analysis.DpsgdTrainingAccountant:
  if _SAMPLING[args.sampling] is analysis.SamplingMethod.FIXED_BATCH_SIZE:
    return analysis.DpsgdTrainingAccountant(accountants.RdpAccountantConfig())
  return analysis.DpsgdTrainingAccountant(
      accountants.PldAccountantConfig(args.pld_interval))


def _epsilons(args, params, steps) -> dict:
  """Epsilon by RDP and PLD (None where dp_accounting cannot), user level."""
  configs = {
      'rdp': accountants.RdpAccountantConfig(),
      'pld': accountants.PldAccountantConfig(args.pld_interval),
  }
  result = {}
  for name, config in configs.items():
    try:
      result[f'epsilon_{name}'] = analysis.DpsgdTrainingAccountant(
          config).compute_epsilon(steps, params)
    except ValueError:
      result[f'epsilon_{name}'] = None
  if args.examples_per_user is not None:
    user_params = analysis.DpParams(
        noise_multipliers=params.noise_multipliers,
        num_samples=params.num_samples, delta=params.delta,
        batch_size=params.batch_size, cycle_length=params.cycle_length,
        examples_per_user=args.examples_per_user)
    # The mixture-of-Gaussians PLD is ~10x slower than the plain one: a
    # grid of at least 1e-3 keeps the command interactive (still pessimistic).
    user_config = accountants.PldAccountantConfig(max(args.pld_interval, 1e-3))
    result['user_level_pld_interval'] = (
        user_config.value_discretization_interval)
    result['user_level_epsilon_pld'] = (
        analysis.DpsgdTrainingUserLevelAccountant(user_config)
        .compute_epsilon(steps, user_params))
  return result


def _report(args, params: analysis.DpParams, steps: int) -> dict:
  method = params.sampling_method
  cycle = params.cycle_length or 1
  accountant = analysis.DpsgdTrainingAccountant(
      accountants.RdpAccountantConfig())
  relation = accountant.neighboring_relation(params)
  report = {
      'mechanism': 'DP-SGD (per-example gradients clipped to L2 norm C,'
                   ' Gaussian noise of stddev noise_multiplier * C)',
      'sampling': args.sampling,
      'sampling_description': _SAMPLING_TEXT[method],
      'heuristic': method.is_heuristic,
      'neighbouring_relation': _RELATION_TEXT[relation],
      'noise_multiplier': params.noise_multipliers,
      'batch_size': params.batch_size,
      'num_samples': params.num_samples,
      'sampling_prob': min(1.0, params.batch_size * cycle / params.num_samples),
      'cycle_length': cycle,
      'truncated_batch_size': params.truncated_batch_size,
      'steps': steps,
      'epochs': steps * params.batch_size / params.num_samples,
      'delta': params.delta,
      'pld_interval': args.pld_interval,
      'examples_per_user': args.examples_per_user,
  }
  report.update(_epsilons(args, params, steps))
  report['statement'] = _statement(report)
  return report


def _fmt(value: Optional[float]) -> str:
  return 'n/a (not supported by dp_accounting)' if value is None else (
      f'{value:.4g}')


def _statement(r: dict) -> str:
  cyclic = (f', cyclic over {r["cycle_length"]} disjoint groups'
            if r['cycle_length'] > 1 else '')
  truncated = (f', batches truncated to {r["truncated_batch_size"]}'
               if r['truncated_batch_size'] else '')
  text = (
      f'We train with {r["mechanism"]}, noise multiplier'
      f' {r["noise_multiplier"]:.4g}, for {r["steps"]} steps'
      f' ({r["epochs"]:.4g} epochs) on {r["num_samples"]} examples with'
      f' batch size {r["batch_size"]}: {r["sampling_description"]},'
      f' q = {r["sampling_prob"]:.4g}{cyclic}{truncated}. Under the'
      f' {r["neighbouring_relation"]} neighbouring relation the training is'
      f' (epsilon, delta)-DP with delta = {r["delta"]:g} and epsilon ='
      f' {_fmt(r["epsilon_pld"])} by PLD accounting (discretisation'
      f' {r["pld_interval"]:g}, pessimistic) and {_fmt(r["epsilon_rdp"])} by'
      ' RDP accounting (dp_accounting).'
  )
  if r.get('user_level_epsilon_pld') is not None:
    text += (
        f' A user contributing up to {r["examples_per_user"]} examples is'
        f' protected with epsilon = {r["user_level_epsilon_pld"]:.4g} (PLD'
        f' with discretisation {r["user_level_pld_interval"]:g},'
        ' add-or-remove-one-user, same delta).'
    )
  if r['heuristic']:
    text += (' HEURISTIC: this epsilon is not a proven guarantee for the'
             ' sampling used.')
  return text


def _check(args, batch_size: Optional[int]) -> None:
  """Cross-option checks: exits with status 2 naming the option."""
  parser = args.command_parser
  if batch_size is not None:
    limit = args.num_samples // (args.cycle_length or 1)
    if batch_size > limit:
      parser.error(
          f'argument --batch-size: must be an integer in [1, {limit}]'
          ' (num-samples / cycle-length), got'
          f' {batch_size}')
  method = _SAMPLING[args.sampling]
  if method is not analysis.SamplingMethod.POISSON:
    for option in ('cycle_length', 'truncated_batch_size'):
      if getattr(args, option) is not None:
        parser.error(f'argument --{option.replace("_", "-")}: only valid with'
                     ' --sampling poisson')
    if args.examples_per_user is not None:
      parser.error('argument --examples-per-user: only valid with'
                   ' --sampling poisson')
  if args.examples_per_user is not None and args.truncated_batch_size:
    parser.error('argument --examples-per-user: not supported with'
                 ' --truncated-batch-size')


def _emit(args, report: dict) -> None:
  if args.json:
    print(json.dumps(report, indent=2))
    return
  print(report['statement'])
  print()
  for key in ('epsilon_pld', 'epsilon_rdp', 'user_level_epsilon_pld',
              'delta', 'noise_multiplier', 'batch_size', 'sampling_prob',
              'steps', 'epochs'):
    if key in report:
      value = report[key]
      shown = value if isinstance(value, int) else _fmt(value)
      print(f'  {key:<24}{shown}')


def _epsilon_command(args: argparse.Namespace) -> int:
  _check(args, args.batch_size)
  steps = _steps(args, args.batch_size)
  if args.plot:
    try:
      import matplotlib  # pylint: disable=g-import-not-at-top
    except ModuleNotFoundError:
      args.command_parser.error(
          "argument --plot: needs matplotlib: pip install 'jax-privacy[plots]'")
  logging.getLogger('absl').setLevel(logging.ERROR)
  params = _params(args, noise=args.noise_multiplier,
                   batch_size=args.batch_size)
  report = _report(args, params, steps)
  if args.plot:
    report['plot'] = _plot(args, params, steps, matplotlib)
  _emit(args, report)
  return 0


def _plot(args, params, steps: int, matplotlib) -> str:
  """Draws epsilon against steps by RDP and PLD; returns the file name."""
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  points = sorted({max(1, round(steps * i / 12)) for i in range(1, 13)})
  figure, axes = pyplot.subplots(figsize=(6, 4))
  for name, config in (
      ('RDP', accountants.RdpAccountantConfig()),
      (f'PLD (interval {max(args.pld_interval, 1e-3):g})',
       accountants.PldAccountantConfig(max(args.pld_interval, 1e-3))),
  ):
    accountant = analysis.DpsgdTrainingAccountant(config)
    try:
      values = [accountant.compute_epsilon(n, params) for n in points]
    except ValueError:
      continue
    axes.plot(points, values, marker='.', label=name)
  axes.set_xlabel('training steps')
  axes.set_ylabel(f'epsilon (delta = {params.delta:g})')
  axes.set_title(f'DP-SGD, sigma = {args.noise_multiplier:g},'
                 f' q = {params.batch_size / params.num_samples:.3g}')
  axes.grid(True, alpha=0.3)
  axes.legend()
  figure.tight_layout()
  figure.savefig(args.plot, dpi=120)
  pyplot.close(figure)
  return args.plot


def _calibrate_command(args: argparse.Namespace) -> int:
  given = {
      'noise-multiplier': args.noise_multiplier is not None,
      'batch-size': args.batch_size is not None,
      'steps': args.steps is not None or args.epochs is not None,
  }
  missing = [name for name, is_given in given.items() if not is_given]
  if len(missing) != 1:
    args.command_parser.error(
        'argument --noise-multiplier/--batch-size/--steps: give exactly two'
        f' of them (the third is calibrated), missing {missing}')
  if args.epochs is not None and args.batch_size is None:
    args.command_parser.error(
        'argument --epochs: cannot calibrate --batch-size with --epochs'
        ' (the number of steps would change with it); give --steps')
  _check(args, args.batch_size)
  logging.getLogger('absl').setLevel(logging.ERROR)
  accountant = _main_accountant(args)
  common = dict(target_epsilon=args.target_epsilon, accountant=accountant,
                num_samples=args.num_samples, target_delta=args.delta,
                cycle_length=args.cycle_length,
                truncated_batch_size=args.truncated_batch_size)
  target = missing[0]
  sampling = _SAMPLING[args.sampling]
  noise, batch_size = args.noise_multiplier, args.batch_size
  try:
    if target == 'noise-multiplier':
      steps = _steps(args, batch_size)
      noise = _calibrate_noise(common, sampling, batch_size, steps)
    elif target == 'batch-size':
      steps = args.steps
      batch_size = _with_sampling(
          calibrate.calibrate_batch_size, sampling,
          noise_multipliers=noise, num_updates=steps, **common)
    else:
      steps = _with_sampling(
          calibrate.calibrate_num_updates, sampling,
          noise_multipliers=noise, batch_sizes=batch_size, **common)
  except ValueError as error:
    args.command_parser.error(f'argument --target-epsilon: {error}')
  params = _params(args, noise=noise, batch_size=batch_size)
  report = _report(args, params, steps)
  report['calibrated'] = target.replace('-', '_')
  report['target_epsilon'] = args.target_epsilon
  _emit(args, report)
  return 0


def _calibrate_noise(common, sampling, batch_size, steps) -> float:
  return _with_sampling(
      calibrate.calibrate_noise_multiplier, sampling,
      batch_sizes=batch_size, num_updates=steps, tol=1e-3, **common)


def _with_sampling(calibrator, sampling, **kwargs):
  """Runs a calibrator with a sampling method other than the default.

  The calibrators build `DpParams` with Poisson sampling; other methods are
  handled by an accountant that sets the method on every `DpParams`.
  """
  if sampling is analysis.SamplingMethod.POISSON:
    return calibrator(**kwargs)
  kwargs['accountant'] = _SamplingAccountant(kwargs['accountant'], sampling)
  return calibrator(**kwargs)


class _SamplingAccountant:
  """Wraps a training accountant to impose a sampling method."""

  def __init__(self, accountant, sampling):
    self._accountant = accountant
    self._sampling = sampling
    self.can_calibrate_steps = True
    self.can_calibrate_batch_size = True
    self.can_calibrate_noise_multipliers = True

  def compute_epsilon(self, num_updates, dp_params,
                      allow_approximate_cache=False):
    del allow_approximate_cache
    return self._accountant.compute_epsilon(
        num_updates,
        dataclasses.replace(dp_params, sampling_method=self._sampling))
