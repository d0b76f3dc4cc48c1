"""Loading `get_config(arg)` config files by path, as ml_collections' --config flag does."""

import importlib.util
import os
from typing import Optional

import ml_collections


def load_config(path: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
  """get_config(arg) (or get_config()) of the config file at `path`."""
  if not os.path.isfile(path):
    raise ValueError(f'no config file at {path!r}')
  name = 'curvopt_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)
