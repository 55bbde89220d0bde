"""An end-to-end DP-SGD trainer: plan, data, train step, budget.

:class:`DPTrainer` runs the mechanism of a
:class:`~jax_privacy.experimental.execution_plan.DpsgdExecutionPlanConfig`:
it draws Poisson batches with the plan's sampler, pads them to one compiled
physical size, accumulates clipped gradients over physical chunks when a
batch is larger than that (for memory), adds the plan's noise once per
logical batch, and applies any optax optimizer::

    config = DpsgdExecutionPlanConfig(
        iterations=500, num_examples=len(x), expected_batch_size=128,
        epsilon=3.0, delta=1e-5, noise_seed=1)
    trainer = DPTrainer(loss_fn=loss, config=config,
                        optimizer=optax.adam(1e-3), sampling_seed=2)
    state = trainer.init(params)
    state = trainer.fit((x, y), state)
    epsilon = trainer.epsilon_spent(state)

``loss_fn(params, example, key)`` is the loss of ONE example (every leaf of
``example`` has a leading axis of size 1); ``key`` is a per-example PRNG key
(for dropout, say), independent of the noise. The data is a pytree of arrays
(in memory or memory-mapped ``.npy``) or a random-access source such as a
``grain.MapDataset``; the sampler's indices decide what is read. The guide
is ``docs/training.md``.

Privacy:
  The run is the plan's mechanism: Poisson sampling with ``q =
  expected_batch_size / num_examples``, per-example clipping, one Gaussian
  noise draw per step, under add/remove-one neighbours. Padding and
  gradient accumulation change memory and speed, never the result. The
  trainer stops after the plan's ``iterations`` steps, so a run never spends
  more than the plan's epsilon; ``epsilon_spent`` counts the steps run.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy import _training_data
from jax_privacy.experimental import execution_plan

PyTree = Any


class TrainState(NamedTuple):
  """Everything a run needs to continue.

  Attributes:
    params: the model parameters.
    opt_state: state of ``optax.chain(noise, optimizer)``; the noise state
      holds the noise key and step count.
    step: number of training steps run (an int32 scalar).
  """

  params: PyTree
  opt_state: optax.OptState
  step: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainProgress:
  """What callbacks receive.

  Attributes:
    step: steps run so far.
    epsilon: epsilon spent by those steps (at the plan's delta).
    state: the current train state.
  """

  step: int
  epsilon: float
  state: TrainState


class Callback(Protocol):

  def __call__(self, progress: TrainProgress) -> None:
    ...


class DPTrainer:
  """DP-SGD training of one model under one execution plan.

  Args:
    loss_fn: ``loss_fn(params, example, key) -> scalar`` for ONE example.
    config: the mechanism (sampling, clipping, noise, accounting).
    optimizer: any optax optimizer; it runs after the noise (post-processing).
    sampling_seed: seed of the batch sampler (kept apart from the noise seed
      of ``config`` and from ``example_key_seed``).
    example_key_seed: seed of the per-example keys passed to ``loss_fn``.
    physical_batch_size: the batch size the gradient is compiled for;
      logical batches are padded to a multiple of it and processed in chunks
      whose clipped sums are accumulated. Default: the expected batch size
      rounded up to a multiple of 8.
    extra_gradients_fn: (for auditing) ``fn(step)`` returns a pytree added
      to that step's sum of clipped gradients before it is normalised and
      noised, or None. Use it to insert canaries
      (``auditing.canaries.canary_gradient_sum``): each canary must have
      norm at most the clip norm and take part in steps like an example of
      the data set, or the accounting does not cover it.
    mesh: a ``jax.sharding.Mesh``; each physical batch is split over its
      ``batch_axis`` (data parallelism). Same result as one device, to
      float tolerance.
    batch_axis: the mesh axis the examples are split over.
    checkpoint_tag: a string describing what the plan does not (model,
      optimizer, learning rate, ...). It is stored with each checkpoint, and
      a checkpoint is only resumed by a trainer with the same tag, so that a
      run is never continued under other settings.
    clipped_grad_method: how per-example gradients are clipped,
      ``'vectorized'`` (default), ``'ghost'`` or ``'auto'`` (see
      ``clipping.clipped_grad``). A speed and memory option only: every
      method gives the same clipped sum up to float rounding, so the
      mechanism and its accounting do not depend on it.

  Raises:
    ValueError: on a bad ``physical_batch_size``, seed or
      ``clipped_grad_method``.
  """

  def __init__(
      self,
      *,
      loss_fn: Callable[[PyTree, PyTree, jax.Array], jax.Array],
      config: execution_plan.DpsgdExecutionPlanConfig,
      optimizer: optax.GradientTransformation,
      sampling_seed: int,
      example_key_seed: int = 0,
      physical_batch_size: int | None = None,
      extra_gradients_fn: Callable[[int], PyTree | None] | None = None,
      mesh: jax.sharding.Mesh | None = None,
      batch_axis: str = 'batch',
      checkpoint_tag: str = '',
      clipped_grad_method: str = 'vectorized',
  ):
    for name, value in (
        ('sampling_seed', sampling_seed),
        ('example_key_seed', example_key_seed),
    ):
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f'{name} must be an int, got {value!r}')
    if clipped_grad_method not in ('vectorized', 'ghost', 'auto'):
      raise ValueError(
          "clipped_grad_method must be 'vectorized', 'ghost' or 'auto', got "
          f'{clipped_grad_method!r}'
      )
    if not isinstance(checkpoint_tag, str):
      raise ValueError(
          f'checkpoint_tag must be a str, got {type(checkpoint_tag).__name__}'
      )
    if physical_batch_size is None:
      physical_batch_size = -(-config.expected_batch_size // 8) * 8
    if (
        isinstance(physical_batch_size, bool)
        or not isinstance(physical_batch_size, numbers.Integral)
        or physical_batch_size < 1
    ):
      raise ValueError(
          'physical_batch_size must be None or an integer >= 1, got '
          f'{physical_batch_size!r}'
      )
    self._batch_sharding = None
    if mesh is not None:
      if batch_axis not in mesh.shape:
        raise ValueError(
            f'batch_axis {batch_axis!r} is not an axis of the mesh '
            f'{dict(mesh.shape)}'
        )
      axis_type = dict(zip(mesh.axis_names, mesh.axis_types))[batch_axis]
      if axis_type != jax.sharding.AxisType.Auto:
        raise ValueError(
            f'the mesh axis {batch_axis!r} must have AxisType.Auto (the '
            'compiler shards the per-example work), got '
            f'{axis_type}; build it with jax.make_mesh(shape, names, '
            'axis_types=(jax.sharding.AxisType.Auto,) * len(names))'
        )
      if physical_batch_size % mesh.shape[batch_axis]:
        raise ValueError(
            f'physical_batch_size ({physical_batch_size}) must be a multiple '
            f'of the mesh axis {batch_axis!r} size ({mesh.shape[batch_axis]})'
        )
      self._batch_sharding = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(batch_axis)
      )
    self.config = config
    self.plan = config.plan
    self.physical_batch_size = int(physical_batch_size)
    self._sampling_seed = int(sampling_seed)
    self._checkpoint_tag = checkpoint_tag
    self._extra_gradients_fn = extra_gradients_fn
    self._example_key = jax.random.key(example_key_seed)
    self._grad_fn = self.plan.clipped_grad(
        loss_fn, batch_argnums=1, prng_argnum=2, method=clipped_grad_method
    )
    self._transform = optax.chain(
        self.plan.noise_addition_transform, optimizer
    )
    self._accumulate = jax.jit(self._accumulate_impl)
    self._apply = jax.jit(self._apply_impl)
    self._add_scaled = jax.jit(
        lambda total, extra: jax.tree_util.tree_map(
            lambda t, e: t + e / config.expected_batch_size, total, extra
        )
    )
    self.train_step = jax.jit(self._train_step_impl)

  def init(self, params: PyTree) -> TrainState:
    """The state before the first step."""
    return TrainState(
        params=params,
        opt_state=self._transform.init(params),
        step=jnp.zeros((), jnp.int32),
    )

  def _accumulate_impl(self, params, total, batch, is_padding, key):
    grads = self._grad_fn(params, batch, key, is_padding_example=is_padding)
    return jax.tree_util.tree_map(jnp.add, total, grads)

  def _apply_impl(self, state: TrainState, grads) -> TrainState:
    updates, opt_state = self._transform.update(
        grads, state.opt_state, state.params
    )
    return TrainState(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        step=state.step + 1,
    )

  def _train_step_impl(self, state, batch, is_padding_example, key):
    grads = self._grad_fn(
        state.params, batch, key, is_padding_example=is_padding_example
    )
    return self._apply_impl(state, grads)

  def epsilon_spent(self, state: TrainState) -> float:
    """Epsilon spent by the steps ``state`` has run, at the plan's delta."""
    return self.config.epsilon_after(int(state.step))

  def _step_key(self, step: int) -> jax.Array:
    return jax.random.fold_in(self._example_key, step)

  def fit(
      self,
      dataset: PyTree,
      state: TrainState,
      *,
      num_steps: int | None = None,
      callbacks: Sequence[Callback] = (),
      callback_every: int = 100,
      checkpoint_dir: str | None = None,
      checkpoint_every: int = 100,
  ) -> TrainState:
    """Trains on ``dataset`` from ``state`` until the plan's last step.

    Args:
      dataset: a pytree of arrays (NumPy or JAX) whose leaves share a leading
        axis of ``config.num_examples`` examples, or a random-access source
        of that many records (anything with ``__len__`` and
        ``__getitem__``, e.g. a ``grain.MapDataset``), each record a pytree
        of arrays without the example axis. Only the sampled examples are
        read: rows of memory-mapped NumPy files (``np.load(path,
        mmap_mode='r')``), one ``source[i]`` per record of a source.
      state: from :meth:`init`, or a restored state: the run continues at
        ``state.step`` with the batches and noise the uninterrupted run would
        have used.
      num_steps: run at most this many more steps (default: to the end of
        the plan). Asking for more than the plan has left stops at the plan's
        end, with a log message.
      callbacks: called every ``callback_every`` steps and after the last.
      callback_every: steps between callbacks, ``>= 1``.
      checkpoint_dir: if given, the state is saved there (with orbax) every
        ``checkpoint_every`` steps and after the last; resume with
        :meth:`restore`.
      checkpoint_every: steps between checkpoints, ``>= 1``.

    Returns:
      The final state.

    Raises:
      ValueError: if the dataset's size differs from the plan's
        ``num_examples``, a leaf lacks the example axis, a step count is
        invalid, or ``checkpoint_dir`` holds another run's checkpoints.
    """
    num_examples = self.config.num_examples
    read = _training_data.batch_reader(dataset, num_examples)
    for name, value in (
        ('callback_every', callback_every),
        ('checkpoint_every', checkpoint_every),
    ):
      if (
          isinstance(value, bool)
          or not isinstance(value, numbers.Integral)
          or value < 1
      ):
        raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
    if num_steps is not None and (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, numbers.Integral)
        or num_steps < 0
    ):
      raise ValueError(
          f'num_steps must be None or an integer >= 0, got {num_steps!r}'
      )
    if checkpoint_dir is not None:
      self._check_checkpoints_are_ours(checkpoint_dir)
    start = int(state.step)
    remaining = self.config.iterations - start
    if num_steps is not None and num_steps > remaining:
      logging.warning(
          'asked for %d more steps but the plan has %d left (of %d): the '
          'run stops at the end of the plan, within its privacy budget',
          num_steps, remaining, self.config.iterations,
      )
    if num_steps is not None:
      remaining = min(num_steps, remaining)
    end = start + remaining
    batches = self.plan.batch_selection_strategy.batch_iterator(
        num_examples, rng=np.random.default_rng(self._sampling_seed)
    )
    for step, indices in enumerate(batches):
      if step < start:
        continue  # The batches of steps already run, replayed and skipped.
      if step >= end:
        break
      state = self._run_step(state, read, indices, step)
      done = step + 1
      if checkpoint_dir is not None and (
          done % checkpoint_every == 0 or done == end
      ):
        self.save(checkpoint_dir, state)
      if callbacks and (done % callback_every == 0 or done == end):
        progress = TrainProgress(
            step=done, epsilon=self.epsilon_spent(state), state=state
        )
        for callback in callbacks:
          callback(progress)
    return state

  def _fingerprint(self) -> str:
    """What a checkpoint must have been trained with to be resumed here."""
    return repr((
        self.config,
        self._sampling_seed,
        self.physical_batch_size,
        self._checkpoint_tag,
    ))

  def _check_checkpoints_are_ours(self, directory: str) -> None:
    """Refuses a directory holding another run's checkpoints (before any
    step, so that nothing of theirs is overwritten or pruned)."""
    ocp = _orbax()
    with ocp.CheckpointManager(directory) as manager:
      step = manager.latest_step()
      if step is None:
        return
      meta = manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
      )['meta']
    if meta['fingerprint'] != self._fingerprint():
      raise ValueError(
          f'{directory} holds checkpoints of a run with other privacy, '
          'sampling or run settings (checkpoint_tag); use another '
          'checkpoint_dir. Saved: '
          f"{meta['fingerprint']}; here: {self._fingerprint()}"
      )

  def save(self, directory: str, state: TrainState) -> None:
    """Saves ``state`` under ``directory`` (orbax), keeping the last two.

    The checkpoint holds the parameters, the optimizer and noise states
    (noise key included), and the step; the sampler position and the
    privacy spent follow from the step. It also records the plan, so that a
    checkpoint is never resumed under a different mechanism.
    """
    ocp = _orbax()
    step = int(state.step)
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=2)
    ) as manager:
      manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(_unwrap_keys(state)),
              meta=ocp.args.JsonSave({'fingerprint': self._fingerprint()}),
          ),
          force=True,
      )
      manager.wait_until_finished()

  @staticmethod
  def latest_checkpoint_step(directory: str) -> int | None:
    """The step of the newest checkpoint under ``directory``, or None."""
    if not os.path.isdir(directory):
      return None
    ocp = _orbax()
    with ocp.CheckpointManager(directory) as manager:
      return manager.latest_step()

  def restore(self, directory: str, params: PyTree) -> TrainState:
    """The latest state saved under ``directory``, or ``init(params)``.

    Args:
      directory: where :meth:`fit` or :meth:`save` wrote checkpoints.
      params: parameters with the model's structure (e.g. a fresh
        initialisation); used as the template, and as the start when there
        is no checkpoint.

    Returns:
      The restored state; ``fit`` continues it exactly where it stopped.
      Steps that ran after the last checkpoint are re-run with the same
      batches and the same noise, so they release nothing new and
      ``epsilon_spent`` counts each step once.

    Raises:
      ValueError: if the checkpoint was written under a different plan,
        sampling seed, physical batch size or ``checkpoint_tag``.
    """
    ocp = _orbax()
    template = self.init(params)
    with ocp.CheckpointManager(directory) as manager:
      step = manager.latest_step()
      if step is None:
        return template
      restored = manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(_unwrap_keys(template)),
              meta=ocp.args.JsonRestore(),
          ),
      )
    if restored['meta']['fingerprint'] != self._fingerprint():
      raise ValueError(
          f'the checkpoint in {directory} was written by a run with other '
          'privacy, sampling or run settings (checkpoint_tag); resuming it '
          'here would misreport the privacy spent. Saved: '
          f"{restored['meta']['fingerprint']}; here: {self._fingerprint()}"
      )
    return _rewrap_keys(restored['state'], template)

  def _run_step(self, state, read, indices, step) -> TrainState:
    size = self.physical_batch_size
    total = jax.tree_util.tree_map(
        lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
        state.params,
    )
    step_key = self._step_key(step)
    # An empty batch sums to exactly zero: nothing is read or computed.
    for chunk in range(-(-len(indices) // size)):
      chunk_indices = indices[chunk * size : (chunk + 1) * size]
      batch = _training_data.pad_batch(read(chunk_indices), size)
      is_padding = np.arange(size) >= len(chunk_indices)
      if self._batch_sharding is not None:
        batch, is_padding = jax.device_put(
            (batch, is_padding), self._batch_sharding
        )
      total = self._accumulate(
          state.params,
          total,
          batch,
          is_padding,
          jax.random.fold_in(step_key, chunk),
      )
    if self._extra_gradients_fn is not None:
      extra = self._extra_gradients_fn(step)
      if extra is not None:
        total = self._add_scaled(total, extra)
    return self._apply(state, total)


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'checkpointing needs orbax-checkpoint: pip install '
        "'jax-privacy[checkpoint]'"
    ) from e
  return ocp


def _is_key(leaf) -> bool:
  return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
      leaf.dtype, jax.dtypes.prng_key
  )


def _unwrap_keys(tree):
  return jax.tree_util.tree_map(
      lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree
  )


def _rewrap_keys(tree, template):
  return jax.tree_util.tree_map(
      lambda leaf, like: (
          jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(like))
          if _is_key(like)
          else leaf
      ),
      tree,
      template,
  )
