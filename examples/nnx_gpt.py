"""A small GPT-style decoder in Flax NNX, with LoRA adapters and generation.

The model for DP fine-tuning examples (``examples/dp_lora_finetuning.py``),
tests and benchmarks: token and learned position embeddings, pre-LayerNorm
blocks (causal multi-head self-attention, then a GELU MLP, each in a
residual branch), a final LayerNorm and a linear language-model head. The
head is NOT tied to the token embedding: with a tied table one parameter
would be used twice (lookup and head), which per-example gradient engines
must then materialise; untied, each weight is used once.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
arXiv:2106.09685) uses Flax's own adapters: :func:`add_lora` wraps the chosen
``nnx.Linear`` layers in ``nnx.LoRA(..., base_module=linear)``, whose
``lora_a`` / ``lora_b`` are ``nnx.LoRAParam`` variables (``lora_b`` starts
at zero, so adding adapters does not change the model's outputs). Train only
them with ``flax_api.nnx_loss(model, loss, trainable=nnx.LoRAParam)``: the
frozen weights are constants of the loss and get no gradient at all.

Text goes in and out through a byte-level tokenizer (:func:`encode`,
:func:`decode`: UTF-8 bytes are tokens 0-255, :data:`PAD_ID` = 256 pads), so
nothing is downloaded.

Example::

    config = nnx_gpt.GPTConfig(vocab_size=nnx_gpt.VOCAB_SIZE,
                               context_length=64, num_layers=2, num_heads=4,
                               embed_dim=64, mlp_dim=256)
    model = nnx_gpt.GPT(config, rngs=nnx.Rngs(0))
    ...  # pretrain all parameters
    nnx_gpt.add_lora(model, rank=8, rngs=nnx.Rngs(1))
    loss = flax_api.nnx_loss(model, per_example_loss,
                             trainable=nnx.LoRAParam)
    ...  # DP fine-tuning of the adapters
    tokens = nnx_gpt.generate(model, nnx_gpt.encode('The '), num_tokens=40,
                              greedy=True)
    print(nnx_gpt.decode(tokens))

Run ``python examples/nnx_gpt.py`` for a tiny untrained model's generation.
"""

import argparse
import dataclasses
import functools
import math
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

LORA_TARGETS = ('attention', 'mlp')
PAD_ID = 256
VOCAB_SIZE = 257


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------


def encode(text: str) -> np.ndarray:
  """The UTF-8 bytes of ``text`` as tokens, ``int32[len(bytes)]``."""
  if not isinstance(text, str):
    raise ValueError(f'text must be a str, got {type(text).__name__}')
  return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)


def decode(tokens) -> str:
  """The text of byte tokens; padding is dropped, bad UTF-8 replaced."""
  tokens = np.asarray(tokens).reshape(-1)
  if tokens.size and (tokens.min() < 0 or tokens.max() > PAD_ID):
    raise ValueError(
        f'tokens must be in [0, {PAD_ID}] (bytes and PAD_ID), got values in '
        f'[{tokens.min()}, {tokens.max()}]'
    )
  data = bytes(int(t) for t in tokens if t != PAD_ID)
  return data.decode('utf-8', errors='replace')


def pad_batch(
    sequences: Sequence[Sequence[int]], length: int
) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token sequences to ``length``.

  Args:
    sequences: token sequences, each at most ``length`` long.
    length: the padded length.

  Returns:
    ``(tokens int32[n, length], mask bool[n, length])``, ``mask`` True on
    real tokens. Padding goes on the right, so with a causal model it never
    changes the logits of real tokens.

  Raises:
    ValueError: if a sequence is longer than ``length`` (split it first).
  """
  if length < 1:
    raise ValueError(f'length must be >= 1, got {length}')
  tokens = np.full((len(sequences), length), PAD_ID, np.int32)
  mask = np.zeros((len(sequences), length), bool)
  for i, seq in enumerate(sequences):
    seq = np.asarray(seq, np.int32).reshape(-1)
    if len(seq) > length:
      raise ValueError(
          f'sequence {i} has {len(seq)} tokens, more than length={length}; '
          'split or truncate it first'
      )
    tokens[i, : len(seq)] = seq
    mask[i, : len(seq)] = True
  return tokens, mask


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
  """The shape of a :class:`GPT`.

  Attributes:
    vocab_size: number of token ids (:data:`VOCAB_SIZE` for :func:`encode`).
    context_length: the longest sequence the model takes.
    num_layers: number of Transformer blocks.
    num_heads: attention heads; must divide ``embed_dim``.
    embed_dim: width of the residual stream.
    mlp_dim: hidden width of each block's MLP.
    dropout: dropout rate on the residual branches, in [0, 1); active after
      ``model.train()``, off after ``model.eval()``.
    lora_rank: 0 for no adapters; r > 0 builds the model with rank-r LoRA
      adapters on ``lora_targets`` (the same structure as :func:`add_lora`).
    lora_targets: which layers get adapters: ``'attention'`` (query, key,
      value and output projections) and/or ``'mlp'`` (both MLP layers).
  """

  vocab_size: int
  context_length: int
  num_layers: int
  num_heads: int
  embed_dim: int
  mlp_dim: int
  dropout: float = 0.0
  lora_rank: int = 0
  lora_targets: tuple[str, ...] = LORA_TARGETS

  def __post_init__(self):
    for name in (
        'vocab_size', 'context_length', 'num_layers', 'num_heads',
        'embed_dim', 'mlp_dim',
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
    if self.embed_dim % self.num_heads:
      raise ValueError(
          f'embed_dim must be a multiple of num_heads={self.num_heads}, got '
          f'{self.embed_dim}'
      )
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {self.dropout}')
    if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
      raise ValueError(
          f'lora_rank must be an integer >= 0 (0: no adapters), got '
          f'{self.lora_rank!r}'
      )
    object.__setattr__(
        self, 'lora_targets', _check_targets(self.lora_targets)
    )


def _check_targets(targets) -> tuple[str, ...]:
  if isinstance(targets, str):
    targets = (targets,)
  targets = tuple(targets)
  if not targets or any(t not in LORA_TARGETS for t in targets):
    raise ValueError(
        f'lora_targets must be a non-empty subset of {LORA_TARGETS}, got '
        f'{targets!r}'
    )
  return targets


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention where position t sees positions <= t."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    dim = config.embed_dim
    self.num_heads = config.num_heads
    self.query = nnx.Linear(dim, dim, rngs=rngs)
    self.key = nnx.Linear(dim, dim, rngs=rngs)
    self.value = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, dim = x.shape
    head_dim = dim // self.num_heads

    def heads(y):
      return y.reshape(batch, length, self.num_heads, head_dim)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    mixed = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    return self.out(mixed.reshape(batch, length, dim))


class MLP(nnx.Module):
  """Two linear layers with a GELU between them."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(config.embed_dim, config.mlp_dim, rngs=rngs)
    self.down = nnx.Linear(config.mlp_dim, config.embed_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-LayerNorm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(config.embed_dim, rngs=rngs)
    self.attention = CausalSelfAttention(config, rngs=rngs)
    self.norm2 = nnx.LayerNorm(config.embed_dim, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.dropout(self.attention(self.norm1(x)))
    return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(nnx.Module):
  """Tokens ``int[B, T]`` in, next-token logits ``float32[B, T, V]`` out.

  The head is a separate ``nnx.Linear`` (untied from the token embedding).
  With ``config.lora_rank > 0`` the model is built with LoRA adapters, as
  :func:`add_lora` would add them.
  """

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, GPTConfig):
      raise ValueError(
          f'config must be a GPTConfig, got {type(config).__name__}'
      )
    self.config = config
    self.token_embed = nnx.Embed(config.vocab_size, config.embed_dim, rngs=rngs)
    self.position_embed = nnx.Embed(
        config.context_length, config.embed_dim, rngs=rngs
    )
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
    self.blocks = nnx.List(
        [Block(config, rngs=rngs) for _ in range(config.num_layers)]
    )
    self.final_norm = nnx.LayerNorm(config.embed_dim, rngs=rngs)
    self.head = nnx.Linear(
        config.embed_dim, config.vocab_size, use_bias=False, rngs=rngs
    )
    if config.lora_rank:
      add_lora(
          self, config.lora_rank, rngs=rngs, targets=config.lora_targets
      )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    if jnp.ndim(tokens) != 2:
      raise ValueError(
          f'tokens must be int[batch, length], got shape {jnp.shape(tokens)}'
      )
    length = tokens.shape[1]
    context = self.config.context_length
    if length > context:
      raise ValueError(
          f'sequence of length {length} is longer than the model\'s '
          f'context_length {context}; truncate or split it'
      )
    x = self.token_embed(tokens) + self.position_embed(jnp.arange(length))
    x = self.dropout(x)
    for block in self.blocks:
      x = block(x)
    return self.head(self.final_norm(x)).astype(jnp.float32)


def _lora_layers(block: Block, targets: tuple[str, ...]):
  """``(owner, attribute)`` of each linear layer of ``block`` in ``targets``."""
  layers = []
  if 'attention' in targets:
    layers += [
        (block.attention, name) for name in ('query', 'key', 'value', 'out')
    ]
  if 'mlp' in targets:
    layers += [(block.mlp, name) for name in ('up', 'down')]
  return layers


def add_lora(
    model: GPT,
    rank: int,
    *,
    rngs: nnx.Rngs,
    targets: Sequence[str] = LORA_TARGETS,
) -> GPT:
  """Adds rank-``rank`` LoRA adapters to ``model``, in place.

  Each targeted ``nnx.Linear`` becomes ``nnx.LoRA(in, rank, out,
  base_module=linear)``: its output is ``linear(x) + x @ lora_a @ lora_b``,
  with ``lora_a`` He-uniform and ``lora_b`` zero, so the model's outputs do
  not change until the adapters are trained. The pretrained weights stay
  where they were, under ``base_module``.

  Args:
    model: a :class:`GPT` without adapters.
    rank: the adapters' rank, >= 1.
    rngs: initialises ``lora_a``.
    targets: ``'attention'`` and/or ``'mlp'`` (see :class:`GPTConfig`).

  Returns:
    ``model``, for chaining.

  Raises:
    ValueError: on a rank < 1, unknown targets, or a model that already has
      adapters.
  """
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise ValueError(
        f'rank must be an integer >= 1, got {rank!r}; to fine-tune every '
        'weight instead, train nnx.Param without adding adapters'
    )
  targets = _check_targets(targets)
  if not isinstance(model, GPT):
    raise ValueError(f'model must be a GPT, got {type(model).__name__}')
  if any(isinstance(node, nnx.LoRA) for _, node in nnx.iter_graph(model)):
    raise ValueError(
        'model already has LoRA adapters; build a new GPT (or use a config '
        'with lora_rank > 0) instead of adding a second set'
    )
  for block in model.blocks:
    for owner, name in _lora_layers(block, targets):
      linear = getattr(owner, name)
      setattr(
          owner,
          name,
          nnx.LoRA(
              linear.in_features, rank, linear.out_features,
              base_module=linear, rngs=rngs,
          ),
      )
  return model


# ----------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('graphdef', 'top_k', 'greedy'))
def _next_token(
    graphdef, state, window, position, key, temperature, *, top_k, greedy
):
  """The token after ``window[:, position]``, from a copy of the model."""
  # A fresh module: eval() must not switch the caller's model out of training.
  model = nnx.merge(graphdef, state, copy=True)
  model.eval()
  logits = jax.lax.dynamic_index_in_dim(
      model(window), position, 1, keepdims=False
  )
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: GPT,
    prompt_tokens,
    *,
    num_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
) -> jax.Array:
  """Continues ``prompt_tokens`` by ``num_tokens`` tokens.

  Each step runs the model on the last ``context_length`` tokens (no KV
  cache: the window is recomputed, which is simple and fast enough for small
  models) with dropout off, and appends the next token: the argmax with
  ``greedy=True``, else a sample from ``softmax(logits / temperature)``
  restricted to the ``top_k`` most likely tokens. Step ``i`` samples with
  ``fold_in(key, i)``, so a key reproduces its continuation.

  Args:
    model: the model (not modified).
    prompt_tokens: ``int[T]`` or ``int[B, T]``, ``1 <= T <=
      context_length``.
    num_tokens: how many tokens to append, >= 0.
    key: PRNG key for sampling; required unless ``greedy``.
    temperature: > 0; below 1 sharpens, above 1 flattens the distribution.
    top_k: sample among the ``top_k`` most likely tokens (1 <= top_k <=
      vocab_size); None for all.
    greedy: take the most likely token at every step (ignores ``key``,
      ``temperature`` and ``top_k``).

  Returns:
    The prompt followed by the new tokens, ``int32[T + num_tokens]`` (or
    ``[B, T + num_tokens]``, as the prompt).

  Raises:
    ValueError: on an empty or too long prompt, or a bad option.
  """
  config = model.config
  prompt = jnp.asarray(prompt_tokens, jnp.int32)
  single = prompt.ndim == 1
  if single:
    prompt = prompt[None]
  if prompt.ndim != 2:
    raise ValueError(
        f'prompt_tokens must be int[T] or int[B, T], got shape {prompt.shape}'
    )
  length = prompt.shape[1]
  if length == 0:
    raise ValueError(
        'prompt_tokens is empty: give at least one token, e.g. encode("\\n")'
    )
  if length > config.context_length:
    raise ValueError(
        f'prompt of length {length} is longer than the model\'s '
        f'context_length {config.context_length}; truncate or split it'
    )
  if not isinstance(num_tokens, int) or num_tokens < 0:
    raise ValueError(f'num_tokens must be an integer >= 0, got {num_tokens!r}')
  if not greedy:
    if key is None:
      raise ValueError(
          'key is None: sampling needs a PRNG key (e.g. jax.random.key(0)), '
          'or pass greedy=True'
      )
    if not temperature > 0:
      raise ValueError(f'temperature must be > 0, got {temperature}')
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
      raise ValueError(
          f'top_k must be None or in [1, {config.vocab_size}], got {top_k}'
      )
  if key is None:
    key = jax.random.key(0)
  context = config.context_length
  total = length + num_tokens
  graphdef, state = nnx.split(model)
  # Every step sees a window of exactly context_length tokens (one
  # compilation whatever the prompt's length), right-padded while the text
  # is shorter: padding after a position is invisible to a causal model.
  tokens = jnp.concatenate(
      [
          prompt,
          jnp.full(
              (prompt.shape[0], max(total, context) - length), PAD_ID,
              jnp.int32,
          ),
      ],
      axis=1,
  )
  for i in range(num_tokens):
    end = length + i
    start = max(0, end - context)
    token = _next_token(
        graphdef, state, tokens[:, start:start + context], end - 1 - start,
        jax.random.fold_in(key, i), temperature, top_k=top_k, greedy=greedy,
    )
    tokens = tokens.at[:, end].set(token)
  tokens = tokens[:, :total]
  return tokens[0] if single else tokens


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--prompt', default='Hello')
  parser.add_argument('--num_tokens', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  config = GPTConfig(
      vocab_size=VOCAB_SIZE, context_length=64, num_layers=2, num_heads=4,
      embed_dim=64, mlp_dim=256,
  )
  model = GPT(config, rngs=nnx.Rngs(args.seed))
  tokens = generate(
      model, encode(args.prompt), num_tokens=args.num_tokens,
      key=jax.random.key(args.seed), top_k=20,
  )
  print(repr(decode(tokens)))


if __name__ == '__main__':
  main()
