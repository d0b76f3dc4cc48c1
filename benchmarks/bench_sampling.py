r"""Sampling throughput with the KV cache vs recomputing the full prefix every token.

  python benchmarks/bench_sampling.py                                   # tiny, CPU-sized
  python benchmarks/bench_sampling.py --model=small --batch_size=64 --new_tokens=128,512   # GPU

Times, side by side in one process (interleaved repetitions, median), two jit'd samplers of
the same decoder on the same left-padded prompts, with the same sampling rule (temperature,
top-k through rl.filter_logits, a categorical draw per step) and an EOS that never comes, so
both produce every one of the new tokens:
  - cache: rl.sample with models.decode_fn_for: one prefill, then one one-token decode
    step per new token over the KV cache;
  - anchor: no cache: a fixed [N, P + L] token buffer, and at every step the full causal
    forward over all of it (lax.fori_loop), reading the logits at the newest position.
Prints tokens/s of both and the speed-up (anchor time / cache time) for each completion
length.
"""

import functools

import _timing  # benchmarks/_timing.py, beside this script
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from curvopt import models
from curvopt import rl

_MODEL = flags.DEFINE_string('model', 'tiny', 'Decoder preset (tiny, small, gpt2s).')
_BATCH = flags.DEFINE_integer('batch_size', 2, 'Completions sampled at once (N).')
_PROMPT = flags.DEFINE_integer('prompt_len', 16, 'Prompt width P (left-padded).')
_NEW = flags.DEFINE_list('new_tokens', ['128', '512'], 'Completion lengths L to time.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature.')
_TOP_K = flags.DEFINE_integer('top_k', 50, 'Top-k (0 = off).')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Interleaved repetitions; the median is reported.')


def no_cache_sampler(model, *, new_tokens, temperature, top_k):
  """The anchor: a full forward over the whole fixed-size buffer for every new token."""

  def sample(params, prompts, prompt_mask, key):
    batch, prompt_len = prompts.shape
    tokens = jnp.concatenate([prompts, jnp.zeros((batch, new_tokens), jnp.int32)], 1)
    # Slots not yet written sit after the newest position, so causality hides them.
    mask = jnp.concatenate([prompt_mask, jnp.ones((batch, new_tokens), jnp.int32)], 1)
    positions = models.positions_from_mask(mask)

    def step(t, tokens):
      logits, _ = model.apply({'params': params}, tokens, positions=positions, attention_mask=mask)
      last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1 + t, axis=1, keepdims=False)
      kept = rl.filter_logits(last / temperature, top_k=top_k)
      token = jax.random.categorical(jax.random.fold_in(key, t), kept, axis=-1)
      return jax.lax.dynamic_update_index_in_dim(
        tokens, token.astype(jnp.int32), prompt_len + t, axis=1
      )

    tokens = jax.lax.fori_loop(0, new_tokens, step, tokens)
    return tokens[:, prompt_len:]

  return jax.jit(sample)


def main(argv):
  del argv
  batch, prompt_len = _BATCH.value, _PROMPT.value
  lengths = [int(n) for n in _NEW.value]
  dtype = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  cfg = models.model_config(_MODEL.value, dtype=dtype, max_len=prompt_len + max(lengths))
  model = models.Decoder(cfg)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])()
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  pads = rng.integers(0, prompt_len // 2, batch)
  prompt_mask = (np.arange(prompt_len)[None] >= pads[:, None]).astype(np.int32)
  prompts = np.where(prompt_mask == 1, prompts, 0).astype(np.int32)
  prompts, prompt_mask = jnp.asarray(prompts), jnp.asarray(prompt_mask)
  key = jax.random.key(1)
  decode_fn = models.decode_fn_for(model)
  # An id outside the vocabulary: no row ever ends early, both samplers do all L steps.
  never = cfg.vocab_size
  print(
    f'backend {jax.default_backend()}, device {jax.devices()[0].device_kind}; model '
    f'{_MODEL.value} ({models.count_params(params) / 1e6:.2f}M params, vocab '
    f'{cfg.vocab_size}, {dtype}), batch {batch}, prompt {prompt_len}, temperature '
    f'{_TEMPERATURE.value}, top_k {_TOP_K.value}; median of {_REPEATS.value}',
    flush=True,
  )

  for new_tokens in lengths:
    cache = models.init_cache(model, batch, prompt_len + new_tokens)
    cached = functools.partial(
      rl.sample,
      decode_fn,
      params,
      cache,
      prompts,
      prompt_mask,
      key,
      max_new_tokens=new_tokens,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      eos_id=never,
      pad_id=0,
    )
    anchor_args = (params, prompts, prompt_mask, key)
    # Compiled ahead, not warmed up by a run: one anchor run at L=512 takes minutes on CPU.
    anchor = functools.partial(
      no_cache_sampler(
        model, new_tokens=new_tokens, temperature=_TEMPERATURE.value, top_k=_TOP_K.value
      )
      .lower(*anchor_args)
      .compile(),
      *anchor_args,
    )
    outputs = {'cache': jax.block_until_ready(cached().completions)}  # compile

    def run_anchor(anchor=anchor, outputs=outputs):
      outputs['anchor'] = anchor()
      return outputs['anchor']

    runs = {'cache': lambda cached=cached: cached().completions, 'anchor': run_anchor}
    times = {name: [] for name in runs}
    for _ in range(_REPEATS.value):
      for name, fn in runs.items():
        times[name].append(_timing.seconds_per_call(fn, 1))
    # Same key, same rule: the two must draw the same tokens up to float rounding.
    agree = float(np.mean(np.asarray(outputs['cache']) == np.asarray(outputs['anchor'])))
    t_cache, t_anchor = np.median(times['cache']), np.median(times['anchor'])
    tokens = batch * new_tokens
    print(
      f'{new_tokens:4d} new tokens   cache {tokens / t_cache:9.1f} tok/s   '
      f'no-cache anchor {tokens / t_anchor:9.1f} tok/s   speed-up {t_anchor / t_cache:6.2f}x'
      f'   same tokens {100 * agree:.1f}%',
      flush=True,
    )


if __name__ == '__main__':
  app.run(main)
