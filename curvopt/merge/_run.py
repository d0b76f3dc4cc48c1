"""A whole merge from a plain-dict spec into a new output directory.

What `experiments/merge.py` runs (its config's `to_dict()`), usable without
ml_collections. The spec, mergekit-like:

  method: one of METHODS
  base: {'path': str, 'format': 'auto' | 'safetensors' | 'orbax'} or None
  experts: [{'path': str, 'format': ...,
             'moments': None (auto: the checkpoint's Adam nu for orbax, the
                        expert's export/exp_avg_sq.safetensors for HF)
                        or {'path': str, 'format': 'auto' | 'orbax_nu' |
                            'exp_avg_sq' | 'safetensors' | 'orbax'},
             'weight': w, 'density': d, 'drop': p, 'scale': s  (optional,
                        each a number or [{'filter': regex, 'value': x}]),
             'include': [regex] | None, 'exclude': [regex] | None}, ...]
  options: method options (power, eps, normalise, fallback_to_base, scale,
           combine, seed for dare, ...)
  ffg: None or {'density' | 'mass' | 'threshold', 'scope', 'score', 'quantile'}; an
       expert's own 'density' overrides ffg density for ota / ffg_graft
  rank1: bool
  include / exclude: [regex] of the tensors merged (others copied)
  output: {'format': 'safetensors' | 'orbax', 'max_shard_bytes': int|None}
  batch_bytes: int

The merge is written into a temporary sibling directory that is renamed to
the output at the end, so a crash never leaves a complete-looking output.
"""

import json
import os
import shutil
from typing import Any, Callable, Mapping

import jax

from curvopt.merge import _io_orbax
from curvopt.merge import _io_safetensors
from curvopt.merge import _sources
from curvopt.merge import _streaming

READER_FORMATS = ('auto', 'safetensors', 'orbax')
MOMENT_FORMATS = ('auto', 'orbax_nu', 'exp_avg_sq', 'safetensors', 'orbax')
OUTPUT_FORMATS = ('safetensors', 'orbax')
# per-expert spec field -> method option it feeds
_PER_EXPERT = {'weight': 'weights', 'density': 'density', 'drop': 'drop', 'scale': 'scales'}


# PyTorch pickles: weights curvopt does not read (unpickling runs code).
_PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt')
_CONVERT_HINT = (
  'convert it to safetensors first, e.g. python -c "from transformers import '
  "AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}-safetensors', "
  'safe_serialization=True)" (then copy its tokenizer files beside it)'
)


def _listing(path: str, limit: int = 12) -> str:
  entries = sorted(os.listdir(path))
  shown = [e + '/' if os.path.isdir(os.path.join(path, e)) else e for e in entries[:limit]]
  more = f' and {len(entries) - limit} more' if len(entries) > limit else ''
  return f'{shown}{more}' if entries else 'nothing (an empty directory)'


def detect_format(path: str) -> str:
  """'safetensors' or 'orbax' for what lies at `path`.

  Raises:
    ValueError: nothing there, a PyTorch pickle (`pytorch_model.bin`: the
      message says how to convert it), or a directory holding neither
      safetensors files nor an orbax checkpoint (the message lists what it
      holds).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(f'no model at {path}: it does not exist')
  if os.path.isfile(path):
    if path.endswith('.safetensors') or path.endswith('.json'):
      return 'safetensors'
    if path.endswith(_PICKLE_SUFFIXES):
      raise ValueError(
        f'{path} is a PyTorch pickle, a format curvopt does not read; '
        + _CONVERT_HINT.format(path=os.path.dirname(path) or '.')
      )
    raise ValueError(f'{path} is neither a safetensors file nor a model directory')
  files = os.listdir(path)
  if any(f.endswith('.safetensors') or f.endswith(_io_safetensors.INDEX_SUFFIX) for f in files):
    return 'safetensors'
  try:
    _io_orbax.pytree_directory(path)
    return 'orbax'
  except ValueError:
    pass
  pickles = sorted(
    (f for f in files if f.endswith(_PICKLE_SUFFIXES) or '.bin.index' in f),
    key=lambda f: (not f.startswith('pytorch_model'), f),
  )
  if pickles:
    raise ValueError(
      f'{path} holds PyTorch pickle weights ({", ".join(pickles[:3])}), a format curvopt does '
      'not read; ' + _CONVERT_HINT.format(path=path)
    )
  raise ValueError(
    f'no model at {path}: it holds neither safetensors files (model.safetensors or shards with '
    'model.safetensors.index.json) nor an orbax checkpoint (_METADATA, step directories or '
    f'checkpoints/); it holds {_listing(path)}'
  )


def open_reader(path: str, fmt: str = 'auto') -> _sources.LeafReader:
  """A weights reader for a safetensors model or an orbax checkpoint."""
  if fmt not in READER_FORMATS:
    raise ValueError(f'unknown format {fmt!r}; valid: {READER_FORMATS}')
  if fmt == 'auto':
    fmt = detect_format(path)
  if fmt == 'safetensors':
    return _io_safetensors.SafetensorsReader(path)
  return _io_orbax.orbax_params_reader(path)


def open_moments(expert: Mapping[str, Any]) -> _sources.LeafReader:
  """The second-moment reader of one expert spec."""
  moments = expert.get('moments') or {}
  path = moments.get('path') or expert['path']
  fmt = moments.get('format') or 'auto'
  if fmt not in MOMENT_FORMATS:
    raise ValueError(f'unknown moments format {fmt!r}; valid: {MOMENT_FORMATS}')
  if fmt == 'auto':
    if moments.get('path'):
      fmt = 'orbax_nu' if detect_format(path) == 'orbax' else 'safetensors'
      if fmt == 'safetensors' and os.path.isdir(path):
        fmt = 'exp_avg_sq'
    else:
      fmt = 'orbax_nu' if detect_format(expert['path']) == 'orbax' else 'exp_avg_sq'
  if fmt == 'orbax_nu':
    return _io_orbax.orbax_moments_reader(path)
  if fmt == 'exp_avg_sq':
    return _io_safetensors.exp_avg_sq_reader(path)
  if fmt == 'safetensors':
    return _io_safetensors.SafetensorsReader(path)
  return _io_orbax.orbax_params_reader(path)


def _streaming_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
  method = spec['method']
  experts = list(spec.get('experts') or [])
  if not experts:
    raise ValueError('the merge spec lists no experts')
  options = dict(spec.get('options') or {})
  ffg = dict(spec['ffg']) if spec.get('ffg') else None
  if ffg is not None:
    ffg = {k: v for k, v in ffg.items() if v is not None}
  if method == 'dare':
    options['key'] = jax.random.key(int(options.pop('seed', 0)))
  else:
    options.pop('seed', None)
  for field, option in _PER_EXPERT.items():
    given = [e.get(field) for e in experts]
    if all(v is None for v in given):
      continue
    if any(v is None for v in given):
      raise ValueError(f'set {field!r} for every expert or for none, got {given}')
    if field == 'density' and ffg is not None:
      for kind in ('density', 'mass', 'threshold'):
        ffg.pop(kind, None)
      ffg['density'] = given
    else:
      options[option] = given
  return dict(
    method=method,
    options=options,
    ffg=ffg,
    rank1=bool(spec.get('rank1', False)),
    include=spec.get('include') or None,
    exclude=spec.get('exclude') or None,
    expert_include=[e.get('include') or None for e in experts],
    expert_exclude=[e.get('exclude') or None for e in experts],
    batch_bytes=int(spec.get('batch_bytes') or 1 << 28),
  )


def _needs_moments(kwargs: Mapping[str, Any]) -> bool:
  ffg = kwargs['ffg']
  return kwargs['method'] in ('ota', 'fisher') or (
    ffg is not None and ffg.get('score', 'fisher') == 'fisher'
  )


def merge_from_spec(
  spec: Mapping[str, Any],
  output: str,
  *,
  overwrite: bool = False,
  progress: Callable[[str], None] | None = None,
  on_plan: Callable[[int], None] | None = None,
) -> _streaming.StreamResult:
  """Runs the merge that `spec` describes (module docstring) into `output`.

  Args:
    spec: the merge spec (plain dicts and lists).
    output: the output directory; it must not exist unless `overwrite`.
    overwrite: replace an existing output (only once the merge succeeded).
    progress: called with each tensor's name as it is written.
    on_plan: called with the number of tensors before any is written.

  Returns:
    The `StreamResult`.

  Raises:
    ValueError: an existing output without `overwrite`, or any spec error.
  """
  output = os.path.abspath(os.fspath(output))
  if os.path.exists(output) and not overwrite:
    raise ValueError(
      f'the output {output} exists; pass overwrite (the --overwrite flag) to replace it'
    )
  out_spec = dict(spec.get('output') or {})
  out_format = out_spec.get('format', 'safetensors')
  if out_format not in OUTPUT_FORMATS:
    raise ValueError(f'unknown output format {out_format!r}; valid: {OUTPUT_FORMATS}')
  kwargs = _streaming_kwargs(spec)
  base = (
    open_reader(spec['base']['path'], spec['base'].get('format', 'auto'))
    if spec.get('base') and spec['base'].get('path')
    else None
  )
  experts = [open_reader(e['path'], e.get('format', 'auto')) for e in spec['experts']]
  moments = [open_moments(e) for e in spec['experts']] if _needs_moments(kwargs) else None
  reference = base if base is not None else experts[0]
  specs = {n: reference.spec(n) for n in reference.names}
  if on_plan is not None:
    on_plan(len(specs))
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  temporary = os.path.join(parent, f'.{os.path.basename(output)}.partial-{os.getpid()}')
  if os.path.exists(temporary):
    shutil.rmtree(temporary)
  os.makedirs(temporary)
  try:
    if out_format == 'safetensors':
      writer = _io_safetensors.SafetensorsWriter(
        temporary, specs, max_shard_bytes=out_spec.get('max_shard_bytes')
      )
    else:
      writer = _io_orbax.OrbaxWriter(os.path.join(temporary, 'params'), specs)
    result = _streaming.merge_streaming(
      experts=experts, writer=writer, base=base, moments=moments, progress=progress, **kwargs
    )
    writer.close()
    with open(os.path.join(temporary, 'merge_spec.json'), 'w') as f:
      json.dump(spec, f, indent=2, default=str)
      f.write('\n')
    if os.path.exists(output):
      shutil.rmtree(output)
    os.rename(temporary, output)
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise
  return result
