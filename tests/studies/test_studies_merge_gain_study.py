"""The fine-tuning merge study end to end: a fake backend (linear skills on disjoint task
directions, so linear and task arithmetic keep known shares) runs the whole pipeline in
seconds; the smoke config trains real runs (slow)."""

import math
import os

import jax
import numpy as np
import pytest

from curvopt import merge
from curvopt import studies
from curvopt import train
from curvopt.studies import _merge_gain_study

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')
_TASKS = ('reversal', 'sorting', 'format')
_N = 200  # test prompts per task
_BASE_ACC = 0.3


def _config(**overrides):
  config = train.load_config(os.path.join(_CONFIGS, 'merge_study.py'), 'finetune_smoke')
  config.tasks = _TASKS
  config.base_band = (0.2, 0.5)
  config.expert_lrs = (1e-4, 1e-3)
  config.expert_seeds = (0, 1, 2)
  config.expert_min_z = 3.0
  config.eval.num_prompts = _N
  config.update_from_flattened_dict(overrides)
  return config


class FakeBackend(_merge_gain_study.Backend):
  """Params: base + (rate / 1e-3) (1 + seed / 10) u_task, the u's on disjoint entries. A task's
  accuracy is 0.3 + 0.3 * (projection of params - base on u_task / |u_task|^2), so an expert
  at rate 1e-3 gains 0.3 (1 + seed / 10) and a merge keeps exactly its projection's share.
  Correct prompts are the first round(p n) (nested): every model's outcomes line up."""

  def __init__(self, tasks):  # pylint: disable=super-init-not-called
    rng = np.random.default_rng(0)
    # One leaf shape: each merge kernel compiles once (compiling dominates this test's time).
    shapes = {'embed': {'embedding': (16, 8)}, 'attn': {'q': {'kernel': (16, 8)}}}
    self.base = jax.tree.map(
      lambda s: rng.normal(size=s).astype(np.float32),
      shapes,
      is_leaf=lambda x: isinstance(x, tuple),
    )
    leaves, treedef = jax.tree.flatten(self.base)
    sizes = [x.size for x in leaves]
    owner = rng.permutation(np.arange(sum(sizes)) % len(tasks))
    self.directions = {}
    for i, t in enumerate(tasks):
      flat = np.where(owner == i, rng.normal(size=owner.size), 0.0).astype(np.float32)
      parts = np.split(flat, np.cumsum(sizes)[:-1])
      self.directions[t] = treedef.unflatten([p.reshape(x.shape) for p, x in zip(parts, leaves)])
    self.runs = {}
    self.trained = []
    self.scored = []

  def train(self, run_config, run_dir):
    tasks = list(run_config.data.tasks)
    self.trained.append(run_dir)
    self.runs[run_dir] = (
      None if len(tasks) > 1 else (run_config.optimizer.learning_rate, run_config.seed, tasks[0])
    )

  def _scale(self, run_dir):
    rate, seed, _ = self.runs[run_dir]
    return rate / 1e-3 * (1 + seed / 10)

  def read(self, run_dir):
    if self.runs[run_dir] is None:
      return self.base
    u = self.directions[self.runs[run_dir][2]]
    return jax.tree.map(lambda b, x: b + self._scale(run_dir) * x, self.base, u)

  def read_moments(self, run_dir):
    u = self.directions[self.runs[run_dir][2]]
    return jax.tree.map(lambda x: 0.5 * x * x + 1e-6, u)

  def projection(self, params, task):
    u = jax.tree.leaves(self.directions[task])
    delta = [
      np.asarray(p, np.float64) - b
      for p, b in zip(jax.tree.leaves(params), jax.tree.leaves(self.base))
    ]
    return sum(float(np.vdot(d, x)) for d, x in zip(delta, u)) / sum(
      float(np.vdot(x, x)) for x in u
    )

  def correct(self, params, task, *, sampled):
    self.scored.append(task)
    p = min(max(_BASE_ACC + 0.3 * self.projection(params, task), 0.0), 1.0)
    right = (np.arange(_N) < round(p * _N)).astype(np.int64)
    return right * 2 if sampled else right  # 2 samples per prompt in the smoke config


def test_pipeline_end_to_end_with_known_shares(tmp_path):
  config = _config()
  backend = FakeBackend(_TASKS)
  workdir = str(tmp_path)
  study = studies.run_gain_study(config, workdir, backend=backend)

  assert study.rate == 1e-3  # 1e-4 gains 0.03 on 200 prompts: z 1.3
  assert study.seeds == (0, 1, 2) and study.metrics == ('greedy', 'sampled')
  sub = os.path.join(workdir, 'warmup4')
  assert os.path.join(sub, 'base') in backend.trained
  assert os.path.join(sub, 'experts', 'lr0.0001', 'seed0', 'sorting') in backend.trained
  assert os.path.join(sub, 'experts', 'lr0.0001', 'seed1', 'sorting') not in backend.trained
  for t in _TASKS:
    assert study.base['greedy'][t].value == pytest.approx(_BASE_ACC)
    assert study.sweep[1e-4][t]['gain'].value == pytest.approx(0.03)
    assert study.experts['greedy'][2][t].value == pytest.approx(_BASE_ACC + 0.36)

  # Task vectors: (1 + seed / 10) u_t on disjoint entries.
  for seed in study.seeds:
    for t in _TASKS:
      want = (1 + seed / 10) * np.sqrt(
        sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(backend.directions[t]))
        / sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(backend.base))
      )
      assert study.relative_size[seed][t] == pytest.approx(want, rel=1e-5)
    assert all(abs(c) < 1e-6 for c in study.cosine[seed].values())

  # Linear keeps 1/3 of each gain, task arithmetic its scale, up to one prompt in 60.
  for seed in study.seeds:
    for t in _TASKS:
      greedy = study.gain_kept['greedy']
      assert greedy['linear'][seed][t].value == pytest.approx(1 / 3, abs=0.02)
      assert greedy['ta_s0.5'][seed][t].value == pytest.approx(0.5, abs=0.02)
      assert greedy['ta_s1'][seed][t].value == pytest.approx(1.0, abs=1e-12)
      assert study.gain_kept['sampled']['linear'][seed][t].value == pytest.approx(1 / 3, abs=0.03)
  for name in study.models:
    for seed in study.seeds:
      for t in _TASKS:
        kept = study.gain_kept['greedy'][name][seed][t]
        assert math.isfinite(kept.value) and kept.se >= 0, (name, seed, t)
  # Sampled accuracy re-measures what greedy chose: task arithmetic at scale 1, not 0.5.
  greedy_means = studies.task_means(study, 'greedy')
  assert list(study.gain_kept['sampled']) == _merge_gain_study.sampled_models(
    study.models, greedy_means
  )
  assert 'ta_s1' in study.gain_kept['sampled'] and 'ta_s0.5' not in study.gain_kept['sampled']
  # A graft at density d keeps the expert's top-d saliency entries only: more with density.
  means = studies.task_means(study, 'greedy')
  assert means['ffg_graft_d0.1'][0] < means['ffg_graft_d0.3'][0] <= 1.0
  for rule in ('knee', 'mass0.9'):
    for seed in study.seeds:
      assert all(0 < d < 1 for d in study.auto_density[rule][seed].values())

  text = studies.gain_study_report(study, workdir)
  decision = studies.decide(study, 'greedy')
  assert decision.candidate in ('ota_ffg_d0.1', 'ota_ffg_d0.3')
  assert {c.family for c in decision.comparisons} == set(_merge_gain_study.BASELINES)
  assert next(c for c in decision.comparisons if c.family == 'task arithmetic').setting == 'ta_s1'
  assert 'Rule 1: **' in text and 'Rule 2: `ota_ffg_rank1_d' in text
  assert 'Secondary metric, sampled' in text and '`ffg_graft_knee`' in text
  assert 'Sampled accuracy re-measures the models greedy accuracy chose' in text
  assert os.path.exists(tmp_path / 'merge_gain_kept.png')
  assert os.path.exists(tmp_path / 'merge_gain_sweeps.png')

  # A rerun measures nothing again.
  scored = len(backend.scored)
  again = studies.run_gain_study(config, workdir, backend=backend)
  assert len(backend.scored) == scored
  assert again.gain_kept == study.gain_kept


def test_sampled_models_are_each_methods_best_and_the_automatic_ones():
  config = _config()
  models = studies.gain_models(config)
  greedy = {name: [0.1, 0.1] for name in models}
  greedy.update({'ta_s0.5': [0.5, 0.4], 'ota_ffg_d0.3': [0.6, 0.7], 'ffg_graft_d0.1': [0.9, 0.9]})
  got = _merge_gain_study.sampled_models(models, greedy)
  assert got == [
    'linear',
    'ta_s0.5',
    'ties_d0.3',
    'dare_ties_d0.5',
    'fisher',
    'ota',
    'ota_ffg_d0.3',
    'ota_ffg_rank1_d0.3',  # at full OTA+FFG's best density, whatever rank-1 scored itself
    'ota_ffg_knee',
    'ota_ffg_mass0.9',
    'ffg_graft_d0.1',
    'ffg_graft_knee',
    'ffg_graft_mass0.9',
  ]


def test_knee_masks_keep_the_entries_above_the_mean_saliency(tmp_path):
  backend = FakeBackend(_TASKS)
  config = _config()
  runs = []
  for t in _TASKS:
    run = str(tmp_path / t)
    expert = config.expert.copy_and_resolve_references()
    expert.data.tasks = {t: 1.0}
    expert.optimizer.learning_rate = 1e-3
    backend.train(expert, run)
    runs.append(run)
  experts = [backend.read(r) for r in runs]
  nus = [backend.read_moments(r) for r in runs]
  masks = _merge_gain_study._auto_masks('knee', backend.base, experts, nus)  # pylint: disable=protected-access
  for expert, nu, mask in zip(experts, nus, masks):
    s = jax.tree.map(
      lambda b, e, v: np.asarray(v, np.float64) * (np.asarray(e, np.float64) - b) ** 2,
      backend.base,
      expert,
      nu,
    )
    mean = np.mean(np.concatenate([x.ravel() for x in jax.tree.leaves(s)]))
    # fp32 saliencies: entries within rounding of the mean may fall either way.
    for got, x in zip(jax.tree.leaves(mask), jax.tree.leaves(s)):
      clear = np.abs(x - mean) > 1e-5 * mean
      np.testing.assert_array_equal(np.asarray(got)[clear], (x >= mean)[clear])
  mass = _merge_gain_study._auto_masks('mass0.9', backend.base, experts, nus)  # pylint: disable=protected-access
  want = merge.ffg_mask(backend.base, experts[0], nus[0], mass=0.9)
  assert jax.tree.all(jax.tree.map(np.array_equal, mass[0], want))


def test_base_outside_the_band_stops_the_study(tmp_path):
  backend = FakeBackend(_TASKS)
  with pytest.raises(studies.StudyStopped, match=r'below\).*--config.base.total_steps \(now 4'):
    studies.run_gain_study(_config(base_band=(0.4, 0.5)), str(tmp_path), backend=backend)
  assert not any('experts' in r for r in backend.trained)  # stopped before any expert


def test_no_passing_rate_stops_the_study(tmp_path):
  backend = FakeBackend(_TASKS)
  with pytest.raises(
    studies.StudyStopped, match=r'expert_lrs \[1e-05\].*reversal \+0.005 \(z 1.0\)'
  ):
    studies.run_gain_study(_config(expert_lrs=(1e-5,)), str(tmp_path), backend=backend)


@pytest.mark.parametrize(
  'overrides, field',
  [
    ({'tasks': ('reversal',)}, 'at least 2 tasks'),
    ({'tasks': ('reversal', 'poetry')}, 'poetry'),
    ({'warmup_weights': (1.0, 2.0)}, 'warmup_weights'),
    ({'base_band': (0.6, 0.5)}, 'base_band'),
    ({'merge.auto_rules': ('elbow',)}, 'elbow'),
    ({'expert_seeds': ()}, 'expert_seeds'),
    ({'merge.ffg_densities': ()}, 'ffg_densities'),
    ({'eval.sampled_models': 'some'}, 'sampled_models'),
  ],
)
def test_bad_config_fields(tmp_path, overrides, field):
  with pytest.raises(ValueError, match=field):
    studies.run_gain_study(_config(**overrides), str(tmp_path), backend=FakeBackend(_TASKS))


def test_study_dir_per_warmup():
  config = _config()
  assert _merge_gain_study.study_dir('/w', config) == '/w/warmup4'
  config.warmup_weights = (2.0, 1.0, 0.5)
  assert _merge_gain_study.study_dir('/w', config) == '/w/warmup4_w2-1-0.5'


def test_changed_settings_set_the_old_scores_aside(tmp_path):
  path = str(tmp_path / 'evals.jsonl')
  cache = _merge_gain_study._OutcomeCache(path, {'num_prompts': 4})  # pylint: disable=protected-access
  cache.put('base', 'reversal', 'greedy', [1, 0, 0, 1])
  with open(path, 'a') as f:
    f.write('{"model": "cut sh')  # a crash mid-line
  again = _merge_gain_study._OutcomeCache(path, {'num_prompts': 4})  # pylint: disable=protected-access
  assert again.has('base', 'reversal', 'greedy')
  np.testing.assert_array_equal(again.get('base', 'reversal', 'greedy'), [1, 0, 0, 1])
  other = _merge_gain_study._OutcomeCache(path, {'num_prompts': 8})  # pylint: disable=protected-access
  assert not other.has('base', 'reversal', 'greedy')
  assert os.path.exists(path + '.1')


def _study(per_seed: dict[str, list[float]]) -> studies.GainStudy:
  """A study whose every task keeps per_seed[model][seed] of its gain."""
  config = _config()
  config.merge.update(
    ta_scales=(1.0,), ties_densities=(0.3,), dare_densities=(0.5,), ffg_densities=(0.1, 0.3)
  )
  models = studies.gain_models(config)
  seeds = (0, 1, 2)
  tasks = ('a', 'b')
  kept = {
    name: {
      s: {t: studies.Estimate(per_seed.get(name, [0.2] * 3)[s], 0.05) for t in tasks} for s in seeds
    }
    for name in models
  }
  acc = {t: studies.Estimate(0.3, 0.02) for t in tasks}
  return studies.GainStudy(
    tasks=tasks,
    seeds=seeds,
    rate=1e-3,
    metrics=('greedy',),
    models=models,
    base={'greedy': acc},
    sweep={1e-3: {t: {'accuracy': acc[t], 'gain': acc[t], 'size': 0.01} for t in tasks}},
    experts={'greedy': {s: acc for s in seeds}},
    relative_size={s: {t: 0.01 for t in tasks} for s in seeds},
    cosine={s: {('a', 'b'): 0.1} for s in seeds},
    gain_kept={'greedy': kept},
    auto_density={r: {s: {t: 0.2 for t in tasks} for s in seeds} for r in config.merge.auto_rules},
    options={
      'warmup_steps': 1200,
      'warmup_weights': (),
      'base_band': (0.2, 0.5),
      'expert_steps': 300,
      'expert_min_z': 3.0,
      'num_prompts': {t: 500 for t in tasks},
      'num_samples': 4,
      'temperature': 1.0,
      'sampled_models': 'best',
    },
  )


@pytest.mark.parametrize(
  'scores, rule1, rule2',
  [
    (
      {
        'ota_ffg_d0.3': [0.8, 0.82, 0.81],
        'ota_ffg_rank1_d0.3': [0.805, 0.81, 0.8],
        'ta_s1': [0.6, 0.65, 0.62],
      },
      '**holds**',
      '**within**',
    ),
    (
      {
        'ota_ffg_d0.1': [0.7, 0.6, 0.8],
        'ota_ffg_rank1_d0.1': [0.6, 0.6, 0.6],
        'ties_d0.3': [0.65, 0.66, 0.64],
      },
      '**fails**',
      '**outside**',
    ),
  ],
)
def test_report_applies_the_decision_rules(tmp_path, scores, rule1, rule2):
  study = _study(scores)
  text = studies.gain_study_report(study, str(tmp_path))
  assert f'Rule 1: {rule1}' in text and f'{rule2} one point' in text
  best = max((n for n in scores if n.startswith('ota_ffg_d')), key=lambda n: np.mean(scores[n]))
  assert studies.decide(study, 'greedy').candidate == best


def test_report_with_one_seed_says_rule_1_does_not_apply(tmp_path):
  study = _study({})
  study.seeds = (0,)
  text = studies.gain_study_report(study, str(tmp_path))
  assert 'Rule 1: **not applicable**' in text and '**within** one point' in text


def test_report_without_gains_applies_no_rule(tmp_path):
  # Experts that gained nothing leave nothing to keep (the smoke run's case).
  study = _study({name: [math.nan] * 3 for name in studies.gain_models(_config())})
  text = studies.gain_study_report(study, str(tmp_path))
  assert 'Rule 1: **not applicable**' in text and ': **not applicable**.' in text
  assert studies.decide(study, 'greedy').rank1_within is None


@pytest.mark.parametrize('arg', ['finetune', 'finetune_smoke'])
def test_finetune_configs(arg):
  config = train.load_config(os.path.join(_CONFIGS, 'merge_study.py'), arg)
  assert config.study == 'gain_kept' and config.expert.optimizer.name == 'adamw'
  names = studies.gain_models(config)
  assert {s.family for s in names.values()} >= set(_merge_gain_study.BASELINES) | {
    'OTA',
    'OTA+FFG',
    'OTA+FFG rank-1',
    'FFG graft',
  }
  if arg == 'finetune':
    assert len(config.tasks) in (3, 4) and len(config.expert_seeds) == 3
    assert min(config.expert_lrs) >= 1e-4 and max(config.expert_lrs) <= 1e-3
    assert config.base_band == (0.2, 0.5) and config.eval.num_prompts == 500


@pytest.mark.slow
def test_smoke_study_trains_real_runs(tmp_path):
  config = train.load_config(os.path.join(_CONFIGS, 'merge_study.py'), 'finetune_smoke')
  study = studies.run_gain_study(config, str(tmp_path))
  assert study.rate == min(config.expert_lrs)
  assert list(study.gain_kept['greedy']) == list(studies.gain_models(config))
  assert list(study.gain_kept['sampled']) == _merge_gain_study.sampled_models(
    study.models, studies.task_means(study, 'greedy')
  )
  text = studies.gain_study_report(study, str(tmp_path))
  assert 'Rule 1:' in text
