"""Decoder forward, causality, KV-cache decoding and sharding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import models

P = jax.sharding.PartitionSpec

MICRO = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48, max_len=16)


def _cfg(**overrides):
  return models.model_config('tiny', **{**MICRO, **overrides})


def _random_params(cfg, seed=0):
  """Params far from init (0.02 weights hardly move attention or logits)."""
  shapes = jax.eval_shape(
    models.Decoder(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.int32)
  )['params']
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  values = [
    (1.0 + 0.2 * rng.normal(size=s.shape)) if len(s.shape) == 1 else 0.3 * rng.normal(size=s.shape)
    for s in leaves
  ]
  return jax.tree.unflatten(treedef, [jnp.asarray(v, jnp.float32) for v in values])


@functools.partial(jax.jit, static_argnames='cfg')
def _forward(params, tokens, positions, mask, *, cfg):
  return models.Decoder(cfg).apply(
    {'params': params}, tokens, positions=positions, attention_mask=mask
  )


@functools.partial(jax.jit, static_argnames='cfg', donate_argnums=1)
def _decode(params, cache, tokens, positions, mask, *, cfg):
  (logits, hidden), mutated = models.Decoder(cfg).apply(
    {'params': params, 'cache': cache},
    tokens,
    positions=positions,
    attention_mask=mask,
    decode=True,
    mutable=['cache'],
  )
  return logits, hidden, mutated['cache']


def _np_decoder(params, cfg, tokens, positions, valid):
  """float64 loop reference of the whole decoder."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b_size, t_size = tokens.shape
  n, kv, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

  def dense(x, layer):
    return x @ layer['kernel'] + layer.get('bias', 0.0)

  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

  def inv_freq(i):
    freq = cfg.rope_theta ** (-2 * i / h)
    s = cfg.rope_scaling
    if s is None:
      return freq
    wavelen = 2 * np.pi / freq
    if wavelen < s.original_max_len / s.high_freq_factor:
      return freq
    if wavelen > s.original_max_len / s.low_freq_factor:
      return freq / s.factor
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor
    )
    return (1 - smooth) * freq / s.factor + smooth * freq

  def rope(x):
    out = np.empty_like(x)
    for b in range(b_size):
      for t in range(t_size):
        for i in range(h // 2):
          angle = positions[b, t] * inv_freq(i)
          c, s = np.cos(angle), np.sin(angle)
          x1, x2 = x[b, t, :, i], x[b, t, :, i + h // 2]
          out[b, t, :, i] = x1 * c - x2 * s
          out[b, t, :, i + h // 2] = x2 * c + x1 * s
    return out

  x = p['embed']['embedding'][tokens]
  for layer in range(cfg.n_layers):
    lp = p[f'layers_{layer}']
    y = rms(x, lp['attn_norm']['scale'])
    q = rope(dense(y, lp['attn']['q']).reshape(b_size, t_size, n, h))
    k = rope(dense(y, lp['attn']['k']).reshape(b_size, t_size, kv, h))
    v = dense(y, lp['attn']['v']).reshape(b_size, t_size, kv, h)
    att = np.zeros((b_size, t_size, n, h))
    for b in range(b_size):
      for head in range(n):
        g = head // (n // kv)
        for t in range(t_size):
          scores = k[b, :, g] @ q[b, t, head] / np.sqrt(h)
          allowed = [s <= t and (valid[b, s] or s == t) for s in range(t_size)]
          scores = np.where(allowed, scores, -np.inf)
          w = np.exp(scores - scores.max())
          att[b, t, head] = (w / w.sum()) @ v[b, :, g]
    x = x + dense(att.reshape(b_size, t_size, n * h), lp['attn']['o'])
    y = rms(x, lp['mlp_norm']['scale'])
    gate = y @ lp['mlp']['gate']['kernel']
    up = y @ lp['mlp']['up']['kernel']
    x = x + (gate / (1 + np.exp(-gate)) * up) @ lp['mlp']['down']['kernel']
  hidden = rms(x, p['final_norm']['scale'])
  head = p['embed']['embedding'].T if cfg.tie_embeddings else p['head']['kernel']
  return hidden @ head, hidden


def _left_padded_batch(seed, batch, length, vocab, pads):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  for b, pad in enumerate(pads):
    mask[b, :pad] = 0
    tokens[b, :pad] = 0
  return tokens, mask


# name -> config overrides, left padding per row (None: no mask)
FORWARD_CASES = {
  'tied_mha_nomask': (dict(), None),
  'untied_gqa_leftpad': (dict(n_kv_heads=2, tie_embeddings=False), (2, 0)),
  # What Hugging Face checkpoints add: a head size other than d_model // n_heads, q/k/v and
  # output biases, Llama 3's RoPE scaling.
  'hf_features_leftpad': (
    dict(
      n_kv_heads=2,
      head_size=16,
      qkv_bias=True,
      out_bias=True,
      rope_scaling=models.RopeScaling('llama3', 8.0, 1.0, 4.0, 16),
    ),
    (1, 0),
  ),
}


@pytest.mark.parametrize('name', sorted(FORWARD_CASES))
def test_forward_matches_numpy_reference(name):
  overrides, pads = FORWARD_CASES[name]
  cfg = _cfg(**overrides)
  params = _random_params(cfg)
  tokens, mask = _left_padded_batch(0, 2, 6, cfg.vocab_size, pads or (0, 0))
  positions = np.asarray(models.positions_from_mask(mask))
  logits, hidden = _forward(params, tokens, positions, None if pads is None else mask, cfg=cfg)
  ref_logits, ref_hidden = _np_decoder(params, cfg, tokens, positions, mask.astype(bool))
  np.testing.assert_allclose(hidden, ref_hidden, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_output_shapes_and_dtypes(dtype):
  cfg = _cfg(dtype=dtype)
  params = _random_params(cfg)
  tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
  logits, hidden = _forward(params, tokens, None, None, cfg=cfg)
  assert logits.shape == (2, 5, cfg.vocab_size) and logits.dtype == jnp.float32
  assert hidden.shape == (2, 5, cfg.d_model)
  assert hidden.dtype == jnp.dtype(dtype)
  assert np.all(np.isfinite(logits))
  if dtype == 'bfloat16':
    ref_logits, _ = _forward(params, tokens, None, None, cfg=_cfg())
    scale = np.abs(ref_logits).max()
    np.testing.assert_allclose(logits, ref_logits, atol=0.1 * scale)


@pytest.mark.parametrize('tied', [True, False])
def test_output_head_gives_the_logits(tied):
  cfg = _cfg(tie_embeddings=tied)
  params = _random_params(cfg)
  logits, hidden = _forward(
    params, np.arange(10, dtype=np.int32).reshape(2, 5), None, None, cfg=cfg
  )
  head = models.output_head(params, cfg)
  assert head.shape == (cfg.vocab_size, cfg.d_model)
  np.testing.assert_allclose(logits, np.einsum('btd,vd->btv', hidden, head), rtol=1e-4, atol=1e-4)


def test_causality():
  """Changing token t changes no logit before t, and does change later ones."""
  cfg = _cfg(n_kv_heads=2)
  params = _random_params(cfg)
  length = 6
  base = np.random.default_rng(1).integers(0, cfg.vocab_size, size=length)
  batch = np.tile(base, (length + 1, 1)).astype(np.int32)
  for t in range(length):
    batch[t + 1, t] = (base[t] + 1) % cfg.vocab_size
  logits, _ = _forward(params, batch, None, None, cfg=cfg)
  logits = np.asarray(logits)
  for t in range(length):
    np.testing.assert_array_equal(logits[t + 1, :t], logits[0, :t])
    assert np.abs(logits[t + 1, t:] - logits[0, t:]).min() > 0


def test_padding_is_invisible_to_real_tokens():
  """Left padding of any content and length leaves real tokens' logits alone."""
  cfg = _cfg()
  params = _random_params(cfg)
  prompt = np.array([5, 9, 2, 7], np.int32)
  tokens = np.array([[0, 0] + list(prompt), [33, 12] + list(prompt)], np.int32)
  mask = np.array([[0, 0, 1, 1, 1, 1]] * 2, np.int32)
  positions = models.positions_from_mask(mask)
  padded, _ = _forward(params, tokens, positions, mask, cfg=cfg)
  unpadded, _ = _forward(params, prompt[None], None, None, cfg=cfg)
  np.testing.assert_allclose(padded[:, 2:], np.repeat(unpadded, 2, 0), rtol=1e-5, atol=1e-5)


# name -> config overrides, left padding per row (None: no mask and default
# positions, which continue from the cache index when decoding), prefill
# length, cache length
DECODE_CASES = {
  'mha_nomask_prefill3': (dict(), None, 3, 8),
  'gqa_leftpad_prefill4': (dict(n_kv_heads=2), (3, 0, 1), 4, 10),
  'mqa_untied_leftpad_prefill1': (dict(n_kv_heads=1, tie_embeddings=False), (1, 0, 2), 1, 8),
}


def _prefill_then_decode(params, cfg, tokens, positions, mask, prefill, cache_len):
  batch, length = tokens.shape
  cache = models.init_cache(models.Decoder(cfg), batch, cache_len)
  chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]
  logits, hidden = [], []
  for start, stop in chunks:
    step_logits, step_hidden, cache = _decode(
      params,
      cache,
      *[None if x is None else x[:, start:stop] for x in (tokens, positions, mask)],
      cfg=cfg,
    )
    logits.append(step_logits)
    hidden.append(step_hidden)
  return np.concatenate(logits, 1), np.concatenate(hidden, 1), cache


@pytest.mark.parametrize('name', sorted(DECODE_CASES))
def test_kv_cache_decode_equals_full_forward(name):
  overrides, pads, prefill, cache_len = DECODE_CASES[name]
  cfg = _cfg(**overrides)
  params = _random_params(cfg, seed=3)
  batch = 2 if pads is None else len(pads)
  tokens, mask = _left_padded_batch(4, batch, 7, cfg.vocab_size, pads or (0,) * batch)
  full_mask = None if pads is None else mask
  positions = None if pads is None else models.positions_from_mask(mask)
  full_logits, full_hidden = _forward(params, tokens, positions, full_mask, cfg=cfg)
  logits, hidden, cache = _prefill_then_decode(
    params, cfg, tokens, positions, full_mask, prefill, cache_len
  )
  np.testing.assert_allclose(logits, full_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hidden, full_hidden, rtol=1e-5, atol=1e-5)
  assert int(cache['cache_index']) == 7
  np.testing.assert_array_equal(cache['key_valid'][:, :7], mask.astype(bool))
  assert not np.any(cache['key_valid'][:, 7:])


def test_remat_and_fsdp_grads_match_plain_grads(mesh8):
  """Rematerialized blocks on FSDP-sharded params: same loss and gradients,
  and the gradients come back sharded like the params."""
  cfg = _cfg(n_kv_heads=2, tie_embeddings=False)
  params = _random_params(cfg)
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(8, 6)).astype(np.int32)

  def loss(p, tok, c):
    logits, _ = models.Decoder(c).apply({'params': p}, tok)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)
  expected_loss, expected_grads = value_and_grad(params, tokens, cfg)
  sharded_params = jax.tree.map(lambda x: jax.device_put(x, _fsdp_sharding(mesh8, x)), params)
  sharded_tokens = jax.device_put(tokens, jax.sharding.NamedSharding(mesh8, P(('data', 'fsdp'))))
  loss_value, grads = value_and_grad(
    sharded_params, sharded_tokens, dataclasses.replace(cfg, remat=True)
  )
  np.testing.assert_allclose(loss_value, expected_loss, rtol=1e-6)
  jax.tree.map(
    lambda g, e, p: (
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7),
      _assert_same_spec(g, p),
    ),
    grads,
    expected_grads,
    sharded_params,
  )


def _assert_same_spec(x, ref):
  assert x.sharding.spec == ref.sharding.spec, (x.sharding, ref.sharding)


def test_input_validation():
  cfg = _cfg()
  model = models.Decoder(cfg)
  params = _random_params(cfg)
  variables = {'params': params}
  tokens = np.zeros((2, 4), np.int32)
  with pytest.raises(ValueError, match=r'\(4,\)'):
    model.apply(variables, tokens[0])
  with pytest.raises(TypeError, match='float32'):
    model.apply(variables, tokens.astype(np.float32))
  with pytest.raises(ValueError, match='sequence length 17'):
    model.apply(variables, np.zeros((1, 17), np.int32))
  with pytest.raises(ValueError, match=r'positions.*\(2, 3\)'):
    model.apply(variables, tokens, positions=np.zeros((2, 3), np.int32))
  with pytest.raises(TypeError, match='attention_mask.*float32'):
    model.apply(variables, tokens, attention_mask=np.ones((2, 4), np.float32))
  cache = models.init_cache(model, 3, 8)
  with pytest.raises(ValueError, match='batch size 2.*3'):
    model.apply({'params': params, 'cache': cache}, tokens, decode=True, mutable=['cache'])
  cache = models.init_cache(model, 2, 3)
  with pytest.raises(ValueError, match='4 tokens.*length 3'):
    model.apply({'params': params, 'cache': cache}, tokens, decode=True, mutable=['cache'])


def _fsdp_sharding(mesh, leaf):
  """Shard the first dimension divisible by the 'fsdp' axis, else replicate."""
  fsdp = mesh.shape['fsdp']
  spec = [None] * leaf.ndim
  for dim, size in enumerate(leaf.shape):
    if size % fsdp == 0:
      spec[dim] = 'fsdp'
      break
  return jax.sharding.NamedSharding(mesh, P(*spec))


def test_sharded_forward_and_decode_match_single_device(mesh8):
  cfg = _cfg(n_kv_heads=2)
  params = _random_params(cfg, seed=5)
  tokens, mask = _left_padded_batch(6, 8, 6, cfg.vocab_size, (0, 1, 2, 3, 0, 1, 2, 3))
  positions = np.asarray(models.positions_from_mask(mask))
  expected_logits, expected_hidden = _forward(params, tokens, positions, mask, cfg=cfg)

  batch_sharding = jax.sharding.NamedSharding(mesh8, P(('data', 'fsdp')))
  sharded_params = jax.tree.map(lambda x: jax.device_put(x, _fsdp_sharding(mesh8, x)), params)
  assert any(
    len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
    for x in jax.tree.leaves(sharded_params)
  )

  def put(x):
    return jax.device_put(x, batch_sharding)

  logits, hidden = _forward(sharded_params, put(tokens), put(positions), put(mask), cfg=cfg)
  assert not logits.sharding.is_fully_replicated
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hidden, expected_hidden, rtol=1e-5, atol=1e-5)

  # A fresh (uncommitted, unsharded) cache takes the batch layout of the
  # tokens on the first step; decoding stays exact.
  cache = models.init_cache(models.Decoder(cfg), 8, 6)
  logits_chunks = []
  for start, stop in ((0, 4), (4, 5), (5, 6)):
    step_logits, _, cache = _decode(
      sharded_params,
      cache,
      put(tokens[:, start:stop]),
      put(positions[:, start:stop]),
      put(mask[:, start:stop]),
      cfg=cfg,
    )
    logits_chunks.append(step_logits)
  np.testing.assert_allclose(
    np.concatenate(logits_chunks, 1), expected_logits, rtol=1e-5, atol=1e-5
  )
  key_sharding = cache['layers_0']['attn']['cached_key'].sharding
  assert key_sharding.spec[0] == ('data', 'fsdp')
