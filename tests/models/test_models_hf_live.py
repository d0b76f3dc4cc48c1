"""Against transformers itself, when it is installed (skipped otherwise): a random checkpoint of
each family loads with transformers' logits, and what save_hf writes loads in transformers with
the same logits (the round trip the golden fixtures cannot close)."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from curvopt import models

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

_SCRIPT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'fixtures', 'hf', 'make_golden.py'
)


def _golden_script():
  spec = importlib.util.spec_from_file_location('make_golden', _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


golden = _golden_script()
# name -> (family in make_golden.MODELS, config changes)
CASES = {
  'llama': ('llama', {}),
  'llama_attention_bias': ('llama', dict(attention_bias=True, tie_word_embeddings=False)),
  'qwen2': ('qwen2', {}),
  'mistral': ('mistral', {}),
}


def _hf_model(name, seed):
  family, changes = CASES[name]
  config_cls, model_cls, extra = golden.MODELS[family]
  config = config_cls(**{**golden.COMMON, **extra, **changes}, attn_implementation='eager')
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  golden._randomize(model, seed)  # pylint: disable=protected-access
  return model


@torch.no_grad()
def _hf_logits(model, tokens, mask, positions):
  return model(
    input_ids=torch.tensor(tokens, dtype=torch.long),
    attention_mask=torch.tensor(mask, dtype=torch.long),
    position_ids=torch.tensor(positions, dtype=torch.long),
  ).logits.numpy()


@pytest.mark.parametrize('name', sorted(CASES))
def test_load_matches_and_save_loads_in_transformers(name, tmp_path):
  model = _hf_model(name, seed=len(name))
  model.save_pretrained(tmp_path / 'hf')
  tokens, mask, positions = golden._left_padded(np.random.default_rng(0), 2, 9, (0, 3))  # pylint: disable=protected-access
  expected = _hf_logits(model, tokens, mask, positions)
  real = mask.astype(bool)

  cfg, params = models.load_hf(tmp_path / 'hf')
  assert cfg.out_bias == (name == 'llama_attention_bias')
  logits, _ = models.Decoder(cfg).apply(
    {'params': params}, tokens, positions=positions, attention_mask=mask
  )
  np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=2e-5, rtol=1e-5)

  models.save_hf(tmp_path / 'ours', cfg, jax.tree.map(np.asarray, params))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
    tmp_path / 'ours', dtype=torch.float32, attn_implementation='eager'
  ).eval()
  assert type(reloaded) is type(model) or name == 'mistral'  # Mistral is written as Llama
  np.testing.assert_allclose(
    _hf_logits(reloaded, tokens, mask, positions)[real], expected[real], atol=2e-5, rtol=1e-5
  )
