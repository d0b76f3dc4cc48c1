"""rl.sample and rl.filter_logits: against hand-built bigram tables and the real decoder."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import models
from curvopt import rl

P = jax.sharding.PartitionSpec
VOCAB = 48
EOS, PAD = 1, 0


# --- a fake policy: logits of the next token depend on the last token only ---


def _bigram_decode(table, cache, tokens, positions, attention_mask):
  """decode_fn whose params are a [V, V] logits table indexed by the last token."""
  del positions, attention_mask
  return table[tokens], cache + tokens.shape[1]


def _bigram_table(seed, vocab=16):
  """Distinct logits per row (no ties), spread wide enough to make filters bite."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(vocab) * 0.35 for _ in range(vocab)]).astype(np.float32)


def _previous_tokens(prompts, prompt_index, completions):
  """The token each completion token was sampled after."""
  first = np.asarray(prompts)[np.asarray(prompt_index), -1]
  return np.concatenate([first[:, None], np.asarray(completions)[:, :-1]], axis=1)


def _np_filter(logits, top_k, top_p):
  """Loop reference of filter_logits: the set kept per row, as a boolean mask."""
  logits = np.asarray(logits, np.float64)
  keep = np.ones(logits.shape, bool)
  for row in np.ndindex(logits.shape[:-1]):
    x = logits[row]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    if top_k:
      order = order[:top_k]
    kept = []
    if top_p < 1:
      p = np.exp(np.array([x[i] for i in order]) - max(x))
      p /= p.sum()
      before = 0.0
      for i, pi in zip(order, p):
        if before >= top_p and kept:
          break
        kept.append(i)
        before += pi
    else:
      kept = order
    keep[row] = np.isin(np.arange(len(x)), kept)
  return keep


# name -> (top_k, top_p)
FILTER_CASES = {
  'none': (0, 1.0),
  'top1': (1, 1.0),
  'top5': (5, 1.0),
  'topk_ge_vocab': (100, 1.0),
  'nucleus_0.5': (0, 0.5),
  'nucleus_0.9': (0, 0.9),
  'nucleus_tiny': (0, 1e-6),
  'top5_nucleus_0.8': (5, 0.8),
}


@pytest.mark.parametrize('name', FILTER_CASES)
def test_filter_logits_matches_loop_reference(name):
  top_k, top_p = FILTER_CASES[name]
  logits = np.random.default_rng(3).normal(size=(2, 3, 20)).astype(np.float32) * 2
  got = np.asarray(rl.filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
  keep = _np_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), keep)
  np.testing.assert_array_equal(got[keep], logits[keep])
  assert np.all(got[~keep] == -np.inf)


@pytest.mark.parametrize('top_k, top_p', [(3, 1.0), (0, 0.6), (4, 0.7)])
def test_samples_stay_inside_the_filtered_set_with_the_right_frequencies(top_k, top_p):
  table = _bigram_table(0)
  vocab = table.shape[0]
  prompts = np.tile(np.arange(2, 6, dtype=np.int32)[:, None], (1, 3))
  temperature = 0.8
  out = rl.sample(
    _bigram_decode,
    jnp.asarray(table),
    jnp.int32(0),
    prompts,
    np.ones_like(prompts),
    jax.random.key(0),
    max_new_tokens=6,
    num_samples=256,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    eos_id=vocab + 5,
    pad_id=PAD,
  )  # an EOS that never comes
  completions = np.asarray(out.completions)
  assert np.all(np.asarray(out.mask) == 1) and np.all(np.asarray(out.truncated))
  prev = _previous_tokens(prompts, out.prompt_index, completions)
  keep = _np_filter(table / temperature, top_k, top_p)  # [V (previous token), V]
  assert np.all(keep[prev, completions]), 'sampled outside the kept set'
  # Empirical frequencies of the next token after each previous token match the
  # renormalized filtered softmax (about 9k draws spread over <= 16 contexts).
  for p in np.unique(prev):
    drawn = completions[prev == p]
    if drawn.size < 400:
      continue
    probs = np.where(keep[p], np.exp(table[p] / temperature), 0.0)
    probs /= probs.sum()
    freq = np.bincount(drawn, minlength=vocab) / drawn.size
    np.testing.assert_allclose(freq, probs, atol=5 * np.sqrt(0.25 / drawn.size))
  # logp is under the unfiltered tempered softmax.
  want = jax.nn.log_softmax(table / temperature)[prev, completions]
  np.testing.assert_allclose(out.logp, want, rtol=1e-5, atol=1e-6)


def test_eos_stops_a_row_and_pads_after_it():
  # Greedy chains: 2 -> 3 -> EOS; 4 -> EOS; 5 -> 6 -> 5 -> 6 ... (never ends).
  vocab = 8
  table = np.full((vocab, vocab), -5.0, np.float32)
  for src, dst in ((2, 3), (3, EOS), (4, EOS), (5, 6), (6, 5), (EOS, 7), (PAD, 7)):
    table[src, dst] = 5.0
  prompts = np.asarray([[0, 2], [7, 4], [7, 5]], np.int32)
  mask = np.asarray([[0, 1], [1, 1], [1, 1]], np.int32)
  out = rl.sample(
    _bigram_decode,
    jnp.asarray(table),
    jnp.int32(0),
    prompts,
    mask,
    jax.random.key(0),
    max_new_tokens=5,
    temperature=0.0,
    eos_id=EOS,
    pad_id=PAD,
  )
  np.testing.assert_array_equal(
    out.completions, [[3, EOS, PAD, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [6, 5, 6, 5, 6]]
  )
  np.testing.assert_array_equal(out.mask, [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1] * 5])
  np.testing.assert_array_equal(out.truncated, [False, False, True])
  assert out.completions.dtype == jnp.int32 and out.mask.dtype == jnp.float32
  assert out.logp.dtype == jnp.float32 and out.truncated.dtype == jnp.bool_
  logp = np.asarray(out.logp)
  assert np.all(logp[np.asarray(out.mask) == 0] == 0)
  assert np.all(logp[np.asarray(out.mask) == 1] < 0)


def test_early_exit_when_every_row_ended():
  # Every row ends at its first token; a decode call after that would return NaN
  # logits through the counter in the cache, and the loop must not make one.
  def decode(table, count, tokens, positions, attention_mask):
    del positions, attention_mask
    logits = table[tokens]
    return jnp.where(count >= 3, jnp.nan, logits), count + tokens.shape[1]

  table = np.full((4, 4), -5.0, np.float32)
  table[:, EOS] = 5.0
  prompts = np.asarray([[2, 3, 2]], np.int32)  # the prefill writes 3 tokens
  out = rl.sample(
    decode,
    jnp.asarray(table),
    jnp.int32(0),
    prompts,
    np.ones_like(prompts),
    jax.random.key(1),
    max_new_tokens=4,
    num_samples=3,
    eos_id=EOS,
    pad_id=PAD,
  )
  np.testing.assert_array_equal(out.completions, [[EOS, PAD, PAD, PAD]] * 3)
  assert np.all(np.isfinite(out.logp))


def test_input_validation():
  table, prompts = jnp.zeros((4, 4)), np.ones((2, 3), np.int32)
  call = functools.partial(
    rl.sample,
    _bigram_decode,
    table,
    jnp.int32(0),
    prompts,
    np.ones_like(prompts),
    jax.random.key(0),
    eos_id=1,
    pad_id=0,
  )
  cases = [
    (dict(max_new_tokens=0), ValueError, 'max_new_tokens'),
    (dict(max_new_tokens=2.0), TypeError, 'max_new_tokens'),
    (dict(max_new_tokens=2, num_samples=0), ValueError, 'num_samples'),
    (dict(max_new_tokens=2, temperature=-1.0), ValueError, 'temperature'),
    (dict(max_new_tokens=2, temperature=float('nan')), ValueError, 'temperature'),
    (dict(max_new_tokens=2, top_k=-1), ValueError, 'top_k'),
    (dict(max_new_tokens=2, top_p=0.0), ValueError, 'top_p'),
    (dict(max_new_tokens=2, top_p=1.5), ValueError, 'top_p'),
  ]
  for kwargs, error, match in cases:
    with pytest.raises(error, match=match):
      call(**kwargs)
  with pytest.raises(ValueError, match='prompt_mask'):
    rl.sample(
      _bigram_decode,
      table,
      jnp.int32(0),
      prompts,
      np.ones((2, 2)),
      jax.random.key(0),
      max_new_tokens=2,
      eos_id=1,
      pad_id=0,
    )
  with pytest.raises(TypeError, match='prompts'):
    rl.sample(
      _bigram_decode,
      table,
      jnp.int32(0),
      prompts * 1.0,
      np.ones_like(prompts),
      jax.random.key(0),
      max_new_tokens=2,
      eos_id=1,
      pad_id=0,
    )
  with pytest.raises(ValueError, match='top_p'):
    rl.filter_logits(table, top_p=2.0)
  with pytest.raises(TypeError, match='Decoder'):
    models.decode_fn_for(lambda *a: a)


# --- the real decoder ---------------------------------------------------------

CFG = models.model_config(
  'tiny', d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=VOCAB, max_len=32
)
MODEL = models.Decoder(CFG)
DECODE = models.decode_fn_for(MODEL)
PROMPT_LENS = (5, 2, 7, 4)
MAX_PROMPT = max(PROMPT_LENS)


@functools.lru_cache(maxsize=None)
def _params():
  """Params far from init, so that logits are spread and argmax ties impossible."""
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.int32))[
    'params'
  ]
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(0)
  values = [
    (1.0 + 0.2 * rng.normal(size=s.shape)) if len(s.shape) == 1 else 0.3 * rng.normal(size=s.shape)
    for s in leaves
  ]
  return jax.tree.unflatten(treedef, [jnp.asarray(v, jnp.float32) for v in values])


def _prompts(lengths=PROMPT_LENS, width=MAX_PROMPT, seed=1):
  """Left-padded prompts of the given lengths (never EOS or PAD inside)."""
  rng = np.random.default_rng(seed)
  tokens = np.full((len(lengths), width), PAD, np.int32)
  mask = np.zeros((len(lengths), width), np.int32)
  for row, n in enumerate(lengths):
    tokens[row, width - n :] = rng.integers(2, VOCAB, n)
    mask[row, width - n :] = 1
  return tokens, mask


def _sample(prompts, mask, key=0, *, params=None, new=6, num_samples=1, **opts):
  cache = models.init_cache(MODEL, prompts.shape[0] * num_samples, prompts.shape[1] + new)
  opts = {**dict(eos_id=EOS, pad_id=PAD), **opts}
  return rl.sample(
    DECODE,
    _params() if params is None else params,
    cache,
    prompts,
    mask,
    jax.random.key(key),
    max_new_tokens=new,
    num_samples=num_samples,
    **opts,
  )


@jax.jit
def _full_logits(params, tokens, mask):
  return MODEL.apply(
    {'params': params}, tokens, attention_mask=mask, positions=models.positions_from_mask(mask)
  )[0]


# Two option sets shared by the tests below, so the sampler compiles few times.
# EOS 7 is reached by the greedy model within 6 tokens in some rows, not all.
GREEDY = dict(new=6, temperature=0.0, eos_id=7)
SAMPLED = dict(new=6, num_samples=2, temperature=0.8, top_k=20, top_p=0.95, eos_id=7)
WIDTH = MAX_PROMPT + GREEDY['new']


def test_greedy_equals_argmax_of_the_full_forward_step_by_step():
  prompts, mask = _prompts()
  out = _sample(prompts, mask, **GREEDY)
  eos, new = GREEDY['eos_id'], GREEDY['new']
  for row, n in enumerate(PROMPT_LENS):
    seq = list(prompts[row, -n:])
    want = []
    while len(want) < new:
      # Left-padded to one width: one compile of the reference forward.
      tokens = np.zeros((1, WIDTH), np.int32)
      tokens[0, WIDTH - len(seq) :] = seq
      logits = _full_logits(_params(), tokens, (np.arange(WIDTH) >= WIDTH - len(seq))[None])
      token = int(np.argmax(logits[0, -1]))
      want.append(token)
      seq.append(token)
      if token == eos:
        break
    got = np.asarray(out.completions[row])
    np.testing.assert_array_equal(got[: len(want)], want)
    assert np.all(got[len(want) :] == PAD)
    np.testing.assert_array_equal(out.mask[row], np.arange(new) < len(want))
    assert bool(out.truncated[row]) == (want[-1] != eos)
  assert 0 < np.sum(out.truncated) < len(PROMPT_LENS), 'pick an eos some rows reach'


def _recomputed_logp(prompts, mask, out, temperature):
  """log_softmax(logits / T) of every sampled id from one full forward."""
  index = np.asarray(out.prompt_index)
  tokens = np.concatenate([prompts[index], np.asarray(out.completions)], 1)
  full_mask = np.concatenate([mask[index], np.asarray(out.mask, np.int32)], 1)
  logits = _full_logits(_params(), jnp.asarray(tokens), jnp.asarray(full_mask))
  width, new = prompts.shape[1], out.completions.shape[1]
  logp = jax.nn.log_softmax(logits[:, width - 1 : width - 1 + new] / temperature)
  return np.take_along_axis(np.asarray(logp), np.asarray(out.completions)[..., None], -1)[..., 0]


def test_logp_equals_the_full_forward_and_groups_are_contiguous():
  prompts, mask = _prompts()
  num_samples = SAMPLED['num_samples']
  out = _sample(prompts, mask, **SAMPLED)
  np.testing.assert_array_equal(out.prompt_index, np.repeat(np.arange(4), num_samples))
  real = np.asarray(out.mask) == 1
  want = _recomputed_logp(prompts, mask, out, SAMPLED['temperature'])
  np.testing.assert_allclose(np.asarray(out.logp)[real], want[real], rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(out.logp)[~real] == 0)
  # Sampling differs within a group (one prompt's rows are not copies).
  completions = np.asarray(out.completions).reshape(4, num_samples, -1)
  assert any(not np.array_equal(*group) for group in completions)

  # Greedy: the rows of a group agree with each other and with num_samples=1.
  greedy = _sample(prompts, mask, **{**GREEDY, 'num_samples': num_samples})
  single = _sample(prompts, mask, **GREEDY)
  for field in ('completions', 'mask', 'truncated'):
    np.testing.assert_array_equal(
      getattr(greedy, field), np.repeat(np.asarray(getattr(single, field)), num_samples, 0)
    )
  np.testing.assert_allclose(
    greedy.logp, np.repeat(np.asarray(single.logp), num_samples, 0), rtol=1e-5, atol=1e-6
  )
  real = np.asarray(greedy.mask) == 1
  want = _recomputed_logp(prompts, mask, greedy, 1.0)
  np.testing.assert_allclose(np.asarray(greedy.logp)[real], want[real], rtol=1e-4, atol=1e-5)


def test_a_left_padded_prompt_gets_the_completion_it_gets_alone():
  prompts, mask = _prompts()
  batch = _sample(prompts, mask, **GREEDY)
  # The most padded prompt, unpadded (each new shape is one more compile).
  row = int(np.argmin(PROMPT_LENS))
  n = PROMPT_LENS[row]
  alone = _sample(prompts[row : row + 1, -n:], mask[row : row + 1, -n:], **GREEDY)
  np.testing.assert_array_equal(batch.completions[row], alone.completions[0])
  np.testing.assert_allclose(batch.logp[row], alone.logp[0], rtol=1e-5, atol=1e-5)


def test_deterministic_for_a_key_and_different_across_keys():
  prompts, mask = _prompts()
  first = _sample(prompts, mask, key=3, **SAMPLED)
  again = _sample(prompts, mask, key=3, **SAMPLED)
  other = _sample(prompts, mask, key=4, **SAMPLED)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first.completions, other.completions)


def test_jit_with_static_options_matches_eager_call():
  prompts, mask = _prompts()
  opts = {k: v for k, v in SAMPLED.items() if k not in ('new', 'num_samples')}
  cache = models.init_cache(MODEL, 4 * SAMPLED['num_samples'], MAX_PROMPT + SAMPLED['new'])

  @jax.jit
  def run(params, cache, prompts, mask, key):
    return rl.sample(
      DECODE,
      params,
      cache,
      prompts,
      mask,
      key,
      max_new_tokens=SAMPLED['new'],
      num_samples=SAMPLED['num_samples'],
      pad_id=PAD,
      **opts,
    )

  got = run(_params(), cache, prompts, mask, jax.random.key(5))
  want = _sample(prompts, mask, key=5, **SAMPLED)
  np.testing.assert_array_equal(got.completions, want.completions)
  np.testing.assert_allclose(got.logp, want.logp, rtol=1e-6, atol=1e-6)


def _fsdp(mesh, leaf):
  """Shard the first dimension divisible by the 'fsdp' axis, else replicate."""
  spec = [None] * leaf.ndim
  for dim, size in enumerate(leaf.shape):
    if size % mesh.shape['fsdp'] == 0:
      spec[dim] = 'fsdp'
      break
  return jax.sharding.NamedSharding(mesh, P(*spec))


def test_sharded_over_the_data_axis_equals_single_device(mesh8):
  prompts, mask = _prompts()
  want = _sample(prompts, mask, key=7, **SAMPLED)

  rows = jax.sharding.NamedSharding(mesh8, P('data'))
  params = jax.tree.map(lambda x: jax.device_put(x, _fsdp(mesh8, x)), _params())
  got = _sample(
    jax.device_put(prompts, rows), jax.device_put(mask, rows), key=7, params=params, **SAMPLED
  )
  for field in ('completions', 'mask', 'truncated', 'prompt_index'):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
  np.testing.assert_allclose(got.logp, want.logp, rtol=1e-5, atol=1e-5)
  assert got.completions.sharding.spec[0] == 'data'
  assert not got.completions.sharding.is_fully_replicated
