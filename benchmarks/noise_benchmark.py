"""Benchmark: the cost of drawing Gaussian noise, the floor of a DP step.

Times jitted draws of float32 N(0, 1) noise shaped like the parameters of an
MLP 784-512-512-10 (669,706 values), for several ways of drawing it, and the
privatizer's update and a non-private SGD step on the same model for scale.
Configurations are interleaved round by round and reported as the median
over rounds of (config time / baseline time in the same round), so load from
other processes on a shared machine cancels out of the ratios.

Run: ``python benchmarks/noise_benchmark.py [--rounds 7] [--reps 50]``.
"""

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy import noise_addition

MLP_SHAPES = {
    'w1': (784, 512),
    'b1': (512,),
    'w2': (512, 512),
    'b2': (512,),
    'w3': (512, 10),
    'b3': (10,),
}
BATCH = 256


def _specs(dtype=jnp.float32):
  return {k: jax.ShapeDtypeStruct(s, dtype) for k, s in MLP_SHAPES.items()}


def _draw_jax_normal_per_leaf(key):
  keys = jax.random.split(key, len(MLP_SHAPES))
  return {
      name: jax.random.normal(k, shape)
      for k, (name, shape) in zip(keys, MLP_SHAPES.items())
  }


def _draw_jax_normal_flat_then_split(key):
  sizes = [int(np.prod(s)) for s in MLP_SHAPES.values()]
  flat = jax.random.normal(key, (sum(sizes),))
  pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
  return {
      name: piece.reshape(shape)
      for piece, (name, shape) in zip(pieces, MLP_SHAPES.items())
  }


def _draw_ours(key):
  return noise_addition._standard_normal_tree(key, _specs())


def _bits_jax(key):
  keys = jax.random.split(key, len(MLP_SHAPES))
  return {
      name: jax.random.bits(k, shape, jnp.uint32)
      for k, (name, shape) in zip(keys, MLP_SHAPES.items())
  }


def _bits_ours(key):
  keys = jax.random.split(key, len(MLP_SHAPES))
  return {
      name: noise_addition._random_bits(k, int(np.prod(shape)), None)
      for k, (name, shape) in zip(keys, MLP_SHAPES.items())
  }


def _mlp_loss(params, x, y):
  h = jax.nn.relu(x @ params['w1'] + params['b1'])
  h = jax.nn.relu(h @ params['w2'] + params['b2'])
  logits = h @ params['w3'] + params['b3']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _time_ms(fn, args, reps):
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _compile(fn, args):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  return compiled, 1e3 * (time.perf_counter() - start)


def _configs():
  """Returns {name: (function, args)}; the first entry is the baseline."""
  key = jax.random.key(0)
  rbg_key = jax.random.key(0, impl='rbg')
  unsafe_rbg_key = jax.random.key(0, impl='unsafe_rbg')
  params = {
      k: 0.01 * jax.random.normal(jax.random.key(i), s)
      for i, (k, s) in enumerate(MLP_SHAPES.items())
  }
  x = jax.random.normal(jax.random.key(10), (BATCH, 784))
  y = jax.random.randint(jax.random.key(11), (BATCH,), 0, 10)
  sgd = optax.sgd(0.1)
  private = optax.chain(
      noise_addition.gaussian_privatizer(stddev=1.0, prng_key=key), sgd
  )

  def sgd_step(opt):
    def step(params, opt_state, x, y):
      grads = jax.grad(_mlp_loss)(params, x, y)
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return step

  privatizer = noise_addition.gaussian_privatizer(stddev=1.0, prng_key=key)
  zeros = jax.tree.map(jnp.zeros_like, params)

  def add_only(grads):
    return jax.tree.map(lambda g: g + 1.0, grads)

  def reference_update(grads, key):
    noise = _draw_jax_normal_per_leaf(key)
    return jax.tree.map(lambda g, z: g + z, grads, noise)

  return {
      'draw: jax.random.normal per leaf (baseline)': (
          _draw_jax_normal_per_leaf,
          (key,),
      ),
      'draw: jax.random.normal flat, then split': (
          _draw_jax_normal_flat_then_split,
          (key,),
      ),
      'draw: rbg normal per leaf': (_draw_jax_normal_per_leaf, (rbg_key,)),
      'draw: unsafe_rbg normal per leaf': (
          _draw_jax_normal_per_leaf,
          (unsafe_rbg_key,),
      ),
      'draw: ours (fused threefry + inverse CDF)': (_draw_ours, (key,)),
      'bits: jax.random.bits (rolled threefry loop)': (_bits_jax, (key,)),
      'bits: ours (the same bits, fused threefry)': (_bits_ours, (key,)),
      'add: grads + constant (no noise)': (add_only, (zeros,)),
      'add: grads + jax.random.normal': (reference_update, (zeros, key)),
      'add: gaussian_privatizer.update': (
          privatizer.update,
          (zeros, privatizer.init(zeros)),
      ),
      'step: non-private SGD': (
          sgd_step(sgd),
          (params, sgd.init(params), x, y),
      ),
      'step: SGD + gaussian_privatizer': (
          sgd_step(private),
          (params, private.init(params), x, y),
      ),
  }


def _odd_size_probe(reps):
  """XLA's CPU loops over odd-length 1-D arrays are several times slower.

  Both jax.random and our draw hit it; leaves of two or more dimensions
  mostly do not.
  """
  key = jax.random.key(0)
  rows = []
  for size in (669_706, 669_707, 334_853, 334_854):
    fn = jax.jit(lambda k, n=size: jax.random.bits(k, (n,), jnp.uint32))
    jax.block_until_ready(fn(key))
    rows.append((size, _time_ms(fn, (key,), reps)))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--reps', type=int, default=50)
  args = parser.parse_args()

  num_values = sum(int(np.prod(s)) for s in MLP_SHAPES.values())
  print(
      f'jax {jax.__version__}, {jax.devices()[0].platform}, '
      f'threefry_partitionable={jax.config.jax_threefry_partitionable}, '
      f'{num_values} float32 values, median of {args.reps} calls per round, '
      f'{args.rounds} rounds'
  )
  compiled = {}
  compile_ms = {}
  for name, (fn, fn_args) in _configs().items():
    compiled[name], compile_ms[name] = _compile(fn, fn_args)
    compiled[name] = (compiled[name], fn_args)

  baseline = next(iter(compiled))
  per_round = {name: [] for name in compiled}
  for _ in range(args.rounds):
    for name, (fn, fn_args) in compiled.items():
      per_round[name].append(_time_ms(fn, fn_args, args.reps))

  print(f"{'configuration':46s} {'ms':>7s} {'ratio':>7s} {'compile ms':>11s}")
  for name, times in per_round.items():
    ratios = [t / b for t, b in zip(times, per_round[baseline])]
    print(
        f'{name:46s} {statistics.median(times):7.2f} '
        f'{statistics.median(ratios):6.2f}x {compile_ms[name]:11.0f}'
    )
  step = statistics.median(per_round['step: non-private SGD'])
  private = statistics.median(per_round['step: SGD + gaussian_privatizer'])
  print(f'SGD + privatizer / non-private SGD step: {private / step:.2f}x')
  print('odd-length probe (jax.random.bits uint32, flat):')
  for size, ms in _odd_size_probe(args.reps):
    print(f"  n={size:>7d} ({'odd' if size % 2 else 'even'}): {ms:6.2f} ms")
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'peak RSS of the benchmark process: {peak_mb:.0f} MB')


if __name__ == '__main__':
  main()
