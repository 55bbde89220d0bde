"""Times one training step in PyTorch, non-private or with Opacus (peer runner).

Runs in the virtual environment that ``benchmarks/clipping.py --peers``
creates (``benchmarks/.venvs/opacus``: ``torch==2.13.0`` CPU build, then
``opacus``), never in the project venv. It uses only Opacus' documented
public API: ``PrivacyEngine().make_private(module=..., optimizer=...,
data_loader=..., criterion=..., noise_multiplier=..., max_grad_norm=...,
grad_sample_mode=...)``, which with ``grad_sample_mode='ghost'`` also
returns a wrapped criterion whose ``backward`` does ghost clipping (Li et
al. 2021, arXiv:2110.05679).

The models have the shapes of ``_models.py`` (same layers and parameter
counts; PyTorch's own initialisation and NCHW layout). The DP step clips to
norm 1 and adds noise with multiplier 1 (noise stddev 1 / batch on the mean
gradient, as in the JAX runners), then takes an SGD step.

Usage (by ``clipping.py``): ``python _peer_opacus.py --model mlp
--batch-size 256 --mode ghost --steps 20 --warmup 2 --max-seconds 60``;
``--mode`` is ``non_private``, ``ghost`` or ``hooks``. Prints one JSON line.
"""

import argparse
import json
import warnings

import _models


def _build(model, batch_size):
  """Returns ``(module, x, y)`` for one of the three models."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  gen = torch.Generator().manual_seed(0)
  if model == 'mlp':
    module = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )
    x = torch.randn(batch_size, 784, generator=gen)
    y = torch.arange(batch_size) % 10
  elif model == 'cnn':
    module = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 8 * 64, 10),
    )
    x = torch.randn(batch_size, 3, 32, 32, generator=gen)
    y = torch.arange(batch_size) % 10
  else:
    module = _encoder_class()()
    x = torch.randint(0, 1000, (batch_size, 64), generator=gen)
    y = torch.roll(x, -1, dims=1)
  return module, x, y


def _encoder_class():
  """Defines the Transformer modules (PyTorch imported lazily)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    """Pre-norm encoder layer; attention from plain Linear projections."""

    def __init__(self, d=128, heads=4):
      super().__init__()
      self.heads = heads
      self.ln1 = nn.LayerNorm(d)
      self.ln2 = nn.LayerNorm(d)
      self.q = nn.Linear(d, d, bias=False)
      self.k = nn.Linear(d, d, bias=False)
      self.v = nn.Linear(d, d, bias=False)
      self.o = nn.Linear(d, d, bias=False)
      self.fc1 = nn.Linear(d, 4 * d)
      self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
      b, t, d = x.shape
      h = self.ln1(x)

      def split(z):
        return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

      q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
      att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5,
                          dim=-1)
      x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
      return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

  class Encoder(nn.Module):
    """Token and positional embeddings, 2 blocks, output projection."""

    def __init__(self, vocab=1000, d=128, seq=64, layers=2):
      super().__init__()
      self.emb = nn.Embedding(vocab, d)
      self.pos = nn.Embedding(seq, d)
      self.blocks = nn.Sequential(*[Block(d) for _ in range(layers)])
      self.out = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
      # Expanded to [batch, seq]: Opacus takes axis 0 of a layer's input as
      # the batch axis.
      positions = torch.arange(ids.shape[1], device=ids.device)
      positions = positions.expand_as(ids).contiguous()
      x = self.blocks(self.emb(ids) + self.pos(positions))
      # [batch, vocab, seq]: the layout CrossEntropyLoss takes for sequences.
      return self.out(x).transpose(1, 2)

  return Encoder


def _sequence_loss():
  """Next-token cross-entropy, averaged over the sequence per example.

  Follows PyTorch's ``reduction`` convention: ``'none'`` gives one loss per
  example (the mean over its tokens), ``'mean'`` / ``'sum'`` reduce those
  over the batch. Opacus' ghost mode switches its criterion's reduction to
  per example, so a token-level ``CrossEntropyLoss`` would hand it a
  ``[batch, seq]`` loss instead.
  """
  from torch import nn  # pylint: disable=g-import-not-at-top

  class SequenceCrossEntropy(nn.Module):

    def __init__(self):
      super().__init__()
      self.reduction = 'mean'

    def forward(self, logits, labels):
      per_token = nn.functional.cross_entropy(logits, labels, reduction='none')
      per_example = per_token.mean(dim=1)
      if self.reduction == 'none':
        return per_example
      if self.reduction == 'sum':
        return per_example.sum()
      return per_example.mean()

  return SequenceCrossEntropy()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', required=True, choices=tuple(_models.BUILDERS))
  parser.add_argument('--batch-size', type=int, required=True)
  parser.add_argument(
      '--mode', required=True, choices=('non_private', 'ghost', 'hooks')
  )
  parser.add_argument('--steps', type=int, required=True)
  parser.add_argument('--warmup', type=int, required=True)
  parser.add_argument('--max-seconds', type=float, required=True)
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  module, x, y = _build(args.model, args.batch_size)
  optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
  if args.model == 'transformer':
    criterion = _sequence_loss()
  else:
    criterion = nn.CrossEntropyLoss()
  versions = {'torch': torch.__version__, 'threads': torch.get_num_threads()}
  if args.mode != 'non_private':
    import opacus  # pylint: disable=g-import-not-at-top

    warnings.filterwarnings('ignore')
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=args.batch_size
    )
    engine = opacus.PrivacyEngine()
    made = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        criterion=criterion,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode=args.mode,
    )
    if args.mode == 'ghost':
      module, optimizer, criterion, _ = made
    else:
      module, optimizer, _ = made
    versions['opacus'] = opacus.__version__

  def step():
    optimizer.zero_grad()
    loss = criterion(module(x), y)
    loss.backward()
    optimizer.step()

  result = _models.time_loop(
      step, args.steps, args.warmup, args.max_seconds
  )
  result['compile_s'] = None
  result['own_peak_rss_mb'] = _models.own_peak_rss_mb()
  result['versions'] = versions
  print(json.dumps(result))


if __name__ == '__main__':
  main()
