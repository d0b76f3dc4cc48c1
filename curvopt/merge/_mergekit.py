"""mergekit YAML configs as merge specs (`merge_from_spec`), so existing configs carry over.

Accepted: `merge_method`, `base_model`, `models` (each `model` with its
`parameters`), top-level `parameters` (method options, and defaults for the
per-model ones, as in mergekit), `dtype` / `out_dtype` (the output dtype;
computations are fp32 here) and `tokenizer_source` (`base`, `union` when all
the models' tokenizers are the same files, or a model path). Parameter
values are numbers or mergekit's `[{filter: substring, value: x}, ...]`
lists (`filter` matches a substring of the tensor name, as in mergekit).

Methods, with mergekit 0.1's defaults:
- linear: weight, normalize (true).
- task_arithmetic: weight, lambda, normalize (false).
- ties: weight, density (1), lambda, normalize (true), rescale (false: no
  L1 rescale of the trimmed task vectors).
- dare_ties / dare_linear: weight, density (kept fraction; drop = 1 -
  density), lambda, normalize (false), rescale (true: L1), seed (ours, 0).
  The random masks are this library's (seeded), not torch's.
- ota (the OTA reference's): per model preconditioner_path, scaling_factor,
  rank1_approx, rank, precond_threshold; epsilon, power, normalise (none |
  global), fallback_to_base (false), precond_threshold (FFG cutoff on
  v tau^2, needs a base), masked_task_vector_merge_method (precond | linear |
  ties).
- ota_ffg (ours): ota's parameters plus the FFG density per model or
  global (density, or mass), score (or metric), scope, quantile;
  fallback_to_base defaults to true.
- ffg (the reference's graft of one model): density, metric.
Model references are local directories (nothing is downloaded).
"""

import os
import re
from typing import Any, Mapping

METHODS = ('linear', 'task_arithmetic', 'ties', 'dare_ties', 'dare_linear', 'ota', 'ota_ffg', 'ffg')
_TOP_KEYS = (
  'merge_method',
  'base_model',
  'models',
  'parameters',
  'dtype',
  'out_dtype',
  'tokenizer_source',
  'slices',
  'modules',
  'tokenizer',
  'chat_template',
)
# mergekit option -> (spec option, mergekit default) per method family.
_GTA = {'lambda': ('scale', 1.0), 'normalize': ('normalize', None), 'rescale': ('rescale', None)}
_METHOD_OPTIONS = {
  'linear': {'normalize': ('normalize', True)},
  'task_arithmetic': {'lambda': ('scale', 1.0), 'normalize': ('normalize', False)},
  'ties': {**_GTA, 'normalize': ('normalize', True), 'rescale': ('rescale', False)},
  'dare_ties': {**_GTA, 'normalize': ('normalize', False), 'rescale': ('rescale', True)},
  'dare_linear': {**_GTA, 'normalize': ('normalize', False), 'rescale': ('rescale', True)},
}
_IGNORED = ('int8_mask',)  # no effect on the numbers
_OTA_GLOBAL = (
  'epsilon',
  'power',
  'normalise',
  'fallback_to_base',
  'precond_threshold',
  'masked_task_vector_merge_method',
  'rescale',
  'approximate_norm',
  'rescale_relative_threshold',
  'ties_density',
)
_FFG = ('density', 'mass', 'score', 'metric', 'scope', 'quantile')
_OTA_PER_MODEL = (
  'preconditioner_path',
  'scaling_factor',
  'rank1_approx',
  'rank',
  'precond_threshold',
  'weight',
)
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.json', 'merges.txt')


def _setting(value: Any, what: str) -> Any:
  """A mergekit parameter value as a spec value (scalar or rule list)."""
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
    rules = []
    for rule in value:
      if set(rule) - {'filter', 'value'} or 'value' not in rule:
        raise ValueError(f'{what}: a conditional parameter needs value (and filter), got {rule!r}')
      pattern = rule.get('filter')
      inner = _setting(rule['value'], what)
      if isinstance(inner, list):
        raise ValueError(f'{what}: nested rule lists are not supported, got {rule!r}')
      rules.append(
        {'value': inner}
        if pattern in (None, '*')
        else {'filter': re.escape(str(pattern)), 'value': inner}
      )
    return rules
  if isinstance(value, list):
    raise ValueError(
      f'{what}: a list of numbers is a mergekit gradient (interpolated over layers), which is '
      f'not supported; give a number or [{{filter, value}}] rules, got {value!r}'
    )
  raise ValueError(f'{what}: unsupported parameter value {value!r}')


def _scalar(value: Any, what: str) -> Any:
  value = _setting(value, what)
  if isinstance(value, list):
    raise ValueError(f'{what} must be one value for the whole model, got {value!r}')
  return value


def _path(reference: Any, what: str) -> str:
  if isinstance(reference, Mapping):
    reference = reference.get('model') or reference.get('path')
  path = str(reference)
  if '+' in os.path.basename(path) and not os.path.exists(path):
    raise ValueError(f'{what} {path!r}: LoRA references (model+lora) are not supported')
  if not os.path.exists(path):
    raise ValueError(
      f'{what} {path!r} does not exist; mergekit YAML models must be local directories here '
      '(nothing is downloaded from a hub)'
    )
  return path


def _same_tokenizers(paths) -> bool:
  seen = {}
  for path in paths:
    for name in _TOKENIZER_FILES:
      file = os.path.join(path, name)
      if os.path.isfile(file):
        with open(file, 'rb') as f:
          seen.setdefault(name, set()).add(f.read())
  return all(len(contents) == 1 for contents in seen.values())


def spec_from_mergekit(config: Mapping[str, Any] | str) -> dict[str, Any]:
  """The merge spec of a mergekit YAML config (module docstring).

  Args:
    config: the parsed YAML, or the path of a .yml / .yaml file.

  Returns:
    A spec for `merge_from_spec`.

  Raises:
    ValueError: a method, field or parameter this library does not support,
      or a model path that does not exist (each named).
  """
  if isinstance(config, (str, os.PathLike)):
    try:
      import yaml  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError('reading a mergekit YAML needs PyYAML: pip install pyyaml') from e
    with open(config) as f:
      try:
        config = yaml.safe_load(f)
      except yaml.YAMLError as e:
        raise ValueError(f'{config} is not valid YAML: {e}') from e
  if not isinstance(config, Mapping):
    raise ValueError(f'a mergekit config is a mapping, got {type(config).__name__}')
  unknown = sorted(set(config) - set(_TOP_KEYS))
  if unknown:
    raise ValueError(f'unknown mergekit config field(s) {unknown}; valid: {sorted(_TOP_KEYS)}')
  for field in ('slices', 'modules', 'tokenizer', 'chat_template'):
    if config.get(field):
      raise ValueError(f'mergekit configs with {field!r} are not supported; use models:')
  method = config.get('merge_method')
  if method not in METHODS:
    raise ValueError(f'unsupported merge_method {method!r}; supported: {METHODS}')
  models = config.get('models') or []
  if not models:
    raise ValueError('the mergekit config lists no models')
  base_path = _path(config['base_model'], 'base_model') if config.get('base_model') else None
  globals_ = dict(config.get('parameters') or {})
  entries = []
  for i, model in enumerate(models):
    if not isinstance(model, Mapping) or 'model' not in model:
      raise ValueError(f'models[{i}] needs a model: path, got {model!r}')
    path = _path(model['model'], f'models[{i}]')
    if base_path is not None and os.path.abspath(path) == os.path.abspath(base_path):
      continue  # mergekit lists the base among the models in some configs
    entries.append((path, dict(model.get('parameters') or {})))

  def per_model(key, default=None):
    values = []
    for path, params in entries:
      value = params.get(key, globals_.get(key, default))
      values.append(_setting(value, f'{key} of {path}'))
    return values

  spec: dict[str, Any] = {
    'base': {'path': base_path} if base_path else None,
    'experts': [{'path': path} for path, _ in entries],
    'options': {},
  }
  if method in _METHOD_OPTIONS:
    _gta(spec, method, globals_, entries, per_model)
  else:
    _ota(spec, method, globals_, entries, per_model)
  dtype = config.get('out_dtype') or config.get('dtype')
  if dtype:
    spec['output'] = {'dtype': str(dtype)}
  source = config.get('tokenizer_source')
  if source not in (None, 'base'):
    if source == 'union':
      paths = [p for p in [base_path] + [p for p, _ in entries] if p and os.path.isdir(p)]
      if not _same_tokenizers(paths):
        raise ValueError(
          'tokenizer_source: union over models whose tokenizers differ is not supported '
          '(vocabularies are not merged here); use tokenizer_source: base'
        )
    else:
      spec['model_files'] = _path(source, 'tokenizer_source')
  return spec


def _check_params(entries, globals_, valid, method):
  valid = set(valid) | set(_IGNORED)
  for where, params in [('parameters', globals_)] + [(p, q) for p, q in entries]:
    unknown = sorted(set(params) - valid)
    if unknown:
      raise ValueError(
        f'unknown parameter(s) {unknown} for merge_method {method!r} in {where}; '
        f'valid: {sorted(valid)}'
      )


def _gta(spec, method, globals_, entries, per_model):
  """linear, task_arithmetic, ties, dare_ties, dare_linear."""
  table = _METHOD_OPTIONS[method]
  per_expert = ['weight'] + ([] if method in ('linear', 'task_arithmetic') else ['density'])
  _check_params(entries, globals_, [*table, *per_expert, 'seed'], method)
  for key in ('lambda', 'normalize', 'rescale', 'seed'):
    for _, params in entries:
      if key in params:
        raise ValueError(f'{key} is a merge-wide parameter: set it under parameters:')
  native = {'ties': 'ties', 'dare_ties': 'dare', 'dare_linear': 'dare'}.get(method, method)
  spec['method'] = native
  options = spec['options']
  for key, (option, default) in table.items():
    value = _scalar(globals_.get(key, default), key)
    if option == 'rescale':
      value = 'l1' if value else 'none'
    options[option] = value
  weights = per_model('weight', 1.0)
  for expert, weight in zip(spec['experts'], weights):
    expert['weight'] = weight
  if method in ('ties', 'dare_ties', 'dare_linear'):
    densities = per_model('density', 1.0)
    for expert, density in zip(spec['experts'], densities):
      if method == 'ties':
        expert['density'] = density
      else:
        expert['drop'] = _drop(density)
  if native == 'dare':
    options['combine'] = 'ties' if method == 'dare_ties' else 'linear'
    options['seed'] = int(_scalar(globals_.get('seed', 0), 'seed'))


def _drop(density):
  if isinstance(density, list):
    return [dict(rule, value=1.0 - float(rule['value'])) for rule in density]
  return 1.0 - float(density)


def _same(values, key):
  values = [v for v in values if v is not None]
  if any(isinstance(v, list) for v in values) or len({repr(v) for v in values}) > 1:
    raise ValueError(f'{key} must be the same for every model here, got {values}')
  return values[0] if values else None


def _ota(spec, method, globals_, entries, per_model):
  """ota (the reference's), ota_ffg (ours), ffg (graft)."""
  valid = [*_OTA_GLOBAL, *_OTA_PER_MODEL, *(_FFG if method != 'ota' else ())]
  if method == 'ffg':
    valid = ['density', 'metric', 'preconditioner_path']
  _check_params(entries, globals_, valid, method)
  options = spec['options']
  for key in ('preconditioner_path',):
    paths = per_model(key)
    for expert, path in zip(spec['experts'], paths):
      if path is not None:
        expert['moments'] = {'path': _path(path, key)}
  metric = _scalar(globals_.get('metric', globals_.get('score', 'fisher')), 'metric')
  if method == 'ffg':
    if len(entries) != 1:
      raise ValueError(f'merge_method ffg grafts one model onto the base, got {len(entries)}')
    spec['method'] = 'ffg_graft'
    spec['ffg'] = {
      'density': _scalar(globals_.get('density', 0.1), 'density'),
      'score': metric,
      'scope': 'per_tensor',  # the reference's graft ranks each tensor alone
    }
    return
  spec['method'] = 'ota'
  eps = _scalar(globals_.get('epsilon', 1e-8), 'epsilon')
  normalise = _scalar(globals_.get('normalise', 'none'), 'normalise')
  if normalise not in ('none', 'global'):
    raise ValueError(f"normalise must be 'none' or 'global', got {normalise!r}")
  options.update(
    eps=float(eps),
    power=float(_scalar(globals_.get('power', 0.5), 'power')),
    normalise='mean' if normalise == 'global' else 'none',
    fallback_to_base=bool(
      _scalar(globals_.get('fallback_to_base', method == 'ota_ffg'), 'fallback_to_base')
    ),
    combine=_scalar(globals_.get('masked_task_vector_merge_method', 'precond'), 'combine'),
  )
  if _scalar(globals_.get('rescale', False), 'rescale'):
    raise ValueError(
      "the OTA reference's rescale (hybrid operator norms of masked task vectors) is not "
      'supported; set rescale: false'
    )
  if globals_.get('ties_density') is not None:
    raise ValueError('ties_density (trimming before masked TIES) is not supported; drop it')
  if any(w != 1.0 for w in per_model('weight', 1.0)):
    raise ValueError('OTA weighs each entry by curvature: use scaling_factor, not weight')
  scales = per_model('scaling_factor', 1.0)
  if any(s != 1.0 for s in scales):
    for expert, scale in zip(spec['experts'], scales):
      expert['scale'] = scale
  spec['rank1'] = bool(_same(per_model('rank1_approx', False), 'rank1_approx'))
  rank = _same(per_model('rank'), 'rank')
  if rank is not None:
    spec['moment_rank'] = int(rank)
  thresholds = per_model('precond_threshold')
  has_threshold = any(t is not None for t in thresholds)
  densities = per_model('density') if method == 'ota_ffg' else [None] * len(entries)
  masses = per_model('mass') if method == 'ota_ffg' else [None] * len(entries)
  kinds = [
    k
    for k, v in (('threshold', thresholds), ('density', densities), ('mass', masses))
    if any(x is not None for x in v)
  ]
  if len(kinds) > 1:
    raise ValueError(f'give one of precond_threshold, density and mass, got {kinds}')
  if not kinds:
    if method == 'ota_ffg':
      raise ValueError('merge_method ota_ffg needs density (or mass, or precond_threshold)')
    return
  kind = kinds[0]
  values = {'threshold': thresholds, 'density': densities, 'mass': masses}[kind]
  if any(v is None for v in values):
    raise ValueError(f'{kind} is set for some models only: {values}')
  if has_threshold and not spec['base']:
    raise ValueError(
      'precond_threshold without a base_model masks by the moment alone, which is not '
      'supported; give a base_model (FFG masks v tau^2)'
    )
  spec['ffg'] = {
    kind: [float(_scalar(v, kind)) for v in values],
    'score': metric,
    'scope': _scalar(globals_.get('scope', 'global'), 'scope'),
    'quantile': _scalar(globals_.get('quantile', 'exact'), 'quantile'),
  }
