"""`jax-privacy audit`: empirical privacy of the demo classifier or of scores.

Without `--scores`, trains the digits demo of `jax-privacy train` with
DP-SGD (same options and defaults), attacks it with a loss-threshold
membership-inference attack (training split = members, test split =
non-members) and prints the attack's AUC, TPR at a low FPR and epsilon lower
bounds next to the epsilon the accountant proves. With `--scores FILE`
(`.npz` or `.json` holding `in_scores` and `out_scores`, higher = member) it
audits those scores instead.
"""

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import TextIO

import numpy as np

from jax_privacy import auditing
from jax_privacy.auditing import membership

_FPR = 0.01


def add_parsers(subparsers) -> None:
  """Registers the `audit` command on the `jax-privacy` sub-parsers."""
  # Imported here: cli imports this module while it is being initialised.
  from jax_privacy import _digits_demo  # pylint: disable=g-import-not-at-top
  from jax_privacy import cli  # pylint: disable=g-import-not-at-top

  defaults = _digits_demo.TrainSettings()
  parser = subparsers.add_parser(
      'audit',
      help='measure privacy empirically (membership inference, canaries)',
      description=__doc__.split('\n\n', 1)[1].replace('\n', ' '),
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
      '--scores',
      type=pathlib.Path,
      default=None,
      help=(
          'audit these scores (.npz or .json with in_scores and out_scores)'
          ' instead of the demo classifier'
      ),
  )
  parser.add_argument(
      '--proven-epsilon',
      type=cli._positive_float,  # pylint: disable=protected-access
      default=None,
      help='with --scores: the epsilon the run claims, to compare against',
  )
  parser.add_argument(
      '--significance',
      type=cli._open_unit_interval,  # pylint: disable=protected-access
      default=0.05,
      help='the lower bounds hold with probability 1 - significance',
  )
  parser.add_argument(
      '--epsilon',
      type=cli._epsilon,  # pylint: disable=protected-access
      default=defaults.target_epsilon,
      help='demo: privacy budget of the training run',
  )
  parser.add_argument(
      '--delta',
      type=cli._open_unit_interval,  # pylint: disable=protected-access
      default=defaults.delta,
      help='delta of the guarantee and of the lower bounds',
  )
  parser.add_argument(
      '--epochs',
      type=cli._positive_int,  # pylint: disable=protected-access
      default=defaults.epochs,
      help='demo: passes over the data',
  )
  parser.add_argument(
      '--batch-size',
      type=cli._positive_int,  # pylint: disable=protected-access
      default=defaults.batch_size,
      help='demo: expected (Poisson) batch size',
  )
  parser.add_argument(
      '--seed',
      type=cli._non_negative_int,  # pylint: disable=protected-access
      default=defaults.seed,
      help='demo: seed of initialization, sampling and noise',
  )
  parser.add_argument(
      '--compare-non-private',
      action='store_true',
      help='demo: also attack the same model trained without DP',
  )
  parser.add_argument(
      '--roc',
      type=pathlib.Path,
      default=None,
      help='write the ROC curve(s) to this PNG (needs matplotlib)',
  )
  parser.add_argument(
      '--json', action='store_true', help='print the result as JSON'
  )
  parser.set_defaults(run_command=_audit, handler=_audit, command_parser=parser)


def _load_scores(path: pathlib.Path) -> auditing.CanaryScoreAuditor:
  if path.suffix == '.json':
    data = json.loads(path.read_text())
  else:
    with np.load(path) as npz:
      data = {name: npz[name] for name in npz.files}
  missing = {'in_scores', 'out_scores'} - set(data)
  if missing:
    raise ValueError(
        f'{path} must hold in_scores and out_scores; missing'
        f' {", ".join(sorted(missing))}'
    )
  return auditing.CanaryScoreAuditor(data['in_scores'], data['out_scores'])


def _demo_auditors(args, out: TextIO) -> tuple[dict, float]:
  """Trains the demo (and optionally its non-private twin) and attacks it."""
  import optax  # pylint: disable=g-import-not-at-top

  from jax_privacy import _digits_demo  # pylint: disable=g-import-not-at-top

  data = _digits_demo.load_digits_data()
  settings = _digits_demo.TrainSettings(
      target_epsilon=args.epsilon,
      delta=args.delta,
      epochs=args.epochs,
      batch_size=min(args.batch_size, data.num_train),
      seed=args.seed,
  )
  accountant = _digits_demo.make_accountant()
  plan = _digits_demo.plan_privacy(settings, data.num_train, accountant)
  print(
      f'Training the digits demo with DP-SGD (sigma='
      f'{plan.noise_multiplier:.3f}, {plan.num_steps} steps)...',
      file=out,
      flush=True,
  )
  params, steps = _digits_demo.train_private(data, settings, plan, accountant)
  proven = accountant.compute_epsilon(steps, plan.dp_params)

  def attack(params):
    def losses(x, y):
      return np.asarray(
          optax.softmax_cross_entropy_with_integer_labels(
              _digits_demo.mlp_logits(params, x), y
          )
      )

    return auditing.CanaryScoreAuditor(
        membership.loss_scores(losses(data.train_x, data.train_y)),
        membership.loss_scores(losses(data.test_x, data.test_y)),
    )

  auditors = {'DP-SGD': attack(params)}
  if args.compare_non_private:
    print('Training the non-private twin...', file=out, flush=True)
    auditors['non-private'] = attack(
        _digits_demo.train_non_private(data, settings, plan)
    )
  return auditors, proven


def _audit(args: argparse.Namespace) -> int:
  out = sys.stderr if args.json else sys.stdout
  try:
    if args.scores is not None:
      auditors = {'scores': _load_scores(args.scores)}
      proven = args.proven_epsilon
    else:
      auditors, proven = _demo_auditors(args, out)
  except (OSError, ValueError, ModuleNotFoundError) as error:
    print(f'jax-privacy audit: {error}', file=sys.stderr)
    return 1
  summaries = {
      name: membership.summarize(
          auditor, fpr=_FPR, significance=args.significance, delta=args.delta
      )
      for name, auditor in auditors.items()
  }
  if args.roc is not None:
    try:
      membership.plot_roc(auditors, args.roc)
    except ModuleNotFoundError:
      print(
          "jax-privacy audit: --roc needs matplotlib: pip install"
          " 'jax-privacy[plots]'",
          file=sys.stderr,
      )
      return 1
  if args.json:
    print(json.dumps({
        'proven_epsilon': proven,
        'attacks': {k: dataclasses.asdict(v) for k, v in summaries.items()},
    }, indent=2))
    return 0
  proven_text = 'not given' if proven is None else f'{proven:.4f}'
  print(f'Proven epsilon (accountant): {proven_text} at delta={args.delta:g}')
  for name, s in summaries.items():
    print(f'Attack on {name} ({s.num_members} members, {s.num_non_members}'
          ' non-members):')
    print(f'  AUC                          {s.auc:.4f}')
    print(f'  TPR at FPR {s.fpr:g}              {s.tpr_at_fpr:.4f}')
    print(f'  epsilon lower bound (CP)     {s.epsilon_lower_bound:.4f}')
    print(f'  epsilon lower bound (GDP)    {s.epsilon_lower_bound_gdp:.4f}')
  print(
      f'Lower bounds hold with probability {1 - args.significance:g}; one'
      ' above the proven epsilon means a bug. Train/test membership is an'
      ' indicative audit: canaries (jax_privacy.auditing.canaries) give the'
      ' rigorous one.'
  )
  if args.roc is not None:
    print(f'ROC curve written to {args.roc}')
  return 0
