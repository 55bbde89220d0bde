"""DPTrainer with a data-parallel mesh equals the single-device run."""

import os
import pathlib
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {tests!r})
    import jax
    import numpy as np
    import training_test as setup
    assert len(jax.devices()) == 2, jax.devices()
    x, y = setup._data()
    mesh = jax.make_mesh(
        (2,), ('batch',), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = setup._trainer(physical_batch_size=16, mesh=mesh)
    single = setup._trainer(physical_batch_size=16)
    a = sharded.fit((x, y), sharded.init(setup._params()))
    b = single.fit((x, y), single.init(setup._params()))
    for u, v in zip(jax.tree_util.tree_leaves(a.params),
                    jax.tree_util.tree_leaves(b.params)):
      np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    explicit = jax.make_mesh(
        (2,), ('batch',), axis_types=(jax.sharding.AxisType.Explicit,))
    try:
      setup._trainer(physical_batch_size=16, mesh=explicit)
    except ValueError as e:
      assert 'AxisType.Auto' in str(e)
    else:
      raise AssertionError('explicit mesh accepted')
    try:
      setup._trainer(physical_batch_size=15, mesh=mesh)
    except ValueError as e:
      assert 'physical_batch_size' in str(e)
    else:
      raise AssertionError('odd physical batch accepted')
    print('OK')
''')


def test_two_device_mesh_matches_one_device():
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
      env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
  )
  script = SCRIPT.format(tests=str(pathlib.Path(__file__).resolve().parent))
  result = subprocess.run(
      [sys.executable, '-c', script], env=env, capture_output=True, text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('OK')
