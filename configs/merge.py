r"""Merging fine-tuned experts: OTA + FFG and the baselines, streamed from disk.

Launch (paths are placeholders set on the command line; inputs may be HF-layout safetensors
directories, with the OTA experts' export/exp_avg_sq.safetensors, or our trainers' orbax workdirs,
whose Adam nu is found in the optimizer state):
  python experiments/merge.py --config=configs/merge.py:ota_ffg --output=/tmp/merged \
      --config.base=/ckpt/base --config.experts=/ckpt/math,/ckpt/code,/ckpt/if \
      --config.densities=0.456,0.205,0.41
  python experiments/merge.py --config=configs/merge.py:ties --output=/tmp/ties --overwrite \
      --config.base=/ckpt/base --config.experts=/ckpt/math,/ckpt/code --config.weights=1,0.5
  python experiments/merge.py --config=configs/merge.py:ota --output=/tmp/merged \
      --config.spec=/path/merge_spec.json   # the full mergekit-like spec (rules, filters)
  python experiments/merge.py --config=merge.yml --output=/tmp/merged   # a mergekit YAML
Variants: linear, task_arithmetic, ties, dare, fisher, ota, ota_ffg, ffg_graft, test (ota + FFG
on small inputs, for the tests), mergekit (what --config=X.yml runs: --config.mergekit=X.yml).
Every option of the method is under config.options (`--config.options.fallback_to_base=False`;
per-expert values comma-separated, e.g. `--config.options.scales=1,2`; bias_correction as
`b2:count,b2:count`). The output is safetensors (sharded + index past
--config.max_shard_bytes, 5 GB by default) or orbax (--config.output_format=orbax), with the
base's config, tokenizer and generation files, and merge_spec.json (what was run, resolved).
"""

import ml_collections
from ml_collections import config_dict

from curvopt import merge

# variant -> (method, method options, ffg options or None)
_VARIANTS = {
  'linear': ('linear', {}, None),
  'task_arithmetic': ('task_arithmetic', {'scale': 1.0}, None),
  'ties': ('ties', {'density': 0.3, 'scale': 1.0}, None),
  'dare': ('dare', {'drop': 0.5, 'combine': 'ties', 'scale': 1.0, 'seed': 0}, None),
  'fisher': ('fisher', {'eps': 1e-8}, None),
  'ota': ('ota', {'power': 0.5, 'eps': 1e-8, 'normalise': 'none'}, None),
  # The reference's settings with a base model: eps = 1e-26, global FFG cutoff per expert.
  'ota_ffg': (
    'ota',
    {'power': 0.5, 'eps': 1e-26, 'normalise': 'none'},
    {'density': 0.3, 'scope': 'global', 'score': 'fisher'},
  ),
  'ffg_graft': ('ffg_graft', {}, {'density': 0.3, 'scope': 'global', 'score': 'fisher'}),
  'test': (
    'ota',
    {'power': 0.5, 'eps': 1e-8, 'normalise': 'none'},
    {'density': 0.3, 'scope': 'global', 'score': 'fisher'},
  ),
  'mergekit': ('linear', {}, None),  # replaced by the YAML's method and options
}
# Options whose default is None, by the type a command line gives them.
_BOOL_OPTIONS = ('normalize',)


def _options(method: str, preset: dict) -> ml_collections.ConfigDict:
  """Every option of `method`, so that each can be set on the command line."""
  options = {}
  for key, default in merge.method_options(method).items():
    if key == 'key':  # dare's PRNG key, from an integer seed
      key, default = 'seed', 0
    value = preset.get(key, default)
    if value is None:
      value = config_dict.placeholder(bool if key in _BOOL_OPTIONS else str)
    options[key] = value
  return ml_collections.ConfigDict(options)


def get_config(arg: str = 'ota_ffg') -> ml_collections.ConfigDict:
  if arg not in _VARIANTS:
    raise ValueError(f'unknown configs/merge.py variant {arg!r}; valid: {sorted(_VARIANTS)}')
  method, options, ffg = _VARIANTS[arg]
  config = ml_collections.ConfigDict()
  config.method = method
  config.spec = config_dict.placeholder(str)  # JSON merge spec (curvopt.merge.merge_from_spec)
  config.base = config_dict.placeholder(str)
  config.base_format = 'auto'  # or safetensors, orbax
  config.experts = config_dict.placeholder(str)  # comma-separated paths
  config.expert_format = 'auto'
  # Comma-separated curvature sources, one per expert; None: each expert's own (orbax nu or
  # export/exp_avg_sq.safetensors). A saved estimate_fisher file works too (format safetensors
  # or orbax).
  config.moments = config_dict.placeholder(str)
  config.moments_format = 'auto'  # or orbax_nu, exp_avg_sq, safetensors, orbax, trainer
  # For Trainer optimizer.pt moments: a file of parameter names in the optimizer's index order
  # (one a line); by default rebuilt from the checkpoint's config.json with transformers.
  config.moments_names = config_dict.placeholder(str)
  config.mergekit = config_dict.placeholder(str)  # a mergekit YAML; --config=X.yml sets it
  config.weights = config_dict.placeholder(str)  # comma-separated, one per expert
  config.densities = config_dict.placeholder(str)  # ties trim / FFG density, one per expert
  config.include = config_dict.placeholder(str)  # comma-separated regexes of merged tensors
  config.exclude = config_dict.placeholder(str)
  config.options = _options(method, options)
  config.ffg = ml_collections.ConfigDict(
    {
      'enabled': ffg is not None,
      'density': (ffg or {}).get('density'),
      'mass': config_dict.placeholder(float),
      'threshold': config_dict.placeholder(float),
      'scope': (ffg or {}).get('scope', 'global'),
      'score': (ffg or {}).get('score', 'fisher'),
      # 'sampled': each global density cutoff from a strided sample of ~65k saliencies, in one
      # streaming pass instead of two (the merge reads the inputs twice, not three times).
      'quantile': 'exact',
    }
  )
  config.rank1 = False
  config.moment_rank = config_dict.placeholder(int)  # rank-r SVD moments (the reference's rank)
  config.extra_tensors = 'error'  # or drop: expert tensors the base lacks
  config.output_format = 'safetensors'  # or orbax
  config.output_dtype = config_dict.placeholder(str)  # bfloat16, float16, float32; None: base's
  config.max_shard_bytes = 5_000_000_000  # as mergekit's --out-shard-size 5B
  config.batch_bytes = 1 << 20 if arg == 'test' else 1 << 28
  return config
