"""DP-SGD step cost against the non-private step, same model and batch.

Each configuration runs in its own process (so that peak RSS is its own), and
the script prints median ms per step, the ratio to the non-private step,
compile time (of the first step: wall clock, and CPU seconds of the process,
which other processes' load does not inflate) and peak RSS:

* ``non_private``: gradient of the mean loss + SGD.
* ``floor``: the same, plus Gaussian noise for every parameter.
* ``dp_vmap``: per-example clipping with ``clipped_grad`` (vmap) + noise.
* ``dp_microbatch``: the same with ``microbatch_size=32``.
* ``dp_ghost``: ``clipped_grad(method='ghost')`` (ghost norms and
  book-keeping) + noise.

Models (``--model``, default batch size in brackets): ``mlp`` 784-512-512-10
(256), ``cnn`` two 3x3 convolutions on 32x32x3 images and a dense head (128),
``transformer`` a 2-layer encoder, d=128, 4 heads, seq 64, vocab 1000 (32);
``--model all`` runs the three.

Usage: ``python benchmarks/dp_step_benchmark.py [--model all] [--steps 20]
[--rounds 3] [--configs non_private,dp_ghost]``.
Compare ratios within one run only: absolute times vary across machines, and
the machine this was written on is shared, so even runs minutes apart differ.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import _models  # The shared benchmark models (benchmarks/_models.py).

CONFIGS = ('non_private', 'floor', 'dp_vmap', 'dp_microbatch', 'dp_ghost')
MODELS = _models.BATCH_SIZES


def _run_one(config, model, batch_size, steps):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from jax_privacy import clipping  # pylint: disable=g-import-not-at-top
  from jax_privacy import noise_addition  # pylint: disable=g-import-not-at-top

  builders = _models.BUILDERS
  params, loss, x, y = builders[model](batch_size)
  sgd = optax.sgd(0.1)
  if config in ('non_private', 'floor'):
    grad_fn = lambda p, x, y: jax.grad(loss)(p, x, y)  # pylint: disable=unnecessary-lambda-assignment
  else:
    grad_fn = clipping.clipped_grad(
        loss,
        l2_clip_norm=1.0,
        batch_argnums=(1, 2),
        normalize_by=batch_size,
        microbatch_size=32 if config == 'dp_microbatch' else None,
        method='ghost' if config == 'dp_ghost' else 'vectorized',
    )
  stddev = 0.0 if config == 'non_private' else 1.0 / batch_size
  optimizer = optax.chain(
      noise_addition.gaussian_privatizer(
          stddev=stddev, prng_key=jax.random.key(1)
      ),
      sgd,
  )
  state = optimizer.init(params)

  step = _models.jit_step(grad_fn, optimizer)

  start, start_cpu = time.perf_counter(), time.process_time()
  params, state = step(params, state, x, y)
  jax.block_until_ready(params)
  compile_s = time.perf_counter() - start
  compile_cpu_s = time.process_time() - start_cpu
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    params, state = step(params, state, x, y)
    jax.block_until_ready(params)
    times.append((time.perf_counter() - start) * 1e3)
  return {
      'config': config,
      'median_ms': statistics.median(times),
      'compile_s': compile_s,
      'compile_cpu_s': compile_cpu_s,
      'peak_rss_mb': _models.own_peak_rss_mb(),
  }


def _run_model(model, batch_size, steps, configs, rounds):
  """Runs every config ``rounds`` times, interleaved; keeps each one's best.

  On a shared machine the load changes from one process to the next; taking
  each configuration's fastest round (its median over steps, the lowest
  compile time and peak RSS) compares them under similar load.
  """
  best = {}
  for _ in range(rounds):
    for config in configs:
      proc = subprocess.run(
          [sys.executable, __file__, '--only', config, '--model', model,
           '--batch-size', str(batch_size), '--steps', str(steps)],
          check=False, capture_output=True, text=True,
      )
      if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ['?']
        print(f'{model} {config} failed: {tail[0]}', file=sys.stderr)
        continue
      result = json.loads(proc.stdout.strip().splitlines()[-1])
      if config in best:
        result = {
            key: min(value, best[config][key]) if key != 'config' else value
            for key, value in result.items()
        }
      best[config] = result
  results = [best[c] for c in configs if c in best]
  base = next(
      (r['median_ms'] for r in results if r['config'] == 'non_private'), None
  )
  base_rss = next(
      (r['peak_rss_mb'] for r in results if r['config'] == 'non_private'), None
  )
  base_compile = next(
      (r['compile_s'] for r in results if r['config'] == 'non_private'), None
  )
  base_cpu = next(
      (r['compile_cpu_s'] for r in results if r['config'] == 'non_private'),
      None,
  )
  print(f'model={model} batch={batch_size} steps={steps} rounds={rounds}')
  print(
      f"{'config':<15}{'median ms':>10}{'ratio':>8}{'compile s':>11}"
      f"{'ratio':>7}{'cpu s':>7}{'ratio':>7}{'peak MB':>9}{'ratio':>7}"
  )
  for r in results:
    print(
        f"{r['config']:<15}{r['median_ms']:>10.1f}"
        f"{r['median_ms'] / base if base else float('nan'):>8.2f}"
        f"{r['compile_s']:>11.2f}"
        f"{r['compile_s'] / base_compile if base_compile else float('nan'):>7.2f}"
        f"{r['compile_cpu_s']:>7.2f}"
        f"{r['compile_cpu_s'] / base_cpu if base_cpu else float('nan'):>7.2f}"
        f"{r['peak_rss_mb']:>9.0f}"
        f"{r['peak_rss_mb'] / base_rss if base_rss else float('nan'):>7.2f}"
    )
  sys.stdout.flush()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='mlp', choices=tuple(MODELS) + ('all',))
  parser.add_argument(
      '--batch-size', type=int, default=None,
      help='default: 256 (mlp), 128 (cnn), 32 (transformer)',
  )
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument(
      '--configs', default=','.join(CONFIGS),
      help='comma-separated subset of ' + ','.join(CONFIGS),
  )
  parser.add_argument(
      '--rounds', type=int, default=1,
      help='run the configs this many times, interleaved, and keep the best',
  )
  parser.add_argument('--only', choices=CONFIGS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.only:
    batch_size = args.batch_size or MODELS[args.model]
    print(json.dumps(_run_one(args.only, args.model, batch_size, args.steps)))
    return
  configs = [c for c in args.configs.split(',') if c]
  unknown = sorted(set(configs) - set(CONFIGS))
  if unknown:
    parser.error(f'--configs must be a subset of {CONFIGS}, got {unknown}')
  models = tuple(MODELS) if args.model == 'all' else (args.model,)
  for model in models:
    _run_model(
        model, args.batch_size or MODELS[model], args.steps, configs,
        args.rounds,
    )


if __name__ == '__main__':
  main()
