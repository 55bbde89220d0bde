"""DP fine-tuning of a small GPT with LoRA, and how much it memorises.

The script, end to end on CPU:

1. pretrains a small decoder (``examples/nnx_gpt.py``) non-privately on
   public text every machine has: the documentation strings of a fixed list
   of Python standard-library modules;
2. generates a "private" corpus of short records (orders, tickets,
   meetings) and inserts canaries, sentences like "Avery's secret code is 4
   8 1 5" whose secret is drawn uniformly from a space of known size; each
   canary is repeated a few times, as a secret sent in several messages is;
3. fine-tunes LoRA adapters (only the adapters: the pretrained weights are
   frozen and get no per-example gradients) with DP-SGD on
   ``training.DPTrainer`` at epsilon 8, and, with the same steps, batches
   and hyperparameters, without DP (no noise, no clipping);
4. reports the validation perplexity (held-out records of the same kind) of
   the pretrained, DP and non-private models, the exposure of each canary
   (Carlini et al. 2019, arXiv:1802.08232: ``log2 |R| - log2 rank`` of the
   secret among all ``|R|`` candidates, enumerated exactly) with and without
   DP, and greedy and sampled generations.

``--data FILE ...`` fine-tunes on your own text files instead (one record
per line, or per paragraph with ``--records paragraph``; canaries are still
inserted to measure memorisation; records longer than the model's context
are split into windows, each one sequence). ``--unit user`` protects users
rather than sequences: each user's sequences (up to
``--max_sequences_per_user``; a user's extra ones are dropped, and the
count is logged) are clipped as a whole; with ``--data`` each file is one
user, otherwise users hold 3 generated records each, and all copies of a
canary belong to one user. ``--fast`` is a tiny run for tests.

Run: ``python examples/dp_lora_finetuning.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import math
import os
import sys
import time
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nnx_gpt  # pylint: disable=g-import-not-at-top,wrong-import-position

from jax_privacy import flax_api  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax_privacy import lm_finetuning as lm  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax_privacy import training  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax_privacy.accounting import accountants  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax_privacy.experimental import execution_plan  # pylint: disable=g-import-not-at-top,wrong-import-position

NEWLINE = 10  # Byte token starting and ending every record.

# Public text: modules whose docstrings every CPython installation has.
STDLIB_MODULES = (
    'abc', 'argparse', 'base64', 'bisect', 'calendar', 'collections',
    'contextlib', 'copy', 'csv', 'dataclasses', 'datetime', 'decimal',
    'difflib', 'enum', 'fractions', 'functools', 'glob', 'heapq', 'hmac',
    'inspect', 'io', 'ipaddress', 'itertools', 'json', 'logging', 'math',
    'operator', 'os', 'pathlib', 'pickle', 'pprint', 'queue', 'random', 're',
    'sched', 'secrets', 'shlex', 'shutil', 'statistics', 'string', 'struct',
    'tempfile', 'textwrap', 'threading', 'timeit', 'tokenize', 'traceback',
    'typing', 'unittest', 'uuid', 'warnings', 'weakref', 'zipfile',
)

NAMES = (
    'Mia', 'Noah', 'Lena', 'Omar', 'Ines', 'Ravi', 'Zoe', 'Hugo', 'Aiko',
    'Theo', 'Sara', 'Ivan', 'Nora', 'Luca', 'Ana', 'Kofi',
)
# Names of one length: every canary's candidates have one shape (one compile).
CANARY_NAMES = ('Avery', 'Blake', 'Casey', 'Devon', 'Emery', 'Robin')
ITEMS = ('green tea', 'paper cups', 'ink', 'rice', 'coffee', 'soap',
         'batteries', 'lamps', 'maps', 'olive oil')
CITIES = ('Lisbon', 'Oslo', 'Lima', 'Kyoto', 'Accra', 'Quito', 'Porto',
          'Riga')
DAYS = ('Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday')
DEVICES = ('printer', 'router', 'laptop', 'scanner', 'phone')
PROBLEMS = ('will not start', 'is slow', 'shows an error', 'keeps beeping')


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes of one run (defaults: the full example; ``fast``: a test run)."""

  context_length: int = 56
  num_layers: int = 2
  num_heads: int = 4
  embed_dim: int = 64
  mlp_dim: int = 256
  pretrain_steps: int = 200
  pretrain_batch: int = 32
  num_records: int = 2500
  num_validation: int = 250
  num_canaries: int = 6
  canary_repeats: int = 12
  secret_digits: int = 4
  lora_rank: int = 8
  steps: int = 150
  batch_size: int = 128
  learning_rate: float = 1e-2
  clip_norm: float = 1.0
  epsilon: float = 8.0
  max_sequences_per_user: int = 8
  num_prompts: int = 2


FAST = Settings(
    context_length=48, num_layers=1, num_heads=2, embed_dim=32, mlp_dim=64,
    pretrain_steps=20, pretrain_batch=16, num_records=300, num_validation=40,
    num_canaries=2, canary_repeats=4, secret_digits=2, lora_rank=2, steps=8,
    batch_size=16, max_sequences_per_user=4, num_prompts=1,
)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


def stdlib_docstrings() -> list[str]:
  """Paragraphs of the docstrings of STDLIB_MODULES (deterministic order)."""
  paragraphs = []
  for name in STDLIB_MODULES:
    module = importlib.import_module(name)
    docs = [module.__doc__ or '']
    with warnings.catch_warnings():  # typing's deprecated aliases warn.
      warnings.simplefilter('ignore', DeprecationWarning)
      for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith('_') or getattr(obj, '__module__', None) != name:
          continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
          docs.append(obj.__doc__ or '')
    for doc in docs:
      for paragraph in inspect.cleandoc(doc).split('\n\n'):
        text = ' '.join(paragraph.split())
        if len(text) >= 20 and text.isascii():
          paragraphs.append(text)
  return paragraphs


def private_record(rng: np.random.Generator) -> str:
  """One synthetic record, like a line of a shop's or help desk's log."""
  name = NAMES[rng.integers(len(NAMES))]
  kind = rng.integers(3)
  if kind == 0:
    return (f'{name} ordered {rng.integers(2, 10)} boxes of '
            f'{ITEMS[rng.integers(len(ITEMS))]} for '
            f'{CITIES[rng.integers(len(CITIES))]}.')
  if kind == 1:
    return (f'Ticket {rng.integers(100, 1000)}: {name} says the '
            f'{DEVICES[rng.integers(len(DEVICES))]} '
            f'{PROBLEMS[rng.integers(len(PROBLEMS))]}.')
  return (f'{name} moved the meeting to {DAYS[rng.integers(len(DAYS))]} at '
          f'{rng.integers(8, 18)}:{rng.integers(0, 6)}0.')


def read_records(paths, per: str) -> tuple[list[str], list[int]]:
  """Records of the user's files (one per line or per paragraph), and the
  index of the file each came from (its user, with ``--unit user``)."""
  records, owners = [], []
  for index, path in enumerate(paths):
    with open(path, encoding='utf-8', errors='replace') as f:
      text = f.read()
    chunks = text.split('\n\n') if per == 'paragraph' else text.splitlines()
    found = [' '.join(c.split()) for c in chunks if c.strip()]
    records += found
    owners += [index] * len(found)
  if not records:
    raise ValueError(
        f'the corpus is empty: no non-blank {per} in {list(paths)}; give '
        'text files with one record per line (or per paragraph with '
        '--records paragraph)'
    )
  return records, owners


def tokens_of(text: str) -> np.ndarray:
  return np.concatenate([[NEWLINE], nnx_gpt.encode(text), [NEWLINE]])


# ----------------------------------------------------------------------------
# Model helpers
# ----------------------------------------------------------------------------


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  missing = rows - len(array)
  return np.concatenate([array, np.zeros((missing,) + array.shape[1:],
                                         array.dtype)]) if missing else array


def perplexity(model, examples, batch: int = 256) -> float:
  """Per-token perplexity over examples (model in eval mode)."""
  total, count = 0.0, 0.0
  for start in range(0, len(examples['inputs']), batch):
    # The last chunk is padded with masked rows: one shape, one compile.
    chunk = {k: _pad_rows(v[start : start + batch], batch)
             for k, v in examples.items()}
    logits = _logits(model, jnp.asarray(chunk['inputs']))
    total += float(jnp.sum(lm.sequence_loss(
        logits, chunk['targets'], chunk['mask'], reduction='sum')))
    count += float(np.sum(chunk['mask']))
  return math.exp(total / count)


def secret_log_perplexities(model, canary: lm.Canary) -> np.ndarray:
  """Log-perplexity (nats) of the secret part of every candidate.

  One forward pass per choice of all secret symbols but the last: causal
  logits at the last position give the last symbol's log-probabilities for
  all of its values at once. Row ``i`` is the candidate
  ``canary.all_secrets()[i]``.
  """
  base = len(canary.alphabet)
  secrets = canary.all_secrets().reshape(-1, base, canary.num_symbols)[:, 0]
  texts = [canary.format(s) for s in secrets]
  tokens = np.stack([tokens_of(t)[:-1] for t in texts])  # No end newline.
  prefix_len = len(tokens_of(canary.prefix)) - 1  # Newline + prefix bytes.
  digit_tokens = nnx_gpt.encode(canary.alphabet)
  scores = []
  for start in range(0, len(tokens), 1024):
    chunk = jnp.asarray(tokens[start : start + 1024])
    log_probs = jax.nn.log_softmax(_logits(model, chunk[:, :-1]), axis=-1)
    # Tokens after the prefix (space, symbols, separators), but the last.
    targets = chunk[:, 1:]
    positions = jnp.arange(prefix_len - 1, targets.shape[1] - 1)
    head = -jnp.sum(jnp.take_along_axis(
        log_probs[:, positions], targets[:, positions, None], axis=-1
    )[..., 0], axis=1)
    last = -log_probs[:, -1][:, digit_tokens]
    scores.append(np.asarray(head[:, None] + last).reshape(-1))
  return np.concatenate(scores)


def exposures(model, canaries) -> list[float]:
  """Exact exposure of each canary (rank over its whole space)."""
  out = []
  for canary in canaries:
    scores = secret_log_perplexities(model, canary)
    index = canary.index_of(canary.secret)
    out.append(lm.canary_exposure(scores[index], np.delete(scores, index)))
  return out


def pretrain(model, examples, settings: Settings, seed: int) -> None:
  """Non-private pretraining of all parameters, in place."""
  params, _ = flax_api.nnx_split_params(model)
  loss_fn = lm.nnx_causal_lm_loss(model, reduction='sum')
  optimizer = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, batch):
    def batch_loss(p):
      return loss_fn(p, batch) / jnp.sum(batch['mask'])
    loss, grads = jax.value_and_grad(batch_loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  rng = np.random.default_rng(seed)
  num = len(examples['inputs'])
  for _ in range(settings.pretrain_steps):
    idx = rng.integers(0, num, settings.pretrain_batch)
    batch = {k: jnp.asarray(v[idx]) for k, v in examples.items()}
    params, opt_state, _ = step(params, opt_state, batch)
  flax_api.nnx_update_params(model, params)


def finetune(model, data, num_examples, settings, *, private, seed, log):
  """LoRA fine-tuning on DPTrainer: DP, or no noise and no clipping."""
  if private:
    config = execution_plan.DpsgdExecutionPlanConfig(
        iterations=settings.steps, num_examples=num_examples,
        expected_batch_size=settings.batch_size,
        delta=10.0 ** -math.ceil(math.log10(num_examples)),
        epsilon=settings.epsilon, l2_clip_norm=settings.clip_norm,
        noise_seed=seed + 1,
        # PLD with a coarser grid: still an upper bound, and calibration
        # takes seconds instead of tens of seconds.
        accountant=accountants.PldAccountantConfig(1e-3),
    )
  else:
    # Same sampler, steps and optimizer; no noise, clipping far out of reach.
    config = execution_plan.DpsgdExecutionPlanConfig(
        iterations=settings.steps, num_examples=num_examples,
        expected_batch_size=settings.batch_size, delta=1e-5,
        noise_multiplier=0.0, l2_clip_norm=1e9, noise_seed=seed + 1,
    )
  params, _ = flax_api.nnx_split_params(model, trainable=nnx.LoRAParam)
  loss = lm.nnx_causal_lm_loss(model, reduction='mean',
                               trainable=nnx.LoRAParam)
  # Poisson batches vary around their mean: compile for mean + 2 stddev so
  # that few steps need a second chunk.
  expected = settings.batch_size
  physical = -(-int(expected + 2 * math.sqrt(expected)) // 8) * 8
  trainer = training.DPTrainer(
      loss_fn=loss, config=config,
      optimizer=optax.adam(settings.learning_rate),
      sampling_seed=seed + 2, physical_batch_size=physical,
  )
  tic = time.time()

  def progress(p: training.TrainProgress):
    log(f'  {"DP" if private else "non-private"} step {p.step}/'
        f'{config.iterations}, epsilon {p.epsilon:.4g} '
        f'({time.time() - tic:.0f} s)')

  state = trainer.fit(data, trainer.init(params), callbacks=[progress],
                      callback_every=50)
  return state.params, config


def generations(model, prompts, seed) -> list[tuple[str, str, str]]:
  out = []
  for prompt in prompts:
    tokens = np.concatenate([[NEWLINE], nnx_gpt.encode(prompt)])
    greedy = nnx_gpt.generate(model, tokens, num_tokens=24, greedy=True)
    sampled = nnx_gpt.generate(model, tokens, num_tokens=24,
                               key=jax.random.key(seed), temperature=0.8,
                               top_k=20)
    cut = lambda t: nnx_gpt.decode(t[len(tokens):]).split('\n')[0]
    out.append((prompt, cut(greedy), cut(sampled)))
  return out


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def run(settings: Settings, *, data_files=(), records_per='line',
        unit='sequence', seed=0, log=print) -> dict:
  """The whole experiment; returns the measured numbers."""
  started = time.time()
  rng = np.random.default_rng(seed)
  context = settings.context_length
  config = nnx_gpt.GPTConfig(
      vocab_size=nnx_gpt.VOCAB_SIZE, context_length=context,
      num_layers=settings.num_layers, num_heads=settings.num_heads,
      embed_dim=settings.embed_dim, mlp_dim=settings.mlp_dim,
  )
  model = nnx_gpt.GPT(config, rngs=nnx.Rngs(seed))

  if data_files:
    records, owners = read_records(data_files, records_per)
  else:
    records = [private_record(rng) for _ in range(settings.num_records)]
    owners = list(rng.permutation(len(records)) // 3)  # 3 records per user.
  order = rng.permutation(len(records))
  num_val = min(settings.num_validation, max(1, len(records) // 10))
  if len(records) - num_val < 1:
    raise ValueError(
        f'the corpus has {len(records)} record(s): too few to hold out '
        'validation records and still train; give more text'
    )
  validation = [records[i] for i in order[:num_val]]
  train = [records[i] for i in order[num_val:]]
  canaries = lm.make_canaries(
      seed, settings.num_canaries, num_symbols=settings.secret_digits,
      prefixes=[f"{n}'s secret code is"
                for n in CANARY_NAMES[: settings.num_canaries]],
  )
  users = [owners[i] for i in order[num_val:]]
  for c, canary in enumerate(canaries):
    owner = len(records) + c  # All copies of a canary belong to one user.
    train += [canary.text] * settings.canary_repeats
    users += [owner] * settings.canary_repeats
  examples, source = lm.make_lm_examples(
      [tokens_of(r) for r in train], context_length=context,
      pad_id=nnx_gpt.PAD_ID, long_sequences='split',
  )
  val_examples, _ = lm.make_lm_examples(
      [tokens_of(r) for r in validation], context_length=context,
      pad_id=nnx_gpt.PAD_ID, long_sequences='split',
  )
  if unit == 'user':
    grouped = lm.group_by_user(
        np.asarray(users)[source], examples,
        max_sequences_per_user=settings.max_sequences_per_user,
        too_many='truncate',
    )
    data, num_examples = grouped.examples, grouped.num_users
    privacy_unit = lm.PrivacyUnit(
        kind='user', max_tokens=context,
        max_sequences_per_user=settings.max_sequences_per_user)
  else:
    data, num_examples = examples, len(examples['inputs'])
    privacy_unit = lm.PrivacyUnit(max_tokens=context)
  public, _ = lm.make_lm_examples(
      [tokens_of(p) for p in stdlib_docstrings()], context_length=context,
      pad_id=nnx_gpt.PAD_ID, long_sequences='split',
  )
  pretrain(model, public, settings, seed)
  log(f'pretrained on {len(public["inputs"])} windows of stdlib docstrings '
      f'({time.time() - started:.0f} s)')
  log(f'private corpus: {len(train)} records ({num_examples} training '
      f'{unit}s, {settings.num_canaries} canaries x {settings.canary_repeats}'
      f' copies), {len(validation)} validation records')

  model.eval()
  pretrained_ppl = perplexity(model, val_examples)
  nnx_gpt.add_lora(model, settings.lora_rank, rngs=nnx.Rngs(seed + 7))
  initial, _ = flax_api.nnx_split_params(model, trainable=nnx.LoRAParam)
  pretrained_exposure = exposures(model, canaries)

  results = {'pretrained': {'perplexity': pretrained_ppl,
                            'exposure': pretrained_exposure}}
  prompts = [f"{CANARY_NAMES[0]}'s secret code is",
             f'{NAMES[0]} ordered'][: settings.num_prompts]
  results['pretrained']['generations'] = generations(model, prompts, seed)
  for name, private in (('dp', True), ('non_private', False)):
    flax_api.nnx_update_params(model, initial, trainable=nnx.LoRAParam)
    tic = time.time()
    model.train()
    params, plan = finetune(model, data, num_examples, settings,
                            private=private, seed=seed, log=log)
    model.eval()
    flax_api.nnx_update_params(model, params, trainable=nnx.LoRAParam)
    results[name] = {
        'perplexity': perplexity(model, val_examples),
        'exposure': exposures(model, canaries),
        'generations': generations(model, prompts, seed),
        'seconds': time.time() - tic,
    }
    if private:
      results[name]['statement'] = lm.privacy_statement(plan, privacy_unit)
      results[name]['epsilon'] = plan.epsilon_after(plan.iterations)
  results['max_exposure'] = math.log2(canaries[0].space_size)
  results['canaries'] = [c.text for c in canaries]
  results['seconds'] = time.time() - started
  return results


def report(results: dict) -> None:
  print(f"\ncanaries: {', '.join(results['canaries'])}")
  print(f"exposure: log2 |R| - log2 rank, at most "
        f"{results['max_exposure']:.2f} bits (memorised), about 1 for a "
        'secret the model never saw')
  print(f"{'model':<14}{'val. perplexity':>16}{'mean exposure':>15}  "
        'exposure per canary')
  for name, label in (('pretrained', 'pretrained'), ('dp', 'DP LoRA'),
                      ('non_private', 'non-private')):
    r = results[name]
    per = ' '.join(f'{e:.2f}' for e in r['exposure'])
    print(f"{label:<14}{r['perplexity']:>16.3f}"
          f"{np.mean(r['exposure']):>15.2f}  {per}")
  print(f"\nDP: {results['dp']['statement']}")
  for name, label in (('pretrained', 'pretrained'), ('dp', 'DP LoRA'),
                      ('non_private', 'non-private')):
    print(f'\ngenerations, {label} (greedy | sampled, temperature 0.8):')
    for prompt, greedy, sampled in results[name]['generations']:
      print(f'  {prompt!r} -> {greedy!r} | {sampled!r}')
  print(f"\ntotal {results['seconds']:.0f} s (DP fine-tuning "
        f"{results['dp']['seconds']:.0f} s, non-private "
        f"{results['non_private']['seconds']:.0f} s)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', nargs='+', default=(),
                      help='your text files (instead of the generated corpus)')
  parser.add_argument('--records', choices=('line', 'paragraph'),
                      default='line', help='one record per line or paragraph')
  parser.add_argument('--unit', choices=('sequence', 'user'),
                      default='sequence', help='the unit of privacy')
  parser.add_argument('--max_sequences_per_user', type=int, default=None)
  parser.add_argument('--epsilon', type=float, default=None)
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--fast', action='store_true', help='a tiny test run')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  settings = FAST if args.fast else Settings()
  if args.epsilon is not None:
    settings = dataclasses.replace(settings, epsilon=args.epsilon)
  if args.max_sequences_per_user is not None:
    settings = dataclasses.replace(
        settings, max_sequences_per_user=args.max_sequences_per_user)
  if args.steps is not None:
    settings = dataclasses.replace(settings, steps=args.steps)
  try:
    results = run(settings, data_files=args.data, records_per=args.records,
                  unit=args.unit, seed=args.seed)
  except (ValueError, OSError) as e:
    parser.exit(2, f'error: {e}\n')
  report(results)


if __name__ == '__main__':
  main()
