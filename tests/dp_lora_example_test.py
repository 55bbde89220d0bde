"""Runs examples/dp_lora_finetuning.py (a tiny run; the full one is slow)."""

import importlib.util
import pathlib
import re
import sys

import numpy as np
import pytest

pytest.importorskip('flax')

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


def _load():
  if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
  spec = importlib.util.spec_from_file_location(
      'dp_lora_finetuning', EXAMPLES / 'dp_lora_finetuning.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules['dp_lora_finetuning'] = module  # Its dataclasses look it up.
  spec.loader.exec_module(module)
  return module


def test_fast_run_prints_the_numbers(capsys):
  example = _load()
  example.main(['--fast'])
  out = capsys.readouterr().out
  rows = {}
  for label in ('pretrained', 'DP LoRA', 'non-private'):
    match = re.search(rf'^{label}\s+([\d.]+)\s+([\d.]+)', out, re.M)
    assert match, out
    rows[label] = (float(match.group(1)), float(match.group(2)))
  for perplexity, exposure in rows.values():
    assert 1.0 < perplexity < example.nnx_gpt.VOCAB_SIZE
    assert 0.0 <= exposure <= 6.65  # log2(10**2), two-digit secrets
  assert 'DP: (' in out and '-DP for one sequence of up to 48 tokens' in out
  assert 'generations, DP LoRA' in out


@pytest.mark.slow
def test_fast_run_user_level(capsys):
  example = _load()
  example.main(['--fast', '--unit', 'user'])
  out = capsys.readouterr().out
  assert 'training users' in out
  assert re.search(r'-DP for one user with up to 4 sequences .* expected '
                   r'users per step', out)


def test_secret_scores_match_direct_scoring():
  example = _load()
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  gpt = example.nnx_gpt
  model = gpt.GPT(gpt.GPTConfig(
      vocab_size=gpt.VOCAB_SIZE, context_length=48, num_layers=1,
      num_heads=2, embed_dim=16, mlp_dim=32), rngs=nnx.Rngs(0))
  canary = example.lm.make_canaries(0, 1, num_symbols=2,
                                    prefixes="Avery's code is")[0]
  scores = example.secret_log_perplexities(model, canary)
  assert scores.shape == (100,)
  # Score three candidates directly: minus the log-probability of every
  # token after the prefix.
  prefix = len(example.tokens_of(canary.prefix)) - 1
  for index in (0, 37, 99):
    tokens = example.tokens_of(canary.format(canary.all_secrets()[index]))
    tokens = jnp.asarray(tokens[:-1])[None]
    # pylint: disable-next=protected-access
    logits = example._logits(model, tokens[:, :-1])
    log_probs = logits - jnp.log(jnp.sum(jnp.exp(logits), -1, keepdims=True))
    targets = np.asarray(tokens[0, 1:])
    direct = -sum(float(log_probs[0, t, targets[t]])
                  for t in range(prefix - 1, len(targets)))
    assert scores[index] == pytest.approx(direct, rel=1e-4)


def test_own_files_and_empty_corpus(tmp_path, capsys):
  example = _load()
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n\n  \n')
  with pytest.raises(SystemExit) as info:
    example.main(['--fast', '--data', str(empty)])
  assert info.value.code == 2
  assert 'the corpus is empty' in capsys.readouterr().err
  records, owners = example.read_records(
      [str(_write(tmp_path)), str(_write(tmp_path, 'more.txt'))], 'paragraph')
  assert records == ['first record spans two lines', 'second one'] * 2
  assert owners == [0, 0, 1, 1]  # With --unit user, each file is a user.


def _write(tmp_path, name='notes.txt'):
  path = tmp_path / name
  path.write_text('first record\nspans two lines\n\nsecond one\n')
  return path


@pytest.mark.slow
def test_full_run_dp_learns_and_does_not_memorise():
  example = _load()
  results = example.run(example.Settings(), log=lambda *_: None)
  pretrained, dp, clear = (results[k] for k in
                           ('pretrained', 'dp', 'non_private'))
  assert dp['epsilon'] <= 8.0
  assert dp['perplexity'] < 0.5 * pretrained['perplexity']
  assert np.mean(clear['exposure']) > 0.6 * results['max_exposure']
  assert np.mean(dp['exposure']) < 0.5 * np.mean(clear['exposure'])
