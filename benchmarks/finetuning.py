"""DP LoRA fine-tuning step against the non-private LoRA step, same model.

The model is the NNX GPT of ``examples/nnx_gpt.py`` with rank-r LoRA
adapters (``nnx.LoRA`` on the attention and MLP projections); only the
adapters (``nnx.LoRAParam``) are trained, through ``flax_api.nnx_loss(...,
trainable=nnx.LoRAParam)``: the frozen weights are constants of the loss.
The loss of one sequence is its mean next-token cross-entropy over the
non-padding tokens (``lm_finetuning.sequence_loss``); the batch has right
padding (sequences of random lengths between half and all of the context).

Configurations, each in its own process (its own peak RSS and compile
time), on the same model, batch and optimizer (Adam on the adapters):

* ``non_private``: gradient of the batch-mean loss + Adam.
* ``floor``: the same plus Gaussian noise on every adapter coordinate (the
  cost of a DP step if clipping were free).
* ``dp_auto``: ``clipped_grad(method='auto')`` (ghost norms and
  book-keeping for the adapters' matmuls) + Gaussian noise + Adam.
* ``dp_vmap``: ``clipped_grad(method='vectorized')`` + noise + Adam.

Each process compiles the jitted step (timed), runs ``--warmup`` untimed
steps, then times up to ``--steps`` steps (fewer once ``--max-seconds`` have
elapsed) and reports the median, its own peak RSS (``VmHWM``) and the step's
floating-point operations as XLA counts them (``cost_analysis`` of the
lowered step: a measure of the work that machine load does not change).
Ratios are to ``non_private`` of the same run; the goal for the DP LoRA step
is <= 1.3x time and <= 1.2x peak RSS. On a shared machine, ``--rounds N``
runs the configurations N times, interleaved, and keeps each one's best
numbers.

Usage::

  python benchmarks/finetuning.py [--layers 4 --embed-dim 256 --context 128
      --batch-size 32 --rank 8] [--steps 20] [--out table.md] [--json r.json]
  python benchmarks/finetuning.py --quick --layers 1 --embed-dim 32 \
      --context 16 --batch-size 4
"""

import argparse
import importlib.util
import json
import logging
import os
import sys

import _models

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), 'examples')

CONFIGS = ('non_private', 'floor', 'dp_auto', 'dp_vmap')
WHAT = {
    'non_private': 'grad of the mean loss + Adam on the adapters',
    'floor': 'non_private + Gaussian noise on the adapters',
    'dp_auto': "clipped_grad(method='auto') + noise + Adam",
    'dp_vmap': "clipped_grad(method='vectorized') + noise + Adam",
}
METHODS = {'dp_auto': 'auto', 'dp_vmap': 'vectorized'}
GOALS = {'median_ratio': 1.3, 'peak_ratio': 1.2}
RATIOS = {
    'median_ms': 'median_ratio', 'compile_s': 'compile_ratio',
    'peak_rss_mb': 'peak_ratio', 'gflops': 'gflop_ratio',
}
SHAPE_ARGS = ('layers', 'embed_dim', 'heads', 'context', 'batch_size', 'rank')


def _load_gpt():
  spec = importlib.util.spec_from_file_location(
      'nnx_gpt', os.path.join(EXAMPLES, 'nnx_gpt.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def build(shape, seed=0):
  """``(model, params, loss, inputs, labels)`` for the benchmark's shape.

  ``loss(params, (inputs, labels))`` is the mean over the leading axis of
  the per-sequence losses, so ``clipped_grad`` (one sequence at a time) and
  the non-private gradient (the whole batch) use the same function.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from jax_privacy import flax_api  # pylint: disable=g-import-not-at-top
  from jax_privacy import lm_finetuning  # pylint: disable=g-import-not-at-top

  gpt = _load_gpt()
  config = gpt.GPTConfig(
      vocab_size=gpt.VOCAB_SIZE, context_length=shape['context'],
      num_layers=shape['layers'], num_heads=shape['heads'],
      embed_dim=shape['embed_dim'], mlp_dim=4 * shape['embed_dim'],
      lora_rank=shape['rank'],
  )
  model = gpt.GPT(config, rngs=nnx.Rngs(seed))
  params, _ = flax_api.nnx_split_params(model, trainable=nnx.LoRAParam)

  def per_example_loss(logits, labels):
    targets, mask = labels
    return lm_finetuning.sequence_loss(
        logits, targets, mask, reduction='mean'
    )

  loss = flax_api.nnx_loss(model, per_example_loss, trainable=nnx.LoRAParam)
  rng = np.random.default_rng(seed)
  batch, context = shape['batch_size'], shape['context']
  tokens = rng.integers(0, 256, size=(batch, context + 1))
  lengths = rng.integers(context // 2 + 1, context + 2, size=batch)
  positions = np.arange(context + 1)
  tokens = np.where(positions < lengths[:, None], tokens, gpt.PAD_ID)
  inputs = jnp.asarray(tokens[:, :-1], jnp.int32)
  targets = jnp.asarray(tokens[:, 1:], jnp.int32)
  mask = jnp.asarray(positions[1:] < lengths[:, None])
  return model, params, loss, inputs, (targets, mask)


def _child(config, shape, steps, warmup, max_seconds):
  """Runs one configuration in this process; returns its result dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from jax_privacy import clipping  # pylint: disable=g-import-not-at-top
  from jax_privacy import noise_addition  # pylint: disable=g-import-not-at-top

  records = []

  class Keep(logging.Handler):

    def emit(self, record):
      records.append(record.getMessage())

  logger = logging.getLogger('jax_privacy')
  logger.setLevel(logging.INFO)
  logger.addHandler(Keep())

  _, params, loss, inputs, labels = build(shape)
  batch = shape['batch_size']
  if config in ('non_private', 'floor'):
    grad_fn = jax.grad(lambda p, x, y: loss(p, (x, y)))
  else:
    clipped = clipping.clipped_grad(
        loss, l2_clip_norm=1.0, batch_argnums=1, normalize_by=batch,
        method=METHODS[config],
    )
    grad_fn = lambda p, x, y: clipped(p, (x, y))
  optimizer = optax.adam(1e-3)
  if config != 'non_private':
    optimizer = optax.chain(
        noise_addition.gaussian_privatizer(
            stddev=1.0 / batch, prng_key=jax.random.key(1)
        ),
        optimizer,
    )
  state = optimizer.init(params)

  step = _models.jit_step(grad_fn, optimizer)
  cost = step.lower(params, state, inputs, labels).cost_analysis()
  result = _models.jax_step_result(
      step, params, state, inputs, labels, steps, warmup, max_seconds
  )
  result['gflops'] = (cost or {}).get('flops', 0.0) / 1e9 or None
  result['own_peak_rss_mb'] = _models.own_peak_rss_mb()
  result['trained_parameters'] = sum(
      leaf.size for leaf in jax.tree_util.tree_leaves(params)
  )
  result['versions'] = {'jax': jax.__version__}
  if records:
    result['log'] = records
  return result


def _child_command(config, shape, args):
  command = [
      sys.executable, os.path.abspath(__file__), '--child', config,
      '--steps', str(args.steps), '--warmup', str(args.warmup),
      '--max-seconds', str(args.max_seconds),
  ]
  for name in SHAPE_ARGS:
    command += ['--' + name.replace('_', '-'), str(shape[name])]
  return command


def run(configs, shape, args):
  """Runs each configuration in a child; returns ``(results, failed)``.

  With ``args.rounds > 1`` each configuration keeps its lowest median,
  compile time and peak RSS over the rounds.
  """
  best, failed = {}, []
  for config in [c for _ in range(args.rounds) for c in configs]:
    result = _models.child_result(
        config, _child_command(config, shape, args)
    )
    if result is None:
      failed.append(config)
      continue
    _models.keep_best(best, config, result)
  results = []
  base = best.get('non_private')
  for config in configs:
    if config not in best:
      continue
    result = dict(best[config], config=config, what=WHAT[config], **shape)
    for key, ratio in RATIOS.items():
      ok = base and result.get(key) and base.get(key)
      result[ratio] = (
          result[key] / base[key] if ok else None
      )
    results.append(result)
  return results, failed


def describe(shape):
  return (
      f"NNX GPT {shape['layers']}x d{shape['embed_dim']}, "
      f"{shape['heads']} heads, context {shape['context']}, LoRA rank "
      f"{shape['rank']}, batch {shape['batch_size']}"
  )


def markdown_table(results):
  """One row per configuration: time, compile and peak RSS with ratios."""
  fmt = _models.fmt
  lines = [
      '| config | median ms | ratio | compile s | ratio | peak RSS MB '
      '| ratio | GFLOP | ratio | steps |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    lines.append(
        f"| {r['config']} | {fmt(r['median_ms'], 1)} "
        f"| {fmt(r['median_ratio'], 2)} | {fmt(r['compile_s'], 2)} "
        f"| {fmt(r['compile_ratio'], 2)} | {fmt(r['peak_rss_mb'], 0)} "
        f"| {fmt(r['peak_ratio'], 2)} | {r['gflops'] or 0:.3g} "
        f"| {fmt(r['gflop_ratio'], 2)} | {r['steps']} |"
    )
  return '\n'.join(lines)


def goals(results):
  """Lines checking the DP LoRA step (``dp_auto``) against the goals."""
  row = next((r for r in results if r['config'] == 'dp_auto'), None)
  if row is None or row['median_ratio'] is None:
    return ''
  checks = []
  for name, key in (('time', 'median_ratio'), ('peak RSS', 'peak_ratio')):
    value, limit = row[key], GOALS[key]
    verdict = 'met' if value <= limit else f'missed by {value - limit:.2f}x'
    checks.append(f'{name} {value:.2f}x (<= {limit}x: {verdict})')
  return '\n\nGoals (dp_auto vs non_private): ' + '; '.join(checks)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--embed-dim', type=int, default=256)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--context', type=int, default=128)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--rank', type=int, default=8)
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps per configuration (default 20)')
  parser.add_argument('--warmup', type=int, default=None,
                      help='untimed steps after compilation (default 2)')
  parser.add_argument('--max-seconds', type=float, default=None,
                      help='stop timing a configuration after this long '
                      '(default 60)')
  parser.add_argument('--rounds', type=int, default=1,
                      help='interleave the configurations this many times '
                      "and keep each one's best numbers")
  parser.add_argument('--quick', action='store_true',
                      help='smoke test: 3 steps, 1 warm-up, 10 s at most')
  parser.add_argument(
      '--configs', default=','.join(CONFIGS),
      help='comma-separated, from ' + ','.join(CONFIGS),
  )
  parser.add_argument('--out', help='also write the markdown table here')
  parser.add_argument('--json', help="write the results as JSON here ('-': "
                      'stdout)')
  parser.add_argument('--child', choices=CONFIGS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  quick = (3, 1, 10.0) if args.quick else (20, 2, 60.0)
  args.steps = quick[0] if args.steps is None else args.steps
  args.warmup = quick[1] if args.warmup is None else args.warmup
  args.max_seconds = quick[2] if args.max_seconds is None else args.max_seconds
  if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
    parser.error('--steps and --rounds must be >= 1, --warmup >= 0')
  shape = {name: getattr(args, name) for name in SHAPE_ARGS}
  for name, value in shape.items():
    if value < 1:
      parser.error(f'--{name.replace("_", "-")} must be >= 1, got {value}')
  if args.embed_dim % args.heads:
    parser.error('--embed-dim must be a multiple of --heads')

  if args.child:
    print(json.dumps(_child(args.child, shape, args.steps, args.warmup,
                            args.max_seconds)))
    return

  configs = [c for c in args.configs.split(',') if c]
  unknown = sorted(set(configs) - set(CONFIGS))
  if unknown:
    parser.error(f'--configs must be among {CONFIGS}, got {unknown}')
  results, failed = run(configs, shape, args)
  text = (
      describe(shape) + '\n\n' + markdown_table(results) + '\n\n'
      + '\n'.join(f"- `{r['config']}`: {r['what']}" for r in results)
      + goals(results)
  )
  _models.emit(text, results, failed, args)


if __name__ == '__main__':
  main()
