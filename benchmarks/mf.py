"""Benchmark: per-step noise generation of matrix-factorization privatizers.

A model of ``--params`` float32 parameters (default 10^6) trained for
``--steps`` steps (default 10^4). Measures, per step, the privatizer update
(draw ``Z_t``, multiply by the noising matrix, add to the gradient) for:

* ``gaussian``: DP-SGD's i.i.d. noise, the baseline;
* ``blt``: a 4-buffer BLT as a streaming matrix (state: 4 model copies);
* ``banded``: a 16-band BandMF strategy, streaming (state: 15 copies);
* ``tree``: the binary tree of DP-FTRL, streaming (log2(n) copies);
* ``dense``: ``C^{-1}`` as a dense ``n x n`` array. It stores no past noise
  but regenerates every ``Z_s`` each step, so its cost is linear in ``n``:
  it is timed at ``--dense_steps`` (default 100) and extrapolated to
  ``--steps`` linearly (storing ``Z`` instead would take ``n`` model copies:
  40 GB here).

Configurations are interleaved round by round and reported as the median
over rounds of (time / Gaussian time in the same round), so load from other
processes cancels out; the state size is exact. Run:
``python benchmarks/mf.py [--rounds 5] [--reps 10]``.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_privacy import noise_addition
from jax_privacy.matrix_factorization import banded
from jax_privacy.matrix_factorization import buffered_toeplitz
from jax_privacy.matrix_factorization import tree_aggregation


def _privatizers(steps, dense_steps):
  key = jax.random.key(0)
  blt = buffered_toeplitz.BufferedToeplitz(
      buf_decay=(0.999, 0.99, 0.9, 0.5), output_scale=(0.02, 0.08, 0.2, 0.3)
  )
  noising = {
      'blt': blt.inverse_as_streaming_matrix(),
      'banded': banded.ColumnNormalizedBanded.default(
          steps, 16
      ).inverse_as_streaming_matrix(),
      'tree': tree_aggregation.inverse_as_streaming_matrix(steps),
      'dense': np.linalg.inv(blt.materialize(dense_steps)),
  }
  result = {
      'gaussian': noise_addition.gaussian_privatizer(stddev=1.0, prng_key=key)
  }
  for name, matrix in noising.items():
    result[name] = noise_addition.matrix_factorization_privatizer(
        matrix, stddev=1.0, prng_key=key
    )
  return result


def _state_bytes(state):
  return sum(
      x.size * x.dtype.itemsize
      for x in jax.tree.leaves(state)
      if hasattr(x, 'dtype')
      and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--params', type=int, default=1_000_000)
  parser.add_argument('--steps', type=int, default=10_000)
  parser.add_argument('--dense_steps', type=int, default=100)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--reps', type=int, default=10)
  args = parser.parse_args()
  grads = {'w': jnp.zeros(args.params, jnp.float32)}
  runs = {}
  for name, privatizer in _privatizers(args.steps, args.dense_steps).items():
    update = jax.jit(privatizer.update, donate_argnums=(1,))
    state = jax.tree.map(jnp.copy, privatizer.init(grads))  # donated below
    start = time.perf_counter()
    out, state = update(grads, state)
    jax.block_until_ready(out)
    runs[name] = [
        update,
        state,
        time.perf_counter() - start,
        _state_bytes(state),
    ]
  ratios = {name: [] for name in runs}
  absolute = {name: [] for name in runs}
  for _ in range(args.rounds):
    round_ms = {}
    for name, run in runs.items():
      reps = 1 if name == 'dense' else args.reps
      start = time.perf_counter()
      for _ in range(reps):
        out, run[1] = run[0](grads, run[1])
      jax.block_until_ready(out)
      round_ms[name] = 1000 * (time.perf_counter() - start) / reps
    for name in runs:
      ratios[name].append(round_ms[name] / round_ms['gaussian'])
      absolute[name].append(round_ms[name])
  print(
      f'{args.params:,} float32 parameters, n = {args.steps:,} steps, '
      f'{args.rounds} rounds; time per step relative to Gaussian in the same round'
  )
  print(
      f"{'privatizer':10s} {'ms/step':>10s} {'x gaussian':>11s} {'state MB':>9s} {'first call s':>13s}"
  )
  for name, (_, _, first, nbytes) in runs.items():
    ms = statistics.median(absolute[name])
    ratio = statistics.median(ratios[name])
    if name == 'dense':
      scale = args.steps / args.dense_steps
      print(
          f'{name:10s} {ms:10.1f} {ratio:11.1f} {nbytes / 2**20:9.1f} {first:13.2f}'
          f'   (measured at n = {args.dense_steps})'
      )
      print(
          f"{'dense@n':10s} {ms * scale:10.0f} {ratio * scale:11.0f} "
          f'{nbytes / 2**20:9.1f} {"":>13s}   (extrapolated to n = {args.steps:,})'
      )
    else:
      print(
          f'{name:10s} {ms:10.1f} {ratio:11.2f} {nbytes / 2**20:9.1f} {first:13.2f}'
      )


if __name__ == '__main__':
  main()
