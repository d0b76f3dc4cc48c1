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
