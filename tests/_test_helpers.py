"""Assertions shared by several test files (imported as ``_test_helpers``).

pytest puts ``tests/`` on ``sys.path`` (the test files are not a package),
so a test file imports this module by its bare name.
"""

import jax
import numpy as np


def assert_trees_close(expected, actual, rtol=1e-5):
  """Same tree structure, shapes and dtypes; leaves equal to ``rtol``.

  The absolute tolerance is ``1e-6`` of the leaf's largest magnitude, so
  entries that should be zero are compared on the leaf's scale.
  """
  exp_leaves, exp_tree = jax.tree_util.tree_flatten(expected)
  act_leaves, act_tree = jax.tree_util.tree_flatten(actual)
  assert exp_tree == act_tree
  for exp, act in zip(exp_leaves, act_leaves):
    exp, act = np.asarray(exp), np.asarray(act)
    assert exp.shape == act.shape and exp.dtype == act.dtype
    scale = np.max(np.abs(exp)) if exp.size else 0.0
    np.testing.assert_allclose(act, exp, rtol=rtol, atol=1e-6 * scale + 1e-12)
