"""A training process killed with SIGKILL mid-run resumes to the same result."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import training_test as setup  # the model, data and trainer of those tests

SCRIPT = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {tests!r})
    import training_test as setup
    x, y = setup._data()
    trainer = setup._trainer()
    state = trainer.restore({ckpt!r}, setup._params())
    trainer.fit((x, y), state, checkpoint_dir={ckpt!r}, checkpoint_every=3,
                callbacks=[lambda p: time.sleep(0.3)], callback_every=1)
''')


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path):
  ckpt = str(tmp_path / 'ckpt')
  script = SCRIPT.format(
      tests=str(pathlib.Path(__file__).resolve().parent), ckpt=ckpt
  )
  process = subprocess.Popen([sys.executable, '-c', script])
  deadline = time.time() + 300
  while time.time() < deadline:
    assert process.poll() is None, 'the training process ended before the kill'
    steps = [p.name for p in pathlib.Path(ckpt).glob('[0-9]*')] if os.path.isdir(ckpt) else []
    if any(int(s) >= 9 for s in steps if s.isdigit()):
      break
    time.sleep(0.2)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL

  x, y = setup._data()
  resumed = setup._trainer()
  state = resumed.restore(ckpt, setup._params())
  assert 9 <= int(state.step) < 30
  final = resumed.fit((x, y), state, checkpoint_dir=ckpt)

  reference = setup._trainer()
  full = reference.fit((x, y), reference.init(setup._params()))
  jax.tree_util.tree_map(np.testing.assert_array_equal, full.params, final.params)
  assert resumed.epsilon_spent(final) == reference.epsilon_spent(full)
