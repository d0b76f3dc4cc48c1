"""A whole merge from a plain-dict spec into a new output directory.

What `experiments/merge.py` runs (its config's `to_dict()`, or a mergekit
YAML through `spec_from_mergekit`), usable without ml_collections. The
spec, mergekit-like:

  method: one of METHODS
  base: {'path': str, 'format': 'auto' | 'safetensors' | 'orbax'} or None
  experts: [{'path': str, 'format': ...,
             'moments': None (auto: the checkpoint's Adam nu for orbax, the
                        expert's export/exp_avg_sq.safetensors for HF, else
                        a Trainer checkpoint's optimizer.pt)
                        or {'path': str, 'format': one of MOMENT_FORMATS,
                            'names': parameter names in index order, for
                                     'trainer' (see trainer_moments_reader)},
             'weight': w, 'density': d, 'drop': p, 'scale': s  (optional,
                        each a number or [{'filter': regex, 'value': x}]),
             'include': [regex] | None, 'exclude': [regex] | None}, ...]
  options: the method's options (`method_options(method)`; dare's key is
           'seed'); unknown names fail, naming the valid ones
  ffg: None or {'density' | 'mass' | 'threshold', 'scope', 'score', 'quantile'}; an
       expert's own 'density' overrides ffg density for ota / ffg_graft
  rank1: bool; moment_rank: int | None (rank-r SVD moments)
  include / exclude: [regex] of the tensors merged (others copied)
  extra_tensors: 'error' | 'drop' (expert tensors the base lacks)
  output: {'format': 'safetensors' | 'orbax',
           'max_shard_bytes': int | None (default 5 GB, as mergekit),
           'dtype': None (the base's) | 'bfloat16' | 'float16' | 'float32'}
  model_files: None (the base's, else the first expert's) or a model
               directory whose config, tokenizer and generation files are
               copied beside the weights; False copies none
  batch_bytes: int

The merge is written into a temporary sibling directory that is renamed to
the output at the end (`_output_dir`), so a crash never leaves a
complete-looking output. Beside the weights it writes merge_spec.json: the
spec as run, every option and per-expert value resolved (densities, FFG
cutoffs), which `merge_from_spec` accepts again to reproduce the merge.
"""

import importlib.metadata
import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

from curvopt.merge import _io_orbax
from curvopt.merge import _io_safetensors
from curvopt.merge import _io_torch
from curvopt.merge import _output_dir
from curvopt.merge import _sources
from curvopt.merge import _streaming

READER_FORMATS = ('auto', 'safetensors', 'orbax')
MOMENT_FORMATS = ('auto', 'orbax_nu', 'exp_avg_sq', 'safetensors', 'orbax', 'trainer')
OUTPUT_FORMATS = ('safetensors', 'orbax')
OUTPUT_DTYPES = ('bfloat16', 'float16', 'float32')
DEFAULT_SHARD_BYTES = 5_000_000_000  # mergekit's --out-shard-size default, 5B
# per-expert spec field -> method option it feeds
_PER_EXPERT = {'weight': 'weights', 'density': 'density', 'drop': 'drop', 'scale': 'scales'}
_SPEC_KEYS = (
  'method',
  'base',
  'experts',
  'options',
  'ffg',
  'rank1',
  'moment_rank',
  'include',
  'exclude',
  'extra_tensors',
  'output',
  'model_files',
  'batch_bytes',
  # written into merge_spec.json, ignored when read back
  'result',
  'curvopt_version',
)
_EXPERT_KEYS = ('path', 'format', 'moments', 'include', 'exclude', 'ffg_cutoff', *_PER_EXPERT)


def _check_keys(given: Mapping[str, Any], valid, what: str) -> None:
  unknown = sorted(set(given) - set(valid))
  if unknown:
    raise ValueError(f'unknown {what} field(s) {unknown}; valid: {sorted(valid)}')


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


def _has_exp_avg_sq(path: str) -> bool:
  return any(
    os.path.exists(os.path.join(folder, 'exp_avg_sq' + suffix))
    for folder in (os.path.join(path, 'export'), path)
    for suffix in ('.safetensors', _io_safetensors.INDEX_SUFFIX)
  )


def moments_format(expert: Mapping[str, Any]) -> tuple[str, str]:
  """(path, format) of an expert spec's second moments, 'auto' resolved."""
  moments = expert.get('moments') or {}
  path = moments.get('path') or expert['path']
  fmt = moments.get('format') or 'auto'
  if fmt not in MOMENT_FORMATS:
    raise ValueError(f'unknown moments format {fmt!r}; valid: {MOMENT_FORMATS}')
  if fmt != 'auto':
    return path, fmt
  if os.path.isfile(path):
    if path.endswith(('.pt', '.pth', '.bin')):
      return path, 'trainer'
    return path, 'safetensors'
  if os.path.isdir(path) and not _has_exp_avg_sq(path):
    if os.path.isfile(os.path.join(path, _io_torch.OPTIMIZER_FILE)):
      return path, 'trainer'
    if detect_format(path) == 'orbax':
      return path, 'orbax_nu'
  if not moments.get('path') and detect_format(path) == 'orbax':
    return path, 'orbax_nu'
  return path, 'exp_avg_sq'


def open_moments(expert: Mapping[str, Any]) -> _sources.LeafReader:
  """The second-moment reader of one expert spec."""
  path, fmt = moments_format(expert)
  if fmt == 'orbax_nu':
    return _io_orbax.orbax_moments_reader(path)
  if fmt == 'exp_avg_sq':
    return _io_safetensors.exp_avg_sq_reader(path)
  if fmt == 'trainer':
    return _io_torch.trainer_moments_reader(path, names=(expert.get('moments') or {}).get('names'))
  if fmt == 'safetensors':
    return _io_safetensors.SafetensorsReader(path)
  return _io_orbax.orbax_params_reader(path)


def _method_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """The spec's options checked against the method's; dare's seed -> key."""
  renamed = {'seed': 'key'} if method == 'dare' else None
  given = dict(options)
  if method == 'dare':
    given.setdefault('seed', 0)
  _streaming.check_options(method, given, renamed=renamed)
  if method == 'dare':
    given['key'] = jax.random.key(int(given.pop('seed')))
  return given


def _streaming_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
  _check_keys(spec, _SPEC_KEYS, 'merge spec')
  method = spec.get('method')
  _streaming.method_options(method)  # an unknown method, named
  experts = list(spec.get('experts') or [])
  if not experts:
    raise ValueError('the merge spec lists no experts')
  for expert in experts:
    _check_keys(expert, _EXPERT_KEYS, 'expert')
  options = dict(spec.get('options') or {})
  ffg = dict(spec['ffg']) if spec.get('ffg') else None
  if ffg is not None:
    ffg = {k: v for k, v in ffg.items() if v is not None}
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
    options=_method_options(method, options),
    ffg=ffg,
    rank1=bool(spec.get('rank1', False)),
    moment_rank=spec.get('moment_rank') or None,
    include=spec.get('include') or None,
    exclude=spec.get('exclude') or None,
    expert_include=[e.get('include') or None for e in experts],
    expert_exclude=[e.get('exclude') or None for e in experts],
    extra_tensors=spec.get('extra_tensors') or 'error',
    batch_bytes=int(spec.get('batch_bytes') or 1 << 28),
  )


def _needs_moments(kwargs: Mapping[str, Any]) -> bool:
  ffg = kwargs['ffg']
  return kwargs['method'] in ('ota', 'fisher') or (
    ffg is not None and ffg.get('score', 'fisher') == 'fisher'
  )


def _output_options(spec: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(spec.get('output') or {})
  _check_keys(out, ('format', 'max_shard_bytes', 'dtype'), 'output')
  fmt = out.get('format') or 'safetensors'
  if fmt not in OUTPUT_FORMATS:
    raise ValueError(f'unknown output format {fmt!r}; valid: {OUTPUT_FORMATS}')
  dtype = out.get('dtype') or None
  if dtype is not None and dtype not in OUTPUT_DTYPES:
    raise ValueError(f'unknown output dtype {dtype!r}; valid: {OUTPUT_DTYPES}')
  shard = out.get('max_shard_bytes', DEFAULT_SHARD_BYTES)
  if shard is not None and (int(shard) != shard or shard <= 0):
    raise ValueError(f'output max_shard_bytes must be a positive integer, got {shard!r}')
  return {'format': fmt, 'dtype': dtype, 'max_shard_bytes': None if shard is None else int(shard)}


def _model_dir(path: str | None) -> str | None:
  """The directory of an HF model: itself, or a weights file's folder."""
  if not path:
    return None
  return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return str(value)


def _record(spec, kwargs, out, result, base_fmt, expert_fmts, moment_fmts, copied):
  """merge_spec.json: the spec as run, every value resolved."""
  method = kwargs['method']
  options = {k: v for k, v in _streaming.method_options(method).items()}
  options.update({k: v for k, v in kwargs['options'].items() if k != 'key'})
  if method == 'dare':
    options.pop('key', None)
    options['seed'] = int((spec.get('options') or {}).get('seed', 0))
  ffg = dict(kwargs['ffg']) if kwargs['ffg'] is not None else None
  num = len(spec['experts'])
  per_expert = {option: options.pop(option) for option in _PER_EXPERT.values() if option in options}
  experts = []
  for t, expert in enumerate(spec['experts']):
    entry = {'path': os.path.abspath(expert['path']), 'format': expert_fmts[t]}
    if moment_fmts is not None:
      path, fmt = moment_fmts[t]
      entry['moments'] = {'path': os.path.abspath(path), 'format': fmt}
      names = (expert.get('moments') or {}).get('names')
      if names is not None:
        entry['moments']['names'] = names
    for field, option in _PER_EXPERT.items():
      value = per_expert.get(option)
      if isinstance(value, (list, tuple)) and len(value) == num and not _streaming._is_rules(value):
        entry[field] = value[t]
      elif value is not None:
        entry[field] = value
    if ffg is not None and ffg.get('density') is not None:
      density = ffg['density']
      entry['density'] = density[t] if isinstance(density, (list, tuple)) else density
    if result.thresholds is not None:
      entry['ffg_cutoff'] = result.thresholds[t]
    for field in ('include', 'exclude'):
      if expert.get(field):
        entry[field] = expert[field]
    experts.append(entry)
  if ffg is not None:
    ffg.pop('density', None)  # recorded per expert
    ffg.setdefault('scope', 'global')
    ffg.setdefault('score', 'fisher')
    ffg.setdefault('quantile', 'exact')
  base = spec.get('base') or {}
  try:
    version = importlib.metadata.version('curvopt')
  except importlib.metadata.PackageNotFoundError:
    version = None
  return _jsonable(
    {
      'method': method,
      'base': {'path': os.path.abspath(base['path']), 'format': base_fmt} if base_fmt else None,
      'experts': experts,
      'options': options,
      'ffg': ffg,
      'rank1': kwargs['rank1'],
      'moment_rank': kwargs['moment_rank'],
      'include': kwargs['include'],
      'exclude': kwargs['exclude'],
      'extra_tensors': kwargs['extra_tensors'],
      'output': out,
      'model_files': copied[0],
      'batch_bytes': kwargs['batch_bytes'],
      'result': {
        'tensors': len(result.names),
        'merged': len(result.merged),
        'ffg_cutoffs': result.thresholds,
        'dropped': {f'expert {t}': list(d) for t, d in enumerate(result.dropped) if d},
        'model_files_copied': copied[1],
      },
      'curvopt_version': version,
    }
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
    ValueError: an existing output without `overwrite`, an output location
      that cannot be written, unreadable inputs, or any spec error (one
      line each).
    KeyboardInterrupt: Ctrl-C, or SIGTERM (`Interrupted`), after removing
      the partial output.
  """
  output = os.path.abspath(os.fspath(output))
  _output_dir.check_output(output, overwrite=overwrite)
  out = _output_options(spec)
  kwargs = _streaming_kwargs(spec)
  base_spec = spec.get('base') or {}
  base_fmt = None
  base = None
  if base_spec.get('path'):
    base_fmt = base_spec.get('format', 'auto')
    base_fmt = detect_format(base_spec['path']) if base_fmt == 'auto' else base_fmt
    base = open_reader(base_spec['path'], base_fmt)
  expert_fmts = [
    detect_format(e['path']) if e.get('format', 'auto') == 'auto' else e['format']
    for e in spec['experts']
  ]
  experts = [open_reader(e['path'], f) for e, f in zip(spec['experts'], expert_fmts)]
  needs_moments = _needs_moments(kwargs)
  moment_fmts = [moments_format(e) for e in spec['experts']] if needs_moments else None
  moments = [open_moments(e) for e in spec['experts']] if needs_moments else None
  reference = base if base is not None else experts[0]
  dtype = out['dtype']
  specs = {}
  for name in reference.names:
    ref = reference.spec(name)
    floating = jax.numpy.issubdtype(ref.dtype, jax.numpy.floating)
    specs[name] = jax.ShapeDtypeStruct(
      ref.shape, jax.numpy.dtype(dtype) if dtype and floating else ref.dtype
    )
  if on_plan is not None:
    on_plan(len(specs))
  sources = spec.get('model_files')
  if sources is None:
    sources = [_model_dir(base_spec.get('path'))] + [_model_dir(e['path']) for e in spec['experts']]
  elif sources is False:
    sources = []
  else:
    sources = [_model_dir(sources)]
  with _output_dir.partial_output(output, overwrite=overwrite) as temporary:
    if out['format'] == 'safetensors':
      writer = _io_safetensors.SafetensorsWriter(
        temporary, specs, max_shard_bytes=out['max_shard_bytes']
      )
    else:
      writer = _io_orbax.OrbaxWriter(os.path.join(temporary, 'params'), specs)
    result = _streaming.merge_streaming(
      experts=experts,
      writer=writer,
      base=base,
      moments=moments,
      progress=progress,
      dtype=dtype,
      **kwargs,
    )
    writer.close()
    copied = _output_dir.copy_model_files(sources, temporary)
    record = _record(spec, kwargs, out, result, base_fmt, expert_fmts, moment_fmts, copied)
    with open(os.path.join(temporary, 'merge_spec.json'), 'w') as f:
      json.dump(record, f, indent=2)
      f.write('\n')
  return result
