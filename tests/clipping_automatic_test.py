"""Automatic clipping (Bu et al., arXiv:2206.07136): ``C g / (||g|| + gamma)``.

References are computed here, in float64 NumPy, from single-example
gradients or outputs (no clipping code involved).
"""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_privacy import clipping

Relation = dp_accounting.NeighboringRelation

BATCH, POSITIONS, D_IN, D_HIDDEN, D_OUT = 7, 3, 6, 8, 4
GAMMA = 0.01


def _params(seed):
  keys = jax.random.split(jax.random.key(seed), 4)
  # Zero biases: an example's gradient shrinks with its inputs, so the
  # batches of _batch hold norms from far below gamma to far above 1.
  return {
      'l1': {
          'w': 0.5 * jax.random.normal(keys[0], (D_IN, D_HIDDEN)),
          'b': jnp.zeros((D_HIDDEN,)),
      },
      'l2': {
          'w': 0.5 * jax.random.normal(keys[2], (D_HIDDEN, D_OUT)),
          'b': jnp.zeros((D_OUT,)),
      },
  }


def _loss(params, x, y):
  h = jnp.tanh(x @ params['l1']['w'] + params['l1']['b'])
  out = h @ params['l2']['w'] + params['l2']['b']
  return 0.5 * jnp.sum((out - y) ** 2)


def _batch(seed, size=BATCH, scale=None):
  kx, ky = jax.random.split(jax.random.key(1000 + seed))
  if scale is None:  # from tiny (norm << gamma) to large (norm >> 1)
    scale = jnp.logspace(-4, 1, size).reshape(size, 1, 1)
  x = scale * jax.random.normal(kx, (size, POSITIONS, D_IN))
  y = scale * jax.random.normal(ky, (size, POSITIONS, D_OUT))
  return x, y


_single_grad = jax.jit(jax.grad(_loss))


def _example_grads(params, x, y, keep_batch_dim=True):
  grads = []
  for i in range(x.shape[0]):
    sl = slice(i, i + 1) if keep_batch_dim else i
    grads.append(
        jax.tree_util.tree_map(
            lambda g: np.asarray(g, np.float64),
            _single_grad(params, x[sl], y[sl]),
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


def _tree_diff_norm(a, b):
  return _norm(
      jax.tree_util.tree_map(
          lambda u, v: np.asarray(u, np.float64) - np.asarray(v, np.float64),
          a,
          b,
      )
  )


def _reference(grads, clip=1.0, *, gamma=GAMMA, rescale=False,
               normalize_by=1.0, padding=None, groups=None):
  """Sum of ``C g / (||g|| + gamma)`` per example (per group), in float64."""
  if groups is None:
    groups = clip
  treedef = jax.tree_util.tree_structure(groups)
  norms = jax.tree_util.tree_leaves(groups)
  bound = float(np.sqrt(sum(c**2 for c in norms)))
  total = None
  for b, grad in enumerate(grads):
    if padding is not None and padding[b]:
      continue
    parts = []
    for c, sub in zip(norms, treedef.flatten_up_to(grad)):
      factor = c / (_norm(sub) + gamma) / (bound if rescale else 1.0)
      parts.append(jax.tree_util.tree_map(lambda g, f=factor: f * g, sub))
    scaled = treedef.unflatten(parts)
    total = scaled if total is None else jax.tree_util.tree_map(
        np.add, total, scaled
    )
  return jax.tree_util.tree_map(lambda t: t / normalize_by, total)


def _assert_close(actual, expected, rtol=1e-5):
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(
      expected
  )
  for a, e in zip(
      jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)
  ):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.max(np.abs(e)))


def _clipped(method='vectorized', l2_clip_norm=1.0, gamma=GAMMA, **kwargs):
  return clipping.clipped_grad(
      _loss,
      l2_clip_norm=l2_clip_norm,
      batch_argnums=(1, 2),
      method=method,
      automatic_clipping_stability=gamma,
      **kwargs,
  )


def test_sensitivity_values():
  assert _clipped().sensitivity() == 1.0
  assert _clipped(normalize_by=4.0).sensitivity() == 0.25
  assert _clipped(normalize_by=4.0).sensitivity(Relation.REPLACE_ONE) == 0.5
  assert _clipped(l2_clip_norm=3.0).sensitivity() == 3.0
  unit = _clipped(l2_clip_norm=3.0, rescale_to_unit_norm=True, normalize_by=2.0)
  assert unit.sensitivity(Relation.ADD_OR_REMOVE_ONE) == 0.5
  grouped = _clipped(l2_clip_norm={'l1': 3.0, 'l2': 4.0})
  assert grouped.sensitivity() == pytest.approx(5.0)


def test_every_example_is_normalised_independently_of_its_size():
  """Per-example outputs: each is ``g / (||g|| + gamma)``, computed here."""
  params = _params(0)
  x, y = _batch(0)
  one = jax.jit(_clipped())
  grads = _example_grads(params, x, y)
  norms = [_norm(g) for g in grads]
  assert min(norms) < GAMMA and max(norms) > 10.0  # both extremes are seen
  for b, grad in enumerate(grads):
    got = one(params, x[b : b + 1], y[b : b + 1])
    expected = jax.tree_util.tree_map(
        lambda g, n=norms[b]: g / (n + GAMMA), grad
    )
    _assert_close(got, expected)
    assert _norm(
        jax.tree_util.tree_map(lambda g: np.asarray(g, np.float64), got)
    ) == pytest.approx(norms[b] / (norms[b] + GAMMA), rel=1e-5)


def test_zero_gradient_contributes_zero_not_nan():
  params = _params(1)
  x = jnp.zeros((2, POSITIONS, D_IN))
  y = jnp.zeros((2, POSITIONS, D_OUT))  # the output is 0: so is the gradient
  got = jax.jit(_clipped(method='ghost'))(params, x, y)
  for leaf in jax.tree_util.tree_leaves(got):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


_RESCALED = dict(l2_clip_norm=3.0, rescale_to_unit_norm=True,
                 normalize_by=2.5, microbatch_size=2)
_GROUPED = dict(l2_clip_norm={'l1': 2.0, 'l2': {'w': 1.0, 'b': 0.5}},
                padding=True, microbatch_size=4)


@pytest.mark.parametrize(
    'method, options',
    [
        ('vectorized', dict(microbatch_size=3, padding=True)),
        ('ghost', dict(microbatch_size=3, padding=True)),
        ('auto', dict(microbatch_size=3, padding=True)),
        ('vectorized', _RESCALED),
        ('ghost', _RESCALED),
        ('vectorized', _GROUPED),
        ('ghost', _GROUPED),
        ('auto', _GROUPED),
    ],
)
def test_matches_independent_reference_on_every_path(method, options):
  options = dict(options)
  padding = None
  if options.pop('padding', False):
    padding = np.zeros(BATCH, bool)
    padding[[0, 4]] = True
  params = _params(2)
  x, y = _batch(2)
  fn = jax.jit(_clipped(method=method, **options))
  got = fn(params, x, y, is_padding_example=padding)
  expected = _reference(
      _example_grads(params, x, y),
      options.get('l2_clip_norm', 1.0),
      rescale=options.get('rescale_to_unit_norm', False),
      normalize_by=options.get('normalize_by', 1.0),
      padding=padding,
  )
  _assert_close(got, expected)


def test_ghost_equals_vmap_per_user_with_norms_and_values():
  params = _params(3)
  x, y = _batch(3)
  padding = np.zeros(BATCH, bool)
  padding[-1] = True
  kwargs = dict(
      keep_batch_dim=False,
      microbatch_size=3,
      return_grad_norms=True,
      return_values=True,
  )
  expected = jax.jit(_clipped(**kwargs))(
      params, x, y, is_padding_example=padding
  )
  grads = _example_grads(params, x, y, keep_batch_dim=False)
  np.testing.assert_allclose(
      expected[1].grad_norms, [_norm(g) for g in grads], rtol=1e-5
  )
  _assert_close(expected[0], _reference(grads, padding=padding))
  for method in ('ghost', 'auto'):
    got = jax.jit(_clipped(method=method, **kwargs))(
        params, x, y, is_padding_example=padding
    )
    _assert_close(got, expected)


@pytest.mark.parametrize('method', ['vectorized', 'ghost'])
def test_nan_example_is_dropped(method):
  params = _params(4)
  x, y = _batch(4)
  fn = jax.jit(_clipped(method=method))
  _assert_close(
      fn(params, x.at[3, 1, 2].set(jnp.inf), y),
      fn(params, x, y, is_padding_example=np.arange(BATCH) == 3),
  )


@pytest.mark.parametrize(
    'method, options',
    [
        ('vectorized', dict()),
        ('ghost', dict()),
        ('ghost', dict(l2_clip_norm={'l1': 2.0, 'l2': 1.0}, normalize_by=2.0)),
        ('vectorized',
         dict(l2_clip_norm=3.0, rescale_to_unit_norm=True, gamma=1.0)),
    ],
)
def test_empirical_sensitivity_within_bound(method, options):
  """Neighbouring batches over many random models never exceed the bound."""
  clipped = _clipped(method=method, **options)
  fn = jax.jit(clipped)
  add_remove = clipped.sensitivity(Relation.ADD_OR_REMOVE_ONE)
  replace_one = clipped.sensitivity(Relation.REPLACE_ONE)
  gamma = options.get('gamma', GAMMA)
  worst_add_remove = worst_replace = 0.0
  for seed in range(6):
    params = _params(100 + seed)
    x, y = _batch(100 + seed)
    i = seed % BATCH
    x_other, y_other = _batch(200 + seed, size=1, scale=30.0)
    base = fn(params, x, y)
    removed = fn(params, x, y, is_padding_example=np.arange(BATCH) == i)
    replaced = fn(params, x.at[i].set(x_other[0]), y.at[i].set(y_other[0]))
    big = fn(params, x.at[i].set(x_other[0]), y.at[i].set(y_other[0]),
             is_padding_example=np.arange(BATCH) == (i + 1) % BATCH)
    d_remove = _tree_diff_norm(base, removed)
    d_replace = _tree_diff_norm(base, replaced)
    d_big = _tree_diff_norm(replaced, big)  # removes a normal example
    for d in (d_remove, d_big):
      assert d <= add_remove * (1 + 1e-5)
    assert d_replace <= replace_one * (1 + 1e-5)
    # The removed contribution is strictly inside the bound (norm / (norm +
    # gamma) < 1), by the amount the formula says.
    grad = _example_grads(params, x[i : i + 1], y[i : i + 1])[0]
    if 'l2_clip_norm' not in options or isinstance(
        options['l2_clip_norm'], float
    ):
      n = _norm(grad)
      assert d_remove == pytest.approx(
          add_remove * n / (n + gamma), rel=1e-4
      )
    worst_add_remove = max(worst_add_remove, d_remove, d_big)
    worst_replace = max(worst_replace, d_replace)
    # The big replacement (norm >> gamma) nearly attains the bound.
    big_removed = _tree_diff_norm(
        replaced,
        fn(params, x.at[i].set(x_other[0]), y.at[i].set(y_other[0]),
           is_padding_example=np.arange(BATCH) == i),
    )
    assert big_removed <= add_remove * (1 + 1e-5)
    worst_add_remove = max(worst_add_remove, big_removed)
  assert worst_add_remove > 0.9 * add_remove
  assert worst_replace > add_remove


def test_clipped_fun_normalises_each_output():
  def features(v):
    return {'v': v, 'sq': v**2}

  v = jax.random.normal(jax.random.key(7), (BATCH, 3)) * jnp.logspace(
      -3, 2, BATCH
  )[:, None]
  fn = clipping.clipped_fun(
      features,
      keep_batch_dim=False,
      automatic_clipping_stability=0.1,
      return_norms=True,
      microbatch_size=3,
  )
  assert fn.sensitivity() == 1.0
  got, aux = jax.jit(fn)(v)
  v64 = np.asarray(v, np.float64)
  norms = np.sqrt(np.sum(v64**2, axis=1) + np.sum(v64**4, axis=1))
  np.testing.assert_allclose(aux.grad_norms, norms, rtol=1e-5)
  np.testing.assert_allclose(
      got['v'], np.sum(v64 / (norms[:, None] + 0.1), axis=0), rtol=1e-5
  )
  np.testing.assert_allclose(
      got['sq'], np.sum(v64**2 / (norms[:, None] + 0.1), axis=0), rtol=1e-5
  )


def test_differs_from_hard_clipping_only_by_normalisation():
  """Hard clipping keeps small gradients; automatic clipping scales them up."""
  params = _params(5)
  x, y = _batch(5, size=1, scale=1e-3)
  auto = jax.jit(_clipped())(params, x, y)
  hard = jax.jit(
      clipping.clipped_grad(_loss, l2_clip_norm=1.0, batch_argnums=(1, 2))
  )(params, x, y)
  n = _norm(jax.tree_util.tree_map(lambda g: np.asarray(g, np.float64), hard))
  assert n < 1.0  # not clipped by hard clipping
  _assert_close(
      auto, jax.tree_util.tree_map(lambda g: g / (n + GAMMA), hard)
  )


@pytest.mark.parametrize(
    'gamma', [0.0, -0.5, float('nan'), float('inf'), True, '0.1', None]
)
def test_bad_stability_is_refused(gamma):
  if gamma is None:  # None is the default: hard clipping, accepted
    _clipped(gamma=None)
    return
  with pytest.raises(ValueError, match='automatic_clipping_stability'):
    _clipped(gamma=gamma)
  with pytest.raises(ValueError, match='automatic_clipping_stability'):
    clipping.clipped_fun(lambda v: v, automatic_clipping_stability=gamma)


@pytest.mark.parametrize(
    'l2_clip_norm', [float('inf'), {'l1': 1.0, 'l2': float('inf')}]
)
def test_automatic_with_infinite_clip_norm_is_refused(l2_clip_norm):
  with pytest.raises(ValueError, match='automatic_clipping_stability.*'
                     'l2_clip_norm'):
    _clipped(l2_clip_norm=l2_clip_norm)


def test_automatic_with_mismatched_group_norms_is_refused():
  params = _params(0)
  x, y = _batch(0)
  fn = _clipped(method='ghost', l2_clip_norm={'l1': 1.0, 'l3': 1.0})
  with pytest.raises(ValueError, match='l2_clip_norm'):
    fn(params, x, y)
