"""Per-example clipping benchmark: DP steps against the non-private step.

For each model, in one run, each configuration in its own process (so that
its peak RSS and compile time are its own):

* ``non_private``: gradient of the mean loss + SGD (no privatizer).
* ``floor``: the same plus Gaussian noise for every parameter (what a DP
  step costs if clipping were free).
* ``dp_vmap``: ``clipped_grad(method='vectorized')`` (per-example gradients
  by ``jax.vmap``) + noise + SGD.
* ``dp_auto``: ``clipped_grad(method='auto')``, our fastest path (ghost norms
  and book-keeping where the layers allow) + noise + SGD. ``dp_ghost``
  (``method='ghost'``) can be asked for with ``--configs``.

With ``--peers``, on the same shapes, each in a separate virtual environment
that this script creates under ``benchmarks/.venvs/`` (on first use, from
PyPI; never imported by the library or the tests):

* ``jax_privacy_2.0``: the original JAX Privacy 2.0 (``jax-privacy==2.0.0``,
  with our JAX version), ``clipped_grad`` + ``gaussian_privatizer`` + SGD,
  on the same JAX functions (``_models.py``).
* ``opacus_non_private`` and ``opacus_ghost``: PyTorch 2.13.0 (CPU) without
  and with Opacus' ghost clipping (``grad_sample_mode='ghost'``), same layer
  shapes. ``opacus_hooks`` (per-sample gradients by hooks) can be asked for
  with ``--configs``.

Each process compiles (JAX: ``jit(step).lower(...).compile()``, timed),
runs ``--warmup`` untimed steps, then times up to ``--steps`` steps (fewer
once ``--max-seconds`` have elapsed, at least 3) and reports the median.
Peak RSS is the child's ``ru_maxrss`` (``os.wait4``). Ratios are to
``non_private`` of the same run, except Opacus' rows, which are to
``opacus_non_private`` (Opacus' overhead on its own framework).

Usage::

  python benchmarks/clipping.py [--model all] [--peers] [--steps 20]
      [--rounds 1] [--out table.md] [--json results.json]
  python benchmarks/clipping.py --quick --model mlp --batch-size 32

Compare ratios within one run only: absolute times vary across machines,
and on a shared machine even between runs minutes apart (``--rounds N``
interleaves the configurations N times and keeps each one's best numbers).
"""

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import _models

HERE = os.path.dirname(os.path.abspath(__file__))
VENVS = os.path.join(HERE, '.venvs')

OURS = ('non_private', 'floor', 'dp_vmap', 'dp_ghost', 'dp_auto')
PEERS = (
    'jax_privacy_2.0', 'opacus_non_private', 'opacus_ghost', 'opacus_hooks'
)
DEFAULT = ('non_private', 'floor', 'dp_vmap', 'dp_auto')
DEFAULT_PEERS = ('jax_privacy_2.0', 'opacus_non_private', 'opacus_ghost')
WHAT = {
    'non_private': 'JAX grad + SGD',
    'floor': 'JAX grad + Gaussian noise + SGD',
    'dp_vmap': "ours, clipped_grad(method='vectorized') + noise",
    'dp_ghost': "ours, clipped_grad(method='ghost') + noise",
    'dp_auto': "ours, clipped_grad(method='auto') + noise",
    'jax_privacy_2.0': 'original JAX Privacy 2.0, clipped_grad + noise',
    'opacus_non_private': 'PyTorch + SGD',
    'opacus_ghost': "Opacus, grad_sample_mode='ghost'",
    'opacus_hooks': "Opacus, grad_sample_mode='hooks'",
}
GOALS = {'mlp': 1.3, 'cnn': 1.6, 'transformer': 1.15}
METHODS = {'dp_vmap': 'vectorized', 'dp_ghost': 'ghost', 'dp_auto': 'auto'}


def _venv_specs():
  """The pip installs of each peer venv, in order (one ``pip`` call each)."""
  jax_version = importlib.metadata.version('jax')
  jaxlib_version = importlib.metadata.version('jaxlib')
  return {
      'jax_privacy': [[
          'jax-privacy==2.0.0', f'jax=={jax_version}',
          f'jaxlib=={jaxlib_version}',
      ]],
      # torch first, from its pinned CPU build, so that opacus' dependency on
      # torch is already met and pip pulls no other (CUDA) build.
      'opacus': [['torch==2.13.0'], ['opacus==1.6.0']],
  }


# Venvs whose creation failed in this run (not retried for every model).
_FAILED_VENVS = {}


def _venv_python(name):
  return os.path.join(VENVS, name, 'bin', 'python')


def ensure_venv(name):
  """Creates ``benchmarks/.venvs/<name>`` with its packages unless present.

  A file ``.ready`` holding the install spec marks a complete venv; a venv
  without it, or made for another spec, is removed and made again.

  Raises:
    RuntimeError: when a step of the creation fails (then again on later
      calls in this run, without retrying).

  Returns:
    The path of the venv's Python.
  """
  if name in _FAILED_VENVS:
    raise RuntimeError(_FAILED_VENVS[name])
  spec = _venv_specs()[name]
  path = os.path.join(VENVS, name)
  marker = os.path.join(path, '.ready')
  wanted = json.dumps(spec)
  if os.path.exists(marker):
    with open(marker) as f:
      if f.read() == wanted:
        return _venv_python(name)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.makedirs(VENVS, exist_ok=True)
  log_path = os.path.join(VENVS, name + '.log')
  print(f'creating {path} (log: {log_path}) ...', file=sys.stderr, flush=True)
  start = time.perf_counter()
  with open(log_path, 'w') as log:
    commands = [[sys.executable, '-m', 'venv', path]] + [
        [_venv_python(name), '-m', 'pip', 'install', *packages]
        for packages in spec
    ]
    for command in commands:
      log.write('$ ' + ' '.join(command) + '\n')
      log.flush()
      proc = subprocess.run(
          command, stdout=log, stderr=subprocess.STDOUT, check=False,
          env=_clean_env(),
      )
      if proc.returncode:
        _FAILED_VENVS[name] = (
            f'{" ".join(command)} failed ({proc.returncode}); see {log_path}'
        )
        raise RuntimeError(_FAILED_VENVS[name])
  with open(marker, 'w') as f:
    f.write(wanted)
  print(
      f'created {path} in {time.perf_counter() - start:.0f} s',
      file=sys.stderr, flush=True,
  )
  return _venv_python(name)


def _clean_env():
  """The environment for peer processes: no project paths leak in."""
  env = dict(os.environ)
  for key in ('PYTHONPATH', 'VIRTUAL_ENV', 'PYTHONHOME'):
    env.pop(key, None)
  return env


# Kept here too: other benchmarks and tests import it from this module.
run_child = _models.run_child


def _child_command(config, model, batch_size, args):
  """The command line that runs one configuration."""
  timing = [
      '--model', model, '--batch-size', str(batch_size),
      '--steps', str(args.steps), '--warmup', str(args.warmup),
      '--max-seconds', str(args.max_seconds),
  ]
  if config in OURS:
    return [sys.executable, os.path.abspath(__file__), '--child', config,
            *timing], None
  if config == 'jax_privacy_2.0':
    python = ensure_venv('jax_privacy')
    return [python, os.path.join(HERE, '_peer_jax_privacy.py'),
            *timing], _clean_env()
  python = ensure_venv('opacus')
  mode = config[len('opacus_'):]
  return [python, os.path.join(HERE, '_peer_opacus.py'), '--mode', mode,
          *timing], _clean_env()


def _child(config, model, batch_size, steps, warmup, max_seconds):
  """Runs one of our configurations in this process; returns its result."""
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

  params, loss, x, y = _models.BUILDERS[model](batch_size)
  if config in ('non_private', 'floor'):
    grad_fn = jax.grad(loss)
  else:
    grad_fn = clipping.clipped_grad(
        loss,
        l2_clip_norm=1.0,
        batch_argnums=(1, 2),
        normalize_by=batch_size,
        method=METHODS[config],
    )
  if config == 'non_private':
    optimizer = optax.sgd(0.1)
  else:
    optimizer = optax.chain(
        noise_addition.gaussian_privatizer(
            stddev=1.0 / batch_size, prng_key=jax.random.key(1)
        ),
        optax.sgd(0.1),
    )
  state = optimizer.init(params)

  step = _models.jit_step(grad_fn, optimizer)
  result = _models.jax_step_result(
      step, params, state, x, y, steps, warmup, max_seconds
  )
  result['own_peak_rss_mb'] = _models.own_peak_rss_mb()
  result['versions'] = {'jax': jax.__version__}
  if records:
    result['log'] = records
  return result


def _baseline(config):
  return 'opacus_non_private' if config.startswith('opacus') else (
      'non_private'
  )


def run_model(model, batch_size, configs, args):
  """Runs every configuration for one model.

  With ``args.rounds > 1`` the configurations run that many times,
  interleaved, and each keeps its lowest median, compile time and peak RSS.

  Returns:
    ``(results, failed)``: one result dict per configuration that ran, and
    the configurations that failed (once per failed round).
  """
  best = {}
  failed = []
  for _ in range(args.rounds):
    for config in configs:
      try:
        command, env = _child_command(config, model, batch_size, args)
      except RuntimeError as e:
        print(f'{model} {config}: {e}', file=sys.stderr, flush=True)
        failed.append(config)
        continue
      result = _models.child_result(f'{model} {config}', command, env=env)
      if result is None:
        failed.append(config)
        continue
      _models.keep_best(best, config, result)
  return finish(model, batch_size, configs, best), failed


def finish(model, batch_size, configs, best):
  """One result dict per configuration in ``best``, with ratios.

  Each ratio is to the row named by ``baseline`` (``non_private``, or
  ``opacus_non_private`` for Opacus' rows); ``None`` without it.
  """
  results = []
  for config in configs:
    if config not in best:
      continue
    result = dict(best[config], model=model, batch_size=batch_size,
                  config=config, what=WHAT[config],
                  baseline=_baseline(config))
    base = best.get(result['baseline'])
    for key in ('median_ms', 'compile_s', 'peak_rss_mb'):
      ok = base and result.get(key) and base.get(key)
      result[key.split('_')[0] + '_ratio'] = (
          result[key] / base[key] if ok else None
      )
    results.append(result)
  return results


def markdown_table(results):
  """The results as a markdown table, one row per model and configuration."""
  lines = [
      '| model, batch | config | median ms | ratio | compile s | ratio '
      '| peak RSS MB | ratio | steps |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  previous = None
  for r in results:
    label = f"{_models.DESCRIPTIONS[r['model']]}, {r['batch_size']}"
    lines.append(
        f"| {label if label != previous else ''} | {r['config']} "
        f"| {_models.fmt(r['median_ms'], 1)} | {_models.fmt(r['median_ratio'], 2)} "
        f"| {_models.fmt(r['compile_s'], 2)} | {_models.fmt(r['compile_ratio'], 2)} "
        f"| {_models.fmt(r['peak_rss_mb'], 0)} | {_models.fmt(r['peak_ratio'], 2)} "
        f"| {r['steps']} |"
    )
    previous = label
  return '\n'.join(lines)


def legend(results):
  """Lines describing the configurations and versions in ``results``."""
  lines = ['', 'Ratios: to `non_private` of the same model, except Opacus '
           'rows: to `opacus_non_private`.']
  seen = []
  for r in results:
    if r['config'] not in seen:
      seen.append(r['config'])
      lines.append(f"- `{r['config']}`: {r['what']}")
  versions = {}
  for r in results:
    for key, value in r.get('versions', {}).items():
      if key != 'threads':
        versions.setdefault(key, set()).add(str(value))
  lines.append('- versions: ' + ', '.join(
      f"{k} {'/'.join(sorted(v))}" for k, v in sorted(versions.items())
  ))
  return '\n'.join(lines)


def goals(results):
  """Lines checking the issue's goals against our fastest DP row per model.

  Goals, as ratios to ``non_private`` of the same run: time <= 1.3x (MLP),
  1.6x (CNN), 1.15x (Transformer); peak RSS <= 1.3x; compile <= 2x; and a
  lower time ratio than JAX Privacy 2.0's and than Opacus ghost's own.
  """
  lines = ['', '', 'Goals (our fastest DP row per model):']
  for model in _models.BUILDERS:
    rows = {r['config']: r for r in results if r['model'] == model}
    ours = [rows[c] for c in ('dp_auto', 'dp_ghost')
            if c in rows and rows[c]['median_ratio'] is not None]
    if not ours:
      continue
    best = min(ours, key=lambda r: r['median_ratio'])
    checks = []
    for name, key, limit in (
        ('time', 'median_ratio', GOALS[model]), ('peak RSS', 'peak_ratio', 1.3),
        ('compile', 'compile_ratio', 2.0)):
      value = best.get(key)
      if value is not None:
        verdict = 'met' if value <= limit else f'missed by {value - limit:.2f}x'
        checks.append(f'{name} {value:.2f}x (<= {limit}x: {verdict})')
    for peer in ('jax_privacy_2.0', 'opacus_ghost'):
      value = rows.get(peer, {}).get('median_ratio')
      if value is not None:
        verdict = 'faster' if best['median_ratio'] < value else 'NOT faster'
        checks.append(f'vs {peer} {value:.2f}x: {verdict}')
    lines.append(f"- {model} (`{best['config']}`): " + '; '.join(checks))
  return '\n'.join(lines) if len(lines) > 3 else ''


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      '--model', default='all', choices=tuple(_models.BUILDERS) + ('all',)
  )
  parser.add_argument(
      '--batch-size', type=int, default=None,
      help='default: 256 (mlp), 128 (cnn), 32 (transformer)',
  )
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps per configuration (default 20)')
  parser.add_argument('--warmup', type=int, default=None,
                      help='untimed steps after compilation (default 2)')
  parser.add_argument(
      '--max-seconds', type=float, default=None,
      help='stop timing a configuration after this long (default 60)',
  )
  parser.add_argument('--rounds', type=int, default=1,
                      help='interleave the configurations this many times '
                      'and keep each one\'s best numbers')
  parser.add_argument('--quick', action='store_true',
                      help='smoke test: 3 steps, 1 warm-up, 10 s at most')
  parser.add_argument('--peers', action='store_true',
                      help='also run JAX Privacy 2.0 and Opacus (creates '
                      'benchmarks/.venvs/ on first use)')
  parser.add_argument(
      '--configs', default=None,
      help='comma-separated, from ' + ','.join(OURS + PEERS) + ' (default: '
      + ','.join(DEFAULT) + ', plus ' + ','.join(DEFAULT_PEERS)
      + ' with --peers)',
  )
  parser.add_argument('--out', help='also write the markdown table here')
  parser.add_argument('--json', help="write the results as JSON here ('-': "
                      'stdout)')
  parser.add_argument('--child', choices=OURS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  quick = (3, 1, 10.0) if args.quick else (20, 2, 60.0)
  args.steps = quick[0] if args.steps is None else args.steps
  args.warmup = quick[1] if args.warmup is None else args.warmup
  args.max_seconds = quick[2] if args.max_seconds is None else args.max_seconds
  if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
    parser.error('--steps and --rounds must be >= 1, --warmup >= 0')

  if args.child:
    batch_size = args.batch_size or _models.BATCH_SIZES[args.model]
    print(json.dumps(_child(args.child, args.model, batch_size, args.steps,
                            args.warmup, args.max_seconds)))
    return

  if args.configs:
    configs = [c for c in args.configs.split(',') if c]
  else:
    configs = list(DEFAULT) + (list(DEFAULT_PEERS) if args.peers else [])
  unknown = sorted(set(configs) - set(OURS + PEERS))
  if unknown:
    parser.error(f'--configs must be among {OURS + PEERS}, got {unknown}')
  models = (
      tuple(_models.BUILDERS) if args.model == 'all' else (args.model,)
  )
  results, failed = [], []
  for model in models:
    batch_size = args.batch_size or _models.BATCH_SIZES[model]
    model_results, model_failed = run_model(model, batch_size, configs, args)
    results.extend(model_results)
    failed.extend(f'{model}/{config}' for config in model_failed)
  text = markdown_table(results) + '\n' + legend(results) + goals(results)
  _models.emit(text, results, failed, args)


if __name__ == '__main__':
  main()
