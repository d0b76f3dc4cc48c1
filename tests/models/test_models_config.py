"""DecoderConfig presets, overrides, validation; parameter trees and counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import models

# name -> (lower, upper) bound on the parameter count.
PRESET_PARAM_RANGES = {
  'tiny': (0.8e6, 1.2e6),
  'small': (9e6, 11.5e6),
  'gpt2s': (120e6, 128e6),
}

MICRO = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=16)


def _abstract_params(cfg):
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(models.Decoder(cfg).init, jax.random.key(0), tokens)['params']


def _paths(tree):
  return {
    '/'.join(str(k.key) for k in path): leaf.shape
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_presets_are_listed_and_complete():
  assert set(models.PRESET_NAMES) == set(PRESET_PARAM_RANGES)


@pytest.mark.parametrize('name', sorted(PRESET_PARAM_RANGES))
def test_preset_param_count_in_range(name):
  cfg = models.model_config(name)
  lower, upper = PRESET_PARAM_RANGES[name]
  num = models.count_params(_abstract_params(cfg))
  assert lower <= num <= upper, (name, num)


def test_param_count_matches_closed_form():
  cfg = models.model_config('small', n_kv_heads=4)
  d, f, v, n_layers = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
  kv = cfg.n_kv_heads * cfg.head_dim
  per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
  expected = v * d + n_layers * per_layer + d
  assert models.count_params(_abstract_params(cfg)) == expected
  untied = dataclasses.replace(cfg, tie_embeddings=False)
  assert models.count_params(_abstract_params(untied)) == expected + d * v


def test_gpt2s_shapes():
  cfg = models.model_config('gpt2s')
  assert (
    cfg.d_model,
    cfg.n_layers,
    cfg.n_heads,
    cfg.vocab_size,
    cfg.max_len,
    cfg.tie_embeddings,
  ) == (768, 12, 12, 50304, 1024, True)


@pytest.mark.parametrize('tie', [True, False])
def test_param_tree_paths_and_shapes(tie):
  cfg = models.model_config('tiny', tie_embeddings=tie, **MICRO)
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  kv = cfg.n_kv_heads * cfg.head_dim
  expected = {'embed/embedding': (v, d), 'final_norm/scale': (d,)}
  for i in range(cfg.n_layers):
    expected.update(
      {
        f'layers_{i}/attn_norm/scale': (d,),
        f'layers_{i}/attn/q/kernel': (d, d),
        f'layers_{i}/attn/k/kernel': (d, kv),
        f'layers_{i}/attn/v/kernel': (d, kv),
        f'layers_{i}/attn/o/kernel': (d, d),
        f'layers_{i}/mlp_norm/scale': (d,),
        f'layers_{i}/mlp/gate/kernel': (d, f),
        f'layers_{i}/mlp/up/kernel': (d, f),
        f'layers_{i}/mlp/down/kernel': (f, d),
      }
    )
  if not tie:
    expected['head/kernel'] = (d, v)
  assert _paths(_abstract_params(cfg)) == expected


def test_remat_keeps_param_tree():
  cfg = models.model_config('tiny', **MICRO)
  remat = dataclasses.replace(cfg, remat=True)
  assert _paths(_abstract_params(remat)) == _paths(_abstract_params(cfg))


def test_param_dtype_and_init_statistics():
  cfg = models.model_config('tiny', d_model=64, d_ff=128, n_layers=2, dtype='bfloat16')
  params = jax.jit(models.Decoder(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))[
    'params'
  ]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out_std = 0.02 / np.sqrt(2 * cfg.n_layers)
  for path, std in (
    ('embed/embedding', 0.02),
    ('layers_0/attn/q/kernel', 0.02),
    ('layers_1/mlp/gate/kernel', 0.02),
    ('layers_1/attn/o/kernel', out_std),
    ('layers_0/mlp/down/kernel', out_std),
  ):
    leaf = params
    for key in path.split('/'):
      leaf = leaf[key]
    np.testing.assert_allclose(np.std(leaf), std, rtol=0.05, err_msg=path)
  np.testing.assert_array_equal(params['final_norm']['scale'], 1.0)
  np.testing.assert_array_equal(params['layers_0']['attn_norm']['scale'], 1.0)


def test_overrides_and_canonical_dtypes():
  cfg = models.model_config('tiny', vocab_size=512, dtype=jnp.bfloat16)
  assert cfg.vocab_size == 512 and cfg.dtype == 'bfloat16'
  assert cfg.compute_dtype == jnp.bfloat16
  assert hash(cfg) == hash(models.model_config('tiny', vocab_size=512, dtype='bfloat16'))
  # Overriding n_heads alone keeps the preset's full multi-head attention.
  cfg = models.model_config('tiny', n_heads=8)
  assert cfg.n_kv_heads == 8
  assert models.model_config('tiny', n_heads=8, n_kv_heads=2).n_kv_heads == 2


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"'huge'.*tiny.*small.*gpt2s"):
    models.model_config('huge')


def test_unknown_field_is_named():
  with pytest.raises(ValueError, match='d_modle'):
    models.model_config('tiny', d_modle=64)


# field overrides on MICRO -> (exception, message fragment containing the value)
INVALID = [
  (dict(d_model=30), ValueError, 'd_model=30'),
  (dict(n_heads=3, n_kv_heads=3), ValueError, 'd_model=32'),
  (dict(n_kv_heads=3), ValueError, 'n_kv_heads=3'),
  (dict(d_model=24, n_heads=8, n_kv_heads=8), ValueError, 'must be even'),
  (dict(vocab_size=0), ValueError, 'vocab_size must be positive, got 0'),
  (dict(n_layers=-1), ValueError, 'got -1'),
  (dict(d_ff=2.5), TypeError, '2.5'),
  (dict(max_len=True), TypeError, 'True'),
  (dict(rope_theta=0.0), ValueError, 'rope_theta must be positive, got 0.0'),
  (dict(norm_eps=-1e-6), ValueError, '-1e-06'),
  (dict(tie_embeddings=1), TypeError, 'tie_embeddings'),
  (dict(dtype='int32'), ValueError, 'int32'),
  (dict(param_dtype='not_a_dtype'), ValueError, 'not_a_dtype'),
  (dict(attention_impl='flash'), ValueError, 'flash'),
  (dict(head_size=0), ValueError, 'head_size must be positive, got 0'),
  (dict(head_size=7), ValueError, 'head dimension 7'),
  (dict(head_size=8.0), TypeError, '8.0'),
  (dict(qkv_bias='yes'), TypeError, 'qkv_bias'),
  (dict(rope_scaling={'factor': 8.0}), TypeError, 'RopeScaling'),
]

LLAMA3 = dict(
  rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=16
)
INVALID_ROPE_SCALING = [
  (dict(rope_type='yarn'), ValueError, 'yarn'),
  (dict(factor=0.0), ValueError, 'factor must be positive, got 0.0'),
  (dict(high_freq_factor=1.0), ValueError, 'must exceed low_freq_factor'),
  (dict(original_max_len='16'), TypeError, "'16'"),
]


@pytest.mark.parametrize('overrides,exc,fragment', INVALID_ROPE_SCALING)
def test_invalid_rope_scaling_raises_with_value(overrides, exc, fragment):
  with pytest.raises(exc, match=fragment):
    models.RopeScaling(**{**LLAMA3, **overrides})


def test_head_size_and_biases_shape_the_param_tree():
  cfg = models.DecoderConfig(**{**MICRO, 'head_size': 16, 'qkv_bias': True, 'out_bias': True})
  assert cfg.head_dim == 16
  paths = _paths(_abstract_params(cfg))
  assert paths['layers_0/attn/q/kernel'] == (32, 64)
  assert paths['layers_0/attn/k/kernel'] == (32, 32)
  assert paths['layers_0/attn/o/kernel'] == (64, 32)
  assert {p for p in paths if p.endswith('bias')} == {
    f'layers_{i}/attn/{m}/bias' for i in range(2) for m in 'qkvo'
  }
  assert paths['layers_1/attn/k/bias'] == (32,)
  # A head size equal to d_model // n_heads is the derived one: equal configs, equal hashes.
  same = models.DecoderConfig(**{**MICRO, 'head_size': 8})
  assert same.head_size is None and same == models.DecoderConfig(**MICRO)
  assert hash(same) == hash(models.DecoderConfig(**MICRO))
  # head_size frees d_model from being a multiple of n_heads.
  assert models.DecoderConfig(**{**MICRO, 'd_model': 30, 'head_size': 8}).head_dim == 8


@pytest.mark.parametrize('overrides,exc,fragment', INVALID)
def test_invalid_config_raises_with_value(overrides, exc, fragment):
  with pytest.raises(exc, match=fragment):
    models.DecoderConfig(**{**MICRO, **overrides})


def test_config_is_frozen():
  cfg = models.DecoderConfig(**MICRO)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 64


def test_init_cache_shapes_and_validation():
  cfg = models.model_config('tiny', dtype='bfloat16', **MICRO)
  model = models.Decoder(cfg)
  cache = models.init_cache(model, 3, 10)
  k, h = cfg.n_kv_heads, cfg.head_dim
  expected = {'cache_index': (), 'key_valid': (3, 10)}
  for i in range(cfg.n_layers):
    expected[f'layers_{i}/attn/cached_key'] = (3, 10, k, h)
    expected[f'layers_{i}/attn/cached_value'] = (3, 10, k, h)
  assert _paths(cache) == expected
  assert cache['layers_0']['attn']['cached_key'].dtype == jnp.bfloat16
  assert not np.any(cache['key_valid']) and int(cache['cache_index']) == 0
  assert models.init_cache(model, 1)['key_valid'].shape == (1, cfg.max_len)
  with pytest.raises(ValueError, match='max_len=17'):
    models.init_cache(model, 1, 17)
  with pytest.raises(ValueError, match='got 0'):
    models.init_cache(model, 0, 8)
  with pytest.raises(TypeError, match='2.0'):
    models.init_cache(model, 2.0, 8)
