r"""Learning-rate sweep of AdamW, D-Muon and LANTON (both mappings) on the code corpus.

  python experiments/sweep_lm.py --config=configs/lm_sweep.py:tiny --workdir=/tmp/sweep_tiny
  python experiments/sweep_lm.py --config=configs/lm_sweep.py:small --workdir=/tmp/sweep_small

Stage one: each entry at each learning rate, seed 0; stage two: each entry's best learning rate
with the other seeds, one seed at a time across the entries. Variants: tiny (~2 min a run on 2 CPU
cores), small (10M params; a reduced budget, see below), smoke (seconds, for tests).
"""

import os

import ml_collections

from curvopt import train


def _lm(arg: str) -> ml_collections.ConfigDict:
  return train.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lm.py'), arg)


# Sweep entry -> its optimizer fields (the learning rate comes from the grid). Muon-family entries
# keep AdamW at its own fixed rate on the leaves they leave to Adam, so the sweep moves only the
# geometry-aware step. LANTON's sign-LMO embedding / head runs at 0.1 of the schedule (a full-rate
# sign step trained far worse: docs/lm_experiments.md).
_ADAM = {'adam_learning_rate': 3e-3}
_LANTON = dict(_ADAM, lanton_embed_head_scale=0.1)
_ENTRIES = {
  'adamw': {'name': 'adamw'},
  'dmuon': dict(_ADAM, name='dmuon'),
  'lanton_min': dict(_LANTON, name='lanton', lanton_mapping='min_ratio'),
  'lanton_mean': dict(_LANTON, name='lanton_mean'),
  # Cheaper noise estimates: refreshed every k-th step, and / or fewer Newton-Schulz steps.
  'lanton_mean_every4': dict(_LANTON, name='lanton_mean', lanton_noise_every=4),
  'lanton_mean_every8': dict(_LANTON, name='lanton_mean', lanton_noise_every=8),
  'lanton_mean_ns2': dict(_LANTON, name='lanton_mean', lanton_noise_ns_steps=2),
  'lanton_mean_every4_ns2': dict(
    _LANTON, name='lanton_mean', lanton_noise_every=4, lanton_noise_ns_steps=2
  ),
  # LANTON leaves the vector leaves' step open: the bias-RMS LMO instead of AdamW, at the shared
  # rate and at 0.2 of it (AdamW's 3e-3 against 1.5e-2).
  'lanton_mean_bias_rms': dict(_LANTON, name='lanton_mean', lanton_vector='bias_rms'),
  'lanton_mean_bias_rms_scaled': dict(
    _LANTON, name='lanton_mean', lanton_vector='bias_rms', lanton_vector_scale=0.2
  ),
}


def _grid(**learning_rates: list[float]) -> ml_collections.ConfigDict:
  """Entry name -> its optimizer fields and the learning rates to sweep."""
  unknown = sorted(set(learning_rates) - set(_ENTRIES))
  if unknown:
    raise ValueError(f'unknown sweep entries {unknown}; valid: {sorted(_ENTRIES)}')
  return ml_collections.ConfigDict(
    {name: dict(_ENTRIES[name], learning_rate=rates) for name, rates in learning_rates.items()}
  )


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.anchor = 'dmuon'  # steps-to-loss ratios are against this entry's final eval loss
  config.seeds = (0, 1, 2)
  # min_ratio gives most layers 0.002-0.015 of the schedule (the quietest layer sets 1), so its
  # peak rates sit an order of magnitude above the others'.
  # The first grid's best D-Muon and LANTON (mean) points sat at its low edge (0.01, 0.015):
  # one more point below each.
  # The cheaper noise estimates and the bias-RMS vector leaves run at lanton_mean's best rate only.
  config.grid = _grid(
    adamw=[1e-3, 3e-3, 1e-2],
    dmuon=[0.005, 0.01, 0.02, 0.04],
    lanton_min=[0.03, 0.1, 0.3],
    lanton_mean=[0.0075, 0.015, 0.03, 0.06],
    lanton_mean_every4=[0.0075, 0.015],
    lanton_mean_every8=[0.015],
    lanton_mean_ns2=[0.015],
    lanton_mean_every4_ns2=[0.015],
    lanton_mean_bias_rms=[0.015],
    lanton_mean_bias_rms_scaled=[0.015],
  )
  if arg == 'tiny':
    config.base = _lm('tiny')
    config.base.update(total_steps=300, eval_every=25)
    config.base.checkpoint.every = 300  # a 2-minute run: its final checkpoint only
  elif arg == 'small':
    # 10M parameters at ~3 s a step on 2 CPU cores (~20 min a run): half the tiny budget's steps
    # at twice the sequence length; every optimizer at three rates around tiny's best. The whole
    # sweep is ~9 h here; rerunning it in the same workdir runs only what is missing.
    config.base = _lm('small')
    config.base.update(total_steps=200, eval_every=25)
    config.base.data.update(batch_size=16, seq_len=256, eval_batches=8)
    config.base.checkpoint.every = 50  # a stopped sweep loses at most 50 steps of a run
    # Of the cheaper noise estimates, the two that kept tiny's result (every 4 and every 8 steps).
    config.grid = _grid(
      adamw=[1e-3, 3e-3, 1e-2],
      dmuon=[0.01, 0.02, 0.04],
      lanton_min=[0.03, 0.1, 0.3],
      lanton_mean=[0.0075, 0.015, 0.03],
      lanton_mean_every4=[0.015],
      lanton_mean_every8=[0.015],
    )
  elif arg == 'smoke':
    config.base = _lm('tiny')
    config.base.model.update(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=64)
    config.base.data.name = 'code_corpus/mini'
    config.base.data.update(batch_size=8, seq_len=32, eval_batches=1)
    config.base.update(total_steps=4, log_every=2, eval_every=2)
    config.base.schedule.warmup_steps = 1
    config.base.checkpoint.every = 4
    config.seeds = (0, 1)
    config.grid = _grid(adamw=[1e-3, 3e-3], dmuon=[0.02], lanton_min=[0.1], lanton_mean=[0.03])
  else:
    raise ValueError(
      f"unknown configs/lm_sweep.py variant {arg!r}; valid: ['small', 'smoke', 'tiny']"
    )
  return config
