"""Per-group (per-layer) clipping: ``l2_clip_norm`` given as a pytree of norms.

References are computed here, in float64 NumPy, from single-example
gradients (``jax.grad`` of one example, no clipping code involved).
"""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_privacy import clipping

Relation = dp_accounting.NeighboringRelation

BATCH, POSITIONS, D_IN, D_HIDDEN, D_OUT, VOCAB = 7, 3, 8, 8, 4, 6
# Groups of whole layers, and one layer split into two groups.
LAYER_NORMS = {'emb': 5.0, 'l1': 20.0, 'l2': 10.0}
MIXED_NORMS = {'emb': 5.0, 'l1': {'w': 20.0, 'b': 4.0}, 'l2': 10.0}


def _params(seed):
  keys = jax.random.split(jax.random.key(seed), 5)
  return {
      'emb': 0.3 * jax.random.normal(keys[0], (VOCAB, D_IN)),
      'l1': {
          'w': 0.3 * jax.random.normal(keys[1], (D_IN, D_HIDDEN)),
          'b': 0.1 * jax.random.normal(keys[2], (D_HIDDEN,)),
      },
      'l2': {
          'w': 0.3 * jax.random.normal(keys[3], (D_HIDDEN, D_OUT)),
          'b': 0.1 * jax.random.normal(keys[4], (D_OUT,)),
      },
  }


def _loss(params, x, ids, y):
  """Embedding + dense over positions (ghost norm) + dense (formed grad)."""
  h = x + params['emb'][ids]
  h = jnp.tanh(h @ params['l1']['w'] + params['l1']['b'])
  out = h @ params['l2']['w'] + params['l2']['b']
  return jnp.sum((out - y) ** 2)


def _batch(seed, size=BATCH, scale=None):
  keys = jax.random.split(jax.random.key(1000 + seed), 3)
  if scale is None:  # per-example scales from tiny to large: some clipped
    scale = jnp.logspace(-1.5, 0.5, size).reshape(size, 1, 1)
  x = scale * jax.random.normal(keys[0], (size, POSITIONS, D_IN))
  ids = jax.random.randint(keys[1], (size, POSITIONS), 0, VOCAB)
  y = scale * jax.random.normal(keys[2], (size, POSITIONS, D_OUT))
  return x, ids, y


_single_grad = jax.jit(jax.grad(_loss))


def _example_grads(params, x, ids, y, keep_batch_dim=True):
  grads = []
  for i in range(x.shape[0]):
    sl = slice(i, i + 1) if keep_batch_dim else i
    grads.append(
        jax.tree_util.tree_map(
            lambda g: np.asarray(g, np.float64),
            _single_grad(params, x[sl], ids[sl], y[sl]),
        )
    )
  return grads


def _norm(tree):
  return float(
      np.sqrt(
          sum(
              np.sum(np.square(leaf))
              for leaf in jax.tree_util.tree_leaves(tree)
          )
      )
  )


def _groups(norms_tree, tree):
  """``[(C_k, subtree_k)]`` pairing each group norm with its subtree."""
  treedef = jax.tree_util.tree_structure(norms_tree)
  return list(
      zip(jax.tree_util.tree_leaves(norms_tree), treedef.flatten_up_to(tree))
  )


def _reference(norms_tree, grads, *, rescale=False, normalize_by=1.0,
               padding=None):
  """Sum over examples of per-group clipped gradients, in float64."""
  bound = float(
      np.sqrt(sum(c**2 for c in jax.tree_util.tree_leaves(norms_tree)))
  )
  treedef = jax.tree_util.tree_structure(norms_tree)
  total = None
  for b, grad in enumerate(grads):
    if padding is not None and padding[b]:
      continue
    clipped = []
    for clip, sub in _groups(norms_tree, grad):
      factor = min(1.0, clip / max(_norm(sub), 1e-300))
      if rescale:
        factor /= bound
      clipped.append(jax.tree_util.tree_map(lambda g, f=factor: f * g, sub))
    clipped = treedef.unflatten(clipped)
    total = clipped if total is None else jax.tree_util.tree_map(
        np.add, total, clipped
    )
  return jax.tree_util.tree_map(lambda t: t / normalize_by, total)


def _assert_close(actual, expected, rtol=1e-5):
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(
      expected
  )
  for a, e in zip(jax.tree_util.tree_leaves(actual),
                  jax.tree_util.tree_leaves(expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.max(np.abs(e)))


def _clipped(norms_tree, method='vectorized', **kwargs):
  return clipping.clipped_grad(
      _loss,
      l2_clip_norm=norms_tree,
      batch_argnums=(1, 2, 3),
      method=method,
      **kwargs,
  )


def test_sensitivity_is_the_l2_norm_of_group_norms():
  fn = _clipped(LAYER_NORMS, normalize_by=4.0)
  expected = np.sqrt(5.0**2 + 20.0**2 + 10.0**2) / 4.0
  assert fn.sensitivity() == pytest.approx(expected, rel=1e-12)
  assert fn.sensitivity(Relation.ADD_OR_REMOVE_ONE) == pytest.approx(expected)
  assert fn.sensitivity(Relation.REPLACE_ONE) == pytest.approx(2 * expected)
  mixed = _clipped(MIXED_NORMS)
  assert mixed.sensitivity() == pytest.approx(
      np.sqrt(5.0**2 + 20.0**2 + 4.0**2 + 10.0**2)
  )
  unit = _clipped(LAYER_NORMS, rescale_to_unit_norm=True, normalize_by=4.0)
  assert unit.sensitivity() == 0.25
  # A one-leaf pytree is one group: the same bound as the plain number.
  assert _clipped({'emb': 2.0, 'l1': 2.0, 'l2': 2.0}).l2_norm_bound == (
      pytest.approx(2.0 * np.sqrt(3))
  )


def test_each_group_is_clipped_to_its_own_norm():
  norms_tree = MIXED_NORMS
  params = _params(0)
  x, ids, y = _batch(0)
  fn = jax.jit(_clipped(norms_tree, return_grad_norms=True))
  _, aux = fn(params, x, ids, y)
  one = jax.jit(_clipped(norms_tree))
  grads = _example_grads(params, x, ids, y)
  for b, grad in enumerate(grads):
    # One example's contribution, alone (batch of one).
    alone = one(params, x[b : b + 1], ids[b : b + 1], y[b : b + 1])
    for (clip, got), (_, raw) in zip(
        _groups(norms_tree, alone), _groups(norms_tree, grad)
    ):
      got_norm, raw_norm = _norm(
          jax.tree_util.tree_map(lambda g: np.asarray(g, np.float64), got)
      ), _norm(raw)
      assert got_norm <= clip * (1 + 1e-6)
      assert got_norm == pytest.approx(min(clip, raw_norm), rel=1e-5)
    # Reported norms: per group, with the structure of l2_clip_norm.
    expected_norms = [_norm(sub) for _, sub in _groups(norms_tree, grad)]
    got_norms = [
        float(leaf[b]) for leaf in jax.tree_util.tree_leaves(aux.grad_norms)
    ]
    np.testing.assert_allclose(got_norms, expected_norms, rtol=1e-5)
  assert jax.tree_util.tree_structure(aux.grad_norms) == (
      jax.tree_util.tree_structure(norms_tree)
  )
  # Both regimes occur, so the test sees clipped and unclipped groups.
  all_norms = np.stack(
      [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(aux.grad_norms)]
  )
  clips = np.array(jax.tree_util.tree_leaves(norms_tree))[:, None]
  assert np.any(all_norms > clips) and np.any(all_norms < clips)


@pytest.mark.parametrize(
    'method, options',
    [
        ('vectorized', dict(microbatch_size=3, padding=True)),
        ('ghost', dict(microbatch_size=3, padding=True)),
        ('auto', dict(microbatch_size=3, padding=True)),
        ('vectorized', dict(rescale_to_unit_norm=True, normalize_by=2.5,
                            microbatch_size=2)),
        ('ghost', dict(rescale_to_unit_norm=True, normalize_by=2.5,
                       microbatch_size=2)),
    ],
)
def test_matches_independent_reference_on_every_path(method, options):
  options = dict(options)
  padding = None
  if options.pop('padding', False):
    padding = np.zeros(BATCH, bool)
    padding[[1, 5]] = True
  params = _params(1)
  x, ids, y = _batch(1)
  fn = jax.jit(_clipped(MIXED_NORMS, method=method, **options))
  got = fn(params, x, ids, y, is_padding_example=padding)
  expected = _reference(
      MIXED_NORMS,
      _example_grads(params, x, ids, y),
      rescale=options.get('rescale_to_unit_norm', False),
      normalize_by=options.get('normalize_by', 1.0),
      padding=padding,
  )
  _assert_close(got, expected)


def test_ghost_equals_vmap_with_norms_keep_batch_dim_false():
  """Per-user groups (keep_batch_dim=False), microbatches and padding."""
  params = _params(2)
  x, ids, y = _batch(2)
  padding = np.zeros(BATCH, bool)
  padding[3] = True
  kwargs = dict(
      keep_batch_dim=False,
      microbatch_size=4,
      return_grad_norms=True,
      return_values=True,
  )
  expected = jax.jit(_clipped(LAYER_NORMS, **kwargs))(
      params, x, ids, y, is_padding_example=padding
  )
  reference = _reference(
      LAYER_NORMS,
      _example_grads(params, x, ids, y, keep_batch_dim=False),
      padding=padding,
  )
  _assert_close(expected[0], reference)
  for method in ('ghost', 'auto'):
    got = jax.jit(_clipped(LAYER_NORMS, method=method, **kwargs))(
        params, x, ids, y, is_padding_example=padding
    )
    _assert_close(got, expected)


@pytest.mark.parametrize('method', ['vectorized', 'ghost'])
def test_nan_example_is_dropped_from_every_group(method):
  params = _params(3)
  x, ids, y = _batch(3)
  fn = jax.jit(_clipped(LAYER_NORMS, method=method))
  got = fn(params, x.at[2, 0, 0].set(jnp.nan), ids, y)
  expected = fn(params, x, ids, y, is_padding_example=np.arange(BATCH) == 2)
  _assert_close(got, expected)
  assert all(
      np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(got)
  )


def test_tuple_argnums_and_clipped_fun_groups():
  params = _params(4)
  x, ids, y = _batch(4)
  both = clipping.clipped_grad(
      lambda emb, rest, x, ids, y: _loss(dict(rest, emb=emb), x, ids, y),
      argnums=(0, 1),
      l2_clip_norm=(5.0, {'l1': 20.0, 'l2': 10.0}),
      batch_argnums=(2, 3, 4),
  )
  rest = {k: v for k, v in params.items() if k != 'emb'}
  emb_grad, rest_grad = jax.jit(both)(params['emb'], rest, x, ids, y)
  expected = jax.jit(_clipped(LAYER_NORMS))(params, x, ids, y)
  _assert_close({'emb': emb_grad, **rest_grad}, expected)

  def stats(v):
    return {'mean': v, 'sq': v**2}

  v = jax.random.normal(jax.random.key(5), (BATCH, 3)) * jnp.arange(
      1, BATCH + 1
  )[:, None]
  fn = clipping.clipped_fun(
      stats, l2_clip_norm={'mean': 0.5, 'sq': 2.0}, keep_batch_dim=False
  )
  assert fn.sensitivity() == pytest.approx(np.sqrt(0.25 + 4.0))
  got = jax.jit(fn)(v)
  v64 = np.asarray(v, np.float64)
  ref_mean = sum(r * min(1, 0.5 / np.linalg.norm(r)) for r in v64)
  ref_sq = sum(r**2 * min(1, 2.0 / np.linalg.norm(r**2)) for r in v64)
  np.testing.assert_allclose(got['mean'], ref_mean, rtol=1e-5)
  np.testing.assert_allclose(got['sq'], ref_sq, rtol=1e-5)


@pytest.mark.parametrize(
    'method, norms_tree, options',
    [
        ('vectorized', LAYER_NORMS, dict()),
        ('ghost', LAYER_NORMS, dict()),
        ('ghost', MIXED_NORMS, dict(normalize_by=3.0)),
        ('vectorized', LAYER_NORMS, dict(rescale_to_unit_norm=True)),
    ],
)
def test_empirical_sensitivity_within_bound(method, norms_tree, options):
  """Neighbouring batches over many random models never exceed the bound."""
  clipped = _clipped(norms_tree, method=method, **options)
  fn = jax.jit(clipped)
  add_remove = clipped.sensitivity(Relation.ADD_OR_REMOVE_ONE)
  replace_one = clipped.sensitivity(Relation.REPLACE_ONE)
  worst_add_remove = worst_replace = 0.0
  for seed in range(6):
    params = _params(100 + seed)
    x, ids, y = _batch(100 + seed, scale=3.0)
    other = _batch(200 + seed, size=1, scale=3.0)
    base = fn(params, x, ids, y)
    removed_mask = np.arange(BATCH) == seed % BATCH
    removed = fn(params, x, ids, y, is_padding_example=removed_mask)
    i = seed % BATCH
    replaced = fn(
        params,
        *(arr.at[i].set(o[0]) for arr, o in zip((x, ids, y), other)),
    )
    diff = lambda a, b: _norm(
        jax.tree_util.tree_map(
            lambda u, v: np.asarray(u, np.float64) - np.asarray(v, np.float64),
            a,
            b,
        )
    )
    d_remove, d_replace = diff(base, removed), diff(base, replaced)
    assert d_remove <= add_remove * (1 + 1e-5)
    assert d_replace <= replace_one * (1 + 1e-5)
    # Each group's part of the removed contribution is within its own norm.
    contribution = jax.tree_util.tree_map(
        lambda u, v: np.asarray(u, np.float64) - np.asarray(v, np.float64),
        base,
        removed,
    )
    scale = (
        clipped.l2_norm_bound
        / np.sqrt(sum(c**2 for c in jax.tree_util.tree_leaves(norms_tree)))
    )
    for clip, sub in _groups(norms_tree, contribution):
      assert _norm(sub) <= clip * scale * (1 + 1e-5)
    worst_add_remove = max(worst_add_remove, d_remove)
    worst_replace = max(worst_replace, d_replace)
  # Large examples saturate every group: the bound is attained, not loose.
  assert worst_add_remove == pytest.approx(add_remove, rel=1e-3)
  assert worst_replace > add_remove


def test_removing_an_example_equals_marking_it_padding():
  params = _params(6)
  x, ids, y = _batch(6)
  fn = jax.jit(_clipped(MIXED_NORMS, method='ghost'))
  mask = np.zeros(BATCH, bool)
  mask[-1] = True
  _assert_close(
      fn(params, x, ids, y, is_padding_example=mask),
      fn(params, x[:-1], ids[:-1], y[:-1]),
  )


@pytest.mark.parametrize(
    'method, bad',
    [
        ('vectorized', {'emb': 1.0, 'l1': 1.0}),  # a missing group
        ('ghost', {'emb': 1.0, 'l1': 1.0}),
        ('vectorized', {'emb': 1.0, 'l1': 1.0, 'l2': 1.0, 'l3': 1.0}),
        (
            'vectorized',
            {'emb': 1.0, 'l1': {'w': 1.0, 'kernel': 1.0}, 'l2': 1.0},
        ),
        ('ghost', {'emb': {'w': 1.0}, 'l1': 1.0, 'l2': 1.0}),  # too deep
        ('vectorized', [1.0, 1.0, 1.0]),  # a list for a dict
    ],
)
def test_mismatched_pytree_of_norms_is_refused(method, bad):
  params = _params(0)
  x, ids, y = _batch(0)
  fn = _clipped(bad, method=method)
  with pytest.raises(ValueError, match='l2_clip_norm') as error:
    fn(params, x, ids, y)
  message = str(error.value)
  # Both structures are shown, and no parameter values.
  assert str(jax.tree_util.tree_structure(bad)) in message
  assert str(jax.tree_util.tree_structure(params)) in message
  assert 'Array(' not in message


@pytest.mark.parametrize(
    'bad, kwargs, field',
    [
        ({'emb': 1.0, 'l1': 0.0, 'l2': 1.0}, {}, r"l2_clip_norm\['l1'\]"),
        ({'emb': 1.0, 'l1': -2.0, 'l2': 1.0}, {}, r"l2_clip_norm\['l1'\]"),
        (
            {'emb': float('nan'), 'l1': 1.0, 'l2': 1.0},
            {},
            r"l2_clip_norm\['emb'\]",
        ),
        ({'emb': '1', 'l1': 1.0, 'l2': 1.0}, {}, r"l2_clip_norm\['emb'\]"),
        ({'emb': jnp.ones(2), 'l1': 1.0, 'l2': 1.0}, {}, 'l2_clip_norm'),
        ({}, {}, 'l2_clip_norm'),
        (
            {'emb': float('inf'), 'l1': 1.0, 'l2': 1.0},
            dict(rescale_to_unit_norm=True),
            'l2_clip_norm',
        ),
    ],
)
def test_bad_group_norms_are_refused_at_construction(bad, kwargs, field):
  with pytest.raises(ValueError, match=field):
    _clipped(bad, **kwargs)
  with pytest.raises(ValueError, match=field):
    clipping.clipped_fun(lambda v: v, l2_clip_norm=bad, **kwargs)
