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
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ('non_private', 'floor', 'dp_vmap', 'dp_microbatch', 'dp_ghost')
MODELS = {'mlp': 256, 'cnn': 128, 'transformer': 32}


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


def _cnn(batch_size):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  keys = jax.random.split(jax.random.key(0), 4)
  params = {
      'c1': jax.random.normal(keys[0], (3, 3, 3, 32)) / jnp.sqrt(27.0),
      'b1': jnp.zeros((32,)),
      'c2': jax.random.normal(keys[1], (3, 3, 32, 64)) / jnp.sqrt(288.0),
      'b2': jnp.zeros((64,)),
      'w': jax.random.normal(keys[2], (8 * 8 * 64, 10)) / 64.0,
      'b': jnp.zeros((10,)),
  }
  dims = ('NHWC', 'HWIO', 'NHWC')

  def loss(params, x, y):
    h = jax.lax.conv_general_dilated(
        x, params['c1'], (1, 1), 'SAME', dimension_numbers=dims
    )
    h = jax.nn.relu(h + params['b1'])
    h = jax.lax.reduce_window(
        h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID'
    )
    h = jax.lax.conv_general_dilated(
        h, params['c2'], (1, 1), 'SAME', dimension_numbers=dims
    )
    h = jax.nn.relu(h + params['b2'])
    h = jax.lax.reduce_window(
        h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID'
    )
    logits = h.reshape((h.shape[0], -1)) @ params['w'] + params['b']
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))

  x = jax.random.normal(keys[3], (batch_size, 32, 32, 3))
  y = jax.nn.one_hot(jnp.arange(batch_size) % 10, 10)
  return params, loss, x, y


def _transformer(batch_size, vocab=1000, d=128, seq=64, heads=4, layers=2):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  keys = iter(jax.random.split(jax.random.key(0), 4 + 6 * layers))

  def dense(m, n):
    return jax.random.normal(next(keys), (m, n)) / jnp.sqrt(m)

  params = {
      'emb': jax.random.normal(next(keys), (vocab, d)) * 0.02,
      'pos': jax.random.normal(next(keys), (seq, d)) * 0.02,
      'out': dense(d, vocab),
      'layers': [
          {
              'wq': dense(d, d), 'wk': dense(d, d), 'wv': dense(d, d),
              'wo': dense(d, d), 'w1': dense(d, 4 * d), 'b1': jnp.zeros(4 * d),
              'w2': dense(4 * d, d), 'b2': jnp.zeros(d),
              'ln1': (jnp.ones(d), jnp.zeros(d)),
              'ln2': (jnp.ones(d), jnp.zeros(d)),
          }
          for _ in range(layers)
      ],
  }

  def layer_norm(x, scale_bias):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale_bias[0] + scale_bias[1]

  def split_heads(x):
    return x.reshape(x.shape[:-1] + (heads, d // heads)).swapaxes(-2, -3)

  def loss(params, ids, labels):
    x = params['emb'][ids] + params['pos']
    for layer in params['layers']:
      h = layer_norm(x, layer['ln1'])
      q, k, v = (split_heads(h @ layer[n]) for n in ('wq', 'wk', 'wv'))
      att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / jnp.sqrt(d // heads))
      o = (att @ v).swapaxes(-2, -3).reshape(x.shape)
      x = x + o @ layer['wo']
      h = layer_norm(x, layer['ln2'])
      x = x + jax.nn.gelu(h @ layer['w1'] + layer['b1']) @ layer['w2']
      x = x + layer['b2']
    logits = x @ params['out']
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))

  ids = jax.random.randint(next(keys), (batch_size, seq), 0, vocab)
  labels = jnp.roll(ids, -1, axis=1)
  return params, loss, ids, labels


def _run_one(config, model, batch_size, steps):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from jax_privacy import clipping  # pylint: disable=g-import-not-at-top
  from jax_privacy import noise_addition  # pylint: disable=g-import-not-at-top

  builders = {'mlp': _mlp, 'cnn': _cnn, 'transformer': _transformer}
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

  @jax.jit
  def step(params, state, x, y):
    grads = grad_fn(params, x, y)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

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
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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
