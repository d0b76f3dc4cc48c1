"""configs/lm_sweep.py's noise-adaptation study: its arms, schedules and a smoke run."""

import os

import pytest

from curvopt import studies
from curvopt import train

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')

# E's candidates: the probe's p = 1/4 geometric-mean mapping, and the same on the scale-free noise.
_E_FIELDS = {
  'g4': {
    'name': 'dmuon_noise',
    'noise_mapping': 'mean_ratio',
    'noise_exponent': 0.25,
    'noise_normaliser': 'geometric',
  },
  'rel': {
    'name': 'dmuon_noise',
    'noise_mapping': 'mean_ratio',
    'noise_exponent': 0.25,
    'noise_normaliser': 'geometric',
    'noise_relative': True,
  },
}
_ADAM = {'adam_learning_rate': 3e-3}
_LANTON = {'adam_learning_rate': 3e-3, 'lanton_embed_head_scale': 0.1}


def _config(arg):
  return train.load_config(os.path.join(_CONFIGS, 'lm_sweep.py'), arg)


def _fields(entry):
  return {k: v for k, v in entry.to_dict().items() if k not in ('learning_rate', 'base_overrides')}


@pytest.mark.parametrize('arm', ['g4', 'rel'])
def test_noise_tiny_arms_grids_and_schedule(arm):
  config = _config(f'noise_tiny:{arm}')
  e = f'dmuon_noise_{arm}'
  assert list(config.grid) == ['dmuon', e, f'{e}_670', 'lanton_mean', 'lanton_ones']  # sorted
  expected = {
    'dmuon': (dict(_ADAM, name='dmuon'), [5e-3, 1e-2, 2e-2]),
    # E's and C's grids have the edge rule's extra point below (their seed-0 best was the low edge).
    e: (dict(_ADAM, **_E_FIELDS[arm]), [2.5e-3, 5e-3, 1e-2, 2e-2]),
    f'{e}_670': (dict(_ADAM, **_E_FIELDS[arm]), [2.5e-3, 5e-3, 1e-2, 2e-2]),
    'lanton_mean': (dict(_LANTON, name='lanton_mean'), [3.75e-3, 7.5e-3, 1.5e-2, 3e-2]),
    # B: C exactly, with s = 1 (its seed-0 best was the low edge too).
    'lanton_ones': (
      dict(_LANTON, name='lanton', lanton_mapping='ones'),
      [3.75e-3, 7.5e-3, 1.5e-2, 3e-2],
    ),
  }
  for name, (fields, rates) in expected.items():
    assert _fields(config.grid[name]) == fields, name
    assert list(config.grid[name].learning_rate) == pytest.approx(rates), name
  # The same relative grid for every arm.
  for entry in config.grid.values():
    lr = list(entry.learning_rate)
    assert lr[1] / lr[0] == pytest.approx(2) and lr[2] / lr[1] == pytest.approx(2)
  assert config.grid[f'{e}_670'].base_overrides.to_dict() == {'total_steps': 670}
  assert 'base_overrides' not in config.grid[e]
  base = config.base
  assert (base.model.name, base.data.batch_size, base.data.seq_len) == ('tiny', 16, 128)
  assert (base.total_steps, base.schedule.name, base.schedule.warmup_steps) == (
    1000,
    'warmup_cosine',
    50,
  )
  assert base.data.eval_batches == 64
  assert base.eval_every == 100  # and every run evaluates at its last step
  assert tuple(config.seeds) == (0, 1, 2, 3)
  assert config.anchor == 'dmuon'
  assert studies.parse_comparisons(config.comparisons, valid=list(config.grid)) == [
    (e, 'dmuon'),
    (f'{e}_670', 'dmuon'),
    ('lanton_mean', 'lanton_ones'),
  ]


def test_noise_probe_compares_the_two_candidates_at_dmuons_rate():
  config = _config('noise_probe')
  assert list(config.grid) == ['dmuon', 'dmuon_noise_g4', 'dmuon_noise_rel']
  for arm in ('g4', 'rel'):
    entry = config.grid[f'dmuon_noise_{arm}']
    assert _fields(entry) == dict(_ADAM, **_E_FIELDS[arm])
    assert list(entry.learning_rate) == [1e-2]
  assert list(config.grid.dmuon.learning_rate) == [1e-2]
  assert (config.base.total_steps, config.base.schedule.warmup_steps) == (500, 25)
  assert config.base.data.eval_batches == 64
  assert tuple(config.seeds) == (0,)


@pytest.mark.parametrize('arg', ['noise_small_untied:g4', 'noise_gpu:rel'])
def test_noise_untied_variants(arg):
  config = _config(arg)
  arm = arg.split(':')[1]
  assert list(config.grid) == ['dmuon', f'dmuon_noise_{arm}']
  assert config.base.model.tie_embeddings is False
  assert config.base.data.eval_batches == 64
  assert config.comparisons == f'dmuon_noise_{arm}-dmuon'
  if arg.startswith('noise_gpu'):
    assert (config.base.total_steps, config.base.data.batch_size) == (2000, 64)
    assert config.base.model.dtype == 'auto'  # bf16 compute on the GPU
  else:
    assert tuple(config.seeds) == (0, 1)


@pytest.mark.parametrize(
  'arg, match',
  [
    ('noise_tiny', 'needs the mapping the probe chose'),
    ('noise_tiny:p2', 'needs the mapping the probe chose'),
    ('noise_probe:g4', 'takes no mapping suffix'),
    ('noise_bogus', "unknown configs/lm_sweep.py variant 'noise_bogus'"),
  ],
)
def test_noise_variants_reject_bad_args(arg, match):
  with pytest.raises(ValueError, match=match):
    train.load_config(os.path.join(_CONFIGS, 'lm_sweep.py'), arg)


def test_the_earlier_sweeps_entries_are_unchanged():
  # Finished runs of the earlier study are read back by name: their settings must not move.
  config = _config('tiny')
  assert _fields(config.grid.dmuon) == dict(_ADAM, name='dmuon')
  assert _fields(config.grid.lanton_mean) == dict(_LANTON, name='lanton_mean')
  assert list(config.grid.dmuon.learning_rate) == [0.005, 0.01, 0.02, 0.04]
  assert (config.base.total_steps, tuple(config.seeds)) == (300, (0, 1, 2))
  assert 'comparisons' not in config


def _lm_optimizer(entry):
  optimizer = train.load_config(os.path.join(_CONFIGS, 'lm.py'), 'tiny').optimizer
  fields = _fields(entry)
  unknown = sorted(set(fields) - set(optimizer))
  optimizer.update(dict(fields, learning_rate=entry.learning_rate[0]))
  return optimizer, unknown


@pytest.mark.parametrize(
  'arg',
  ['noise_probe', 'noise_tiny:g4', 'noise_tiny:rel', 'noise_small_untied:g4', 'noise_gpu:rel'],
)
def test_noise_entries_build(arg):
  config = _config(arg)
  schedule = config.base.schedule
  for name, entry in config.grid.items():
    optimizer, unknown = _lm_optimizer(entry)
    assert not unknown, f'{name}: fields {unknown} are not in configs/lm.py'
    train.make_optimizer(optimizer, config.base.total_steps, schedule)


# ~1 minute. Fast tests cover its pieces: every entry builds (above); per-entry total_steps,
# paired comparisons and the report in test_studies_sweep.py; the optimizers' steps in tests/train.
@pytest.mark.slow
@pytest.mark.parametrize('arm', ['g4'])
def test_noise_smoke_sweep_trains_and_reports(tmp_path, mini_data_dir, arm):
  """The smoke study end to end: every arm trains, the 670-step arm on its own schedule."""
  config = _config(f'noise_smoke:{arm}')
  base = config.base
  base.data.data_dir = mini_data_dir
  base.mesh.num_devices = 1
  base.tensorboard = False
  grid = config.grid
  results = studies.run_sweep(base, grid, config.seeds, str(tmp_path))
  assert set(results) == set(grid)
  for name, points in results.items():
    best = studies.best_point(points)
    assert sorted(best.curves) == [0, 1], name
    steps = grid[name].get('base_overrides', {}).get('total_steps', base.total_steps)
    assert all(s[-1] == steps for s, _ in best.curves.values()), name
  text = studies.sweep_report(results, config.anchor, config.comparisons)
  assert 'Paired differences' in text
  assert f'dmuon_noise_{arm} - dmuon' in text
