"""Benchmark models in plain JAX, and a timing loop shared by the runners.

Imported by ``benchmarks/clipping.py`` (our library, project venv) and by
``benchmarks/_peer_jax_privacy.py`` (the original JAX Privacy 2.0, in its own
venv), so that both time the same functions. It imports no ``jax_privacy``
and imports JAX only inside the builders, so the PyTorch peer runner can use
``time_loop`` without JAX installed.

Each builder returns ``(params, loss, x, y)``: ``loss(params, x, y)`` is the
mean loss over the leading (batch) axis of ``x`` and ``y``, so that
``clipped_grad`` (which hands it one example with a leading axis of size 1)
sees the per-example loss. Shapes:

* ``mlp``: 784-512-512-10, ReLU, softmax cross-entropy (669,706 parameters).
* ``cnn``: 3x3 conv 3->32, ReLU, 2x2 max-pool, 3x3 conv 32->64, ReLU, 2x2
  max-pool, dense 4096->10 on 32x32x3 images (60,362 parameters).
* ``transformer``: token + positional embeddings, 2 pre-norm encoder layers
  (d=128, 4 heads, MLP 512, GELU), output projection to a vocabulary of
  1000, next-token cross-entropy, sequence 64 (659,712 parameters).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Default batch size per model.
BATCH_SIZES = {'mlp': 256, 'cnn': 128, 'transformer': 32}
DESCRIPTIONS = {
    'mlp': 'MLP 784-512-512-10',
    'cnn': 'small CNN 32x32x3',
    'transformer': 'Transformer enc. 2x d128, seq 64, vocab 1000',
}


def mlp(batch_size):
  """MLP 784-512-512-10 with a batch of Gaussian inputs and one-hot labels."""
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


def cnn(batch_size):
  """Two 3x3 convolutions with max-pooling and a dense head, NHWC."""
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

  def pool(h):
    return jax.lax.reduce_window(
        h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID'
    )

  def loss(params, x, y):
    h = jax.lax.conv_general_dilated(
        x, params['c1'], (1, 1), 'SAME', dimension_numbers=dims
    )
    h = pool(jax.nn.relu(h + params['b1']))
    h = jax.lax.conv_general_dilated(
        h, params['c2'], (1, 1), 'SAME', dimension_numbers=dims
    )
    h = pool(jax.nn.relu(h + params['b2']))
    logits = h.reshape((h.shape[0], -1)) @ params['w'] + params['b']
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))

  x = jax.random.normal(keys[3], (batch_size, 32, 32, 3))
  y = jax.nn.one_hot(jnp.arange(batch_size) % 10, 10)
  return params, loss, x, y


def transformer(batch_size, vocab=1000, d=128, seq=64, heads=4, layers=2):
  """A pre-norm Transformer encoder on random token ids, next-token loss."""
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
              'wo': dense(d, d), 'w1': dense(d, 4 * d),
              'b1': jnp.zeros(4 * d), 'w2': dense(4 * d, d),
              'b2': jnp.zeros(d),
              'ln1': (jnp.ones(d), jnp.zeros(d)),
              'ln2': (jnp.ones(d), jnp.zeros(d)),
          }
          for _ in range(layers)
      ],
  }

  def layer_norm(x, scale_bias):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale_bias[0] + (
        scale_bias[1]
    )

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
    logp = jax.nn.log_softmax(x @ params['out'])
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))

  ids = jax.random.randint(next(keys), (batch_size, seq), 0, vocab)
  labels = jnp.roll(ids, -1, axis=1)
  return params, loss, ids, labels


BUILDERS = {'mlp': mlp, 'cnn': cnn, 'transformer': transformer}


def own_peak_rss_mb():
  """This process's own peak resident memory in MB (``VmHWM``).

  ``ru_maxrss`` of a child also counts its parent's memory at fork time
  (Linux keeps the high-water mark across ``exec``), so a child started by
  a large process would report the parent's size. ``VmHWM`` is the
  high-water mark of the memory map made at ``exec``: the child's own.
  Returns None where /proc is not available.
  """
  try:
    with open('/proc/self/status', encoding='ascii') as status:
      for line in status:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def time_loop(step, steps, warmup, max_seconds, min_steps=3):
  """Times ``step()`` (which must block until its result is ready).

  Runs ``warmup`` untimed calls, then up to ``steps`` timed ones, stopping
  early once ``max_seconds`` of timed calls have elapsed and at least
  ``min(min_steps, steps)`` were timed.

  Returns:
    A dict with ``median_ms``, ``min_ms``, ``mean_ms``, ``steps`` (number of
    timed calls) and ``first_step_s`` (the first warm-up call, or the first
    timed call without warm-up).
  """
  first = None
  for _ in range(warmup):
    start = time.perf_counter()
    step()
    if first is None:
      first = time.perf_counter() - start
  times = []
  begin = time.perf_counter()
  while len(times) < steps:
    start = time.perf_counter()
    step()
    times.append((time.perf_counter() - start) * 1e3)
    if first is None:
      first = times[0] / 1e3
    if (time.perf_counter() - begin > max_seconds
        and len(times) >= min(min_steps, steps)):
      break
  return {
      'median_ms': statistics.median(times),
      'min_ms': min(times),
      'mean_ms': statistics.fmean(times),
      'steps': len(times),
      'first_step_s': first,
  }


def jax_step_result(step, params, state, x, y, steps, warmup, max_seconds):
  """Compiles and times ``step(params, state, x, y) -> (params, state)``.

  ``step`` is a jitted function. Compile time is that of
  ``step.lower(...).compile()`` (tracing, lowering and XLA compilation);
  the compiled step is then timed by :func:`time_loop`, feeding each step's
  outputs to the next.
  """
  import jax  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  compiled = step.lower(params, state, x, y).compile()
  compile_s = time.perf_counter() - start
  carry = [params, state]

  def one():
    carry[0], carry[1] = compiled(carry[0], carry[1], x, y)
    jax.block_until_ready(carry)

  result = time_loop(one, steps, warmup, max_seconds)
  result['compile_s'] = compile_s
  return result


def fmt(value, digits):
  """A table cell: '-' for None, thousands separators from 1,000 up."""
  if value is None:
    return '-'
  if digits == 0 or abs(value) >= 1000:
    return f'{value:,.0f}'
  return f'{value:.{digits}f}'


def emit(text, results, failed, args):
  """Prints the report, writes ``--out``/``--json``, exits 1 on failures."""
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  if args.json == '-':
    print(json.dumps(results, indent=1))
  elif args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  if failed:
    sys.exit('failed: ' + ', '.join(failed))


def jit_step(grad_fn, optimizer):
  """One jitted update: ``step(params, state, x, y) -> (params, state)``.

  ``grad_fn(params, x, y)`` returns the (clipped, or plain) gradient;
  ``optimizer`` is an optax transformation (the noise, if any, is part of
  it).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def step(params, state, x, y):
    grads = grad_fn(params, x, y)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def run_child(command, env=None, timeout=1800.0):
  """Runs ``command``; returns (returncode, stdout, stderr, peak RSS MB).

  The peak RSS is the child's ``ru_maxrss``, read with ``os.wait4``. On
  Linux it is at least the parent's RSS at fork time, so the children also
  report their own high-water mark (:func:`own_peak_rss_mb`), which
  :func:`child_result` prefers.
  """
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile(
      'w+'
  ) as err:
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        command, stdout=out, stderr=err, cwd=HERE, env=env, text=True
    )
    deadline = time.monotonic() + timeout
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if time.monotonic() > deadline:
        proc.kill()
        pid, status, usage = os.wait4(proc.pid, 0)
        break
      time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return proc.returncode, out.read(), err.read(), usage.ru_maxrss / 1024


def child_result(label, command, env=None):
  """Runs one benchmark child and reads the JSON result it prints last.

  Adds ``peak_rss_mb`` (the child's own high-water mark, else its
  ``ru_maxrss``) and ``wall_s``, and prints a progress line to stderr.

  Returns:
    The result dict, or None if the child failed (its last stderr line is
    printed).
  """
  start = time.perf_counter()
  code, out, err, rss = run_child(command, env=env)
  wall = time.perf_counter() - start
  if code:
    tail = (err.strip().splitlines() or ['?'])[-1]
    print(f'{label} failed ({code}): {tail}', file=sys.stderr, flush=True)
    return None
  result = json.loads(out.strip().splitlines()[-1])
  result['peak_rss_mb'] = result.pop('own_peak_rss_mb', None) or rss
  result['wall_s'] = wall
  print(
      f"{label}: {result['median_ms']:.1f} ms/step ({result['steps']} "
      f'steps, {wall:.0f} s)',
      file=sys.stderr, flush=True,
  )
  return result


BEST_OF_ROUNDS = ('median_ms', 'min_ms', 'compile_s', 'peak_rss_mb')


def keep_best(best, config, result, keys=BEST_OF_ROUNDS):
  """Stores ``result`` as ``best[config]``, keeping the lowest ``keys``
  over the rounds run so far."""
  old = best.get(config, {})
  for key in keys:
    if old.get(key) is not None and result.get(key) is not None:
      result[key] = min(old[key], result[key])
  best[config] = result
