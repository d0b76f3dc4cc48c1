"""HF-layout safetensors: weights and exp_avg_sq readers, the sharded writer."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from curvopt import merge

# HF tensor names -> shapes, as a tiny LLaMA export has them.
SHAPES = {
  'model.embed_tokens.weight': (32, 8),
  'model.layers.0.self_attn.q_proj.weight': (8, 8),
  'model.layers.0.input_layernorm.weight': (8,),
  'model.layers.1.mlp.up_proj.weight': (16, 8),
  'lm_head.weight': (32, 8),
}


def _weights(rng, dtype):
  return {n: rng.normal(size=s).astype(np.float32).astype(dtype) for n, s in SHAPES.items()}


def write_hf_expert(directory, weights, moments=None, *, shards=1):
  """An expert as HF writes it: model.safetensors (or shards + index) and,
  like the published OTA experts, export/exp_avg_sq.safetensors."""
  os.makedirs(directory, exist_ok=True)
  names = list(weights)
  if shards == 1:
    save_file(weights, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
  else:
    weight_map = {}
    for i in range(shards):
      file = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
      part = {n: weights[n] for n in names[i::shards]}
      save_file(part, os.path.join(directory, file), metadata={'format': 'pt'})
      weight_map.update({n: file for n in part})
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  if moments is not None:
    os.makedirs(os.path.join(directory, 'export'), exist_ok=True)
    save_file(moments, os.path.join(directory, 'export', 'exp_avg_sq.safetensors'))


@pytest.mark.parametrize(
  'dtype,shards', [(ml_dtypes.bfloat16, 1), (ml_dtypes.bfloat16, 2), (np.float32, 3)]
)
def test_reader_reads_hf_layouts(tmp_path, dtype, shards):
  rng = np.random.default_rng(0)
  weights = _weights(rng, dtype)
  moments = {n: rng.uniform(size=s).astype(np.float32) for n, s in SHAPES.items()}
  write_hf_expert(tmp_path, weights, moments, shards=shards)
  reader = merge.SafetensorsReader(str(tmp_path))
  assert sorted(reader.names) == sorted(SHAPES)
  for name, value in weights.items():
    assert reader.spec(name).shape == value.shape
    assert reader.spec(name).dtype == np.dtype(dtype)
  got = reader.read(list(SHAPES)[::-1])
  for name, value in weights.items():
    assert got[name].dtype == value.dtype
    np.testing.assert_array_equal(got[name], value)
  nu = merge.exp_avg_sq_reader(str(tmp_path))
  assert nu.spec('lm_head.weight').dtype == np.float32
  for name, value in nu.read(list(SHAPES)).items():
    np.testing.assert_array_equal(value, moments[name])
  with pytest.raises(ValueError, match="no tensor 'nope'"):
    reader.read(['nope'])


def test_reader_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match='neither model.safetensors'):
    merge.SafetensorsReader(str(tmp_path))
  with pytest.raises(ValueError, match='estimate_fisher'):
    merge.exp_avg_sq_reader(str(tmp_path))
  with open(tmp_path / 'model.safetensors.index.json', 'w') as f:
    json.dump({'weight_map': {'a': 'gone.safetensors'}}, f)
  with pytest.raises(ValueError, match='gone.safetensors .*does not exist'):
    merge.SafetensorsReader(str(tmp_path))


@pytest.mark.parametrize('max_shard_bytes,files', [(None, 1), (700, 3), (1, 5)])
def test_writer_shards_by_size_and_writes_an_index(tmp_path, max_shard_bytes, files):
  rng = np.random.default_rng(1)
  weights = _weights(rng, ml_dtypes.bfloat16)
  weights['model.layers.0.input_layernorm.weight'] = rng.normal(size=(8,)).astype(np.float32)
  writer = merge.SafetensorsWriter(str(tmp_path), weights, max_shard_bytes=max_shard_bytes)
  for name in reversed(list(weights)):  # any order
    writer.write(name, jnp.asarray(weights[name]))
  writer.close()
  assert len(writer.files) == files
  index = tmp_path / 'model.safetensors.index.json'
  assert index.exists() == (files > 1)
  if files > 1:
    weight_map = json.loads(index.read_text())['weight_map']
    assert sorted(weight_map) == sorted(weights)
    for file in writer.files:
      size = sum(weights[n].nbytes for n, f in weight_map.items() if f == file)
      assert size <= max_shard_bytes or len([n for n, f in weight_map.items() if f == file]) == 1
  loaded = {}
  for file in writer.files:
    loaded.update(load_file(str(tmp_path / file)))
    with safetensors.safe_open(str(tmp_path / file), 'numpy') as f:
      assert f.metadata() == {'format': 'pt'}
  for name, value in weights.items():
    assert loaded[name].dtype == value.dtype
    np.testing.assert_array_equal(loaded[name], value)
  reread = merge.SafetensorsReader(str(tmp_path)).read(list(weights))
  for name, value in weights.items():
    np.testing.assert_array_equal(reread[name], value)


def test_writer_refuses_wrong_or_missing_tensors(tmp_path):
  specs = {
    'a': jax.ShapeDtypeStruct((2, 3), jnp.float32),
    'b': jax.ShapeDtypeStruct((4,), jnp.bfloat16),
  }
  writer = merge.SafetensorsWriter(str(tmp_path), specs)
  with pytest.raises(ValueError, match="'a' has shape \\(3, 2\\)"):
    writer.write('a', np.zeros((3, 2), np.float32))
  with pytest.raises(ValueError, match="'a' has shape .* dtype float64"):
    writer.write('a', np.zeros((2, 3), np.float64))
  with pytest.raises(ValueError, match="'c' is not among"):
    writer.write('c', np.zeros((2, 3), np.float32))
  writer.write('a', np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match="'a' was already written"):
    writer.write('a', np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match='never written'):
    writer.close()


def test_save_safetensors_of_a_pytree(tmp_path):
  tree = {'layers_0': {'w': jnp.ones((3, 2)), 'b': jnp.arange(2.0)}}
  files = merge.save_safetensors(str(tmp_path), tree)
  assert files == ['model.safetensors']
  got = merge.SafetensorsReader(str(tmp_path)).read_tree()
  np.testing.assert_array_equal(got['layers_0']['b'], [0.0, 1.0])


def test_streamed_ota_ffg_from_hf_files_equals_in_memory(tmp_path):
  rng = np.random.default_rng(2)
  base = _weights(rng, ml_dtypes.bfloat16)
  write_hf_expert(tmp_path / 'base', base, shards=2)
  experts, moments = [], []
  for t in range(3):
    weights = {
      n: (v.astype(np.float32) + rng.normal(size=v.shape)).astype(v.dtype) for n, v in base.items()
    }
    nu = {n: (rng.uniform(size=v.shape) ** 4).astype(np.float32) for n, v in base.items()}
    write_hf_expert(tmp_path / f'e{t}', weights, nu, shards=1 + t)
    experts.append(weights)
    moments.append(nu)
  out = tmp_path / 'out'
  out.mkdir()
  base_reader = merge.SafetensorsReader(str(tmp_path / 'base'))
  specs = {n: base_reader.spec(n) for n in base_reader.names}
  with merge.SafetensorsWriter(str(out), specs, max_shard_bytes=600) as w:
    merge.merge_streaming(
      'ota',
      [merge.SafetensorsReader(str(tmp_path / f'e{t}')) for t in range(3)],
      w,
      base=base_reader,
      moments=[merge.exp_avg_sq_reader(str(tmp_path / f'e{t}')) for t in range(3)],
      ffg={'density': [0.3, 0.2, 0.5]},
      batch_bytes=1000,
    )
  got = merge.SafetensorsReader(str(out)).read(list(SHAPES))
  jbase = {n: jnp.asarray(v) for n, v in base.items()}
  jexperts = [{n: jnp.asarray(v) for n, v in e.items()} for e in experts]
  masks = [
    merge.ffg_mask(jbase, e, m, density=d) for e, m, d in zip(jexperts, moments, [0.3, 0.2, 0.5])
  ]
  want = merge.ota(jbase, jexperts, moments, masks=masks)
  for name in SHAPES:
    assert got[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got[name], np.asarray(want[name]))
