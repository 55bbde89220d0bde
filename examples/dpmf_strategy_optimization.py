"""Compares correlated-noise strategies for prefix sums (DP-FTRL / DP-MF).

For ``n`` training steps in which every example participates at most
``max_participations`` times, at least ``min_sep`` steps apart (e.g. epochs
of ``min_sep`` steps in a shuffled order), prints the root-mean-squared and
the max-query root-squared error of the prefix sums of noisy gradients, per
unit noise multiplier, for:

* DP-SGD (identity strategy: independent noise every step),
* the binary tree of DP-FTRL (Kairouz et al. 2021, arXiv:2103.00039),
* the optimal Toeplitz square root of the prefix sum (arXiv:2202.11205),
* an optimised banded Toeplitz strategy (BandMF, arXiv:2306.08153),
* an optimised buffered-linear Toeplitz strategy (BLT, arXiv:2404.16706).

All strategies are compared at the same noise multiplier, i.e. at the same
privacy for the same participation pattern: each error includes the
strategy's own sensitivity under that pattern. Run::

    python examples/dpmf_strategy_optimization.py --n 1024 --min_sep 256 \
        --max_participations 4
"""

import argparse

import numpy as np

from jax_privacy.matrix_factorization import buffered_toeplitz
from jax_privacy.matrix_factorization import toeplitz
from jax_privacy.matrix_factorization import tree_aggregation


def _toeplitz_row(name, coef, n, min_sep, participations, monotone=True):
  coef = toeplitz.pad_coefs_to_n(np.asarray(coef, np.float64), n)
  errors = toeplitz.per_query_error(strategy_coef=coef)
  if monotone:
    sens = toeplitz.minsep_sensitivity_squared(
        coef, min_sep=min_sep, max_participations=participations
    )
  else:
    sens = toeplitz.num_participations(n, min_sep, participations) * np.sum(
        coef**2
    )
  return name, float(sens), float(np.mean(errors)), float(np.max(errors))


def compare(
    n: int,
    min_sep: int,
    max_participations: int,
    bands: int,
    buffers: int,
    steps: int,
) -> list[tuple[str, float, float, float]]:
  """Rows ``(name, sensitivity^2, mean variance, max variance)``."""
  rows = [
      _toeplitz_row('DP-SGD (identity)', [1.0], n, min_sep, max_participations)
  ]
  tree = tree_aggregation.materialize(n)
  noise = np.tril(np.ones((n, n))) @ np.linalg.inv(tree)
  tree_errors = np.sum(noise**2, axis=1)
  rows.append(
      (
          'tree (DP-FTRL)',
          tree_aggregation.sensitivity_squared(
              n, min_sep=min_sep, max_participations=max_participations
          ),
          float(np.mean(tree_errors)),
          float(np.max(tree_errors)),
      )
  )
  rows.append(
      _toeplitz_row(
          'optimal Toeplitz A^(1/2)',
          toeplitz.optimal_max_error_strategy_coefs(n),
          n,
          min_sep,
          max_participations,
      )
  )
  band_coef = toeplitz.optimize_banded_toeplitz(
      n,
      min(bands, min_sep),
      min_sep=min_sep,
      max_participations=max_participations,
      max_optimizer_steps=steps,
  )
  rows.append(
      _toeplitz_row(
          f'banded Toeplitz ({min(bands, min_sep)} bands)',
          band_coef,
          n,
          min_sep,
          max_participations,
          monotone=False,
      )
  )
  blt = buffered_toeplitz.optimize(
      n=n,
      min_sep=min_sep,
      max_participations=max_participations,
      num_buffers=buffers,
      max_optimizer_steps=steps,
  )
  rows.append(
      _toeplitz_row(
          f'BLT ({buffers} buffers)',
          blt.toeplitz_coefs(n),
          n,
          min_sep,
          max_participations,
      )
  )
  return rows


def main(argv=None) -> list[tuple[str, float, float, float]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--n', type=int, default=1024)
  parser.add_argument('--min_sep', type=int, default=256)
  parser.add_argument('--max_participations', type=int, default=4)
  parser.add_argument('--bands', type=int, default=16)
  parser.add_argument('--buffers', type=int, default=4)
  parser.add_argument('--steps', type=int, default=200)
  args = parser.parse_args(argv)
  rows = compare(
      args.n,
      args.min_sep,
      args.max_participations,
      args.bands,
      args.buffers,
      args.steps,
  )
  print(
      f'n={args.n} min_sep={args.min_sep} '
      f'max_participations={args.max_participations}, per unit noise multiplier'
  )
  print(f"{'strategy':32s} {'sens^2':>9s} {'RMSE':>9s} {'max error':>10s}")
  for name, sens, mean, worst in rows:
    print(
        f'{name:32s} {sens:9.3f} {np.sqrt(sens * mean):9.3f} {np.sqrt(sens * worst):10.3f}'
    )
  return rows


if __name__ == '__main__':
  main()
