r"""Learning-rate sweep of AdamW, D-Muon and LANTON (both mappings) on the code corpus.

  python experiments/sweep_lm.py --config=configs/lm_sweep.py:tiny --workdir=/tmp/sweep_tiny
  python experiments/sweep_lm.py --config=configs/lm_sweep.py:small --workdir=/tmp/sweep_small

Stage one: each entry at each learning rate, seed 0; stage two: each entry's best learning rate
with the other seeds, one seed at a time across the entries. Variants: tiny (~2 min a run on 2 CPU
cores), small (10M params; a reduced budget, see below), smoke (seconds, for tests).

The noise-adaptation study (docs/lm_experiments.md, "Isolating the noise adaptation"; its
decision rule is written there): D-Muon (A), D-Muon with noise factors (E), LANTON mean_ratio
(C) and LANTON with s = 1 (B).

  python experiments/sweep_lm.py --config=configs/lm_sweep.py:noise_probe --workdir=DIR_PROBE
  python experiments/sweep_lm.py --config=configs/lm_sweep.py:noise_tiny:g4 --workdir=DIR

noise_probe picks E's mapping; noise_tiny:M, noise_small_untied:M and noise_gpu:M take the
probe's choice M: 'g4' (p = 1/4, geometric-mean normaliser) or 'rel' (the same, on the
scale-free noise relative to the momentum's squared dual norm). noise_smoke: seconds, for tests.
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
  # The noise-adaptation study. E: D-Muon unchanged (directions, step sizes, Nesterov, AdamW
  # embedding / head) times per-layer noise factors s = (geometric mean_j H_j / H_l)^(1/4), the
  # clip at the library's defaults; 'rel': the same on H relative to the momentum's squared dual
  # norm. B: LANTON exactly as lanton_mean (C) but s = 1, so C - B is the adaptation alone.
  'dmuon_noise_g4': dict(
    _ADAM,
    name='dmuon_noise',
    noise_mapping='mean_ratio',
    noise_exponent=0.25,
    noise_normaliser='geometric',
  ),
  'dmuon_noise_rel': dict(
    _ADAM,
    name='dmuon_noise',
    noise_mapping='mean_ratio',
    noise_exponent=0.25,
    noise_normaliser='geometric',
    noise_relative=True,
  ),
  'lanton_ones': dict(_LANTON, name='lanton', lanton_mapping='ones'),
}
# E's mapping as the probe (noise_probe) chose it: variant suffix -> entry.
_NOISE_ARMS = {'g4': 'dmuon_noise_g4', 'rel': 'dmuon_noise_rel'}
# E with its own full schedule over 0.67x the steps, a separate run: the "reaches A's final
# loss in 0.67x the steps" test (the paper's ~1.5x speed-up), read off run ends, not off a curve.
_SHORT_FRACTION = 0.67


def _grid(**learning_rates: list[float]) -> ml_collections.ConfigDict:
  """Entry name -> its optimizer fields and the learning rates to sweep."""
  unknown = sorted(set(learning_rates) - set(_ENTRIES))
  if unknown:
    raise ValueError(f'unknown sweep entries {unknown}; valid: {sorted(_ENTRIES)}')
  return ml_collections.ConfigDict(
    {name: dict(_ENTRIES[name], learning_rate=rates) for name, rates in learning_rates.items()}
  )


# The noise study's learning-rate check: the same relative grid (x 1/2, 1, 2) for every arm,
# centred on the arm's best in the sweeps above (D-Muon 1e-2, LANTON mean_ratio 1.5e-2; E at
# D-Muon's, B at LANTON's: they differ from them only by the factors).
def _around(centre: float) -> list[float]:
  return [centre / 2, centre, centre * 2]


def _noise_study(
  base: ml_collections.ConfigDict,
  arms: dict[str, list[float]],
  *,
  seeds: tuple[int, ...],
  short_arm: str | None = None,
  comparisons: list[tuple[str, str]] = (),
) -> ml_collections.ConfigDict:
  """A noise-study sweep: `arms` (entry -> rates) on `base`; `short_arm` also at 0.67x the steps."""
  grid = _grid(**arms)
  if short_arm is not None:
    grid[_short(short_arm, base)] = dict(
      grid[short_arm].to_dict(), base_overrides={'total_steps': _short_steps(base)}
    )
  config = ml_collections.ConfigDict()
  config.anchor = 'dmuon'
  config.seeds = seeds
  config.base = base
  config.grid = grid
  config.comparisons = ','.join(f'{a}-{b}' for a, b in comparisons)
  return config


def _short_steps(base: ml_collections.ConfigDict) -> int:
  return round(_SHORT_FRACTION * base.total_steps)


def _short(entry: str, base: ml_collections.ConfigDict) -> str:
  """The name of `entry` run over 0.67x base's steps, e.g. dmuon_noise_g4_670."""
  return f'{entry}_{_short_steps(base)}'


def _noise_base(lm_variant: str, *, steps: int, warmup: int, eval_every: int):
  """A study base: `steps` of warm-up + cosine, 64 eval batches (the last eval is the result)."""
  base = _lm(lm_variant)
  base.update(total_steps=steps, eval_every=eval_every)
  base.schedule.update(name='warmup_cosine', warmup_steps=warmup)
  base.data.eval_batches = 64
  return base


def _noise_variant(arg: str) -> ml_collections.ConfigDict:
  variant, _, arm = arg.partition(':')
  if variant == 'noise_probe':
    if arm:
      raise ValueError(f'noise_probe takes no mapping suffix, got {arg!r}')
    # Half the study's steps, seed 0, at D-Muon's best rate of the sweeps above (1e-2); D-Muon
    # itself as the reference. The decision rule (docs/lm_experiments.md) reads the two E
    # candidates' final eval losses.
    base = _noise_base('tiny', steps=500, warmup=25, eval_every=100)
    base.checkpoint.every = 250
    return _noise_study(
      base,
      {'dmuon': [1e-2], 'dmuon_noise_g4': [1e-2], 'dmuon_noise_rel': [1e-2]},
      seeds=(0,),
      comparisons=[('dmuon_noise_g4', 'dmuon'), ('dmuon_noise_rel', 'dmuon')],
    )
  if arm not in _NOISE_ARMS:
    raise ValueError(
      f'{variant} needs the mapping the probe chose (configs/lm_sweep.py:noise_probe): '
      f'{variant}:M with M in {sorted(_NOISE_ARMS)}, got {arg!r}'
    )
  e = _NOISE_ARMS[arm]
  if variant == 'noise_tiny':
    # A 64-batch eval costs ~3 s here against ~0.4 s a step: every 100 steps is ~7% of a run.
    base = _noise_base('tiny', steps=1000, warmup=50, eval_every=100)
    base.checkpoint.every = 250  # a stopped chunk loses at most 250 steps of a run
    return _noise_study(
      base,
      {
        'dmuon': _around(1e-2),
        # The edge rule (docs/lm_experiments.md): E's seed-0 best was the grid's low edge (5e-3,
        # g4: 1.391 at 1,000 steps, 1.420 at 670), so one more point below it, for both E arms.
        e: [2.5e-3, *_around(1e-2)],
        # The same rule for C: its seed-0 best was its low edge (7.5e-3: 1.408).
        'lanton_mean': [3.75e-3, *_around(1.5e-2)],
        # And for B: its seed-0 best was its low edge (7.5e-3: 1.451).
        'lanton_ones': [3.75e-3, *_around(1.5e-2)],
      },
      seeds=(0, 1, 2, 3),
      short_arm=e,
      comparisons=[(e, 'dmuon'), (_short(e, base), 'dmuon'), ('lanton_mean', 'lanton_ones')],
    )
  if variant == 'noise_small_untied':
    # 10M parameters, untied embedding / head, 16 x 256 tokens: too slow here for a learning-rate
    # check, so both arms at D-Muon's best on `small` (2e-2); 2 seeds.
    base = _noise_base('small_untied', steps=1000, warmup=50, eval_every=250)
    base.data.update(batch_size=16, seq_len=256)
    base.checkpoint.every = 100
    return _noise_study(
      base, {'dmuon': [2e-2], e: [2e-2]}, seeds=(0, 1), comparisons=[(e, 'dmuon')]
    )
  if variant == 'noise_gpu':
    # benchmarks/gpu_suite.sh: untied `small`, bf16 compute (model.dtype 'auto'), 64 x 256
    # tokens, 2,000 steps, one seed of each arm at D-Muon's `small` rate (no learning-rate check
    # fits the suite's time limit).
    base = _noise_base('small_untied', steps=2000, warmup=100, eval_every=500)
    base.data.update(batch_size=64, seq_len=256)
    base.checkpoint.every = 2000
    base.tensorboard = False
    return _noise_study(base, {'dmuon': [2e-2], e: [2e-2]}, seeds=(0,), comparisons=[(e, 'dmuon')])
  if variant == 'noise_smoke':
    base = _noise_base('tiny', steps=6, warmup=1, eval_every=3)
    base.model.update(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=64)
    base.data.name = 'code_corpus/mini'
    base.data.update(batch_size=8, seq_len=32, eval_batches=2)
    base.update(log_every=3)
    base.checkpoint.every = 6
    return _noise_study(
      base,
      {
        'dmuon': [0.01, 0.02],
        e: [0.02],
        'lanton_mean': [0.03],
        'lanton_ones': [0.03],
      },
      seeds=(0, 1),
      short_arm=e,
      comparisons=[(e, 'dmuon'), (_short(e, base), 'dmuon'), ('lanton_mean', 'lanton_ones')],
    )
  raise ValueError(f'unknown noise-study variant {arg!r}')


_NOISE_VARIANTS = ('noise_gpu', 'noise_probe', 'noise_small_untied', 'noise_smoke', 'noise_tiny')


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  if arg.partition(':')[0] in _NOISE_VARIANTS:
    return _noise_variant(arg)
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
    valid = sorted(['small', 'smoke', 'tiny', *_NOISE_VARIANTS])
    raise ValueError(f'unknown configs/lm_sweep.py variant {arg!r}; valid: {valid}')
  return config
