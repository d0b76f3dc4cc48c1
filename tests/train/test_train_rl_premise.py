"""The CAPO premise check: Spearman, per-token KLs and head share against numpy; a tiny run."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import models
from curvopt import train
from curvopt.train import _rl_premise

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


def _reference_spearman(x, y):
  """Average ranks by counting, then Pearson's r."""

  def ranks(v):
    return [1 + sum(w < a for w in v) + 0.5 * (sum(w == a for w in v) - 1) for a in v]

  return float(np.corrcoef(ranks(list(x)), ranks(list(y)))[0, 1])


_SPEARMAN_CASES = [
  ([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 25.0, 100.0], 1.0),  # any monotone map
  ([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], -1.0),
  ([1.0, 2.0, 2.0, 3.0, 5.0], [2.0, 1.0, 4.0, 4.0, 9.0], None),  # ties on both sides
  ([0.0, 0.0, 0.0, 1.0, 2.0, 2.0], [3.0, 1.0, 2.0, 2.0, 0.5, 7.0], None),
]


@pytest.mark.parametrize('x, y, exact', _SPEARMAN_CASES)
def test_spearman_matches_a_counting_reference(x, y, exact):
  got = train.spearman(np.array(x), np.array(y))
  assert got == pytest.approx(_reference_spearman(x, y), abs=1e-12)
  if exact is not None:
    assert got == pytest.approx(exact)


def test_spearman_on_random_data_and_degenerate_input():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 6, 40).astype(float)  # many ties
  y = x + rng.normal(size=40)
  assert train.spearman(x, y) == pytest.approx(_reference_spearman(x, y), abs=1e-12)
  assert math.isnan(train.spearman(np.ones(5), np.arange(5.0)))
  with pytest.raises(ValueError, match='1-D of one length'):
    train.spearman(np.ones(3), np.ones(4))


def test_premise_record_uses_valid_tokens_with_nonzero_advantage():
  rng = np.random.default_rng(1)
  m_f, kl, kl_head = rng.exponential(size=(3, 3, 5))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], np.float32)
  adv = np.array([0.5, 0.0, -1.0])
  rec = _rl_premise.premise_record(m_f, kl, kl_head, mask, adv)
  cells = [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]
  pick = lambda a: np.array([a[c] for c in cells])  # noqa: E731
  assert rec['tokens'] == 5
  assert rec['spearman'] == pytest.approx(_reference_spearman(pick(m_f), pick(kl)))
  assert rec['spearman_head'] == pytest.approx(_reference_spearman(pick(m_f), pick(kl_head)))
  assert rec['head_share'] == pytest.approx(pick(kl_head).sum() / pick(kl).sum())
  assert rec['kl_mean'] == pytest.approx(pick(kl).mean())


def test_token_kls_match_numpy_and_the_head_only_forward():
  cfg = models.model_config(
    'tiny',
    d_model=16,
    n_layers=1,
    n_heads=2,
    d_ff=32,
    max_len=16,
    vocab_size=40,
    dtype='float32',
    tie_embeddings=False,
  )
  model = models.Decoder(cfg)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 40, (2, 6)))
  old = model.init(jax.random.key(0), tokens)['params']
  new = jax.tree.map(lambda p: p + 0.05 * jnp.sign(p), old)
  logits_old, hidden_old = model.apply({'params': old}, tokens)
  logits_new, _ = model.apply({'params': new}, tokens)
  kl, kl_head = _rl_premise.token_kls(
    logits_old, hidden_old, models.output_head(new, cfg), logits_new
  )
  # The head's part alone: the old model with only the new head.
  logits_head, _ = model.apply({'params': {**old, 'head': new['head']}}, tokens)

  def numpy_kl(p_logits, q_logits):
    p_logits, q_logits = np.asarray(p_logits, np.float64), np.asarray(q_logits, np.float64)
    out = np.zeros(p_logits.shape[:-1])
    for idx in np.ndindex(out.shape):
      p = np.exp(p_logits[idx] - p_logits[idx].max())
      p /= p.sum()
      q = np.exp(q_logits[idx] - q_logits[idx].max())
      q /= q.sum()
      out[idx] = sum(a * np.log(a / b) for a, b in zip(p, q))
    return out

  np.testing.assert_allclose(kl, numpy_kl(logits_old, logits_new), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(kl_head, numpy_kl(logits_old, logits_head), rtol=1e-4, atol=1e-7)
  assert (np.asarray(kl) > 0).all() and (np.asarray(kl_head) > 0).all()


def _digit_reward(prompts, completions, answers):
  del prompts, answers
  return np.asarray(
    [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions], np.float32
  )


@pytest.mark.slow
def test_premise_check_on_a_tiny_model(tmp_path):
  config = train.load_config(os.path.join(_CONFIGS, 'rl.py'), 'test')
  config.task.data_dir = str(tmp_path / 'tfds')
  config.model.tie_embeddings = False
  config.optimizer.learning_rate = 1e-2
  config.schedule.update(name='constant', warmup_steps=0)
  result = train.capo_premise_check(config, str(tmp_path / 'run'), steps=2, reward_fn=_digit_reward)
  assert len(result.records) == 2
  with open(tmp_path / 'run' / 'premise.json') as f:
    saved = json.load(f)
  assert saved['summary']['steps'] == 2
  for step, record in enumerate(result.records, start=1):
    arrays = np.load(tmp_path / 'run' / 'premise_tokens' / f'step_{step:06d}.npz')
    want = _rl_premise.premise_record(
      arrays['m_F'], arrays['kl'], arrays['kl_head'], arrays['mask'], arrays['advantages']
    )
    assert record['tokens'] == want['tokens'] > 1
    assert record['spearman'] == pytest.approx(want['spearman'])
    assert -1 <= record['spearman'] <= 1 and 0 < record['head_share'] < 10
    assert record['learning_rate'] == pytest.approx(1e-2)
  assert [r['step'] for r in train.read_metrics(str(tmp_path / 'run'))] == [1, 2]
