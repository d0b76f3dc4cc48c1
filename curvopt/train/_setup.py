"""What the LM, SFT and RL trainers set up alike: model and mesh, checkpoints, resume or init."""

import json
import os
from typing import Any, Callable, NamedTuple, Sequence

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
  tokenizer: data_lib.ByteTokenizer


def setup_run(config: ml_collections.ConfigDict, workdir: str) -> RunSetup:
  """Checks total_steps; makes the workdir, the mesh, the decoder of config.model, the tokenizer."""
  if config.total_steps < 1:
    raise ValueError(f'total_steps must be >= 1, got {config.total_steps}')
  os.makedirs(workdir, exist_ok=True)
  mesh = _sharding.make_mesh(**config.mesh)
  model_cfg = model_config_from(config.model)
  tokenizer = data_lib.ByteTokenizer()
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(
      f'model vocab_size {model_cfg.vocab_size} < tokenizer vocab_size {tokenizer.vocab_size}'
    )
  return RunSetup(mesh, model_cfg, models.Decoder(model_cfg), tokenizer)


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
