"""CAPO's premise on real steps: does a token's m_F rank the policy change the step makes?

CAPO masks the tokens with the largest predicted policy change m_F, a model of the head's
Adam step alone. Before a study leans on the mask, two numbers say whether it can work here:
the Spearman correlation between each token's m_F and the realized KL(pi_old || pi_new) of its
next-token distribution after the real step, and the share of that KL that the head's part of
the update produces by itself (the logits of the old hidden state through the new head).
"""

import dataclasses
import functools
import json
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from curvopt import models
from curvopt import rl
from curvopt.train import _metrics
from curvopt.train import _rl

PREMISE_TOKENS_DIR = 'premise_tokens'


def average_ranks(x) -> np.ndarray:
  """Ranks 1..n of x, ties given the mean of the ranks they span."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind='stable')
  ranks = np.empty(len(x))
  ranks[order] = np.arange(1, len(x) + 1)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return sums[inverse] / counts[inverse]


def spearman(x, y) -> float:
  """Spearman's rank correlation (the Pearson correlation of average ranks); nan when either
  side has fewer than two distinct values."""
  x, y = np.asarray(x), np.asarray(y)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f'x and y must be 1-D of one length, got {x.shape} and {y.shape}')
  if len(np.unique(x)) < 2 or len(np.unique(y)) < 2:
    return math.nan
  rx, ry = average_ranks(x), average_ranks(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  return float(rx @ ry / math.sqrt((rx @ rx) * (ry @ ry)))


def token_kls(logits_old, hidden_old, head_new, logits_new):
  """Per-token KL(pi_old || pi_new) of the whole step and of its head part alone.

  The head part: the old hidden states through the new head (logits = h @ head_new^T), what
  the update would do if it changed nothing but the output head.
  """
  logits_head = jnp.einsum(
    '...h,vh->...v',
    hidden_old.astype(jnp.float32),
    head_new.astype(jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )
  return rl.categorical_kl(logits_old, logits_new), rl.categorical_kl(logits_old, logits_head)


def premise_record(m_f, kl, kl_head, mask, advantages) -> dict[str, float]:
  """One step's numbers over its valid tokens with A != 0 (the tokens m_F speaks about)."""
  adv = np.broadcast_to(np.asarray(advantages)[:, None], np.shape(mask))
  tokens = (np.asarray(mask) > 0) & (adv != 0)
  m_f, kl, kl_head = (np.asarray(x, np.float64)[tokens] for x in (m_f, kl, kl_head))
  total = kl.sum()
  return {
    'tokens': int(tokens.sum()),
    'spearman': spearman(m_f, kl) if len(m_f) > 1 else math.nan,
    'spearman_head': spearman(m_f, kl_head) if len(m_f) > 1 else math.nan,
    'head_share': float(kl_head.sum() / total) if total > 0 else math.nan,
    'kl_mean': float(kl.mean()) if len(kl) else math.nan,
  }


@dataclasses.dataclass(frozen=True)
class PremiseResult:
  """Per-step records (see premise_record) and their means over the steps that define them."""

  records: tuple[dict, ...]

  def mean(self, key: str) -> float:
    values = [r[key] for r in self.records if math.isfinite(r[key])]
    return float(np.mean(values)) if values else math.nan

  def summary(self) -> dict[str, float]:
    return {
      'steps': len(self.records),
      'steps_with_signal': sum(r['tokens'] > 1 for r in self.records),
      **{k: self.mean(k) for k in ('spearman', 'spearman_head', 'head_share', 'kl_mean')},
    }


def capo_premise_check(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  steps: int,
  reward_fn: Optional[rl.RewardFn] = None,
) -> PremiseResult:
  """Takes `steps` real steps of the RL config (CAPO's stats logged, nothing masked) and
  measures CAPO's premise on each; writes <workdir>/metrics.jsonl (a record per step),
  premise.json (the summary) and premise_tokens/step_*.npz (per token: m_F, KL, head KL).

  No checkpoint is written: the check is cheap and reported first, before the study. Run it
  at the regime's peak rate (e.g. --config.schedule.name=constant
  --config.schedule.warmup_steps=0): at a warm-up's first, near-zero rates nothing moves.
  """
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  config = config.copy_and_resolve_references()
  config.capo.mode = 'log'
  config.total_steps = max(config.total_steps, steps)
  rl_run = _rl.setup_rl(config, workdir, reward_fn)
  policy = rl_run.steps
  state = jax.jit(policy.init_state, out_shardings=policy.state_shardings)(rl_run.init_params)
  sample_batch = _rl.make_sampler(config, rl_run)
  head_fn = functools.partial(models.output_head, cfg=rl_run.run.model_cfg)

  @jax.jit
  def kls(logits_old, hidden_old, params_new, batch):
    logits_new, _ = policy.forward(params_new, batch)
    return token_kls(logits_old, hidden_old, head_fn(params_new), logits_new)

  writer = _metrics.MetricWriter(workdir, tensorboard=False)
  token_dir = os.path.join(workdir, PREMISE_TOKENS_DIR)
  os.makedirs(token_dir, exist_ok=True)
  records = []
  try:
    for step in range(steps):
      sampled = sample_batch(state.params, step)
      logits_old, hidden_old = policy.forward(state.params, sampled.batch)
      state, metrics = policy.update(state, sampled.batch)
      m_f = np.asarray(metrics.pop('capo_tokens')['m_F'])
      kl, kl_head = (
        np.asarray(x) for x in kls(logits_old, hidden_old, state.params, sampled.batch)
      )
      mask = np.asarray(sampled.samples.mask)
      record = premise_record(m_f, kl, kl_head, mask, sampled.advantages)
      record.update(
        learning_rate=float(metrics['learning_rate']), reward=float(sampled.rewards.mean())
      )
      records.append(record)
      writer.write(step + 1, record)
      np.savez(
        os.path.join(token_dir, f'step_{step + 1:06d}.npz'),
        m_F=m_f,
        kl=kl,
        kl_head=kl_head,
        mask=mask,
        advantages=sampled.advantages,
      )
  finally:
    writer.close()
  result = PremiseResult(tuple(records))
  with open(os.path.join(workdir, 'premise.json'), 'w') as f:
    json.dump({'summary': result.summary(), 'records': records}, f, indent=1)
  return result
