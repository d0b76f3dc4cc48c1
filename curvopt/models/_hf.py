"""Hugging Face checkpoints in and out: safetensors <-> the Decoder's parameter tree.

transformers stores a linear layer's weight as [out, in] and our kernels as [in, out], so every
matrix but the embedding is transposed; the head layouts agree (q/k/v columns are head-major,
and both sides rotate the halves of each head with RoPE), so nothing else is permuted.

Loading reads each tensor on its own, and with a mesh only the slice each device holds
(`jax.make_array_from_callback` over a memory-mapped `get_slice`): host memory peaks at one
slice of one tensor, not at the model.
"""

import json
import os
import re
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import safetensors

from curvopt import merge
from curvopt.models import _config
from curvopt.models import _decoder
from curvopt.models import _hf_config

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
_FLOAT_TYPES = ('F64', 'F32', 'F16', 'BF16')
# Buffers older checkpoints stored next to the weights; derived from the config, not read.
_DERIVED = re.compile(r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq')
_DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' save_pretrained default


def _layer_tensors(cfg: _config.DecoderConfig) -> list[tuple[str, str, bool]]:
  """(HF name suffix, our path under layers_{i}, transposed) of one block."""
  out = [
    ('input_layernorm.weight', 'attn_norm/scale', False),
    ('self_attn.q_proj.weight', 'attn/q/kernel', True),
    ('self_attn.k_proj.weight', 'attn/k/kernel', True),
    ('self_attn.v_proj.weight', 'attn/v/kernel', True),
    ('self_attn.o_proj.weight', 'attn/o/kernel', True),
    ('post_attention_layernorm.weight', 'mlp_norm/scale', False),
    ('mlp.gate_proj.weight', 'mlp/gate/kernel', True),
    ('mlp.up_proj.weight', 'mlp/up/kernel', True),
    ('mlp.down_proj.weight', 'mlp/down/kernel', True),
  ]
  if cfg.qkv_bias:
    out += [(f'self_attn.{p}_proj.bias', f'attn/{p}/bias', False) for p in 'qkv']
  if cfg.out_bias:
    out.append(('self_attn.o_proj.bias', 'attn/o/bias', False))
  return out


def tensor_map(cfg: _config.DecoderConfig) -> list[tuple[str, tuple[str, ...], bool]]:
  """(HF tensor name, our parameter path, transposed) of every parameter, in model order."""
  out = [('model.embed_tokens.weight', ('embed', 'embedding'), False)]
  for i in range(cfg.n_layers):
    for suffix, path, transposed in _layer_tensors(cfg):
      out.append((f'model.layers.{i}.{suffix}', (f'layers_{i}', *path.split('/')), transposed))
  out.append(('model.norm.weight', ('final_norm', 'scale'), False))
  if not cfg.tie_embeddings:
    out.append(('lm_head.weight', ('head', 'kernel'), True))
  return out


def _param_shapes(cfg: _config.DecoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(_decoder.Decoder(cfg).init, jax.random.key(0), tokens)['params']
  return {
    tuple(k.key for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
  }


def _check_dtype(dtype: Any, what: str) -> str:
  message = f"{what} must be a floating dtype such as 'float32' or 'bfloat16', got {dtype!r}"
  try:
    name = jnp.dtype(dtype).name
  except TypeError as e:
    raise ValueError(message) from e
  if not jnp.issubdtype(jnp.dtype(name), jnp.floating):
    raise ValueError(message)
  return name


def read_hf_config(path: str) -> dict[str, Any]:
  """The parsed `config.json` of a Hugging Face model directory."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f'{path} is not a directory (a Hugging Face model directory is expected)')
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise ValueError(f'{path} has no {CONFIG_FILE}; found {sorted(os.listdir(path))}')
  with open(file) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{file} is not valid JSON: {e}') from e


def _weight_files(path: str) -> dict[str, tuple[str, tuple[int, ...], str]]:
  """Tensor name -> (safetensors file, shape, dtype), from the index or the single file."""
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, WEIGHTS_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f'{index} has no "weight_map" of tensor names to shard files')
    by_file: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
      by_file.setdefault(os.path.join(path, shard), []).append(name)
    missing = sorted(os.path.basename(f) for f in by_file if not os.path.exists(f))
    if missing:
      raise ValueError(f'shard file(s) {missing} listed by {index} do not exist')
  elif os.path.exists(single):
    by_file = {single: None}
  else:
    raise ValueError(
      f'{path} holds neither {WEIGHTS_FILE} nor {INDEX_FILE} (found {sorted(os.listdir(path))}); '
      'only safetensors checkpoints are read (save_pretrained writes them by default)'
    )
  specs = {}
  for file, names in by_file.items():
    with safetensors.safe_open(file, framework='numpy') as f:
      held = set(f.keys())
      for name in sorted(held) if names is None else names:
        if name not in held:
          shard = os.path.basename(file)
          raise ValueError(f'{INDEX_FILE} maps {name!r} to {shard}, which lacks it')
        piece = f.get_slice(name)
        specs[name] = (file, tuple(piece.get_shape()), piece.get_dtype())
  return specs


def _fsdp_sharding(shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> NamedSharding:
  """The largest dimension divisible by the mesh's 'fsdp' axis (all axes without one)."""
  axes = ('fsdp',) if 'fsdp' in mesh.axis_names else tuple(mesh.axis_names)
  size = int(np.prod([mesh.shape[a] for a in axes]))
  candidates = [(d, i) for i, d in enumerate(shape) if d % size == 0]
  spec = [None] * len(shape)
  if size > 1 and candidates:
    spec[max(candidates)[1]] = axes if len(axes) > 1 else axes[0]
  return NamedSharding(mesh, PartitionSpec(*spec))


def _tensor_reader(file: str, name: str, transposed: bool, dtype: str):
  """index (in our layout) -> that slice of the tensor as a host array in `dtype`."""
  done: dict[Any, np.ndarray] = {}

  def read(index: tuple[slice, ...]) -> np.ndarray:
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in done:
      # Opened per slice: the mapped pages are dropped as soon as the slice is copied out.
      with safetensors.safe_open(file, framework='numpy') as f:
        piece = f.get_slice(name)[tuple(reversed(index)) if transposed else index]
      piece = piece.T if transposed else piece
      done[key] = np.ascontiguousarray(piece.astype(dtype))
    return done[key]

  return read


def load_hf(
  path: str,
  *,
  dtype: Any = 'float32',
  mesh: Optional[jax.sharding.Mesh] = None,
  shardings: Any = None,
  **overrides: Any,
) -> tuple[_config.DecoderConfig, Any]:
  """A Hugging Face Llama / Qwen2 / Mistral directory as (DecoderConfig, params).

  Args:
    path: a directory with `config.json` and `model.safetensors` or sharded
      `model-*.safetensors` with `model.safetensors.index.json`.
    dtype: the dtype of the parameters and of the computation ('float32',
      'bfloat16', ...), whatever dtype the checkpoint stores.
    mesh: place every parameter sharded over the mesh's 'fsdp' axis (all of
      its axes if it has none) along its largest divisible dimension, each
      device's slice read on its own.
    shardings: instead of `mesh`, a tree of shardings shaped like the params
      (e.g. a trainer's FSDP shardings).
    **overrides: `max_len`, `remat` or `attention_impl` (see `config_from_hf`).
      For a compute dtype other than the parameters',
      `dataclasses.replace(config, dtype=...)`.

  Returns:
    `(config, params)`: `Decoder(config).apply({'params': params}, tokens)`
    computes what transformers computes.

  Raises:
    ValueError: no config.json or weights, a missing shard, a config curvopt
      cannot represent (see `config_from_hf`), tensors missing, unexpected or
      shaped unlike the config, stored in a non-float dtype, or a non-float
      `dtype`.
  """
  dtype = _check_dtype(dtype, 'load_hf dtype')
  if 'param_dtype' in overrides:
    raise ValueError('load_hf sets both dtypes with dtype=; change the compute dtype afterwards')
  path = os.fspath(path)
  hf = read_hf_config(path)
  cfg = _hf_config.config_from_hf(hf, dtype=dtype, param_dtype=dtype, **overrides)
  stored = _weight_files(path)
  planned = tensor_map(cfg)
  shapes = _param_shapes(cfg)
  expected = {name for name, _, _ in planned}
  extra = sorted(
    n
    for n in set(stored) - expected
    if not _DERIVED.fullmatch(n) and not (n == 'lm_head.weight' and cfg.tie_embeddings)
  )
  missing = sorted(expected - set(stored))
  if missing or extra:
    raise ValueError(
      f'the weights in {path} do not match its config.json (tie_word_embeddings='
      f'{cfg.tie_embeddings}, num_hidden_layers={cfg.n_layers}, biases q/k/v={cfg.qkv_bias} '
      f'o={cfg.out_bias}): missing {missing[:5]}{" ..." if len(missing) > 5 else ""}, '
      f'unexpected {extra[:5]}{" ..." if len(extra) > 5 else ""}'
    )
  if shardings is not None and mesh is not None:
    raise ValueError('load_hf takes a mesh or shardings, not both')
  sharding_of = {}
  if shardings is not None:
    sharding_of = {
      tuple(k.key for k in p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)
    }
    if set(sharding_of) != set(shapes):
      raise ValueError(
        'load_hf shardings must have the parameter tree of the config: missing '
        f'{sorted(set(shapes) - set(sharding_of))[:5]}, extra '
        f'{sorted(set(sharding_of) - set(shapes))[:5]}'
      )

  params: dict[str, Any] = {}
  for name, key, transposed in planned:
    file, stored_shape, stored_dtype = stored[name]
    shape = shapes[key]
    want = tuple(reversed(shape)) if transposed else shape
    if stored_shape != want:
      raise ValueError(
        f'tensor {name!r} in {os.path.basename(file)} has shape {list(stored_shape)}, but '
        f'config.json implies {list(want)} (hidden_size={cfg.d_model}, '
        f'intermediate_size={cfg.d_ff}, heads={cfg.n_heads}/{cfg.n_kv_heads} of '
        f'{cfg.head_dim}, vocab_size={cfg.vocab_size})'
      )
    if stored_dtype not in _FLOAT_TYPES:
      raise ValueError(
        f'tensor {name!r} in {os.path.basename(file)} is stored as {stored_dtype}; '
        f'load_hf reads float weights ({list(_FLOAT_TYPES)}), not quantized ones'
      )
    read = _tensor_reader(file, name, transposed, dtype)
    if shardings is not None or mesh is not None:
      sharding = sharding_of[key] if shardings is not None else _fsdp_sharding(shape, mesh)
      value = jax.make_array_from_callback(shape, sharding, read)
    else:
      value = jax.device_put(read(tuple(slice(None) for _ in shape)))
    node = params
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = value
  return cfg, params


def _flat_params(cfg: _config.DecoderConfig, params: Any) -> dict[tuple[str, ...], Any]:
  if isinstance(params, dict) and set(params) == {'params'}:
    params = params['params']
  flat = {
    tuple(getattr(k, 'key', getattr(k, 'name', k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  shapes = _param_shapes(cfg)
  if set(flat) != set(shapes):
    missing = ['/'.join(k) for k in sorted(set(shapes) - set(flat))]
    extra = ['/'.join(k) for k in sorted(set(flat) - set(shapes))]
    raise ValueError(
      f'save_hf params do not match the config: missing {missing[:5]}, unexpected {extra[:5]}'
    )
  for key, shape in shapes.items():
    if tuple(np.shape(flat[key])) != shape:
      raise ValueError(
        f'save_hf param {"/".join(key)} has shape {np.shape(flat[key])}, the config gives {shape}'
      )
  return flat


def save_hf(
  path: str,
  config: _config.DecoderConfig,
  params: Any,
  *,
  dtype: Optional[Any] = None,
  max_shard_bytes: Optional[int] = _DEFAULT_SHARD_BYTES,
) -> list[str]:
  """Writes `params` as a Hugging Face model directory that transformers loads.

  Qwen2 when the config has q/k/v biases only, Llama otherwise (Mistral without a
  sliding window is Llama). Tensors are written one at a time (host memory: one tensor).

  Args:
    path: the output directory (created; existing files of the same names are replaced).
    config: the DecoderConfig of `params`.
    params: the Decoder's parameters (or the `{'params': ...}` variables).
    dtype: the stored dtype (default: each parameter's own).
    max_shard_bytes: larger checkpoints are split into shards with an index, as
      transformers' `save_pretrained` does; None writes one file.

  Returns:
    The files written, config.json first.
  """
  path = os.fspath(path)
  if dtype is not None:
    dtype = _check_dtype(dtype, 'save_hf dtype')
  flat = _flat_params(config, params)
  planned = tensor_map(config)

  def stored_spec(key, transposed):
    leaf = flat[key]
    shape = tuple(reversed(np.shape(leaf))) if transposed else tuple(np.shape(leaf))
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype or leaf.dtype))

  specs = {name: stored_spec(key, transposed) for name, key, transposed in planned}
  stored_dtypes = {s.dtype.name for s in specs.values()}
  os.makedirs(path, exist_ok=True)
  hf = _hf_config.config_to_hf(
    config, dtype=stored_dtypes.pop() if len(stored_dtypes) == 1 else None
  )
  with open(os.path.join(path, CONFIG_FILE), 'w') as f:
    json.dump(hf, f, indent=2)
  with merge.SafetensorsWriter(path, specs, max_shard_bytes=max_shard_bytes) as writer:
    for name, value in _host_tensors(flat, planned, dtype):
      writer.write(name, value)
  files = [CONFIG_FILE, *writer.files]
  return files + ([INDEX_FILE] if len(writer.files) > 1 else [])


def _host_tensors(flat, planned, dtype) -> Iterator[tuple[str, np.ndarray]]:
  for name, key, transposed in planned:
    value = np.asarray(jax.device_get(flat[key]))
    if dtype is not None:
      value = value.astype(dtype)
    yield name, value.T if transposed else value
