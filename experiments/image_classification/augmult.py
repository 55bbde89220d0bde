"""Augmentation multiplicity: several augmented views per example, one clip.

De et al. (2022) train with K augmented views of every example in the batch
(random crop of the reflect-padded image and random horizontal flip). The
gradients of the K views are AVERAGED before the example's gradient is
clipped, so an example still contributes one clipped gradient and the
sensitivity of the sum is the clip norm, whatever K is. The views cost
compute (K forward/backward passes per example), never privacy, and reduce
the variance that data augmentation otherwise adds to DP-SGD.

In this module averaging before clipping is done by construction: the loss
that :func:`make_augmult_loss` returns is the loss of ONE example, the mean
of its K views' losses, so its gradient is the mean of the views' gradients
and :func:`jax_privacy.clipping.clipped_grad` (or
:class:`jax_privacy.training.DPTrainer`) clips that::

    def per_view_loss(params, images, labels):  # images [K, H, W, C]
      logits = model_apply(params, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    loss = make_augmult_loss(per_view_loss, num_views=4)
    trainer = DPTrainer(loss_fn=loss, config=config, optimizer=opt,
                        sampling_seed=0)

Privacy:
  The augmentation of an example depends only on that example and on its
  per-example key (not on the other examples), and the K views enter one
  loss whose gradient is clipped as a whole. Each example's contribution to
  the clipped sum is therefore bounded by the clip norm exactly as without
  augmentation (add/remove-one and replace-special neighbours), and the
  accounting is unchanged.

References:
  De, Berrada, Hayes, Smith, Balle, "Unlocking High-Accuracy Differentially
  Private Image Classification through Scale", 2022, arXiv:2204.13650
  (augmentation multiplicity). Hoffer et al., "Augment your batch: better
  training with larger batches", 2019, arXiv:1901.09335.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

PyTree = Any
PerViewLoss = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


def _check_crop_padding(crop_padding) -> int:
  if (
      isinstance(crop_padding, bool)
      or not isinstance(crop_padding, numbers.Integral)
      or crop_padding < 0
  ):
    raise ValueError(
        f'crop_padding must be an integer >= 0, got {crop_padding!r}'
    )
  return int(crop_padding)


def _check_num_views(num_views) -> int:
  if (
      isinstance(num_views, bool)
      or not isinstance(num_views, numbers.Integral)
      or num_views < 1
  ):
    raise ValueError(f'num_views must be an integer >= 1, got {num_views!r}')
  return int(num_views)


def _check_images(images: jax.Array, crop_padding: int) -> None:
  if images.ndim != 4:
    raise ValueError(
        'images must have shape [N, H, W, C] (a batch of NHWC images), got '
        f'shape {tuple(images.shape)}'
    )
  if crop_padding and crop_padding >= min(images.shape[1], images.shape[2]):
    raise ValueError(
        'crop_padding must be below the image height and width '
        f'{tuple(images.shape[1:3])} (reflect padding), got {crop_padding}'
    )


def _augment_one(key, image, *, crop_padding: int, flip: bool):
  """One image [H, W, C]: crop of its reflect-padded version, maybe flipped."""
  height, width = image.shape[0], image.shape[1]
  crop_key, flip_key = jax.random.split(key)
  if crop_padding:
    padded = jnp.pad(
        image,
        ((crop_padding, crop_padding), (crop_padding, crop_padding), (0, 0)),
        mode='reflect',
    )
    offsets = jax.random.randint(
        crop_key, (2,), 0, 2 * crop_padding + 1, dtype=jnp.int32
    )
    image = jax.lax.dynamic_slice(
        padded,
        (offsets[0], offsets[1], jnp.zeros((), jnp.int32)),
        (height, width, image.shape[2]),
    )
  if flip:
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
  return image


def augment(
    key: jax.Array,
    images: jax.Array,
    *,
    crop_padding: int = 4,
    flip: bool = True,
) -> jax.Array:
  """Random crop (reflect padding) and random horizontal flip, per image.

  Each image ``[H, W, C]`` is padded by ``crop_padding`` pixels on every
  side by reflection (``jnp.pad(mode='reflect')``: the edge pixel is not
  repeated), and an ``H x W`` window is cut from it at an offset drawn
  uniformly from ``{0, ..., 2 * crop_padding}`` in each direction (a shift
  of the image by ``-crop_padding .. crop_padding`` pixels); then, if
  ``flip``, it is mirrored left-right with probability 1/2. Every image
  gets its own randomness (``key`` is split into one key per image). The
  dtype is kept, so ``uint8`` images stay ``uint8``. Jit and vmap friendly.

  Args:
    key: a PRNG key.
    images: ``[N, H, W, C]``.
    crop_padding: the padding (and largest shift) in pixels, ``>= 0``; 0
      means no crop. It must be below ``H`` and ``W`` (reflection needs it).
    flip: whether to flip at random.

  Returns:
    The augmented images, same shape and dtype.

  Raises:
    ValueError: on a negative or non-integer ``crop_padding``, one not
      below the image size, or images that are not 4-D.
  """
  crop_padding = _check_crop_padding(crop_padding)
  _check_images(images, crop_padding)
  if not crop_padding and not flip:
    return images
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(
      lambda k, image: _augment_one(
          k, image, crop_padding=crop_padding, flip=flip
      )
  )(keys, images)


def make_views(
    key: jax.Array,
    images: jax.Array,
    num_views: int,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    augment_first_view: bool = True,
) -> jax.Array:
  """``num_views`` augmented views of each image, example-major.

  Args:
    key: a PRNG key. Image ``i`` uses ``jax.random.split(key, N)[i]``, split
      again into one key per view, so the views are reproducible from the
      key and independent across images and views.
    images: ``[N, H, W, C]``.
    num_views: the augmentation multiplicity K, ``>= 1``.
    crop_padding: see :func:`augment`.
    flip: see :func:`augment`.
    augment_first_view: if False, view 0 of each image is the image itself
      (unaugmented) and views 1..K-1 are augmented.

  Returns:
    ``[N * K, H, W, C]``: rows ``i * K .. i * K + K - 1`` are the K views of
    image ``i`` (``views.reshape(N, K, H, W, C)[i, k]`` is view k of image
    i). With ``num_views=1`` and no augmentation (``crop_padding=0`` and
    ``flip=False``, or ``augment_first_view=False``) it is ``images``
    itself.

  Raises:
    ValueError: on ``num_views < 1`` or a bad ``crop_padding`` or image
      shape.
  """
  num_views = _check_num_views(num_views)
  crop_padding = _check_crop_padding(crop_padding)
  _check_images(images, crop_padding)
  if num_views == 1 and (
      not augment_first_view or (not crop_padding and not flip)
  ):
    return images
  num_images = images.shape[0]
  repeated = jnp.repeat(images, num_views, axis=0)
  if not crop_padding and not flip:
    return repeated
  view_keys = jax.vmap(lambda k: jax.random.split(k, num_views))(
      jax.random.split(key, num_images)
  )
  views = jax.vmap(
      lambda k, image: _augment_one(
          k, image, crop_padding=crop_padding, flip=flip
      )
  )(view_keys.reshape(-1), repeated)
  if not augment_first_view:
    is_first = (jnp.arange(num_images * num_views) % num_views) == 0
    views = jnp.where(is_first[:, None, None, None], repeated, views)
  return views


def _split_example(example) -> tuple[jax.Array, jax.Array]:
  if isinstance(example, Mapping):
    missing = {'image', 'label'} - set(example)
    if missing:
      raise ValueError(
          "example must be a dict with keys 'image' and 'label' (or a tuple "
          f'(image, label)); missing {sorted(missing)}, got keys '
          f'{sorted(example)}'
      )
    return example['image'], example['label']
  if isinstance(example, (tuple, list)) and len(example) == 2:
    return example[0], example[1]
  raise ValueError(
      "example must be a dict {'image': [1, H, W, C], 'label': [1]} or a "
      f'tuple (image, label), got {type(example).__name__}'
  )


def make_augmult_loss(
    per_view_loss: PerViewLoss,
    *,
    num_views: int,
    crop_padding: int = 4,
    flip: bool = True,
    augment_first_view: bool = True,
) -> Callable[[PyTree, Any, jax.Array], jax.Array]:
  """The loss of one example as the mean loss of its K augmented views.

  The returned ``loss(params, example, key)`` has the form that
  :func:`jax_privacy.clipping.clipped_grad` (with ``batch_argnums=1,
  prng_argnum=2``) and :class:`jax_privacy.training.DPTrainer` expect:
  ``example`` is ONE example with a leading axis of size 1, either a dict
  ``{'image': [1, H, W, C], 'label': [1]}`` (other keys are ignored) or a
  tuple ``(image, label)``; ``key`` is that example's own key. It builds
  the K views with :func:`make_views` and returns
  ``mean(per_view_loss(params, views, labels))``; its gradient is the mean
  of the views' gradients, which is what gets clipped.

  Args:
    per_view_loss: ``per_view_loss(params, images [K, H, W, C], labels [K])
      -> per-image losses [K]``.
    num_views: the augmentation multiplicity K, ``>= 1``.
    crop_padding: see :func:`augment`.
    flip: see :func:`augment`.
    augment_first_view: see :func:`make_views`.

  Returns:
    ``loss(params, example, key) -> scalar``.

  Raises:
    ValueError: at construction, on ``num_views < 1`` or a bad
      ``crop_padding``; at trace time, on an example that is not one image
      with one label, or a ``per_view_loss`` that does not return K losses.

  Privacy:
    The K views of an example are built from that example and its key only
    and enter one loss, so the clipped gradient is one per example and the
    sensitivity is the clip norm for any K (see the module docstring).
  """
  num_views = _check_num_views(num_views)
  crop_padding = _check_crop_padding(crop_padding)
  if not callable(per_view_loss):
    raise ValueError(
        f'per_view_loss must be callable, got {type(per_view_loss).__name__}'
    )

  def loss(params, example, key):
    image, label = _split_example(example)
    image, label = jnp.asarray(image), jnp.asarray(label)
    if image.ndim != 4 or image.shape[0] != 1:
      raise ValueError(
          'the example image must have shape [1, H, W, C] (one example with '
          f'its batch axis), got {tuple(image.shape)}'
      )
    if label.size != 1:
      raise ValueError(
          f'the example label must hold one label, got shape {label.shape}'
      )
    views = make_views(
        key,
        image,
        num_views,
        crop_padding=crop_padding,
        flip=flip,
        augment_first_view=augment_first_view,
    )
    labels = jnp.broadcast_to(label.reshape(()), (num_views,))
    losses = per_view_loss(params, views, labels)
    if jnp.shape(losses) != (num_views,):
      raise ValueError(
          f'per_view_loss must return one loss per view, shape '
          f'({num_views},), got {jnp.shape(losses)}'
      )
    return jnp.mean(losses)

  return loss
