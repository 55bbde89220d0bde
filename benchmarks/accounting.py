"""Benchmark: the speed of accounting and calibration, with accuracy.

Measures, side by side in one run (median of --repeats runs each):

1. PLD epsilon of DP-SGD for 1e4 steps (q = 256/60000, sigma = 1.1, delta
   1e-5): our `DpsgdTrainingAccountant` and a plain dp_accounting
   `PLDAccountant` on the same event (both on the 1e-4 grid).
2. Calibration of sigma for q = 4096/50000, 2500 steps, epsilon 8, delta 1e-5
   with the PLD accountant on the 1e-4 grid, tol 0.01:
   - ours: `calibrate.calibrate_noise_multiplier` (coarse PLD stages locate
     sigma, the exact accountant checks it);
   - plain bisection: the bracket [0, 1] doubled until it contains sigma,
     then bisected to width tol, every evaluation exact;
   - dp_accounting's `calibrate_dp_mechanism` (Brent's method on the exact
     accountant) from the bracket [0.5, 16].
   For each: seconds, sigma, its exact epsilon (<= 8 required) and the
   exact epsilon at sigma - tol (> 8 shows sigma is within tol of the best).

Run: ``python benchmarks/accounting.py [--repeats 3]``.
"""

import argparse
import logging
import statistics
import time

import dp_accounting

from jax_privacy.accounting import accountants
from jax_privacy.accounting import analysis
from jax_privacy.accounting import calibrate

NUM_SAMPLES, BATCH, STEPS = 50_000, 4096, 2500
TARGET, DELTA, TOL = 8.0, 1e-5, 0.01


def _event(q, sigma, steps):
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma)), steps)


def _plain_pld_epsilon(q, sigma, steps, delta=DELTA):
  accountant = dp_accounting.pld.PLDAccountant(
      value_discretization_interval=1e-4)
  return accountant.compose(_event(q, sigma, steps)).get_epsilon(delta)


def _timed(fn, repeats):
  times, value = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    value = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), value


def _ours_epsilon():
  accountant = analysis.DpsgdTrainingAccountant(
      accountants.PldAccountantConfig())
  params = analysis.DpParams(noise_multipliers=1.1, num_samples=60_000,
                             delta=DELTA, batch_size=256)
  return accountant.compute_epsilon(10_000, params)


def _ours_calibration():
  return calibrate.calibrate_noise_multiplier(
      target_epsilon=TARGET,
      accountant=analysis.DpsgdTrainingAccountant(
          accountants.PldAccountantConfig()),
      batch_sizes=BATCH, num_updates=STEPS, num_samples=NUM_SAMPLES,
      target_delta=DELTA, tol=TOL)


def _plain_bisection():
  epsilon = lambda s: _plain_pld_epsilon(BATCH / NUM_SAMPLES, s, STEPS)
  low, high = 0.0, 1.0
  while epsilon(high) > TARGET:
    low, high = high, 2 * high
  while high - low > TOL:
    middle = (low + high) / 2
    if epsilon(middle) <= TARGET:
      high = middle
    else:
      low = middle
  return high


def _dp_accounting_calibration():
  return dp_accounting.calibrate_dp_mechanism(
      lambda: dp_accounting.pld.PLDAccountant(
          value_discretization_interval=1e-4),
      lambda s: _event(BATCH / NUM_SAMPLES, s, STEPS),
      TARGET, DELTA,
      bracket_interval=dp_accounting.ExplicitBracketInterval(0.5, 16.0),
      tol=TOL)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  logging.getLogger('absl').setLevel(logging.ERROR)

  print('PLD epsilon, q=256/60000, sigma=1.1, 1e4 steps, delta=1e-5'
        f' (median of {args.repeats})')
  ours_time, ours = _timed(_ours_epsilon, args.repeats)
  plain_time, plain = _timed(
      lambda: _plain_pld_epsilon(256 / 60_000, 1.1, 10_000), args.repeats)
  print(f'  {"jax_privacy accountant":<28}{ours_time:8.3f} s  eps={ours:.6f}')
  print(f'  {"plain dp_accounting":<28}{plain_time:8.3f} s  eps={plain:.6f}')

  print(f'\nCalibrate sigma: q={BATCH}/{NUM_SAMPLES}, {STEPS} steps,'
        f' eps={TARGET:g}, delta={DELTA:g}, tol={TOL} (PLD 1e-4;'
        f' median of {args.repeats})')
  q = BATCH / NUM_SAMPLES
  for name, fn in (
      ('jax_privacy calibrate', _ours_calibration),
      ('plain bisection', _plain_bisection),
      ('dp_accounting calibrate', _dp_accounting_calibration),
  ):
    seconds, sigma = _timed(fn, args.repeats)
    eps = _plain_pld_epsilon(q, sigma, STEPS)
    eps_below = _plain_pld_epsilon(q, sigma - TOL, STEPS)
    print(f'  {name:<28}{seconds:8.3f} s  sigma={sigma:.5f}'
          f'  eps(sigma)={eps:.5f}  eps(sigma-tol)={eps_below:.5f}')


if __name__ == '__main__':
  main()
