"""The tiny image-classification run shared by the runner's test files.

A WRN-10-1 on scikit-learn's digits at their native 8x8 resolution (the
32x32 ``digits32`` images subsampled back), so that a DP run of a few steps
compiles and runs fast on a CPU.
"""

from experiments.image_classification import data

TINY = dict(
    model='wrn-10-1',
    dataset='digits32',
    num_classes=10,
    image_size=8,
    crop_padding=1,
    flip=False,
    epsilon=8.0,
    delta=1e-5,
    batch_size=128,
    physical_batch_size=160,
    augmult=2,
    num_steps=12,
    learning_rate=4.0,
    grad_method='vectorized',
    ema_decay=0.8,
    polyak_start_step=6,
    eval_every=6,
    log_every=6,
)


def digits(stride: int):
  """``(train, test)`` of the 32x32 digits, subsampled by ``stride``."""
  train_split, test_split = data.digits_32x32()
  return tuple(
      {'image': s['image'][:, ::stride, ::stride], 'label': s['label']}
      for s in (train_split, test_split)
  )
