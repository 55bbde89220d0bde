"""Listing and decoding an image-folder data set (private to ``data.py``).

Layout: ``root/train/<class>/<image>`` and ``root/test/<class>/<image>``
(``root/val/...`` is accepted for the test split, as in ImageNet's
layout). Pillow is imported only when images are decoded.
"""

from __future__ import annotations

import os

import numpy as np

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
SPLITS = ('train', 'test')


def classes(root: str) -> list[str]:
  """The sorted names of the class folders of ``root/train``."""
  train_dir = os.path.join(root, 'train')
  if not os.path.isdir(train_dir):
    raise FileNotFoundError(
        f'{train_dir} not found: lay the images out as '
        f'{root}/train/<class>/*.png and {root}/test/<class>/*.png'
    )
  names = sorted(
      d for d in os.listdir(train_dir)
      if os.path.isdir(os.path.join(train_dir, d))
  )
  if not names:
    raise FileNotFoundError(
        f'{train_dir} has no class folders: put the images of class c in '
        f'{train_dir}/c/'
    )
  return names


def split_dir(root: str, split: str) -> str:
  """``root/<split>``; for the test split ``root/val`` when there is no
  ``root/test``."""
  path = os.path.join(root, split)
  if split == 'test' and not os.path.isdir(path):
    val = os.path.join(root, 'val')
    if os.path.isdir(val):
      return val
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'{path} not found: lay the images out as {root}/{split}/<class>/'
        '*.png'
    )
  return path


def listing(root: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
  """The classes and, per split, the ``(path, label)`` of every image.

  Raises:
    FileNotFoundError: if a split folder is missing or holds no image.
    ValueError: if the test split has a class that train has not.
  """
  names = classes(root)
  index = {c: i for i, c in enumerate(names)}
  files_per_split = {}
  for split in SPLITS:
    directory = split_dir(root, split)
    files = []
    for c in sorted(os.listdir(directory)):
      class_dir = os.path.join(directory, c)
      if not os.path.isdir(class_dir):
        continue
      if c not in index:
        raise ValueError(
            f'{class_dir}: class {c!r} has no folder in {root}/train '
            f'(classes: {names})'
        )
      files.extend(
          (os.path.join(class_dir, f), index[c])
          for f in sorted(os.listdir(class_dir))
          if f.lower().endswith(IMAGE_SUFFIXES)
      )
    if not files:
      raise FileNotFoundError(
          f'no images ({", ".join(IMAGE_SUFFIXES)}) under {directory}/<class>/'
      )
    files_per_split[split] = files
  return names, files_per_split


def pil():
  """The ``PIL.Image`` module, or an ImportError saying what to install."""
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'reading an image folder needs pillow to decode images: pip install '
        'pillow'
    ) from e
  return Image


def decode(image_lib, path: str, image_size: int | None) -> np.ndarray:
  """One image as ``uint8 [H, W, 3]`` RGB, resized (bilinear) if asked."""
  with image_lib.open(path) as img:
    img = img.convert('RGB')
    if image_size is not None:
      img = img.resize((image_size, image_size), image_lib.BILINEAR)
    return np.asarray(img, np.uint8)


def check_image_size(image_size) -> None:
  if image_size is not None and (
      isinstance(image_size, bool)
      or not isinstance(image_size, int)
      or image_size < 1
  ):
    raise ValueError(
        f'image_size must be None or an integer >= 1, got {image_size!r}'
    )
