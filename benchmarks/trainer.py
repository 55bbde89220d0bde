"""DPTrainer against a hand-written jitted DP-SGD loop on the same model.

Both run the same mechanism (Poisson batches, per-example clipping, Gaussian
noise, SGD) on an MLP over synthetic data. The hand-written loop pads every
batch to one size drawn up front (the largest of the run), so it compiles
once and does no gradient accumulation; the trainer pads to a multiple of its
physical batch size. The script prints steps per second of each, the time of each relative to the hand-written loop,
and the padding waste (padded slots over real examples) of each.

Usage: ``python benchmarks/trainer.py [--steps 100] [--batch-size 256]``.
Ratios within one run only: the machines are shared.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy import batch_selection
from jax_privacy import clipping
from jax_privacy import noise_addition
from jax_privacy import training
from jax_privacy.experimental import execution_plan

NUM_EXAMPLES = 20_000


def _loss(params, example, key=None):
  del key
  x, y = example
  h = jax.nn.relu(x @ params['w1'] + params['b1'])
  logits = h @ params['w2'] + params['b2']
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))


def _setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(NUM_EXAMPLES, 784)).astype(np.float32)
  y = np.eye(10, dtype=np.float32)[rng.integers(10, size=NUM_EXAMPLES)]
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
      'w1': jax.random.normal(k1, (784, 256)) / 28.0,
      'b1': jnp.zeros(256),
      'w2': jax.random.normal(k2, (256, 10)) / 16.0,
      'b2': jnp.zeros(10),
  }
  return x, y, params


def _hand_written(config, x, y, params):
  grad_fn = clipping.clipped_grad(
      lambda p, xb, yb: _loss(p, (xb, yb)),
      l2_clip_norm=config.l2_clip_norm,
      batch_argnums=(1, 2),
      normalize_by=config.expected_batch_size,
  )
  optimizer = optax.chain(
      noise_addition.gaussian_privatizer(
          stddev=config.noise_multiplier * config.sensitivity,
          prng_key=jax.random.key(1),
      ),
      optax.sgd(0.1),
  )

  @jax.jit
  def step(params, opt_state, xb, yb, pad):
    grads = grad_fn(params, xb, yb, is_padding_example=pad)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  sampler = batch_selection.CyclicPoissonSampling(
      sampling_prob=config.sampling_prob, iterations=config.iterations
  )
  batches = list(sampler.batch_iterator(NUM_EXAMPLES, rng=2))
  size = max(len(b) for b in batches)
  opt_state = optimizer.init(params)
  real = padded = 0
  start = None
  for i, indices in enumerate(batches):
    if i == 1:
      jax.block_until_ready(params)
      start = time.perf_counter()
    gather = np.zeros(size, np.int64)
    gather[: len(indices)] = indices
    pad = np.arange(size) >= len(indices)
    params, opt_state = step(params, opt_state, x[gather], y[gather], pad)
    real += len(indices)
    padded += size
  jax.block_until_ready(params)
  elapsed = time.perf_counter() - start
  return (len(batches) - 1) / elapsed, padded / real - 1


def _trainer(config, x, y, params, physical_batch_size):
  trainer = training.DPTrainer(
      loss_fn=_loss,
      config=config,
      optimizer=optax.sgd(0.1),
      sampling_seed=2,
      physical_batch_size=physical_batch_size,
  )
  state = trainer.fit((x, y), trainer.init(params), num_steps=1)
  jax.block_until_ready(state.params)
  start = time.perf_counter()
  state = trainer.fit((x, y), state)
  jax.block_until_ready(state.params)
  elapsed = time.perf_counter() - start
  sampler = trainer.plan.batch_selection_strategy
  sizes = [len(b) for b in sampler.batch_iterator(NUM_EXAMPLES, rng=2)]
  slots = sum(
      max(1, -(-s // physical_batch_size)) * physical_batch_size for s in sizes
  )
  return (config.iterations - 1) / elapsed, slots / sum(sizes) - 1


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--batch-size', type=int, default=256)
  args = parser.parse_args()
  x, y, params = _setup()
  config = execution_plan.DpsgdExecutionPlanConfig(
      iterations=args.steps,
      num_examples=NUM_EXAMPLES,
      expected_batch_size=args.batch_size,
      delta=1e-5,
      noise_multiplier=1.0,
      noise_seed=1,
  )
  hand_rate, hand_waste = _hand_written(config, x, y, params)
  print(f'steps={args.steps} expected batch={args.batch_size} (MLP 784-256-10)')
  print(f"{'loop':<34}{'steps/s':>9}{'time x':>8}{'padding':>9}")
  print(f"{'hand-written, one padded size':<34}{hand_rate:>9.1f}{1.0:>8.2f}"
        f'{hand_waste:>9.1%}')
  for physical in (args.batch_size // 4, args.batch_size // 2 + args.batch_size // 4):
    rate, waste = _trainer(config, x, y, params, physical)
    print(f"{f'DPTrainer, physical batch {physical}':<34}{rate:>9.1f}"
          f'{hand_rate / rate:>8.2f}{waste:>9.1%}')


if __name__ == '__main__':
  main()
