"""Adam second moments out of a Hugging Face Trainer checkpoint's `optimizer.pt`.

The Trainer saves `torch.optim.AdamW.state_dict()`: `state` maps a
parameter's index to {'step', 'exp_avg', 'exp_avg_sq'}, and `param_groups`
lists the indices of each group. Indices count through the groups in order
(torch numbers them so), and the Trainer builds two groups from
`model.named_parameters()`: the parameters with weight decay, then the rest
(biases and norm weights). So index i is the i-th name of that order, which
the file itself does not hold: pass the names, or let them be rebuilt from
the checkpoint's `config.json` with transformers (a model on the meta
device: no weights are allocated). Optimizers built from named parameters
(torch >= 2.6) store `param_names` in each group; those are used first.

torch is an optional dependency (`pip install 'curvopt[torch]'`), imported
only here and only when such a file is read. The file is memory-mapped: a
tensor's bytes are read when the merge asks for that tensor.
"""

import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from curvopt.merge import _sources

OPTIMIZER_FILE = 'optimizer.pt'


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
      "reading a Trainer checkpoint's optimizer.pt needs torch: pip install 'curvopt[torch]' "
      '(or pip install torch), or export the second moments to safetensors first'
    ) from e
  return torch


def _optimizer_file(path: str) -> str:
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, OPTIMIZER_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'no optimizer state at {path}: a Trainer checkpoint holds {OPTIMIZER_FILE}')
  return path


def trainer_parameter_names(model_dir: str) -> list[str]:
  """Parameter names in a Trainer optimizer's index order, rebuilt from
  `model_dir`'s config.json: the weight-decay group, then the others, as
  `transformers.Trainer` groups `named_parameters()` (needs transformers)."""
  torch = _torch()
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
      'mapping optimizer.pt indices to parameter names needs the model definition: pip install '
      'transformers, or pass the names in index order (moments names=...)'
    ) from e
  if not os.path.isfile(os.path.join(model_dir, 'config.json')):
    raise ValueError(
      f'{model_dir} has no config.json to rebuild the parameter order from; pass the names in '
      'index order (moments names=...)'
    )
  config = transformers.AutoConfig.from_pretrained(model_dir)
  with torch.device('meta'):
    model = transformers.AutoModelForCausalLM.from_config(config)
  named = [n for n, p in model.named_parameters() if p.requires_grad]
  decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
  return [n for n in named if n in decay] + [n for n in named if n not in decay]


def _read_names(names: Any) -> list[str]:
  if isinstance(names, (str, os.PathLike)):
    with open(names) as f:
      text = f.read()
    try:
      names = json.loads(text)
    except json.JSONDecodeError:
      names = [line.strip() for line in text.splitlines() if line.strip()]
  flat = []
  for entry in names:
    flat.extend([entry] if isinstance(entry, str) else list(entry))
  return flat


class TrainerMomentsReader(_sources.LeafReader):
  """`exp_avg_sq` of a Trainer's optimizer.pt, keyed by parameter name.

  Attributes:
    steps: each parameter's Adam step count (for `bias_correction`).
  """

  def __init__(self, path: str, names: Any = None):
    """Maps the optimizer's parameter indices to names.

    Args:
      path: an `optimizer.pt`, or a checkpoint directory holding one.
      names: the parameter names in index order: a list, one list per
        parameter group, or a file (JSON list, or one name a line). None: the
        optimizer's own `param_names`, else `trainer_parameter_names` of
        the checkpoint directory.

    Raises:
      ValueError: no torch, no file, no exp_avg_sq, or names that do not fit
        the optimizer's groups (counts per group, shapes checked later
        against the weights).
    """
    torch = _torch()
    self.path = _optimizer_file(path)
    self.description = f'optimizer state {self.path}'
    try:
      state = torch.load(self.path, map_location='cpu', mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
      raise ValueError(f'{self.path} is not a readable torch optimizer state: {e}') from e
    if not isinstance(state, dict) or 'state' not in state or 'param_groups' not in state:
      raise ValueError(f'{self.path} is not an optimizer state_dict (no state / param_groups)')
    groups = state['param_groups']
    indices = [list(g['params']) for g in groups]
    order = [i for group in indices for i in group]
    stored = [g.get('param_names') for g in groups]
    if names is None and all(stored):
      names = stored
    if names is None:
      names = trainer_parameter_names(os.path.dirname(self.path))
    flat = _read_names(names)
    if len(flat) != len(order):
      sizes = [len(g) for g in indices]
      raise ValueError(
        f'{len(flat)} parameter names for the {len(order)} parameters of {self.path} (groups of '
        f'{sizes}); the names must follow the optimizer index order'
      )
    self._tensors = {}
    self.steps = {}
    for name, index in zip(flat, order):
      entry = state['state'].get(index)
      if not entry or 'exp_avg_sq' not in entry:
        continue  # a parameter that never received a gradient
      self._tensors[name] = entry['exp_avg_sq']
      if 'step' in entry:
        self.steps[name] = int(entry['step'])
    if not self._tensors:
      raise ValueError(f'{self.path} holds no exp_avg_sq (not an Adam optimizer state?)')
    self._specs = {
      name: jax.ShapeDtypeStruct(tuple(t.shape), np.float32) for name, t in self._tensors.items()
    }

  def _read(self, names):
    return {name: self._tensors[name].float().numpy() for name in names}


def trainer_moments_reader(path: str, *, names: Sequence[Any] | str | None = None):
  """The Adam second moments of a Hugging Face Trainer checkpoint.

  Args:
    path: a Trainer checkpoint directory (`checkpoint-500/`, holding
      optimizer.pt and config.json) or an optimizer.pt file.
    names: the parameter names in the optimizer's index order (see
      `TrainerMomentsReader`); None: found as the module docstring says.

  Returns:
    A `TrainerMomentsReader` (raw `exp_avg_sq`, fp32, named like the weights).
  """
  return TrainerMomentsReader(path, names)
