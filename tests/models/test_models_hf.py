"""Hugging Face checkpoints: config mapping, loading against transformers' golden logits (full
forward and KV-cache decoding with left padding), saving, sharded loading, and bad input.

The golden files under tests/fixtures/hf were written by transformers itself
(tests/fixtures/hf/make_golden.py); these tests need neither torch nor transformers.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import models

FIXTURES = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'fixtures', 'hf'
)
FAMILIES = ('llama', 'qwen2', 'mistral')
# family -> what its fixture must map to (the features each one covers).
EXPECTED_CONFIG = {
  'llama': dict(
    tie_embeddings=True,
    qkv_bias=False,
    head_size=None,
    rope_theta=10000.0,
    rope_scaling=models.RopeScaling('llama3', 8.0, 1.0, 4.0, 16),
  ),
  'qwen2': dict(
    tie_embeddings=True, qkv_bias=True, head_size=None, rope_theta=1e6, rope_scaling=None
  ),
  'mistral': dict(
    tie_embeddings=False, qkv_bias=False, head_size=16, rope_theta=10000.0, rope_scaling=None
  ),
}
ATOL, RTOL = 2e-5, 1e-5  # fp32: transformers and XLA sum in different orders


def _fixture(name):
  return os.path.join(FIXTURES, name)


def _golden(name):
  with np.load(os.path.join(_fixture(name), 'golden.npz')) as f:
    return dict(f)


def _copy(name, tmp_path):
  out = tmp_path / name
  shutil.copytree(_fixture(name), out)
  return out


def _edit_config(path, **changes):
  file = os.path.join(path, 'config.json')
  with open(file) as f:
    hf = json.load(f)
  hf.update(changes)
  with open(file, 'w') as f:
    json.dump(hf, f)


@functools.partial(jax.jit, static_argnames='cfg')
def _forward(params, tokens, positions, mask, *, cfg):
  return models.Decoder(cfg).apply(
    {'params': params}, tokens, positions=positions, attention_mask=mask
  )[0]


@functools.partial(jax.jit, static_argnames='cfg')
def _decode(params, cache, tokens, positions, mask, *, cfg):
  (logits, _), mutated = models.Decoder(cfg).apply(
    {'params': params, 'cache': cache},
    tokens,
    positions=positions,
    attention_mask=mask,
    decode=True,
    mutable=['cache'],
  )
  return logits, mutated['cache']


def _assert_real_tokens_close(logits, expected, mask):
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=ATOL, rtol=RTOL)


@pytest.fixture(scope='module', params=FAMILIES)
def loaded(request):
  cfg, params = models.load_hf(_fixture(request.param))
  return request.param, cfg, params


def test_config_maps_each_family(loaded):
  name, cfg, _ = loaded
  shape = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  for field, value in {**shape, **EXPECTED_CONFIG[name], 'max_len': 64, 'norm_eps': 1e-5}.items():
    assert getattr(cfg, field) == value, (name, field)
  assert cfg.out_bias is False
  assert cfg.dtype == cfg.param_dtype == 'float32'


def test_full_forward_matches_transformers(loaded):
  name, cfg, params = loaded
  g = _golden(name)
  logits = _forward(params, g['tokens'], g['positions'], g['mask'], cfg=cfg)
  _assert_real_tokens_close(logits, g['logits'], g['mask'])


def test_kv_cache_decoding_with_left_padding_matches_transformers(loaded):
  name, cfg, params = loaded
  g = _golden(name)
  batch, prompt_len = g['prompt'].shape
  num_steps = g['steps'].shape[1]
  cache = models.init_cache(models.Decoder(cfg), batch, prompt_len + num_steps)
  logits, cache = _decode(
    params, cache, g['prompt'], g['prompt_positions'], g['prompt_mask'], cfg=cfg
  )
  _assert_real_tokens_close(logits, g['prefill_logits'], g['prompt_mask'])
  positions = g['prompt_positions'][:, -1:]
  ones = np.ones((batch, 1), np.int32)
  for t in range(num_steps):
    positions = positions + 1
    logits, cache = _decode(params, cache, g['steps'][:, t : t + 1], positions, ones, cfg=cfg)
    np.testing.assert_allclose(logits[:, 0], g['step_logits'][:, t], atol=ATOL, rtol=RTOL)


# family -> a change to the loaded model that the golden logits must notice (they test
# the feature, not only the shapes).
ABLATIONS = {
  'llama': lambda cfg, p: (models.DecoderConfig(**{**vars(cfg), 'rope_scaling': None}), p),
  'qwen2': lambda cfg, p: (
    cfg,
    jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if path[-1].key == 'bias' else x, p
    ),
  ),
  'mistral': lambda cfg, p: (
    cfg,
    {**p, 'head': {'kernel': p['embed']['embedding'].T}},
  ),
}


def test_golden_logits_see_each_family_feature(loaded):
  name, cfg, params = loaded
  g = _golden(name)
  cfg, params = ABLATIONS[name](cfg, params)
  logits = np.asarray(_forward(params, g['tokens'], g['positions'], g['mask'], cfg=cfg))
  real = g['mask'].astype(bool)
  assert np.abs(logits[real] - g['logits'][real]).max() > 1e-2


def test_bf16_load_is_the_rounded_fp32_load():
  cfg32, params32 = models.load_hf(_fixture('qwen2'))
  cfg16, params16 = models.load_hf(_fixture('qwen2'), dtype='bfloat16')
  assert cfg16.dtype == cfg16.param_dtype == 'bfloat16'
  assert cfg16 == models.DecoderConfig(
    **{**vars(cfg32), 'dtype': 'bfloat16', 'param_dtype': 'bfloat16'}
  )
  for a, b in zip(jax.tree.leaves(params32), jax.tree.leaves(params16)):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16), np.asarray(b))


def test_sharded_load_gives_single_device_logits(mesh8, loaded):
  name, cfg, params = loaded
  g = _golden(name)
  _, sharded = models.load_hf(_fixture(name), mesh=mesh8)
  leaves = jax.tree.leaves(sharded)
  assert all(x.sharding.mesh.shape == mesh8.shape for x in leaves)
  split = [x for x in leaves if not x.sharding.is_fully_replicated]
  assert split and all(x.sharding.spec.count('fsdp') == 1 for x in split)
  for a, b in zip(jax.tree.leaves(params), leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  batch = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec(('data', 'fsdp')))
  rows = np.arange(8) % g['tokens'].shape[0]  # 8 rows: one per device

  def put(x):
    return jax.device_put(x[rows], batch)

  logits = _forward(sharded, put(g['tokens']), put(g['positions']), put(g['mask']), cfg=cfg)
  _assert_real_tokens_close(logits, g['logits'][rows], g['mask'][rows])


def test_explicit_shardings_place_each_parameter(mesh8):
  cfg, params = models.load_hf(_fixture('mistral'))
  spec = jax.sharding.PartitionSpec
  shardings = jax.tree.map(
    lambda x: jax.sharding.NamedSharding(mesh8, spec('data') if x.shape[0] % 2 == 0 else spec()),
    params,
  )
  _, placed = models.load_hf(_fixture('mistral'), shardings=shardings)
  for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(placed), jax.tree.leaves(shardings)):
    assert b.sharding == s
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('name', FAMILIES)
def test_save_then_load_round_trips(name, tmp_path):
  cfg, params = models.load_hf(_fixture(name))
  files = models.save_hf(tmp_path / 'out', cfg, params)
  assert files == ['config.json', 'model.safetensors']
  cfg2, params2 = models.load_hf(tmp_path / 'out')
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(tmp_path / 'out' / 'config.json') as f:
    assert json.load(f)['model_type'] == ('qwen2' if name == 'qwen2' else 'llama')


def test_save_sharded_bf16_with_output_bias(tmp_path):
  cfg = models.DecoderConfig(
    vocab_size=64,
    d_model=16,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    d_ff=32,
    max_len=32,
    qkv_bias=True,
    out_bias=True,
    tie_embeddings=False,
  )
  shapes = jax.eval_shape(
    models.Decoder(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.int32)
  )['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  files = models.save_hf(tmp_path, cfg, params, dtype='bfloat16', max_shard_bytes=2048)
  assert files[-1] == 'model.safetensors.index.json' and len(files) > 4
  with open(tmp_path / 'config.json') as f:
    hf = json.load(f)
  assert (hf['model_type'], hf['attention_bias'], hf['torch_dtype']) == ('llama', True, 'bfloat16')
  cfg2, params2 = models.load_hf(tmp_path)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16).astype(np.float32), b)


# ---- config.json mapping ----


def _hf(name):
  with open(os.path.join(_fixture(name), 'config.json')) as f:
    return json.load(f)


def test_transformers_4_and_5_configs_map_alike():
  v5 = _hf('llama')
  rope = dict(v5['rope_parameters'])
  v4 = {k: v for k, v in v5.items() if k != 'rope_parameters'}
  v4['rope_theta'] = rope.pop('rope_theta')
  v4['rope_scaling'] = rope
  assert models.config_from_hf(v4) == models.config_from_hf(v5)
  # Older 4.x configs name the scaling 'type'.
  rope['type'] = rope.pop('rope_type')
  assert models.config_from_hf({**v4, 'rope_scaling': rope}) == models.config_from_hf(v5)
  # A missing rope_theta is transformers' default.
  qwen = {k: v for k, v in _hf('qwen2').items() if k != 'rope_theta'}
  assert models.config_from_hf(qwen).rope_theta == 10000.0


def test_config_to_hf_inverts_config_from_hf():
  for name in FAMILIES:
    cfg = models.config_from_hf(_hf(name))
    assert models.config_from_hf(models.config_to_hf(cfg)) == cfg


def test_config_overrides():
  hf = _hf('mistral')
  cfg = models.config_from_hf(hf, max_len=32, dtype='bfloat16', remat=True)
  assert (cfg.max_len, cfg.dtype, cfg.param_dtype, cfg.remat) == (32, 'bfloat16', 'float32', True)
  with pytest.raises(ValueError, match=r"\['d_model'\]"):
    models.config_from_hf(hf, d_model=64)


def test_sliding_window_is_fine_when_it_never_slides():
  hf = {**_hf('mistral'), 'sliding_window': 16}
  with pytest.raises(ValueError, match='sliding_window.*max_len <= 16'):
    models.config_from_hf(hf)
  assert models.config_from_hf(hf, max_len=16).max_len == 16
  qwen = _hf('qwen2')
  assert models.config_from_hf({**qwen, 'use_sliding_window': True, 'max_window_layers': 2})
  with pytest.raises(ValueError, match='sliding_window'):
    models.config_from_hf(
      {**qwen, 'use_sliding_window': True, 'max_window_layers': 1, 'sliding_window': 8}
    )
  with pytest.raises(ValueError, match='sliding_window'):
    models.config_from_hf(
      {**qwen, 'layer_types': ['full_attention', 'sliding_attention'], 'sliding_window': 8}
    )


# (base fixture, changes to its config.json, the field the error must name)
BAD_CONFIGS = [
  ('llama', dict(model_type='gpt2'), "'model_type'.*gpt2.*llama"),
  ('llama', dict(architectures=['LlamaForSequenceClassification']), "'architectures'"),
  ('llama', dict(rope_parameters=dict(rope_type='yarn', factor=4.0)), "'rope_parameters'.*yarn"),
  ('qwen2', dict(rope_scaling=dict(type='linear', factor=2.0)), "'rope_scaling'.*linear"),
  ('llama', dict(rope_parameters=dict(rope_type='llama3', factor=8.0)), 'low_freq_factor'),
  ('llama', dict(partial_rotary_factor=0.5), "'partial_rotary_factor'"),
  ('qwen2', dict(rope_theta=1.0, rope_parameters=dict(rope_theta=2.0)), "'rope_theta'"),
  ('mistral', dict(sliding_window=8), "'sliding_window'"),
  ('mistral', dict(num_local_experts=8), "'num_local_experts'.*mixture-of-experts"),
  ('llama', dict(quantization_config=dict(bits=4)), "'quantization_config'"),
  ('llama', dict(hidden_act='gelu'), "'hidden_act'"),
  ('llama', dict(mlp_bias=True), "'mlp_bias'"),
  ('llama', dict(attention_dropout=0.1), "'attention_dropout'"),
  ('llama', dict(logit_scale=2.0), r"\['logit_scale'\] are unknown"),
  ('qwen2', dict(hidden_size=None), "'hidden_size'.*missing"),
]


@pytest.mark.parametrize('base,changes,fragment', BAD_CONFIGS)
def test_unsupported_config_raises_naming_the_field(base, changes, fragment):
  with pytest.raises(ValueError, match=fragment):
    models.config_from_hf({**_hf(base), **changes})


# ---- bad checkpoints ----


def _drop_shard(path):
  os.remove(os.path.join(path, 'model-00002-of-00004.safetensors'))


def _int_weights(path):
  file = os.path.join(path, 'model.safetensors')
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  tensors = safetensors.numpy.load_file(file)
  tensors['model.norm.weight'] = tensors['model.norm.weight'].astype(np.int8)
  safetensors.numpy.save_file(tensors, file)


# (fixture, how to spoil its copy, load_hf keywords, exception, message fragment)
BAD_CHECKPOINTS = {
  'missing_shard': ('mistral', _drop_shard, {}, r"model-00002-of-00004.safetensors'\] listed"),
  'unknown_architecture': (
    'llama',
    lambda p: _edit_config(p, model_type='falcon'),
    {},
    "unknown architecture 'falcon'",
  ),
  'layers_mismatch': (
    'qwen2',
    lambda p: _edit_config(p, num_hidden_layers=3),
    {},
    r"missing \['model.layers.2",
  ),
  'untied_config_tied_weights': (
    'llama',
    lambda p: _edit_config(p, tie_word_embeddings=False),
    {},
    r"missing \['lm_head.weight'\]",
  ),
  'shape_mismatch': (
    'llama',
    lambda p: _edit_config(p, intermediate_size=48),
    {},
    r"'model.layers.0.mlp.gate_proj.weight'.*\[64, 32\].*\[48, 32\]",
  ),
  'int_weights': ('llama', _int_weights, {}, "'model.norm.weight'.*I8"),
  'no_weights': (
    'llama',
    lambda p: os.remove(os.path.join(p, 'model.safetensors')),
    {},
    'holds neither model.safetensors',
  ),
  'no_config': (
    'llama',
    lambda p: os.remove(os.path.join(p, 'config.json')),
    {},
    'has no config.json',
  ),
  'int_dtype': ('llama', lambda p: None, dict(dtype='int8'), "floating dtype.*'int8'"),
  'unknown_dtype': ('llama', lambda p: None, dict(dtype='float33'), "'float33'"),
  'second_dtype': ('llama', lambda p: None, dict(param_dtype='bfloat16'), 'sets both dtypes'),
  'size_override': ('llama', lambda p: None, dict(d_ff=48), r"overrides \['d_ff'\]"),
}


@pytest.mark.parametrize('case', sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_raises_clearly(case, tmp_path):
  name, spoil, kwargs, fragment = BAD_CHECKPOINTS[case]
  path = _copy(name, tmp_path)
  spoil(path)
  with pytest.raises(ValueError, match=fragment):
    models.load_hf(path, **kwargs)


def test_save_rejects_params_of_another_config(tmp_path):
  cfg, params = models.load_hf(_fixture('llama'))
  with pytest.raises(ValueError, match=r"missing \['head/kernel'\]"):
    models.save_hf(tmp_path, models.DecoderConfig(**{**vars(cfg), 'tie_embeddings': False}), params)
  with pytest.raises(ValueError, match="save_hf dtype.*'int32'"):
    models.save_hf(tmp_path, cfg, params, dtype='int32')
