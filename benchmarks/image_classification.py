"""Image-classification benchmark: the DP step against the non-private one.

The model of De et al. 2022 (default WRN-16-4, GroupNorm and weight
standardization) on a batch of 64 random 32x32x3 images with 10 classes,
in one run, each configuration in its own process (its own peak RSS and
compile time):

* ``non_private_k1``: augment each image once (random crop with reflect
  padding 4, random flip), gradient of the mean loss, SGD.
* ``dp_k1``: the same example loss (augmult K=1) through our fastest DP
  step: ``clipped_grad(method='auto')`` (ghost norms and book-keeping, also
  through the weight-standardized kernels), Gaussian noise, SGD.
* ``non_private_k4``: the non-private step over the same 256 augmented
  images (4 views of each of the 64 examples), as 4 accumulated passes of
  64 images: the faster way here (one pass over 256 images measured
  1.8x-15x slower on XLA:CPU, a ``lax.map`` over the passes slower still).
* ``dp_k4``: augmentation multiplicity K=4
  (``experiments.image_classification.augmult.make_augmult_loss``: the 4
  views' gradients averaged before clipping) + ``clipped_grad(method=
  'auto')`` + noise + SGD.

``dp_vmap_k1`` / ``dp_vmap_k4`` (``method='vectorized'``) can be asked for
with ``--configs``. Every step is jitted and includes the augmentation.
Ratios: ``dp_kK`` (and ``dp_vmap_kK``) to ``non_private_kK`` of the same
run; the goal is <= 2x on CPU.

Usage::

  python benchmarks/image_classification.py [--model wrn-16-4] [--steps 10]
      [--rounds 1] [--out table.md] [--json results.json]
  python benchmarks/image_classification.py --model wrn-10-1 --image-size 8
      --batch-size 8 --steps 2 --warmup 0     # a smoke test

Each child compiles (``jit(step).lower(...).compile()``, timed), runs
``--warmup`` untimed steps, then times up to ``--steps`` steps (fewer once
``--max-seconds`` have elapsed, at least 3) and reports the median, and its
own peak RSS (``VmHWM``). With ``--rounds N`` the configurations run N times,
interleaved, each keeping its best numbers. Compare ratios within one run
only (the machine is shared).
"""

import argparse
import json
import os
import sys
import time

import _models
import clipping as _clipping_benchmark

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = ('non_private_k1', 'dp_k1', 'non_private_k4', 'dp_k4',
           'dp_vmap_k1', 'dp_vmap_k4')
DEFAULT = ('non_private_k1', 'dp_k1', 'non_private_k4', 'dp_k4')
GOAL = 2.0
NUM_CLASSES = 10
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0


def _parse(config):
  """``(private, method, num_views)`` of a configuration name."""
  name, views = config.rsplit('_k', 1)
  method = {'non_private': None, 'dp': 'auto', 'dp_vmap': 'vectorized'}[name]
  return method is not None, method, int(views)


def baseline(config):
  return f'non_private_k{_parse(config)[2]}'


def _child(config, args):
  """Runs one configuration in this process; returns its result dict."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from experiments.image_classification import augmult  # pylint: disable=g-import-not-at-top
  from experiments.image_classification import models  # pylint: disable=g-import-not-at-top
  from jax_privacy import clipping  # pylint: disable=g-import-not-at-top
  from jax_privacy import flax_api  # pylint: disable=g-import-not-at-top
  from jax_privacy import noise_addition  # pylint: disable=g-import-not-at-top

  private, method, views = _parse(config)
  batch = args.batch_size
  model = models.build_model(args.model, NUM_CLASSES, rngs=nnx.Rngs(0))
  params, _ = flax_api.nnx_split_params(model)
  apply = models.make_apply(model)
  xent = optax.softmax_cross_entropy_with_integer_labels
  size = args.image_size
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
  y = jnp.arange(batch) % NUM_CLASSES
  padding = min(4, size // 4)

  if private:
    loss = augmult.make_augmult_loss(
        lambda p, images, labels: xent(apply(p, images), labels),
        num_views=views, crop_padding=padding)
    grad_fn = clipping.clipped_grad(
        loss, l2_clip_norm=CLIP_NORM, batch_argnums=1, prng_argnum=2,
        normalize_by=batch, method=method)
    optimizer = optax.chain(
        noise_addition.gaussian_privatizer(
            stddev=NOISE_MULTIPLIER * CLIP_NORM / batch,
            prng_key=jax.random.key(2)),
        optax.sgd(0.1))

    def gradient(params, x, y, key):
      return grad_fn(params, (x, y), key)
  else:
    optimizer = optax.sgd(0.1)

    def mean_loss(params, images, labels):
      return jnp.mean(xent(apply(params, images), labels))

    def gradient(params, x, y, key):
      images = augmult.make_views(key, x, views, crop_padding=padding)
      labels = jnp.repeat(y, views)
      # K passes of `batch` images, unrolled: on XLA:CPU one pass over
      # K * batch images is slower (1.8x for WRN-10-1, more for WRN-16-4
      # here) and a lax.map over the chunks far slower still.
      total = None
      for i in range(views):
        chunk = slice(i * batch, (i + 1) * batch)
        grads = jax.grad(mean_loss)(params, images[chunk], labels[chunk])
        total = grads if total is None else jax.tree_util.tree_map(
            jnp.add, total, grads)
      return jax.tree_util.tree_map(lambda g: g / views, total)

  @jax.jit
  def step(params, state, x, y):
    opt_state, key = state
    key, sub = jax.random.split(key)
    grads = gradient(params, x, y, sub)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), (opt_state, key)

  state = (optimizer.init(params), jax.random.key(3))
  result = _models.jax_step_result(
      step, params, state, x, y, args.steps, args.warmup, args.max_seconds)
  result['own_peak_rss_mb'] = _models.own_peak_rss_mb()
  result['num_params'] = models.count_params(model)
  result['versions'] = {'jax': jax.__version__}
  return result


def _command(config, args):
  return [
      sys.executable, os.path.abspath(__file__), '--child', config,
      '--model', args.model, '--batch-size', str(args.batch_size),
      '--image-size', str(args.image_size), '--steps', str(args.steps),
      '--warmup', str(args.warmup), '--max-seconds', str(args.max_seconds),
  ]


def run(configs, args):
  """Runs the configurations (``args.rounds`` times, interleaved).

  Returns:
    ``(results, failed)``: result dicts with ratios (see :func:`finish`),
    and the configurations that failed (once per failed round).
  """
  best, failed = {}, []
  for _ in range(args.rounds):
    for config in configs:
      start = time.perf_counter()
      code, out, err, rss = _clipping_benchmark.run_child(
          _command(config, args))
      wall = time.perf_counter() - start
      if code:
        tail = (err.strip().splitlines() or ['?'])[-1]
        print(f'{config} failed ({code}): {tail}', file=sys.stderr,
              flush=True)
        failed.append(config)
        continue
      result = json.loads(out.strip().splitlines()[-1])
      result['peak_rss_mb'] = result.pop('own_peak_rss_mb', None) or rss
      result['wall_s'] = wall
      print(f"{config}: {result['median_ms']:.1f} ms/step "
            f"({result['steps']} steps, {wall:.0f} s)", file=sys.stderr,
            flush=True)
      if config in best:
        for key in ('median_ms', 'min_ms', 'compile_s', 'peak_rss_mb'):
          result[key] = min(best[config][key], result[key])
      best[config] = result
  return finish(configs, best, args), failed


def finish(configs, best, args):
  """One dict per configuration that ran, with ratios to its baseline."""
  results = []
  for config in configs:
    if config not in best:
      continue
    views = _parse(config)[2]
    result = dict(best[config], config=config, model=args.model,
                  batch_size=args.batch_size, image_size=args.image_size,
                  num_views=views, images_per_step=args.batch_size * views,
                  baseline=baseline(config))
    base = best.get(result['baseline'])
    for key in ('median_ms', 'compile_s', 'peak_rss_mb'):
      ok = base and result.get(key) and base.get(key)
      result[key.split('_')[0] + '_ratio'] = (
          result[key] / base[key] if ok else None)
    results.append(result)
  return results


def markdown_table(results):
  """The results as a markdown table, one row per configuration."""
  lines = [
      '| config | images/step | median ms | ratio | compile s | ratio '
      '| peak RSS MB | ratio | steps |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    lines.append(
        f"| {r['config']} | {r['images_per_step']} "
        f"| {_models.fmt(r['median_ms'], 1)} | {_models.fmt(r['median_ratio'], 2)} "
        f"| {_models.fmt(r['compile_s'], 2)} | {_models.fmt(r['compile_ratio'], 2)} "
        f"| {_models.fmt(r['peak_rss_mb'], 0)} | {_models.fmt(r['peak_ratio'], 2)} "
        f"| {r['steps']} |")
  return '\n'.join(lines)


def summary(results):
  """Header lines and the goal check (DP step <= 2x its non-private step)."""
  if not results:
    return '', ''
  r0 = results[0]
  lines = [
      f"{r0['model']} ({r0.get('num_params', 0):,} parameters), batch "
      f"{r0['batch_size']}, {r0['image_size']}x{r0['image_size']}x3, "
      f'{NUM_CLASSES} classes; ratios to non_private_kK (same images per '
      'step); jax ' + r0.get('versions', {}).get('jax', '?'), '',
  ]
  goal_lines = []
  for r in results:
    if r['config'].startswith('dp') and r['median_ratio'] is not None:
      verdict = ('met' if r['median_ratio'] <= GOAL
                 else f"missed by {r['median_ratio'] - GOAL:.2f}x")
      goal_lines.append(
          f"- {r['config']}: {r['median_ratio']:.2f}x {r['baseline']} "
          f'(<= {GOAL}x: {verdict}); peak RSS {_models.fmt(r["peak_ratio"], 2)}x, '
          f'compile {_models.fmt(r["compile_ratio"], 2)}x')
  if goal_lines:
    goal_lines.insert(0, '\nGoal, DP step <= 2x non-private on CPU:')
  return '\n'.join(lines), '\n'.join(goal_lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='wrn-16-4',
                      help="a models.build_model name, e.g. 'wrn-16-4' or a "
                      "small 'wrn-10-1' for tests")
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=10,
                      help='timed steps per configuration')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed steps after compilation')
  parser.add_argument('--max-seconds', type=float, default=60.0,
                      help='stop timing a configuration after this long')
  parser.add_argument('--rounds', type=int, default=1,
                      help='interleave the configurations this many times '
                      "and keep each one's best numbers")
  parser.add_argument('--configs', default=','.join(DEFAULT),
                      help='comma-separated, from ' + ','.join(CONFIGS))
  parser.add_argument('--out', help='also write the markdown here')
  parser.add_argument('--json', help="write the results as JSON here ('-': "
                      'stdout)')
  parser.add_argument('--child', choices=CONFIGS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if (args.steps < 1 or args.warmup < 0 or args.rounds < 1
      or args.batch_size < 1 or args.image_size < 4):
    parser.error('--steps, --rounds and --batch-size must be >= 1, --warmup '
                 '>= 0, --image-size >= 4')

  if args.child:
    print(json.dumps(_child(args.child, args)))
    return

  configs = [c for c in args.configs.split(',') if c]
  unknown = sorted(set(configs) - set(CONFIGS))
  if unknown or not configs:
    parser.error(f'--configs must be among {CONFIGS}, got {unknown}')
  results, failed = run(configs, args)
  header, goals = summary(results)
  text = header + '\n' + markdown_table(results) + '\n' + goals
  _models.emit(text, results, failed, args)


if __name__ == '__main__':
  main()
