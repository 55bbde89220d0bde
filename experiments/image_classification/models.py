"""Image models safe for per-example gradients, and their checkpoints.

Models (Flax NNX; NHWC float32 images in, logits out), by name:

* ``'wrn-16-4'``, ``'wrn-28-10'``, ``'wrn-40-4'`` and any ``'wrn-D-K'``:
  Wide-ResNets with GroupNorm (16 groups) and weight-standardized
  convolutions, as De et al. 2022 train from scratch with DP-SGD
  (:mod:`~experiments.image_classification.models_wrn`).
* ``'nf-resnet-50'`` and ``'nfnet-f0'`` to ``'nfnet-f3'``: normalizer-free
  networks (scaled weight standardization, no normalization layer) for
  fine-tuning (:mod:`~experiments.image_classification.models_nf`). The
  NFNets differ by depth only; :data:`NFNET_RESOLUTIONS` holds the train
  and test image sizes Brock et al. 2021b use for each (e.g. 320 and 416
  for NFNet-F3, which De et al. 2022 fine-tune on ImageNet).

Example::

    model = models.build_model('wrn-16-4', 10, rngs=nnx.Rngs(0))
    params, _ = flax_api.nnx_split_params(model)
    loss = flax_api.nnx_loss(
        model, optax.softmax_cross_entropy_with_integer_labels)
    grads = clipping.clipped_grad(loss, l2_clip_norm=1.0, batch_argnums=1,
                                  prng_argnum=2, method='auto')(
                                      params, (images, labels), key)

Fine-tuning from a checkpoint with another number of classes::

    model = models.build_model('nfnet-f0', 100, rngs=nnx.Rngs(0))
    models.load_params(model, 'pretrained.npz', skip_classifier=True)

Privacy:
  DP-SGD bounds each example's influence by clipping its gradient; that
  holds only if the example's gradient does not depend on the other
  examples of the batch and the model keeps no statistics of the data.
  Batch normalization breaks both (batch statistics, running averages), so
  :func:`check_per_example_safe` refuses it and :func:`build_model` never
  builds it. GroupNorm and weight standardization normalize within one
  example or within the parameters only.

References:
  De et al., "Unlocking High-Accuracy Differentially Private Image
  Classification through Scale", 2022, arXiv:2204.13650.
  Brock et al., "Characterizing signal propagation to close the performance
  gap in unnormalized ResNets", 2021, arXiv:2101.08692.
  Brock et al., "High-Performance Large-Scale Image Recognition Without
  Normalization", 2021, arXiv:2102.06171.
"""

from __future__ import annotations

import os
import re
import tempfile

import jax
import numpy as np
from flax import nnx

from experiments.image_classification import models_nf
from experiments.image_classification import models_wrn
from experiments.image_classification.models_layers import standardize_kernel
from experiments.image_classification.models_layers import WSConv
from experiments.image_classification.models_nf import NFNET_RESOLUTIONS
from experiments.image_classification.models_nf import NFNet
from experiments.image_classification.models_nf import NFResNet
from experiments.image_classification.models_wrn import WideResNet

__all__ = [
    'MODEL_NAMES', 'NFNET_RESOLUTIONS', 'NFNet', 'NFResNet', 'WSConv',
    'WideResNet', 'build_model', 'check_per_example_safe', 'count_params',
    'load_params', 'make_apply', 'save_params', 'standardize_kernel',
]

MODEL_NAMES = ('wrn-16-4', 'wrn-28-10', 'wrn-40-4', 'wrn-D-K',
               'nf-resnet-50', 'nfnet-f0', 'nfnet-f1', 'nfnet-f2',
               'nfnet-f3')
_WRN = re.compile(r'wrn-(\d+)-(\d+)')


def build_model(
    name: str, num_classes: int, *, rngs: nnx.Rngs, **kwargs
) -> nnx.Module:
  """Builds a per-example-safe image classifier by name.

  Args:
    name: one of :data:`MODEL_NAMES` (case-insensitive); ``'wrn-D-K'`` is
      any Wide-ResNet of depth ``D = 6n + 4`` and widening factor ``K``.
    num_classes: number of logits.
    rngs: NNX RNG streams for the initialization (``params``).
    **kwargs: passed to the model class: ``num_groups`` for WRNs
      (:class:`WideResNet`); ``depths``, ``widths``, ``stem_width``,
      ``activation`` for :class:`NFResNet`; ``depths``, ``widths``,
      ``stem_widths``, ``group_size``, ``final_width_multiplier``,
      ``activation``, ``dropout_rate`` for :class:`NFNet` (``depths``
      defaults to the named variant's).

  Returns:
    The model, an ``nnx.Module`` mapping ``[batch, h, w, 3]`` float images
    to ``[batch, num_classes]`` logits, with no batch statistics.

  Raises:
    ValueError: on an unknown name (the message lists the known ones), a bad
      size or an unknown keyword argument.
  """
  key = name.lower() if isinstance(name, str) else name
  match = _WRN.fullmatch(key) if isinstance(key, str) else None
  try:
    if match:
      model = WideResNet(int(match.group(1)), int(match.group(2)),
                         num_classes, rngs=rngs, **kwargs)
    elif key == 'nf-resnet-50':
      model = NFResNet(num_classes, rngs=rngs, **kwargs)
    elif key in models_nf.NFNET_DEPTHS:
      model = NFNet(num_classes, rngs=rngs,
                    **{'depths': models_nf.NFNET_DEPTHS[key], **kwargs})
    else:
      raise ValueError(
          f'name must be one of {", ".join(MODEL_NAMES)}, got {name!r}'
      )
  except TypeError as e:
    raise ValueError(f'bad keyword argument for {name!r}: {e}') from e
  check_per_example_safe(model)
  return model


def check_per_example_safe(model: nnx.Module) -> None:
  """Refuses a model whose outputs mix the examples of a batch.

  Args:
    model: an NNX module.

  Raises:
    ValueError: if ``model`` is not an NNX module, or it holds an
      ``nnx.BatchNorm`` layer or any ``nnx.BatchStat`` variable; the message
      names where and what to use instead.

  Privacy:
    Batch statistics make one example's gradient depend on the others, so
    clipping it no longer bounds that example's influence, and running
    averages are a non-private summary of the data.
  """
  if not isinstance(model, nnx.Module):
    raise ValueError(
        f'model must be a flax.nnx.Module, got {type(model).__name__}'
    )
  found = [(path, node) for path, node in nnx.iter_graph(model)
           if isinstance(node, (nnx.BatchNorm, nnx.BatchStat))]
  if found:
    # The outermost offender: the layer rather than its statistics.
    path, node = min(found, key=lambda item: len(item[0]))
    where = '.'.join(str(p) for p in path) or 'the model'
    what = ('nnx.BatchNorm' if isinstance(node, nnx.BatchNorm)
            else 'a batch statistic (nnx.BatchStat)')
    raise ValueError(
        f'the model has {what} at {where}: batch normalization is not '
        'per-example safe for DP-SGD (its statistics mix the examples of '
        "a batch, so clipping no longer bounds one example's influence). "
        'Use nnx.GroupNorm (De et al. 2022 use 16 groups) with '
        'weight-standardized convolutions (models.WSConv), or a '
        "normalizer-free network ('nf-resnet-50', 'nfnet-f0')"
    )


def make_apply(model: nnx.Module):
  """The model as a pure function ``apply(params, images) -> logits``.

  ``params`` is the plain nested dict of ``jax_privacy.flax_api.
  nnx_split_params(model)`` (what DP training updates); the other state of
  the model is fixed at its current value. This is the ``per_view_loss``
  building block of augmentation multiplicity, where one example's loss
  runs the model on its K views at once.

  Args:
    model: a per-example-safe NNX model (checked).

  Returns:
    ``apply(params, images)``, jit and vmap friendly; it never modifies
    ``model``.

  Raises:
    ValueError: if the model is not per-example safe.
  """
  check_per_example_safe(model)
  graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
  param_state = jax.tree_util.tree_map(lambda leaf: leaf, param_state)
  rest = jax.tree_util.tree_map(lambda leaf: leaf, rest)

  def apply(params, images):
    state = jax.tree_util.tree_map(lambda leaf: leaf, param_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, jax.tree_util.tree_map(
        lambda leaf: leaf, rest))(images)

  return apply


def _flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  state = nnx.state(model, nnx.Param)
  return {
      '/'.join(str(p) for p in path): variable
      for path, variable in nnx.to_flat_state(state)
  }


def count_params(model: nnx.Module) -> int:
  """The number of trainable scalars (``nnx.Param`` entries) of ``model``.

  Works on abstract models too (``nnx.eval_shape(lambda: build_model(...))``),
  which allocate nothing.
  """
  return int(sum(
      int(np.prod(v.get_value().shape)) for v in _flat_params(model).values()
  ))


def save_params(model: nnx.Module, path: str) -> None:
  """Writes the parameters of ``model`` to ``path``, an ``.npz`` file.

  Each parameter is stored under its path in the module, joined by ``/``
  (e.g. ``blocks/0/conv1/kernel``). The file is written to a temporary name
  and then renamed, so a crash never leaves a half-written checkpoint.

  Args:
    model: an NNX module.
    path: the file to write (written as given, no suffix added).
  """
  arrays = {
      k: np.asarray(v.get_value()) for k, v in _flat_params(model).items()
  }
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.npz.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_params(
    model: nnx.Module, path: str, *, skip_classifier: bool = False
) -> nnx.Module:
  """Reads parameters saved by :func:`save_params` into ``model``, in place.

  Args:
    model: a model of the same architecture (built with the same name and
      keyword arguments).
    path: the ``.npz`` checkpoint.
    skip_classifier: leave the classifier head (the parameters under the
      model's ``head_name``, ``'classifier'`` for every model here) as
      initialized and ignore it in the file: fine-tuning on a task with
      another number of classes.

  Returns:
    ``model``, for chaining.

  Raises:
    FileNotFoundError: if ``path`` does not exist (the message says what to
      put there).
    ValueError: if the file lacks a parameter of the model or has one the
      model lacks (naming them), or a shape differs (naming the parameter
      and both shapes).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'no checkpoint at {path!r}: put there an .npz file of the '
        'parameters keyed by their path in the model (as written by '
        'experiments.image_classification.models.save_params(model, path) '
        f'for a model of the same architecture), or fix the path'
    )
  head = getattr(model, 'head_name', None) if skip_classifier else None

  def skipped(key):
    return head is not None and key.split('/')[0] == head

  wanted = {k: v for k, v in _flat_params(model).items() if not skipped(k)}
  with np.load(path) as data:
    stored = {k: data[k] for k in data.files if not skipped(k)}
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(set(stored) - set(wanted))
  if missing or unexpected:
    raise ValueError(
        f'checkpoint {path!r} does not match the model: missing '
        f'{missing[:10]}{" ..." if len(missing) > 10 else ""}, unexpected '
        f'{unexpected[:10]}{" ..." if len(unexpected) > 10 else ""}; was it '
        'saved from a model built with the same name and arguments?'
    )
  for key, variable in wanted.items():
    shape = tuple(variable.get_value().shape)
    if stored[key].shape != shape:
      hint = ''
      if key.split('/')[0] == getattr(model, 'head_name', None):
        hint = (' (the classifier head: pass skip_classifier=True to '
                'fine-tune with another number of classes)')
      raise ValueError(
          f'parameter {key} has shape {stored[key].shape} in {path!r} but '
          f'{shape} in the model{hint}'
      )
  for key, variable in wanted.items():
    variable.set_value(
        np.asarray(stored[key], dtype=variable.get_value().dtype)
    )
  return model
