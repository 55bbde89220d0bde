"""Tests of experiments/image_classification/data.py."""

import os
import pickle

import numpy as np
import pytest

from experiments.image_classification import data


def _cifar_rows(n, seed):
  """CIFAR rows (channel-major) and the NHWC images they encode."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
  rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)
  return rows, images


def _write_cifar10(directory, per_batch=4):
  folder = directory / 'cifar-10-batches-py'
  folder.mkdir(parents=True)
  want_images, want_labels = [], []
  names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
  for i, name in enumerate(names):
    rows, images = _cifar_rows(per_batch, i)
    labels = [(i + j) % 10 for j in range(per_batch)]
    with open(folder / name, 'wb') as f:
      pickle.dump({b'data': rows, b'labels': labels, b'batch_label': b'x'}, f)
    want_images.append(images)
    want_labels.append(labels)
  return folder, want_images, want_labels


def test_cifar10_from_parent_and_from_the_folder(tmp_path):
  folder, images, labels = _write_cifar10(tmp_path)
  for where in (tmp_path, folder):
    train, test = data.load_cifar10(str(where))
    np.testing.assert_array_equal(train['image'], np.concatenate(images[:5]))
    np.testing.assert_array_equal(train['label'], np.concatenate(labels[:5]))
    np.testing.assert_array_equal(test['image'], images[5])
    assert train['image'].dtype == np.uint8 and train['label'].dtype == np.int32
    assert train['image'].shape == (20, 32, 32, 3)


def test_cifar_pixel_layout(tmp_path):
  """Row = 1024 red, 1024 green, 1024 blue values, each row-major."""
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  row = np.zeros(3072, np.uint8)
  row[0] = 10  # red, pixel (0, 0)
  row[1024 + 33] = 20  # green, pixel (1, 1)
  row[2048 + 31] = 30  # blue, pixel (0, 31)
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    with open(folder / name, 'wb') as f:
      pickle.dump({b'data': row[None], b'labels': [3]}, f)
  image = data.load_cifar10(str(tmp_path)).train['image'][0]
  assert image[0, 0, 0] == 10 and image[1, 1, 1] == 20 and image[0, 31, 2] == 30
  assert image.sum() == 60


def test_cifar10_missing_file_says_what_to_do(tmp_path):
  folder, _, _ = _write_cifar10(tmp_path)
  os.remove(folder / 'data_batch_3')
  with pytest.raises(FileNotFoundError) as info:
    data.load_cifar10(str(tmp_path))
  message = str(info.value)
  assert 'data_batch_3' in message
  assert 'cifar-10-python.tar.gz' in message and data.CIFAR_URL in message
  assert os.path.join(str(tmp_path), 'cifar-10-batches-py', 'data_batch_1') in (
      message
  )
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.load_dataset('cifar10', str(tmp_path / 'nowhere'))


def test_cifar10_bad_content(tmp_path):
  folder, _, _ = _write_cifar10(tmp_path)
  with open(folder / 'test_batch', 'wb') as f:
    pickle.dump({b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]}, f)
  with pytest.raises(ValueError, match='3072'):
    data.load_cifar10(str(tmp_path))
  with open(folder / 'test_batch', 'wb') as f:
    pickle.dump({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, 10]}, f)
  with pytest.raises(ValueError, match=r'\[0, 10\)'):
    data.load_cifar10(str(tmp_path))
  with open(folder / 'test_batch', 'wb') as f:
    f.write(b'not a pickle')
  with pytest.raises(ValueError, match='pickle'):
    data.load_cifar10(str(tmp_path))


def test_cifar100(tmp_path):
  folder = tmp_path / 'cifar-100-python'
  folder.mkdir()
  rows, images = _cifar_rows(6, 0)
  for name in ('train', 'test'):
    with open(folder / name, 'wb') as f:
      pickle.dump({b'data': rows, b'fine_labels': [99, 0, 5, 6, 7, 8],
                   b'coarse_labels': [19, 0, 1, 2, 3, 4]}, f)
  train, test = data.load_dataset('cifar100', str(tmp_path))
  np.testing.assert_array_equal(train['image'], images)
  np.testing.assert_array_equal(test['label'], [99, 0, 5, 6, 7, 8])
  coarse = data.load_cifar100(str(folder), coarse_labels=True)
  np.testing.assert_array_equal(coarse.train['label'], [19, 0, 1, 2, 3, 4])
  os.remove(folder / 'test')
  with pytest.raises(FileNotFoundError, match='cifar-100-python.tar.gz'):
    data.load_cifar100(str(tmp_path))


def test_numpy_npz_key_variants_and_pairs(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 8, 8, 3)).astype(np.uint8)
  labels = np.arange(5)
  for keys in (('image', 'label'), ('images', 'labels'), ('x', 'y')):
    path = str(tmp_path / f'{keys[0]}.npz')
    np.savez(path, **{keys[0]: images, keys[1]: labels})
    split = data.load_numpy(path)
    np.testing.assert_array_equal(split['image'], images)
    assert split['label'].dtype == np.int32
  np.save(tmp_path / 'im.npy', images)
  np.save(tmp_path / 'lab.npy', labels)
  split = data.load_numpy((str(tmp_path / 'im.npy'), str(tmp_path / 'lab.npy')))
  np.testing.assert_array_equal(split['label'], labels)
  np.savez(tmp_path / 'bad.npz', a=images)
  with pytest.raises(ValueError, match='image/label'):
    data.load_numpy(str(tmp_path / 'bad.npz'))
  with pytest.raises(FileNotFoundError, match='np.savez'):
    data.load_numpy(str(tmp_path / 'absent.npz'))


def test_numpy_dataset_layouts_and_groups(tmp_path):
  images = np.full((4, 6, 6, 3), 0.5, np.float64)
  np.savez(tmp_path / 'train.npz', image=images, label=[0, 1, 2, 3],
           group=[0, 0, 1, 1])
  test_dir = tmp_path / 'test'
  test_dir.mkdir()
  np.save(test_dir / 'images.npy', images.astype(np.float32))
  np.save(test_dir / 'labels.npy', np.array([1, 1, 0, 0]))
  np.save(test_dir / 'groups.npy', np.array([2, 0, 1, 0]))
  train, test = data.load_dataset('numpy', str(tmp_path))
  assert train['image'].dtype == np.float32
  np.testing.assert_array_equal(train['group'], [0, 0, 1, 1])
  np.testing.assert_array_equal(test['group'], [2, 0, 1, 0])
  assert isinstance(test['image'], np.memmap)  # Read lazily.
  os.remove(tmp_path / 'train.npz')
  with pytest.raises(FileNotFoundError, match='train.npz'):
    data.load_dataset('numpy', str(tmp_path))


@pytest.mark.parametrize(
    'split, match',
    [
        ({'image': np.zeros((3, 4, 4)), 'label': np.zeros(3, int)}, 'NHWC'),
        ({'image': np.zeros((3, 4, 4, 3)), 'label': np.zeros(2, int)},
         r'shape \[3\]'),
        ({'image': np.zeros((3, 4, 4, 3)), 'label': np.zeros(3)}, 'integers'),
        ({'image': np.zeros((3, 4, 4, 3)), 'label': -np.ones(3, int)}, '>= 0'),
        ({'image': np.full((1, 2, 2, 3), 300), 'label': np.zeros(1, int)},
         r'\[0, 255\]'),
        ({'image': np.zeros((1, 2, 2, 3))}, "'label'"),
    ],
)
def test_check_split_rejects(split, match):
  with pytest.raises(ValueError, match=match):
    data.check_split(split)


def test_check_split_casts_small_integer_images():
  split = data.check_split(
      {'image': np.full((1, 2, 2, 3), 200, np.int64), 'label': [4]}
  )
  assert split['image'].dtype == np.uint8 and split['image'].max() == 200


def test_image_folder(tmp_path):
  pil = pytest.importorskip('PIL.Image')
  colours = {'cat': (255, 0, 0), 'ant': (0, 255, 0), 'bee': (0, 0, 255)}
  for split, classes in (('train', colours), ('test', ['bee', 'cat'])):
    for c in classes:
      folder = tmp_path / split / c
      folder.mkdir(parents=True)
      for i in range(2):
        pil.new('RGB', (5, 4), colours[c]).save(folder / f'{i}.png')
  (tmp_path / 'train' / 'ant' / 'notes.txt').write_text('ignored')
  assert data.image_folder_classes(str(tmp_path)) == ['ant', 'bee', 'cat']
  train, test = data.load_dataset('image_folder', str(tmp_path))
  assert train['image'].shape == (6, 4, 5, 3)
  np.testing.assert_array_equal(train['label'], [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(test['label'], [1, 1, 2, 2])
  np.testing.assert_array_equal(train['image'][0, 0, 0], (0, 255, 0))
  np.testing.assert_array_equal(test['image'][3, 2, 2], (255, 0, 0))
  resized = data.load_image_folder(str(tmp_path), image_size=8)
  assert resized.train['image'].shape == (6, 8, 8, 3)
  pil.new('RGB', (7, 7)).save(tmp_path / 'train' / 'cat' / 'odd.png')
  with pytest.raises(ValueError, match='image_size'):
    data.load_image_folder(str(tmp_path))
  (tmp_path / 'test' / 'dog').mkdir()
  with pytest.raises(ValueError, match="'dog'"):
    data.load_image_folder(str(tmp_path), image_size=8)


def test_image_folder_val_alias_and_conversion_to_numpy(tmp_path):
  pil = pytest.importorskip('PIL.Image')
  rng = np.random.default_rng(0)
  want = {}
  for split in ('train', 'val'):
    for c in ('n01', 'n02'):
      folder = tmp_path / 'folder' / split / c
      folder.mkdir(parents=True)
      pixels = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
      pil.fromarray(pixels).save(folder / 'a.png')
      want[split, c] = pixels
  root = str(tmp_path / 'folder')
  in_memory = data.load_image_folder(root)
  np.testing.assert_array_equal(in_memory.test['image'][1], want['val', 'n02'])
  out = str(tmp_path / 'npy')
  converted = data.image_folder_to_numpy(root, out, image_size=6)
  assert isinstance(converted.train['image'], np.memmap)
  for a, b in zip(converted, in_memory):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  again = data.load_dataset('numpy', out)
  np.testing.assert_array_equal(again.test['label'], [0, 1])
  with pytest.raises(ValueError, match='image_size'):
    data.image_folder_to_numpy(root, out, image_size=0)


def test_image_folder_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match='train/<class>'):
    data.load_image_folder(str(tmp_path))
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='no images'):
    data.load_image_folder(str(tmp_path))


def test_digits32():
  pytest.importorskip('sklearn')
  train, test = data.load_dataset('digits32')
  assert train['image'].shape[1:] == (32, 32, 3)
  assert len(train['label']) + len(test['label']) == 1797
  assert len(test['label']) == 359
  assert train['image'].dtype == np.uint8 and train['image'].max() == 255
  # Pixel repetition: each 4x4 block is constant, channels are equal.
  image = train['image'][0]
  np.testing.assert_array_equal(image[::4, ::4], image[3::4, 3::4])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  again = data.digits_32x32()
  np.testing.assert_array_equal(again.test['label'], test['label'])
  other = data.digits_32x32(seed=1)
  assert not np.array_equal(other.test['label'], test['label'])


def test_load_dataset_bad_names():
  with pytest.raises(ValueError, match='dataset must be one of'):
    data.load_dataset('mnist', '/tmp')
  with pytest.raises(ValueError, match='data_dir'):
    data.load_dataset('cifar10', None)


def test_normalize():
  images = np.array([[[[0, 255, 51]]]], np.uint8)
  out = np.asarray(data.normalize(images, (0.0, 0.5, 0.2), (1.0, 0.5, 0.1)))
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)
  floats = np.asarray(data.normalize(np.full((1, 1, 1, 3), 0.5, np.float32)))
  want = (0.5 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
  np.testing.assert_allclose(floats[0, 0, 0], want, rtol=1e-6)
  for name in data.DATASETS:
    mean, std = data.DATASET_STATS[name]
    assert len(mean) == len(std) == 3
