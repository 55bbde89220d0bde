"""Image data sets from files the user has: CIFAR, NumPy arrays, folders.

Every loader returns splits as dicts of NumPy arrays,
``{'image': [N, H, W, C], 'label': int32 [N]}`` (plus ``'group': int32
[N]`` when the data defines subgroups), with images ``uint8`` in [0, 255]
(or ``float32``, for NumPy files that hold floats). Nothing is downloaded:
a missing file raises ``FileNotFoundError`` saying which file to put where,
before anything large is read. :func:`load_dataset` dispatches by name and
returns ``(train, test)``.

Normalisation uses fixed per-data-set constants (:data:`DATASET_STATS`),
never statistics computed from the training data: a mean or standard
deviation of the private images would be a release about them that the
privacy accounting does not cover.

Privacy:
  The loaders only read files; which examples enter a training step is
  decided by the trainer's sampler. CIFAR files are Python pickles: load
  only files you trust (a pickle can run code).
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from experiments.image_classification import _image_folder

Split = dict[str, np.ndarray]

CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar.html'

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NEUTRAL_MEAN = (0.5, 0.5, 0.5)
NEUTRAL_STD = (0.5, 0.5, 0.5)

# Public constants per data set: (mean, std) of the RGB channels in [0, 1].
DATASET_STATS = {
    'cifar10': (CIFAR10_MEAN, CIFAR10_STD),
    'cifar100': (CIFAR100_MEAN, CIFAR100_STD),
    'imagenet': (IMAGENET_MEAN, IMAGENET_STD),
    'digits32': (NEUTRAL_MEAN, NEUTRAL_STD),
    'numpy': (NEUTRAL_MEAN, NEUTRAL_STD),
    'image_folder': (NEUTRAL_MEAN, NEUTRAL_STD),
}

DATASETS = ('cifar10', 'cifar100', 'numpy', 'image_folder', 'digits32')

_WHAT_TO_PUT = {
    'cifar10': f'cifar-10-python.tar.gz from {CIFAR_URL}, extracted',
    'cifar100': f'cifar-100-python.tar.gz from {CIFAR_URL}, extracted',
    'numpy': 'train.npz and test.npz with image= and label= arrays',
    'image_folder': 'train/<class>/*.png and test/<class>/*.png',
}


class Splits(NamedTuple):
  """The train and test splits of a data set."""

  train: Split
  test: Split


def normalize(images, mean=CIFAR10_MEAN, std=CIFAR10_STD):
  """Scales images to [0, 1] and standardises each channel.

  Integer images (``uint8``) are divided by 255; float images are taken
  to be in [0, 1] already. Then ``(x - mean) / std`` per channel. Works on
  NumPy and JAX arrays, inside ``jit``.

  Args:
    images: ``[..., C]`` images.
    mean: per-channel means (in [0, 1] units), length C or a scalar.
    std: per-channel standard deviations, length C or a scalar.

  Returns:
    ``float32`` images of the same shape.
  """
  images = jnp.asarray(images)
  if jnp.issubdtype(images.dtype, jnp.integer):
    images = images.astype(jnp.float32) / 255.0
  else:
    images = images.astype(jnp.float32)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images - mean) / std


def check_split(split: Split, *, name: str = 'split') -> Split:
  """Validates a split and returns it with canonical dtypes.

  Args:
    split: ``{'image': [N, H, W, C], 'label': [N]}``, optionally with
      ``'group': [N]``.
    name: what to call the split in error messages.

  Returns:
    The split with ``uint8`` (integer inputs in [0, 255]) or ``float32``
    images and ``int32`` labels and groups.

  Raises:
    ValueError: on missing keys, images that are not 4-D, lengths that
      differ, non-integer or negative labels, or integer images outside
      [0, 255].
  """
  missing = {'image', 'label'} - set(split)
  if missing:
    raise ValueError(
        f"the {name} split needs 'image' and 'label' arrays; missing "
        f'{sorted(missing)}, got keys {sorted(split)}'
    )
  images = split['image']
  if images.ndim != 4:
    raise ValueError(
        f'the {name} images must have shape [N, H, W, C] (NHWC), got shape '
        f'{tuple(images.shape)}'
    )
  if np.issubdtype(images.dtype, np.integer):
    if images.dtype != np.uint8:
      low, high = int(np.min(images)), int(np.max(images))
      if low < 0 or high > 255:
        raise ValueError(
            f'the {name} integer images must be in [0, 255], got values in '
            f'[{low}, {high}]'
        )
      images = images.astype(np.uint8)
  elif np.issubdtype(images.dtype, np.floating):
    if images.dtype != np.float32:
      images = images.astype(np.float32)
  else:
    raise ValueError(
        f'the {name} images must be uint8 or float, got dtype {images.dtype}'
    )
  out = {'image': images}
  for key in ('label', 'group'):
    if key not in split:
      continue
    values = np.asarray(split[key])
    if values.ndim != 1 or len(values) != len(images):
      raise ValueError(
          f'the {name} {key}s must have shape [{len(images)}] (one per '
          f'image), got shape {values.shape}'
      )
    if not np.issubdtype(values.dtype, np.integer):
      raise ValueError(
          f'the {name} {key}s must be integers, got dtype {values.dtype}'
      )
    if values.size and values.min() < 0:
      raise ValueError(
          f'the {name} {key}s must be >= 0, got a minimum of {values.min()}'
      )
    out[key] = values.astype(np.int32)
  return out


def _cifar_root(data_dir: str, folder: str, files: Sequence[str],
                archive: str) -> str:
  """The directory holding the CIFAR files: ``data_dir`` or its child."""
  for candidate in (data_dir, os.path.join(data_dir, folder)):
    if all(os.path.isfile(os.path.join(candidate, f)) for f in files):
      return candidate
  expected = os.path.join(data_dir, folder)
  missing = [
      f for f in files if not os.path.isfile(os.path.join(expected, f))
  ]
  raise FileNotFoundError(
      f'{folder} not found under {data_dir!r} (missing {missing} in '
      f'{expected!r}): download {archive} from {CIFAR_URL} and extract it '
      f'(tar xzf {archive} -C {data_dir}) so that '
      f'{os.path.join(expected, files[0])} exists'
  )


def _read_pickle(path: str) -> dict:
  with open(path, 'rb') as f:
    try:
      return pickle.load(f, encoding='bytes')
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
      raise ValueError(
          f'{path} is not a CIFAR python pickle ({e}); re-extract the '
          f'archive from {CIFAR_URL}'
      ) from e


def _cifar_batches(paths: Sequence[str], label_key: bytes,
                   num_classes: int) -> Split:
  images, labels = [], []
  for path in paths:
    batch = _read_pickle(path)
    if not isinstance(batch, dict) or b'data' not in batch or (
        label_key not in batch
    ):
      keys = sorted(batch) if isinstance(batch, dict) else type(batch)
      raise ValueError(
          f"{path} must be a dict with b'data' and {label_key!r}, got {keys}"
      )
    data = np.asarray(batch[b'data'])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
      raise ValueError(
          f"{path}: b'data' must have shape [N, 3072] (32x32 RGB rows), got "
          f'{data.shape}'
      )
    batch_labels = np.asarray(batch[label_key])
    if batch_labels.shape != (len(data),):
      raise ValueError(
          f'{path}: {label_key!r} must hold {len(data)} labels, got shape '
          f'{batch_labels.shape}'
      )
    if batch_labels.size and (
        batch_labels.min() < 0 or batch_labels.max() >= num_classes
    ):
      raise ValueError(
          f'{path}: labels must be in [0, {num_classes}), got values in '
          f'[{batch_labels.min()}, {batch_labels.max()}]'
      )
    # Rows are channel-major (1024 red, 1024 green, 1024 blue values).
    images.append(
        data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    )
    labels.append(batch_labels.astype(np.int32))
  return {'image': np.concatenate(images), 'label': np.concatenate(labels)}


def load_cifar10(data_dir: str) -> Splits:
  """CIFAR-10 from its python version (``cifar-10-python.tar.gz``).

  Args:
    data_dir: the extracted ``cifar-10-batches-py`` directory, or its
      parent.

  Returns:
    ``Splits(train, test)``: 50,000 and 10,000 ``uint8`` 32x32x3 images.

  Raises:
    FileNotFoundError: if ``data_batch_1..5`` or ``test_batch`` is
      missing, naming where to put them.
    ValueError: on files of the wrong format or shape.
  """
  files = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
  root = _cifar_root(
      data_dir, 'cifar-10-batches-py', files, 'cifar-10-python.tar.gz'
  )
  paths = [os.path.join(root, f) for f in files]
  return Splits(
      train=_cifar_batches(paths[:5], b'labels', 10),
      test=_cifar_batches(paths[5:], b'labels', 10),
  )


def load_cifar100(data_dir: str, *, coarse_labels: bool = False) -> Splits:
  """CIFAR-100 from its python version (``cifar-100-python.tar.gz``).

  Args:
    data_dir: the extracted ``cifar-100-python`` directory, or its parent.
    coarse_labels: use the 20 superclasses instead of the 100 classes.

  Returns:
    ``Splits(train, test)``: 50,000 and 10,000 ``uint8`` 32x32x3 images.

  Raises:
    FileNotFoundError: if ``train`` or ``test`` is missing, naming where to
      put them.
    ValueError: on files of the wrong format or shape.
  """
  root = _cifar_root(
      data_dir, 'cifar-100-python', ['train', 'test'],
      'cifar-100-python.tar.gz',
  )
  key, num_classes = (
      (b'coarse_labels', 20) if coarse_labels else (b'fine_labels', 100)
  )
  return Splits(
      train=_cifar_batches([os.path.join(root, 'train')], key, num_classes),
      test=_cifar_batches([os.path.join(root, 'test')], key, num_classes),
  )


_NPZ_KEYS = (('image', 'label'), ('images', 'labels'), ('x', 'y'))


def load_numpy(path: str | Sequence[str]) -> Split:
  """One split from NumPy files.

  Args:
    path: a ``.npz`` file with keys ``image``/``label`` (or
      ``images``/``labels``, or ``x``/``y``; optional ``group``), a
      directory holding ``images.npy`` and ``labels.npy`` (optional
      ``groups.npy``), or a pair ``(images.npy, labels.npy)`` of paths.
      ``.npy`` images are memory-mapped, so only the sampled rows are read
      when they are ``uint8`` or ``float32``.

  Returns:
    The split (see :func:`check_split`).

  Raises:
    FileNotFoundError: if a file is missing.
    ValueError: on missing keys or wrong shapes.
  """
  if not isinstance(path, (str, os.PathLike)):
    image_path, label_path = (os.fspath(p) for p in path)
    group_path = None
  elif os.fspath(path).endswith('.npz'):
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f'{path} not found: write it with np.savez({path!r}, image=images '
          '[N, H, W, C] uint8, label=labels [N] int)'
      )
    with np.load(path) as npz:
      for image_key, label_key in _NPZ_KEYS:
        if image_key in npz.files and label_key in npz.files:
          split = {'image': npz[image_key], 'label': npz[label_key]}
          if 'group' in npz.files:
            split['group'] = npz['group']
          return check_split(split, name=os.fspath(path))
      raise ValueError(
          f'{path} must hold arrays named image/label (or images/labels, or '
          f'x/y), got {sorted(npz.files)}'
      )
  else:
    image_path = os.path.join(path, 'images.npy')
    label_path = os.path.join(path, 'labels.npy')
    group_path = os.path.join(path, 'groups.npy')
  for p in (image_path, label_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(
          f'{p} not found: save the images [N, H, W, C] (uint8) and the '
          'labels [N] (int) with np.save as images.npy and labels.npy'
      )
  split = {
      'image': np.load(image_path, mmap_mode='r'),
      'label': np.load(label_path),
  }
  if group_path is not None and os.path.isfile(group_path):
    split['group'] = np.load(group_path)
  return check_split(split, name=image_path)


def _numpy_splits(data_dir: str) -> Splits:
  splits = []
  for name in ('train', 'test'):
    npz = os.path.join(data_dir, f'{name}.npz')
    folder = os.path.join(data_dir, name)
    if os.path.isfile(npz):
      splits.append(load_numpy(npz))
    elif os.path.isdir(folder):
      splits.append(load_numpy(folder))
    else:
      raise FileNotFoundError(
          f'no {name} split under {data_dir!r}: put {npz} (np.savez with '
          f'image= and label=) or {folder}/images.npy and '
          f'{folder}/labels.npy there'
      )
  return Splits(*splits)


def image_folder_classes(root: str) -> list[str]:
  """The class names of an image folder: the sorted sub-directories of
  ``root/train``; class ``c`` has label ``classes.index(c)``."""
  return _image_folder.classes(root)


def load_image_folder(root: str, *, image_size: int | None = None) -> Splits:
  """Images laid out as ``root/{train,test}/<class>/<image>``.

  Class ``c`` gets label ``image_folder_classes(root).index(c)`` (sorted
  names of the train folders); the test split may hold a subset of them.
  ``root/val`` stands in for ``root/test`` when there is no ``test``
  folder (ImageNet's layout). Images are decoded with pillow (imported
  here, not at module load) and converted to RGB. Everything is held in
  memory: for a large data set use :func:`image_folder_to_numpy` once.

  Args:
    root: the data set directory.
    image_size: resize every image to ``image_size x image_size``
      (bilinear); None requires them all to have the same size.

  Returns:
    ``Splits(train, test)`` with ``uint8`` images.

  Raises:
    FileNotFoundError: if ``root/train`` or ``root/test`` is missing or
      empty.
    ValueError: on a test class absent from train, or images of different
      sizes without ``image_size``.
    ImportError: if pillow is not installed.
  """
  _image_folder.check_image_size(image_size)
  names, files = _image_folder.listing(root)
  image_lib = _image_folder.pil()
  splits = []
  for split in _image_folder.SPLITS:
    images, labels = [], []
    for path, label in files[split]:
      array = _image_folder.decode(image_lib, path, image_size)
      if images and array.shape != images[0].shape:
        raise ValueError(
            f'{path} has shape {array.shape}, other images '
            f'{images[0].shape}: pass image_size to resize them all'
        )
      images.append(array)
      labels.append(label)
    splits.append(check_split(
        {'image': np.stack(images), 'label': np.asarray(labels, np.int32)},
        name=os.path.join(root, split),
    ))
  logging.info(
      'image folder %s: %d train, %d test images, %d classes', root,
      len(splits[0]['label']), len(splits[1]['label']), len(names),
  )
  return Splits(*splits)


def image_folder_to_numpy(root: str, out_dir: str, *, image_size: int
                          ) -> Splits:
  """Converts an image folder to ``.npy`` files, one image at a time.

  Writes ``out_dir/{train,test}/images.npy`` (``uint8 [N, image_size,
  image_size, 3]``, filled through a memory map, so the data set never has
  to fit in memory) and ``labels.npy``; ``load_dataset('numpy', out_dir)``
  then memory-maps them and the trainer reads only the sampled rows. Use
  it once for ImageNet-sized folders.

  Args:
    root: the image folder (see :func:`load_image_folder`).
    out_dir: where to write; created if needed.
    image_size: the side every image is resized to.

  Returns:
    The memory-mapped ``Splits(train, test)``.

  Raises:
    FileNotFoundError, ValueError, ImportError: as :func:`load_image_folder`.
  """
  _image_folder.check_image_size(image_size)
  if image_size is None:
    raise ValueError('image_size must be an integer >= 1, got None')
  _, files = _image_folder.listing(root)
  image_lib = _image_folder.pil()
  for split in _image_folder.SPLITS:
    directory = os.path.join(out_dir, split)
    os.makedirs(directory, exist_ok=True)
    images = np.lib.format.open_memmap(
        os.path.join(directory, 'images.npy'), mode='w+', dtype=np.uint8,
        shape=(len(files[split]), image_size, image_size, 3),
    )
    for i, (path, _) in enumerate(files[split]):
      images[i] = _image_folder.decode(image_lib, path, image_size)
    images.flush()
    del images
    np.save(
        os.path.join(directory, 'labels.npy'),
        np.asarray([label for _, label in files[split]], np.int32),
    )
  return _numpy_splits(out_dir)


def digits_32x32(*, test_fraction: float = 0.2, seed: int = 0) -> Splits:
  """scikit-learn's bundled digits as 32x32x3 ``uint8`` images.

  The 1,797 8x8 images (values 0..16) are upsampled 4x by pixel
  repetition, scaled to [0, 255] and repeated over 3 channels; a seeded
  permutation splits them. For tests and smoke runs: no download needed.

  Args:
    test_fraction: fraction of the images in the test split, in (0, 1).
    seed: seed of the split.

  Returns:
    ``Splits(train, test)`` with 10 classes.

  Raises:
    ValueError: on a ``test_fraction`` outside (0, 1).
    ImportError: if scikit-learn is not installed.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}')
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'digits_32x32 needs scikit-learn: pip install scikit-learn'
    ) from e
  digits = datasets.load_digits()
  small = np.asarray(digits.images, np.float64)
  big = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)
  images = np.round(big * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = np.asarray(digits.target, np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  num_test = int(round(test_fraction * len(labels)))
  test, train = order[:num_test], order[num_test:]
  return Splits(
      train={'image': images[train], 'label': labels[train]},
      test={'image': images[test], 'label': labels[test]},
  )


def load_dataset(name: str, data_dir: str | None = None, **kwargs: Any
                 ) -> Splits:
  """Loads a data set by name.

  Args:
    name: one of :data:`DATASETS`: ``'cifar10'``, ``'cifar100'`` (the
      python versions, see :func:`load_cifar10`), ``'numpy'`` (``data_dir``
      holds ``train.npz`` and ``test.npz``, or ``train/`` and ``test/``
      with ``images.npy`` and ``labels.npy``), ``'image_folder'`` (see
      :func:`load_image_folder`) or ``'digits32'`` (no files needed).
    data_dir: where the files are (ignored for ``'digits32'``).
    **kwargs: passed to the loader (e.g. ``image_size`` for
      ``'image_folder'``).

  Returns:
    ``Splits(train, test)``.

  Raises:
    ValueError: on an unknown name, or no ``data_dir`` for a data set that
      needs files.
    FileNotFoundError: if files are missing (the message says which).
  """
  if name not in DATASETS:
    raise ValueError(f'dataset must be one of {DATASETS}, got {name!r}')
  if name == 'digits32':
    return digits_32x32(**kwargs)
  if not data_dir:
    raise ValueError(
        f'data_dir must name the directory holding the {name!r} files, got '
        f'{data_dir!r}'
    )
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f'data_dir {data_dir!r} does not exist; create it and put the '
        f'{name!r} files there ({_WHAT_TO_PUT[name]})'
    )
  loader = {
      'cifar10': load_cifar10,
      'cifar100': load_cifar100,
      'numpy': _numpy_splits,
      'image_folder': load_image_folder,
  }[name]
  return loader(data_dir, **kwargs)
