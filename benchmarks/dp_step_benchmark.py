"""DP-SGD step cost against the non-private step, same model and batch.

Each configuration runs in its own process (so that peak RSS is its own), and
the script prints median ms per step, the ratio to the non-private step,
compile time and peak RSS:

* ``non_private``: gradient of the mean loss + SGD.
* ``floor``: the same, plus Gaussian noise for every parameter.
* ``dp_vmap``: per-example clipping with ``clipped_grad`` (vmap) + noise.
* ``dp_microbatch``: the same with ``microbatch_size=32``.

Usage: ``python benchmarks/dp_step_benchmark.py [--model mlp] [--steps 20]``.
Compare ratios within one run only: absolute times vary across machines.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ('non_private', 'floor', 'dp_vmap', 'dp_microbatch')


def _mlp(batch_size):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  sizes = [784, 512, 512, 10]
  keys = jax.random.split(jax.random.key(0), len(sizes))
  params = [
      {
          'w': jax.random.normal(k, (m, n)) / jnp.sqrt(m),
          'b': jnp.zeros((n,)),
      }
      for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]

  def loss(params, x, y):
    h = x
    for layer in params[:-1]:
      h = jax.nn.relu(h @ layer['w'] + layer['b'])
    logits = h @ params[-1]['w'] + params[-1]['b']
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))

  x = jax.random.normal(keys[-1], (batch_size, 784))
  y = jax.nn.one_hot(jnp.arange(batch_size) % 10, 10)
  return params, loss, x, y


def _run_one(config, model, batch_size, steps):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from jax_privacy import clipping  # pylint: disable=g-import-not-at-top
  from jax_privacy import noise_addition  # pylint: disable=g-import-not-at-top

  if model != 'mlp':
    raise ValueError(f'model must be one of (mlp,), got {model!r}')
  params, loss, x, y = _mlp(batch_size)
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
    )
  stddev = 0.0 if config == 'non_private' else 1.0 / batch_size
  optimizer = optax.chain(
      noise_addition.gaussian_privatizer(
          stddev=stddev, prng_key=jax.random.key(1)
      ),
      sgd,
  )
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = grad_fn(params, x, y)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  start = time.perf_counter()
  params, state = step(params, state, x, y)
  jax.block_until_ready(params)
  compile_s = time.perf_counter() - start
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
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='mlp')
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--only', choices=CONFIGS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.only:
    print(json.dumps(_run_one(args.only, args.model, args.batch_size, args.steps)))
    return
  results = []
  for config in CONFIGS:
    out = subprocess.run(
        [sys.executable, __file__, '--only', config, '--model', args.model,
         '--batch-size', str(args.batch_size), '--steps', str(args.steps)],
        check=True, capture_output=True, text=True,
    ).stdout
    results.append(json.loads(out.strip().splitlines()[-1]))
  base = results[0]['median_ms']
  print(f'model={args.model} batch={args.batch_size} steps={args.steps}')
  print(f"{'config':<15}{'median ms':>10}{'ratio':>8}{'compile s':>11}{'peak MB':>9}")
  for r in results:
    print(
        f"{r['config']:<15}{r['median_ms']:>10.1f}{r['median_ms'] / base:>8.2f}"
        f"{r['compile_s']:>11.2f}{r['peak_rss_mb']:>9.0f}"
    )


if __name__ == '__main__':
  main()
