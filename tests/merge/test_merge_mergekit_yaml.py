"""A mergekit YAML config gives the same tensors as the equivalent native spec."""

import os

import numpy as np
import pytest
from safetensors.numpy import save_file
import yaml

from curvopt import merge

SHAPES = {'model.embed_tokens.weight': (12, 8), 'model.layers.0.mlp.up_proj.weight': (8, 8)}
SHAPES['model.norm.weight'] = (8,)


def _models(root, num=3):
  rng = np.random.default_rng(0)
  base = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
  for name, tensors in [('base', base)] + [
    (f'e{t}', {n: (v + rng.normal(size=v.shape)).astype(np.float32) for n, v in base.items()})
    for t in range(num)
  ]:
    os.makedirs(root / name / 'export')
    save_file(tensors, str(root / name / 'model.safetensors'))
    nu = {n: (rng.uniform(size=s) ** 4).astype(np.float32) for n, s in SHAPES.items()}
    save_file(nu, str(root / name / 'export' / 'exp_avg_sq.safetensors'))


def _native(root, method, options=None, per_expert=None, **extra):
  experts = [{'path': str(root / f'e{t}')} for t in range(3)]
  for field, values in (per_expert or {}).items():
    for expert, value in zip(experts, values):
      expert[field] = value
  spec = {
    'method': method,
    'base': {'path': str(root / 'base')},
    'experts': experts,
    'options': options or {},
  }
  spec.update(extra)
  return spec


def _models_yaml(root, per_model):
  return [
    {'model': str(root / f'e{t}'), 'parameters': {k: v[t] for k, v in per_model.items()}}
    for t in range(3)
  ]


# case -> (YAML fields besides base_model and models, per-model YAML parameters,
#          the native spec's method, options, per-expert fields and extras)
CASES = {
  'linear': (
    {'merge_method': 'linear'},
    {'weight': [1.0, 2.0, 0.5]},
    ('linear', {'normalize': True}, {'weight': [1.0, 2.0, 0.5]}, {}),
  ),
  'task_arithmetic': (
    {'merge_method': 'task_arithmetic', 'parameters': {'lambda': 0.7}},
    {'weight': [1.0, 0.5, 0.25]},
    ('task_arithmetic', {'scale': 0.7, 'normalize': False}, {'weight': [1.0, 0.5, 0.25]}, {}),
  ),
  'ties': (
    {'merge_method': 'ties', 'parameters': {'weight': 1.0, 'int8_mask': True}},
    {'density': [0.29, 0.5, 0.7]},
    (
      'ties',
      {'normalize': True, 'rescale': 'none', 'scale': 1.0},
      {'density': [0.29, 0.5, 0.7], 'weight': [1.0] * 3},
      {},
    ),
  ),
  'ties_filtered_density': (
    {
      'merge_method': 'ties',
      'parameters': {'density': [{'filter': 'mlp', 'value': 0.2}, {'value': 0.6}]},
    },
    {'weight': [1.0, 1.0, 1.0]},
    (
      'ties',
      {'normalize': True, 'rescale': 'none', 'scale': 1.0},
      {'density': [[{'filter': 'mlp', 'value': 0.2}, {'value': 0.6}]] * 3, 'weight': [1.0] * 3},
      {},
    ),
  ),
  'dare_ties': (
    {'merge_method': 'dare_ties', 'parameters': {'density': 0.7, 'weight': 1.0}},
    {},
    (
      'dare',
      {'combine': 'ties', 'normalize': False, 'rescale': 'l1', 'scale': 1.0, 'seed': 0},
      {'drop': [1.0 - 0.7] * 3, 'weight': [1.0] * 3},
      {},
    ),
  ),
  'ota': (
    {
      'merge_method': 'ota',
      'parameters': {'epsilon': 1e-26, 'power': 0.5, 'precond_threshold': 1e-4},
    },
    {'fallback_to_base': [True] * 3},
    (
      'ota',
      {'eps': 1e-26, 'power': 0.5, 'normalise': 'none', 'fallback_to_base': True},
      {},
      {'ffg': {'threshold': [1e-4] * 3}},
    ),
  ),
  'ota_ffg': (
    {'merge_method': 'ota_ffg', 'parameters': {'epsilon': 1e-26, 'rank1_approx': True}},
    {'density': [0.456, 0.205, 0.41]},
    (
      'ota',
      {'eps': 1e-26, 'fallback_to_base': True},
      {'density': [0.456, 0.205, 0.41]},
      {'ffg': {'density': 0.3}, 'rank1': True},
    ),
  ),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_mergekit_yaml_equals_the_native_spec(tmp_path, case):
  _models(tmp_path)
  fields, per_model, (method, options, per_expert, extra) = CASES[case]
  config = dict(fields, base_model=str(tmp_path / 'base'), dtype='float32')
  config['models'] = _models_yaml(tmp_path, per_model)
  if case == 'ota':  # a global fallback_to_base is the usual spelling; per model works too
    config['parameters'] = dict(config['parameters'], fallback_to_base=True)
    for model in config['models']:
      model['parameters'] = {}
  path = tmp_path / 'merge.yml'
  path.write_text(yaml.safe_dump(config))
  merge.merge_from_spec(merge.spec_from_mergekit(str(path)), str(tmp_path / 'yaml'))
  merge.merge_from_spec(
    _native(tmp_path, method, options, per_expert, **extra), str(tmp_path / 'native')
  )
  got = merge.SafetensorsReader(str(tmp_path / 'yaml')).read(list(SHAPES))
  want = merge.SafetensorsReader(str(tmp_path / 'native')).read(list(SHAPES))
  for name in SHAPES:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not np.array_equal(got[name], np.zeros_like(got[name]))


def test_unsupported_mergekit_configs_say_why(tmp_path):
  _models(tmp_path)
  models = [{'model': str(tmp_path / 'e0')}]
  cases = {
    'slerp': ({'merge_method': 'slerp', 'models': models}, 'unsupported merge_method'),
    'gradient': (
      {
        'merge_method': 'linear',
        'models': [{'model': str(tmp_path / 'e0'), 'parameters': {'weight': [0, 0.5, 1]}}],
      },
      'gradient',
    ),
    'hub_id': (
      {'merge_method': 'linear', 'models': [{'model': 'meta-llama/Llama-3-8B'}]},
      'nothing is downloaded',
    ),
    'unknown_parameter': (
      {'merge_method': 'ties', 'models': models, 'parameters': {'densty': 0.5}},
      r"unknown parameter\(s\) \['densty'\]",
    ),
    'slices': ({'merge_method': 'linear', 'slices': [{'sources': []}]}, 'slices'),
  }
  for name, (config, text) in cases.items():
    with pytest.raises(ValueError, match=text):
      merge.spec_from_mergekit(config)
    del name
