"""The merging study: table math (normalized scores, overlap, concentration) and a smoke run."""

import itertools
import math
import os

import jax
import numpy as np
import pytest

from curvopt import studies
from curvopt import train
from curvopt.studies import _merge_study

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


@pytest.mark.parametrize(
  'accuracy, expert, expected',
  [
    ({'a': 0.5, 'b': 0.2}, {'a': 1.0, 'b': 0.4}, {'a': 0.5, 'b': 0.5, 'mean': 0.5}),
    ({'a': 0.9, 'b': 0.0}, {'a': 0.6, 'b': 0.5}, {'a': 1.5, 'b': 0.0, 'mean': 0.75}),
    # An expert at 0 gives its task no normalized score; the mean skips it.
    ({'a': 0.3, 'b': 0.1}, {'a': 0.6, 'b': 0.0}, {'a': 0.5, 'b': math.nan, 'mean': 0.5}),
    ({'a': 0.3}, {'a': 0.0}, {'a': math.nan, 'mean': math.nan}),
  ],
)
def test_normalized_scores(accuracy, expert, expected):
  got = studies.normalized_scores(accuracy, expert)
  assert set(got) == set(expected)
  for key, value in expected.items():
    assert (math.isnan(got[key]) and math.isnan(value)) or got[key] == pytest.approx(value)


def test_normalized_scores_missing_task():
  with pytest.raises(ValueError, match="'b'"):
    studies.normalized_scores({'a': 0.3}, {'a': 0.5, 'b': 0.5})


def _random_trees(seed):
  rng = np.random.default_rng(seed)
  shapes = {
    'embed': {'embedding': (12, 8)},
    'layers_0': {
      'attn': {'q': {'kernel': (8, 8)}},
      'mlp': {'up': {'kernel': (8, 16)}},
      'attn_norm': {'scale': (8,)},
    },
  }
  return [
    jax.tree.map(
      lambda s: rng.random(s).astype(np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    for _ in range(2)
  ]


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize('seed, cut', itertools.product(range(3), [0.0, 0.3, 0.8, 1.1]))
def test_overlap_matches_numpy(seed, cut):
  a, b = _random_trees(seed)
  mask_a = jax.tree.map(lambda x: x > cut, a)
  mask_b = jax.tree.map(lambda x: x > cut, b)
  fa, fb = _flat(mask_a), _flat(mask_b)
  union = sum(int(x or y) for x, y in zip(fa, fb))
  inter = sum(int(x and y) for x, y in zip(fa, fb))
  assert studies.mask_jaccard(mask_a, mask_b) == pytest.approx(inter / union if union else 1.0)
  va, vb = _flat(a).astype(np.float64), _flat(b).astype(np.float64)
  cos = sum(x * y for x, y in zip(va, vb)) / math.sqrt(sum(va * va) * sum(vb * vb))
  assert studies.cosine_similarity(a, b) == pytest.approx(cos, rel=1e-9)
  assert studies.mask_jaccard(mask_a, mask_a) == 1.0


def test_overlap_on_sharded_leaves(mesh8):
  a, b = _random_trees(7)
  sharding = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec('data', 'fsdp'))

  def put(tree):
    return jax.tree.map(lambda x: jax.device_put(x, sharding) if x.ndim == 2 else x, tree)

  mask = lambda t: jax.tree.map(lambda x: x > 0.5, t)  # noqa: E731
  assert studies.cosine_similarity(put(a), put(b)) == pytest.approx(
    studies.cosine_similarity(a, b), rel=1e-12
  )
  assert studies.mask_jaccard(mask(put(a)), mask(put(b))) == studies.mask_jaccard(mask(a), mask(b))


def test_overlap_rejects_different_trees():
  a, b = _random_trees(0)
  del b['embed']
  with pytest.raises(ValueError, match='embed'):
    studies.cosine_similarity(a, b)


@pytest.mark.parametrize(
  'name, kind',
  [
    ('embed/embedding', 'embed'),
    ('layers_0/attn/q/kernel', 'attn'),
    ('layers_3/mlp/down/kernel', 'mlp'),
    ('layers_1/attn_norm/scale', 'norm'),
    ('final_norm/scale', 'norm'),
    ('head/kernel', 'head'),
    ('lm_head/kernel', 'head'),
    ('something/else', 'other'),
  ],
)
def test_layer_type(name, kind):
  assert studies.layer_type(name) == kind


def test_mask_concentration():
  a, _ = _random_trees(1)
  mask = jax.tree.map(lambda x: x > 0.6, a)
  got = studies.mask_concentration(mask)
  kept = {
    'embed': np.sum(mask['embed']['embedding']),
    'attn': np.sum(mask['layers_0']['attn']['q']['kernel']),
    'mlp': np.sum(mask['layers_0']['mlp']['up']['kernel']),
    'norm': np.sum(mask['layers_0']['attn_norm']['scale']),
  }
  sizes = {'embed': 96, 'attn': 64, 'mlp': 128, 'norm': 8}
  total = sum(kept.values())
  assert set(got) == set(kept)
  for kind in kept:
    assert got[kind]['share'] == pytest.approx(kept[kind] / total)
    assert got[kind]['density'] == pytest.approx(kept[kind] / sizes[kind])
  assert sum(c['share'] for c in got.values()) == pytest.approx(1.0)


def _study(ota_ffg, rank1, baseline):
  tasks = ('a', 'b')
  names = [
    'base',
    'linear',
    'ta_s1',
    'ties_d0.3',
    'dare_ties_p0.7',
    'fisher',
    'ffg_graft_d0.3',
    'ota',
    'ota_ffg_d0.3',
    'ota_ffg_rank1_d0.3',
  ]
  means = dict.fromkeys(names, 0.2)
  means.update(
    {
      'linear': baseline,
      'ota_ffg_d0.3': ota_ffg,
      'ota_ffg_rank1_d0.3': rank1,
      'ffg_graft_d0.3': 2.0,
    }
  )  # a graft is no merged model: never the baseline
  accuracy = {n: {t: means[n] for t in tasks} for n in names}
  return studies.MergeStudy(
    tasks=tasks,
    accuracy=accuracy,
    expert_accuracy={'a': 1.0, 'b': 1.0},
    normalized={n: studies.normalized_scores(accuracy[n], {'a': 1.0, 'b': 1.0}) for n in names},
    concentration={t: {'attn': {'share': 1.0, 'density': 0.3}} for t in tasks},
    mask_jaccard={('a', 'b'): 0.5},
    nu_cosine={('a', 'b'): 0.9},
    options={
      'descriptions': {n: n for n in names},
      'ffg_density': 0.3,
      'ffg_densities': [0.3],
      'ta_scales': [1.0],
    },
  )


@pytest.mark.parametrize(
  'ota_ffg, rank1, baseline, beats, within',
  [
    (0.8, 0.795, 0.6, 'beats', 'within'),
    (0.5, 0.8, 0.6, 'does not beat', 'outside'),
  ],
)
def test_report_goal_checks(tmp_path, ota_ffg, rank1, baseline, beats, within):
  text = studies.merge_study_report(_study(ota_ffg, rank1, baseline), str(tmp_path))
  assert f'**{beats}** every baseline' in text and f'**{within}** 1 point' in text
  assert 'best baseline `linear`' in text
  assert os.path.exists(tmp_path / 'merge_normalized.png')
  assert os.path.exists(tmp_path / 'merge_sweeps.png')


@pytest.mark.parametrize('arg', ['default', 'smoke'])
def test_configs(arg):
  config = train.load_config(os.path.join(_CONFIGS, 'merge_study.py'), arg)
  assert len(config.tasks) >= 2
  assert config.merge.ffg_density <= 1 and config.expert.optimizer.name == 'adamw'
  with pytest.raises(ValueError, match='nope'):
    train.load_config(os.path.join(_CONFIGS, 'merge_study.py'), 'nope')


# Slow (~130 s): the report, score and overlap tests above cover its parts.
@pytest.mark.slow
def test_smoke_study_end_to_end_and_resume(tmp_path, monkeypatch):
  config = train.load_config(os.path.join(_CONFIGS, 'merge_study.py'), 'smoke')
  workdir = str(tmp_path / 'study')
  study = studies.run_merge_study(config, workdir)
  names = set(_merge_study.model_names(config)) | {'base', 'ffg_graft_d0.3'}
  assert set(study.accuracy) == names
  for name in names:
    assert set(study.accuracy[name]) == set(config.tasks)
    assert all(0.0 <= v <= 1.0 for v in study.accuracy[name].values())
    assert set(study.normalized[name]) == set(config.tasks) | {'mean'}
  for concentration in study.concentration.values():
    assert sum(c['share'] for c in concentration.values()) == pytest.approx(1.0)
  (pair,) = study.mask_jaccard
  assert 0.0 <= study.mask_jaccard[pair] <= 1.0 and -1.0 <= study.nu_cosine[pair] <= 1.0
  text = studies.merge_study_report(study, workdir)
  assert 'ota_ffg_rank1_d0.3' in text

  # A rerun reuses every training run and every measured accuracy.
  def no_accuracy(*_args, **_kwargs):
    raise AssertionError('re-evaluated a cached model')

  monkeypatch.setattr(train.Rollout, 'accuracy', no_accuracy)
  again = studies.run_merge_study(config, workdir, train_fn=lambda c, d: None)
  assert again.accuracy == study.accuracy
  assert again.mask_jaccard == study.mask_jaccard

  # Existing runs stand in for the base and the experts: nothing is trained, same models.
  monkeypatch.undo()
  given = config.copy_and_resolve_references()
  given.base_from = _merge_study.base_dir(workdir)
  given.expert_runs = {t: _merge_study.expert_dir(workdir, t) for t in config.tasks}
  trained = []
  reused = studies.run_merge_study(
    given, str(tmp_path / 'reuse'), train_fn=lambda c, d: trained.append(d)
  )
  assert trained == []
  assert reused.accuracy == study.accuracy
  assert 'no warm-up' in reused.options['descriptions']['base']
  given.expert_runs = {'sorting': given.base_from}
  with pytest.raises(ValueError, match='sorting'):
    studies.run_merge_study(given, str(tmp_path / 'bad'), train_fn=lambda c, d: None)
