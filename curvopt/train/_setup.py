"""What the LM, SFT and RL trainers set up alike: model and mesh, checkpoints, resume or init."""

import dataclasses
import json
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

from absl import logging
import jax
import ml_collections

from curvopt import data as data_lib
from curvopt import models
from curvopt.train import _checkpoint
from curvopt.train import _optimizers
from curvopt.train import _sharding


def resolve_dtype(name: str) -> str:
  """'auto' is bf16 compute on accelerators and fp32 on the CPU."""
  if name == 'auto':
    return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return name


def model_config_from(cfg: ml_collections.ConfigDict) -> 'models.DecoderConfig':
  overrides = {k: v for k, v in cfg.items() if k != 'name' and v is not None}
  overrides['dtype'] = resolve_dtype(overrides.get('dtype', 'auto'))
  return models.model_config(cfg.name, **overrides)


HF_PREFIX = 'hf:'
# config.model fields that may differ from a Hugging Face checkpoint's: they change how its
# parameters are used, not what they are (max_len bounds sequences and caches).
_HF_NUMERICS = ('dtype', 'param_dtype', 'remat', 'attention_impl', 'max_len')


def hf_dir(config: ml_collections.ConfigDict) -> Optional[str]:
  """The Hugging Face model directory of `init_from='hf:/path'`, else None."""
  init_from = config.get('init_from') or ''
  if not init_from.startswith(HF_PREFIX):
    return None
  path = init_from[len(HF_PREFIX) :]
  if not path:
    raise ValueError(f"config.init_from={init_from!r} names no directory; use 'hf:/path/to/model'")
  return path


def hf_model_config(cfg: ml_collections.ConfigDict, path: str) -> 'models.DecoderConfig':
  """The DecoderConfig of the checkpoint at `path`, with config.model's numerics.

  The preset name is not used; a size field set in config.model must equal the checkpoint's.
  """
  overrides = {k: cfg[k] for k in _HF_NUMERICS if cfg.get(k) is not None}
  overrides['dtype'] = resolve_dtype(overrides.get('dtype', 'auto'))
  model_cfg = models.config_from_hf(models.read_hf_config(path), **overrides)
  fields = {f.name for f in dataclasses.fields(model_cfg)}
  differ = {
    k: (v, getattr(model_cfg, k))
    for k, v in cfg.items()
    if k != 'name'
    and k not in _HF_NUMERICS
    and v is not None
    and (k not in fields or v != getattr(model_cfg, k))
  }
  if differ:
    details = ', '.join(f'{k}: config {c!r}, checkpoint {h!r}' for k, (c, h) in differ.items())
    raise ValueError(
      f'config.model differs from the Hugging Face checkpoint at {path} ({details}); leave '
      f'those fields unset (only {list(_HF_NUMERICS)} may be set)'
    )
  return model_cfg


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _without_unset(value):
  # A field added to the configs after a run was saved (default None) does not change that run.
  if isinstance(value, dict):
    return {k: _without_unset(v) for k, v in value.items() if v is not None}
  return value


def _run_defining(key: str, value):
  value = _without_unset(value)
  if key == 'optimizer' and isinstance(value, dict):
    ignored = _optimizers.fields_ignored_by(value.get('name'))
    value = {k: v for k, v in value.items() if k not in ignored}
  return value


def check_resume_compatible(saved: dict, config: dict, keys: Sequence[str]) -> None:
  """Raises unless the saved run's config equals this one on every run-defining key.

  Fields added to the configs later (unset) and optimizer fields that the run's optimizer does
  not read are ignored; the error names the fields that differ.
  """
  for key in keys:
    old, new = _run_defining(key, saved.get(key)), _run_defining(key, config.get(key))
    if old != new:
      if isinstance(old, dict) and isinstance(new, dict):
        detail = describe_differences(
          {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))}
        )
      else:
        detail = f'saved {old!r}, config {new!r}'
      raise ValueError(
        f"config.{key} differs from the checkpoint's ({detail}); use a new "
        'workdir for a different run'
      )


def describe_differences(pairs: dict) -> str:
  """'k: saved A, config B' for each key whose (saved, config) pair differs."""
  return ', '.join(f'{k}: saved {s!r}, config {c!r}' for k, (s, c) in pairs.items() if s != c)


class RunSetup(NamedTuple):
  mesh: jax.sharding.Mesh
  model_cfg: 'models.DecoderConfig'
  model: 'models.Decoder'
  tokenizer: data_lib.Tokenizer
  hf_dir: Optional[str] = None  # the Hugging Face checkpoint the params start from


def setup_run(config: ml_collections.ConfigDict, workdir: str) -> RunSetup:
  """Checks total_steps; makes the workdir, the mesh, the decoder and the tokenizer.

  The decoder is config.model's, or with `init_from='hf:/path'` the Hugging Face checkpoint's,
  whose tokenizer.json then replaces the byte tokenizer.
  """
  if config.total_steps < 1:
    raise ValueError(f'total_steps must be >= 1, got {config.total_steps}')
  os.makedirs(workdir, exist_ok=True)
  mesh = _sharding.make_mesh(**config.mesh)
  path = hf_dir(config)
  if path is None:
    if config.model.get('name') is None:
      # A config that leaves the model to a checkpoint (configs/rl.py:qwen2_5_0_5b_gsm8k).
      raise ValueError(
        "config.model.name is unset and config.init_from is not 'hf:/path': this config takes "
        'its model from a Hugging Face checkpoint; set --config.init_from=hf:/path/to/model'
      )
    model_cfg = model_config_from(config.model)
    tokenizer = data_lib.ByteTokenizer()
  else:
    model_cfg = hf_model_config(config.model, path)
    tokenizer = data_lib.HFTokenizer(path)
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(
      f'model vocab_size {model_cfg.vocab_size} < tokenizer vocab_size {tokenizer.vocab_size}'
    )
  return RunSetup(mesh, model_cfg, models.Decoder(model_cfg), tokenizer, path)


def hf_params(run: RunSetup, shardings: Any) -> Any:
  """The params of the run's Hugging Face checkpoint, each read straight into its shards."""
  _, params = models.load_hf(
    run.hf_dir, dtype=run.model_cfg.param_dtype, shardings=shardings, max_len=run.model_cfg.max_len
  )
  logging.info('initialized params from the Hugging Face checkpoint %s', run.hf_dir)
  return params


def make_checkpointer(config: ml_collections.ConfigDict, workdir: str) -> _checkpoint.Checkpointer:
  return _checkpoint.Checkpointer(
    workdir,
    keep=config.checkpoint.keep,
    save_every=config.checkpoint.every,
    async_save=config.checkpoint.async_save,
  )


def restore_or_init(
  config: ml_collections.ConfigDict,
  ckpt: _checkpoint.Checkpointer,
  *,
  run_defining: Sequence[str],
  abstract_state: Any,
  data: Any,
  init: Callable[[], Any],
) -> Any:
  """The state of the workdir's newest checkpoint, or init()'s when there is none.

  A resume must be the same run (config equal on `run_defining`, see check_resume_compatible)
  and moves `data` (get_state / set_state) to the checkpoint's position; `abstract_state` says
  where the restored arrays go. Closes ckpt when this fails.
  """
  try:
    latest = ckpt.latest_step()
    if latest is None:
      return init()
    check_resume_compatible(ckpt.saved_config(latest), config_to_json(config), run_defining)
    state, position = ckpt.restore(latest, abstract_state)
    data.set_state(position)
    logging.info('resumed from step %d in %s', latest, ckpt.directory)
    return state
  except BaseException:
    ckpt.close()
    raise
