"""A character-level Transformer (Flax NNX) trained with DP-SGD on a tiny text.

The text ships with the package (``jax_privacy/data/tiny_corpus.txt``, about
5 KB of prose). It is cut into non-overlapping chunks of ``seq_len + 1``
characters; one chunk is one example, the privacy unit. A random 20% of the
chunks is held out: the loss and perplexity printed before and after training
are measured on those, so they are computed from the DP parameters and data
outside the training set, and the guarantee covers them.

The model is an ordinary NNX decoder (token and position embeddings, causal
``nnx.MultiHeadAttention`` blocks with LayerNorm and dropout, a linear head)
turned into a per-example loss by ``flax_api.nnx_loss`` and trained with
``training.DPTrainer`` (Poisson sampling, per-example clipping, Gaussian
noise calibrated to the target epsilon by the accounting API).

Run: ``python examples/char_transformer_example.py`` (under a minute).
"""

import argparse
import importlib.resources

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy import flax_api
from jax_privacy import training
from jax_privacy.experimental import execution_plan


def load_corpus() -> str:
  """The text shipped in the package."""
  return (
      importlib.resources.files('jax_privacy')
      .joinpath('data', 'tiny_corpus.txt')
      .read_text(encoding='utf-8')
  )


def make_examples(text: str, seq_len: int, seed: int = 0):
  """Non-overlapping chunks as (inputs, next-character labels), split 80/20."""
  vocab = sorted(set(text))
  ids = np.array([vocab.index(c) for c in text], np.int32)
  num_chunks = len(ids) // (seq_len + 1)
  chunks = ids[: num_chunks * (seq_len + 1)].reshape(num_chunks, seq_len + 1)
  order = np.random.default_rng(seed).permutation(num_chunks)
  num_test = max(1, num_chunks // 5)
  test, train = chunks[order[:num_test]], chunks[order[num_test:]]
  return vocab, (train[:, :-1], train[:, 1:]), (test[:, :-1], test[:, 1:])


class Block(nnx.Module):
  """Pre-LayerNorm Transformer block: causal self-attention, then an MLP."""

  def __init__(self, dim: int, heads: int, dropout: float, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=heads, in_features=dim, decode=False, rngs=rngs
    )
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attention(self.norm1(x), mask=mask)
    hidden = jax.nn.gelu(self.up(self.norm2(x)))
    return x + self.dropout(self.down(hidden))


class CharTransformer(nnx.Module):
  """Characters in, next-character logits out."""

  def __init__(
      self,
      *,
      vocab_size: int,
      seq_len: int,
      dim: int = 64,
      heads: int = 4,
      layers: int = 2,
      dropout: float = 0.1,
      rngs: nnx.Rngs,
  ):
    self.tokens = nnx.Embed(vocab_size, dim, rngs=rngs)
    self.positions = nnx.Embed(seq_len, dim, rngs=rngs)
    self.blocks = nnx.List(
        [Block(dim, heads, dropout, rngs) for _ in range(layers)]
    )
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab_size, rngs=rngs)

  def __call__(self, token_ids):
    positions = jnp.arange(token_ids.shape[-1])
    x = self.tokens(token_ids) + self.positions(positions)
    mask = nnx.make_causal_mask(token_ids)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))


@nnx.jit
def mean_loss(model, inputs, labels) -> jax.Array:
  logits = model(inputs)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.mean(losses)


def train(
    *,
    epsilon: float = 8.0,
    delta: float = 1e-4,
    seq_len: int = 32,
    iterations: int = 150,
    batch_size: int = 32,
    clip_norm: float = 1.0,
    learning_rate: float = 3e-3,
    layers: int = 2,
    seed: int = 0,
) -> dict:
  """Trains the model with DP-SGD; returns held-out loss before and after."""
  vocab, train_set, test_set = make_examples(load_corpus(), seq_len, seed)
  model = CharTransformer(
      vocab_size=len(vocab), seq_len=seq_len, layers=layers,
      rngs=nnx.Rngs(seed),
  )
  model.eval()
  loss_before = float(mean_loss(model, *test_set))

  config = execution_plan.DpsgdExecutionPlanConfig(
      iterations=iterations,
      num_examples=len(train_set[0]),
      expected_batch_size=batch_size,
      delta=delta,
      epsilon=epsilon,
      l2_clip_norm=clip_norm,
      noise_seed=seed + 1,
  )
  model.train()  # Dropout on in the snapshot the loss is built from.
  params, _ = flax_api.nnx_split_params(model)
  loss = flax_api.nnx_loss(
      model, optax.softmax_cross_entropy_with_integer_labels
  )
  trainer = training.DPTrainer(
      loss_fn=loss,
      config=config,
      optimizer=optax.adam(learning_rate),
      sampling_seed=seed + 2,
      example_key_seed=seed + 3,
  )
  state = trainer.fit(train_set, trainer.init(params))

  flax_api.nnx_update_params(model, state.params)
  model.eval()
  loss_after = float(mean_loss(model, *test_set))
  return {
      'vocab_size': len(vocab),
      'num_train': len(train_set[0]),
      'loss_before': loss_before,
      'loss_after': loss_after,
      'perplexity_before': float(np.exp(loss_before)),
      'perplexity_after': float(np.exp(loss_after)),
      'epsilon': trainer.epsilon_spent(state),
      'noise_multiplier': config.calibrated_noise_multiplier,
      'steps': int(state.step),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epsilon', type=float, default=8.0)
  parser.add_argument('--iterations', type=int, default=150)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  result = train(
      epsilon=args.epsilon, iterations=args.iterations, seed=args.seed
  )
  print(
      f"{result['num_train']} training chunks, vocabulary of "
      f"{result['vocab_size']} characters"
  )
  print(
      f"held-out loss {result['loss_before']:.3f} (perplexity "
      f"{result['perplexity_before']:.1f}) before, {result['loss_after']:.3f} "
      f"(perplexity {result['perplexity_after']:.1f}) after "
      f"{result['steps']} DP steps"
  )
  print(
      f"noise multiplier {result['noise_multiplier']:.3f}, epsilon "
      f"{result['epsilon']:.3f}"
  )


if __name__ == '__main__':
  main()
