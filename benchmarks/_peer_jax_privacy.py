"""Times one DP-SGD step of the original JAX Privacy 2.0 (peer runner).

Runs in the virtual environment that ``benchmarks/clipping.py --peers``
creates (``benchmarks/.venvs/jax_privacy``, ``jax-privacy==2.0.0`` from
PyPI), never in the project venv: ``jax_privacy`` here is the original
package. It uses only that package's documented public API
(``jax_privacy.clipping.clipped_grad`` and
``jax_privacy.noise_addition.gaussian_privatizer``), on the same model
functions as our runner (``_models.py``), and prints one JSON line.

Usage (by ``clipping.py``): ``python _peer_jax_privacy.py --model mlp
--batch-size 256 --steps 20 --warmup 2 --max-seconds 60``.
"""

import argparse
import json
import os
import sys

import _models


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', required=True, choices=tuple(_models.BUILDERS))
  parser.add_argument('--batch-size', type=int, required=True)
  parser.add_argument('--steps', type=int, required=True)
  parser.add_argument('--warmup', type=int, required=True)
  parser.add_argument('--max-seconds', type=float, required=True)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax_privacy  # pylint: disable=g-import-not-at-top
  from jax_privacy import clipping  # pylint: disable=g-import-not-at-top
  from jax_privacy import noise_addition  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ours = os.path.join(project, 'jax_privacy') + os.sep
  if os.path.abspath(jax_privacy.__file__).startswith(ours):
    sys.exit('imported the project jax_privacy, not the original package')

  params, loss, x, y = _models.BUILDERS[args.model](args.batch_size)
  grad_fn = clipping.clipped_grad(
      loss,
      l2_clip_norm=1.0,
      batch_argnums=(1, 2),
      normalize_by=args.batch_size,
  )
  optimizer = optax.chain(
      noise_addition.gaussian_privatizer(
          stddev=1.0 / args.batch_size, prng_key=jax.random.key(1)
      ),
      optax.sgd(0.1),
  )
  state = optimizer.init(params)

  step = _models.jit_step(grad_fn, optimizer)

  result = _models.jax_step_result(
      step, params, state, x, y, args.steps, args.warmup, args.max_seconds
  )
  result['own_peak_rss_mb'] = _models.own_peak_rss_mb()
  result['versions'] = {
      'jax': jax.__version__,
      'jax_privacy': getattr(jax_privacy, '__version__', '?'),
  }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
