"""Times clipped_grad on a weight-standardized conv net: ghost vs vectorized.

A WRN-style stack of five 3x3 convolutions with weight standardization
(3->16, 16->32, 32->32 stride 2, 32->64 stride 2, 64->64), ReLU, global
average pooling and a dense head, batch 64 of 32x32x3 images. Prints, in one
run, the median (and minimum) ms per step of the non-private gradient and of
``clipping.clipped_grad`` with ``method='vectorized'``, ``'ghost'`` and
``'auto'``, and the ratios to the non-private step. Compare ratios within
one run only (shared machines are noisy).

Usage: ``python benchmarks/ghost_transforms.py [--steps 10] [--plain]
[--cpu-time]`` (``--plain``: the same net without weight standardization;
``--cpu-time``: the process's CPU time instead of wall time, which other
processes on a shared machine disturb less).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jax_privacy import clipping

LAYERS = ((3, 16, 1), (16, 32, 1), (32, 32, 2), (32, 64, 2), (64, 64, 1))


def _standardize(kernel, epsilon=1e-4):
  mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
  return (kernel - mean) * jax.lax.rsqrt(var + epsilon)


def build(batch_size, standardize):
  """``(params, loss, images, labels)`` of the benchmark net."""
  keys = jax.random.split(jax.random.key(0), len(LAYERS) + 2)
  params = {}
  for i, (cin, cout, _) in enumerate(LAYERS):
    params[f'conv{i}'] = {
        'kernel': jax.random.normal(keys[i], (3, 3, cin, cout)),
        'bias': jnp.zeros((cout,)),
    }
  params['head'] = {
      'kernel': jax.random.normal(keys[-2], (64, 10)) / 8,
      'bias': jnp.zeros((10,)),
  }

  def loss(params, images, labels):
    h = images
    for i, (_, _, stride) in enumerate(LAYERS):
      kernel = params[f'conv{i}']['kernel']
      kernel = _standardize(kernel) if standardize else kernel / 3
      h = jax.lax.conv_general_dilated(
          h, kernel, (stride, stride), 'SAME',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      )
      h = jax.nn.relu(h + params[f'conv{i}']['bias'])
    logits = jnp.mean(h, axis=(1, 2)) @ params['head']['kernel']
    logits = logits + params['head']['bias']
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, axis=-1))

  images = jax.random.normal(keys[-1], (batch_size, 32, 32, 3))
  labels = jax.nn.one_hot(jnp.arange(batch_size) % 10, 10)
  return params, loss, images, labels


def _time(fn, args, steps, clock):
  start = clock()
  jax.block_until_ready(fn(*args))
  compile_seconds = clock() - start
  times = []
  for _ in range(steps):
    start = clock()
    jax.block_until_ready(fn(*args))
    times.append(1000 * (clock() - start))
  return compile_seconds, statistics.median(times), min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--plain', action='store_true')
  parser.add_argument('--cpu-time', action='store_true')
  flags = parser.parse_args()
  params, loss, images, labels = build(flags.batch_size, not flags.plain)
  args = (params, images, labels)
  functions = {'non-private': jax.jit(jax.grad(loss))}
  for method in ('vectorized', 'ghost', 'auto'):
    functions[method] = jax.jit(
        clipping.clipped_grad(loss, l2_clip_norm=1.0, method=method)
    )
  base = None
  name = 'plain' if flags.plain else 'weight-standardized'
  clock = time.process_time if flags.cpu_time else time.perf_counter
  print(f'{name} conv net, batch {flags.batch_size}, 32x32x3, '
        f'{flags.steps} steps, {"CPU" if flags.cpu_time else "wall"} time')
  for label, fn in functions.items():
    compile_seconds, median, fastest = _time(fn, args, flags.steps, clock)
    base = base or median
    print(f'{label:>12}: median {median:8.1f} ms (min {fastest:8.1f}), '
          f'{median / base:5.2f}x, compile {compile_seconds:5.1f} s')


if __name__ == '__main__':
  main()
