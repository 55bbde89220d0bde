r"""DP LoRA fine-tuning of a keras-hub GPT-2 with `jax_privacy.keras_api`.

Without ``--preset``: builds a small byte-level GPT-2 from its config with
random weights, pretrains it (all weights, non-privately) on public text
that every machine has (docstrings of the Python standard library), saves
it as a keras-hub preset and loads it back with
``keras_lm.load_causal_lm(dir, lora_rank=...)`` as a user would load theirs.
Then it fine-tunes only the LoRA adapters with DP-SGD (epsilon 8) on a
generated "private" corpus of personal records, and prints the privacy
statement, the validation perplexity before and after, and a greedy and a
sampled continuation.

With ``--preset DIR``: the same fine-tuning of the user's own keras-hub
causal LM (a directory written by ``save_to_preset`` or downloaded
beforehand; it must include its tokenizer), on the same generated records.

Run::

    KERAS_BACKEND=jax python examples/keras_lora_finetuning.py --fast
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault('KERAS_BACKEND', 'jax')

# pylint: disable=g-import-not-at-top,wrong-import-position
import collections
import functools
import itertools
import json
import logging
import string
import textwrap

import keras
import keras_hub
import numpy as np

from jax_privacy import keras_api
from jax_privacy import keras_lm

_PUBLIC_MODULES = (collections, functools, itertools, json, string, textwrap)
_FIRST = ('Alice', 'Bruno', 'Chloe', 'Dmitri', 'Elena', 'Farid', 'Grace',
          'Hugo', 'Ines', 'Jonas', 'Keiko', 'Liam', 'Maya', 'Nils')
_LAST = ('Moreau', 'Schmidt', 'Rossi', 'Novak', 'Silva', 'Tanaka', 'Okafor',
         'Larsen', 'Dubois', 'Kowalski', 'Haddad', 'Brennan')
_CITIES = ('Lyon', 'Porto', 'Graz', 'Turku', 'Leeds', 'Ghent', 'Bergen',
           'Parma', 'Brno', 'Cork')
_ILLNESSES = ('asthma', 'flu', 'a fracture', 'migraine', 'eczema', 'gout')


def public_text() -> str:
  """Docstrings of a few standard-library modules: public, on every machine."""
  docs = []
  for module in _PUBLIC_MODULES:
    for name in dir(module):
      doc = getattr(getattr(module, name), '__doc__', None)
      if isinstance(doc, str) and len(doc) > 40:
        docs.append(' '.join(doc.split()))
  return ' '.join(docs).encode('ascii', 'ignore').decode()


def private_records(num: int, seed: int) -> list[str]:
  """Generated personal records: the "private" data set."""
  rng = np.random.default_rng(seed)
  records = []
  for _ in range(num):
    records.append(
        f'{rng.choice(_FIRST)} {rng.choice(_LAST)} of {rng.choice(_CITIES)}, '
        f'age {rng.integers(18, 90)}, was treated for '
        f'{rng.choice(_ILLNESSES)}.'
    )
  return records


def byte_sequences(texts, length: int) -> list[np.ndarray]:
  return [np.frombuffer(t.encode()[: length + 1], np.uint8).astype(np.int32)
          for t in texts]


def chunks(text: str, length: int) -> list[str]:
  starts = range(0, len(text) - length, length)
  return [text[i : i + length + 1] for i in starts]


def pretrain_to_preset(
    directory: str, *, fast: bool, seed: int, sequence_length: int
) -> None:
  """A small byte-level GPT-2 pretrained on public text, saved as a preset."""
  keras.utils.set_random_seed(seed)
  backbone = keras_hub.models.GPT2Backbone(
      vocabulary_size=256, num_layers=2, num_heads=2, hidden_dim=128,
      intermediate_dim=256, max_sequence_length=sequence_length,
      dropout=0.0,
  )
  causal_lm = keras_hub.models.GPT2CausalLM(
      backbone=backbone, preprocessor=None
  )
  x, y = keras_lm.prepare_sequences(
      causal_lm,
      byte_sequences(chunks(public_text(), sequence_length), sequence_length),
  )
  causal_lm.compile(
      optimizer=keras.optimizers.Adam(3e-3),
      loss=keras_lm.SequenceCrossentropy(token_reduction='mean'),
  )
  start = time.time()
  steps = 40 if fast else 300
  rows = np.random.default_rng(seed).integers(0, len(y), (steps, 32))
  for batch in rows:
    causal_lm.train_on_batch({k: v[batch] for k, v in x.items()}, y[batch])
  logging.info('pretrained on %d public sequences, %d steps (%.0f s)',
               len(y), steps, time.time() - start)
  causal_lm.save_to_preset(directory)


def run(
    *,
    preset: str | None = None,
    fast: bool = False,
    epsilon: float = 8.0,
    lora_rank: int = 4,
    sequence_length: int = 64,
    seed: int = 0,
) -> dict:
  """Fine-tunes with DP LoRA; returns what the script prints."""
  with tempfile.TemporaryDirectory() as scratch:
    if preset is None:
      directory = os.path.join(scratch, 'pretrained')
      pretrain_to_preset(directory, fast=fast, seed=seed,
                         sequence_length=sequence_length)
    else:
      directory = preset
    causal_lm = keras_lm.load_causal_lm(directory, lora_rank=lora_rank)

  num_train = 512 if fast else 4000
  records = private_records(num_train + 200, seed=seed + 1)
  train, valid = records[:num_train], records[num_train:]
  if preset is None:
    train, valid = (byte_sequences(part, sequence_length)
                    for part in (train, valid))
  x, y = keras_lm.prepare_sequences(
      causal_lm, train, sequence_length=sequence_length)
  x_val, y_val = keras_lm.prepare_sequences(
      causal_lm, valid, sequence_length=y.shape[1])
  before = keras_lm.perplexity(causal_lm, x_val, y_val)

  train_steps = 16 if fast else 150
  config = keras_api.DPKerasConfig(
      epsilon=epsilon, delta=1.0 / (10 * num_train), clipping_norm=1.0,
      batch_size=32 if fast else 128, gradient_accumulation_steps=1,
      train_steps=train_steps, train_size=len(y), seed=seed,
  )
  model = keras_api.make_private(causal_lm, config)
  model.compile(optimizer=keras.optimizers.Adam(1e-2),
                loss=keras_lm.SequenceCrossentropy(token_reduction='sum'),
                weighted_metrics=[keras_lm.SequenceAccuracy()])
  start = time.time()
  history = model.fit(x, y, epochs=1, steps_per_epoch=train_steps, verbose=0)
  seconds = time.time() - start

  prompt = 'Maya Rossi of '
  samplers = {
      'greedy': 'greedy',
      'sampled': keras_hub.samplers.TopKSampler(k=5, seed=seed),
  }
  texts = {}
  for name, sampler in samplers.items():
    if preset is None:
      (out,) = keras_lm.generate(
          causal_lm, byte_sequences([prompt], sequence_length),
          max_length=48, sampler=sampler)
      texts[name] = bytes(out.astype(np.uint8).tolist()).decode(
          errors='replace')
    else:
      (texts[name],) = keras_lm.generate(
          causal_lm, [prompt], max_length=48, sampler=sampler)
  return {
      'statement': keras_lm.privacy_statement(model,
                                              sequence_length=y.shape[1]),
      'epsilon_spent': history.history['epsilon'][-1],
      'noise_multiplier': keras_api.get_noise_multiplier(model),
      'train_steps': train_steps,
      'seconds': seconds,
      'perplexity_before': before,
      'perplexity_after': keras_lm.perplexity(causal_lm, x_val, y_val),
      **texts,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', help='a local keras-hub preset directory '
                      '(with its tokenizer) to fine-tune instead')
  parser.add_argument('--fast', action='store_true', help='a quick smoke run')
  parser.add_argument('--epsilon', type=float, default=8.0)
  parser.add_argument('--lora-rank', type=int, default=4)
  parser.add_argument('--sequence-length', type=int, default=64)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  result = run(preset=args.preset, fast=args.fast, epsilon=args.epsilon,
               lora_rank=args.lora_rank,
               sequence_length=args.sequence_length, seed=args.seed)
  print(result['statement'])
  print(f'epsilon spent: {result["epsilon_spent"]:.3f} (noise multiplier '
        f'{result["noise_multiplier"]:.3f}, {result["train_steps"]} DP-SGD '
        f'updates in {result["seconds"]:.0f} s)')
  print(f'validation perplexity: {result["perplexity_before"]:.2f} before, '
        f'{result["perplexity_after"]:.2f} after DP LoRA fine-tuning')
  print(f'greedy:  {result["greedy"]!r}')
  print(f'sampled: {result["sampled"]!r}')


if __name__ == '__main__':
  main()
