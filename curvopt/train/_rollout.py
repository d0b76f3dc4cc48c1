"""Sampling completions of task prompts with the decoder, and scoring them by exact match."""

from typing import Mapping, Sequence

import jax
import numpy as np

from curvopt import data as data_lib
from curvopt import models
from curvopt import rl


class Rollout:
  """Samples `num_samples` completions per task prompt and decodes them to text.

  The prompt width and completion length are fixed (static shapes: one compiled sampler for the
  whole run).
  """

  def __init__(
    self,
    model: models.Decoder,
    tokenizer: data_lib.Tokenizer,
    *,
    max_prompt_len: int,
    max_new_tokens: int,
  ):
    self.model = model
    self.tokenizer = tokenizer
    self.max_prompt_len = max_prompt_len
    self.max_new_tokens = max_new_tokens
    self._decode_fn = models.decode_fn_for(model)

  def __call__(
    self,
    params,
    examples: Sequence[Mapping[str, str]],
    key: jax.Array,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
  ):
    """Returns (prompts [B, P], prompt_mask [B, P], rl.Samples over B * num_samples rows, texts)."""
    prompts, prompt_mask = data_lib.prompt_batch(
      examples, self.tokenizer, max_prompt_len=self.max_prompt_len
    )
    cache = models.init_cache(
      self.model, len(examples) * num_samples, self.max_prompt_len + self.max_new_tokens
    )
    samples = rl.sample(
      self._decode_fn,
      params,
      cache,
      prompts,
      prompt_mask,
      key,
      max_new_tokens=self.max_new_tokens,
      num_samples=num_samples,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      eos_id=self.tokenizer.eos_id,
      pad_id=self.tokenizer.pad_id,
    )
    # The model's vocabulary may be padded past the tokenizer's; such ids carry no text.
    vocab = self.tokenizer.vocab_size
    texts = [self.tokenizer.decode(row[row < vocab]) for row in np.asarray(samples.completions)]
    return prompts, prompt_mask, samples, texts

  def accuracy(
    self, params, examples: Sequence[Mapping[str, str]], *, batch_size: int = 256
  ) -> float:
    """Exact-match accuracy of greedy completions (the held-out metric of SFT and RL)."""
    correct = []
    for start in range(0, len(examples), batch_size):
      chunk = examples[start : start + batch_size]
      _, _, _, texts = self(params, chunk, jax.random.key(0), temperature=0.0)
      correct.append(
        rl.exact_match_reward([e['prompt'] for e in chunk], texts, [e['answer'] for e in chunk])
      )
    return float(np.mean(np.concatenate(correct)))

  def per_prompt_correct(
    self,
    params,
    examples: Sequence[Mapping[str, str]],
    key: jax.Array,
    *,
    num_samples: int,
    temperature: float = 1.0,
    top_k: int = 0,
    max_rows: int = 256,
  ) -> np.ndarray:
    """[prompts, num_samples] exact match (0 / 1) of sampled completions.

    Prompt chunk c (at most `max_rows` completions) draws with fold_in(key, c): a fixed key
    gives the same draws at every call, so changes between calls are the policy's.
    """
    per_chunk = max(1, max_rows // num_samples)
    per_prompt = []
    for chunk_index, start in enumerate(range(0, len(examples), per_chunk)):
      chunk = examples[start : start + per_chunk]
      _, _, samples, texts = self(
        params,
        chunk,
        jax.random.fold_in(key, chunk_index),
        num_samples=num_samples,
        temperature=temperature,
        top_k=top_k,
      )
      index = np.asarray(samples.prompt_index)
      correct = rl.exact_match_reward(
        [chunk[i]['prompt'] for i in index], texts, [chunk[i]['answer'] for i in index]
      )
      per_prompt.append(np.asarray(correct, np.float64).reshape(len(chunk), num_samples))
    return np.concatenate(per_prompt)

  def sampled_accuracy(
    self,
    params,
    examples: Sequence[Mapping[str, str]],
    key: jax.Array,
    *,
    num_samples: int,
    temperature: float = 1.0,
    top_k: int = 0,
    max_rows: int = 256,
  ) -> tuple[float, float]:
    """(mean exact match, its standard error) of `num_samples` sampled completions a prompt.

    What the policy does when it samples, as in training: greedy accuracy can stay put while
    the sampling distribution flattens (or flip when it does). The standard error is over
    prompts (the std of the per-prompt means over sqrt(prompts)), since samples of one prompt
    are correlated. The draws are `per_prompt_correct`'s: the same at every evaluation.
    """
    means = self.per_prompt_correct(
      params,
      examples,
      key,
      num_samples=num_samples,
      temperature=temperature,
      top_k=top_k,
      max_rows=max_rows,
    ).mean(axis=1)
    se = float(means.std(ddof=1) / np.sqrt(len(means))) if len(means) > 1 else float('nan')
    return float(means.mean()), se
