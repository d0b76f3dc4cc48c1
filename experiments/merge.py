r"""Merges fine-tuned experts tensor by tensor (OTA + FFG or a baseline); see configs/merge.py.

  python experiments/merge.py --config=configs/merge.py:ota_ffg --output=/tmp/merged \
      --config.base=/ckpt/base --config.experts=/ckpt/math,/ckpt/code [--overwrite]
  python experiments/merge.py --config=merge.yml --output=/tmp/merged   # a mergekit YAML

Refuses an existing --output unless --overwrite; writes into a temporary sibling directory that is
renamed at the end (Ctrl-C or SIGTERM removes it). Errors are one line, without a traceback.
"""

import importlib.util
import json
import os
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import tqdm

from curvopt import merge

_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'merge.py')


def _yaml_argv(argv):
  """`--config=X.yml` (a mergekit YAML, told by its extension) as
  `--config=configs/merge.py:mergekit --config.mergekit=X.yml`."""
  out = []
  for arg in argv:
    value = arg.split('=', 1)[1] if arg.startswith('--config=') else None
    if value is not None and value.lower().endswith(('.yml', '.yaml')):
      out += [f'--config={_CONFIG_FILE}:mergekit', f'--config.mergekit={value}']
    else:
      out.append(arg)
  return out


# Before the flag is defined: ml_collections registers the --config.* overrides from the argv
# it is given here.
_ARGV = _yaml_argv(sys.argv)
_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, e.g. configs/merge.py:ota, or a mergekit YAML.', sys_argv=_ARGV
)
_OUTPUT = flags.DEFINE_string('output', None, 'Output directory (must not exist).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing output directory.')
flags.mark_flags_as_required(['config', 'output'])

_PER_EXPERT_OPTIONS = ('weights', 'scales', 'density', 'drop')


def _split(text, cast=str):
  return None if text is None else [cast(x.strip()) for x in text.split(',') if x.strip()]


def _option_value(key, value):
  """A command-line option string as a spec value (per-expert lists, pairs)."""
  if not isinstance(value, str):
    return value
  if key in _PER_EXPERT_OPTIONS:
    values = _split(value, float)
    return values[0] if len(values) == 1 else values
  if key == 'bias_correction':
    return [(float(b2), int(count)) for b2, count in (p.split(':') for p in _split(value))]
  return value


def _mergekit_spec(config) -> dict:
  spec = merge.spec_from_mergekit(config.mergekit)
  output = dict(spec.get('output') or {})
  output.setdefault('format', config.output_format)
  output.setdefault('max_shard_bytes', config.max_shard_bytes)
  if config.output_dtype:
    output['dtype'] = config.output_dtype
  spec['output'] = output
  spec['extra_tensors'] = config.extra_tensors
  spec['batch_bytes'] = config.batch_bytes
  return spec


def spec_from_config(config) -> dict:
  """The merge spec (curvopt.merge.merge_from_spec) of a configs/merge.py config."""
  if config.mergekit:
    return _mergekit_spec(config)
  spec = {}
  if config.spec:
    with open(config.spec) as f:
      spec = json.load(f)
  spec.setdefault('method', config.method)
  if config.base:
    spec['base'] = {'path': config.base, 'format': config.base_format}
  if config.experts:
    spec['experts'] = [{'path': p, 'format': config.expert_format} for p in _split(config.experts)]
  experts = spec.get('experts') or []
  per_expert = {
    'moments': _split(config.moments),
    'weight': _split(config.weights, float),
    'density': _split(config.densities, float),
  }
  for field, values in per_expert.items():
    if values is None:
      continue
    if len(values) != len(experts):
      raise ValueError(f'{len(values)} {field} values for {len(experts)} experts')
    for expert, value in zip(experts, values):
      expert[field] = (
        {'path': value, 'format': config.moments_format} if field == 'moments' else value
      )
  for expert in experts:
    moments = dict(expert.get('moments') or {'format': config.moments_format})
    if config.moments_names:
      moments['names'] = config.moments_names
    if moments.get('path') or moments.get('names') or moments['format'] != 'auto':
      expert['moments'] = moments
  options = {k: _option_value(k, v) for k, v in config.options.to_dict().items() if v is not None}
  spec.setdefault('options', options)
  if config.ffg.enabled and 'ffg' not in spec:
    ffg = {k: config.ffg[k] for k in ('scope', 'score', 'quantile')}
    given = {k: config.ffg[k] for k in ('mass', 'threshold') if config.ffg[k] is not None}
    ffg.update(given or {'density': config.ffg.density})
    spec['ffg'] = ffg
  for field in ('include', 'exclude'):
    if config[field]:
      spec[field] = _split(config[field])
  spec.setdefault('rank1', config.rank1)
  spec.setdefault('moment_rank', config.moment_rank)
  spec.setdefault('extra_tensors', config.extra_tensors)
  spec.setdefault(
    'output',
    {
      'format': config.output_format,
      'max_shard_bytes': config.max_shard_bytes,
      'dtype': config.output_dtype,
    },
  )
  spec.setdefault('batch_bytes', config.batch_bytes)
  return spec


def _config_of(argv):
  """The config (without overrides) that --config names, or None."""
  for arg in argv:
    if arg.startswith('--config='):
      path, _, variant = arg.split('=', 1)[1].partition(':')
      spec = importlib.util.spec_from_file_location('merge_config', path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      return module.get_config(variant) if variant else module.get_config()
  return None


def _flag_error(argv, error):
  """A one-line message for a bad override (ml_collections raises raw errors)."""
  keys = [m.group(1) for a in argv if (m := re.match(r'--config\.options\.(\w+)', a))]
  try:
    config = _config_of(argv)
  except Exception:  # pylint: disable=broad-except
    config = None
  if config is not None:
    unknown = [k for k in keys if k not in config.options]
    if unknown:
      return (
        f'unknown option {unknown[0]!r} for method {config.method!r}; valid: '
        f'{sorted(config.options)}'
      )
  return f'bad flag value: {error}'


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f'merge failed: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f'merge failed: {_flag_error(argv, e)}') from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  bar = tqdm.tqdm(unit='tensor', desc='merge')
  try:
    spec = spec_from_config(_CONFIG.value)
    result = merge.merge_from_spec(
      spec,
      _OUTPUT.value,
      overwrite=_OVERWRITE.value,
      progress=lambda name: bar.update(1),
      on_plan=lambda total: bar.reset(total=total),
    )
  except (ValueError, OSError) as e:
    bar.close()
    raise SystemExit(f'merge failed: {e}') from None
  except KeyboardInterrupt as e:
    bar.close()
    signum = getattr(e, 'signum', 2)
    print(f'merge interrupted ({e or "Ctrl-C"}); the partial output was removed', file=sys.stderr)
    raise SystemExit(128 + signum) from None
  bar.close()
  cutoffs = '' if result.thresholds is None else f', FFG cutoffs {list(result.thresholds)}'
  dropped = sum(len(d) for d in result.dropped)
  dropped = f', dropped {dropped} expert tensors the base lacks' if dropped else ''
  print(
    f'wrote {len(result.names)} tensors ({len(result.merged)} merged) to {_OUTPUT.value} in '
    f'{result.passes} passes over {result.bytes_read / 1e6:.1f} MB read{cutoffs}{dropped}',
    flush=True,
  )


if __name__ == '__main__':
  app.run(main, argv=_ARGV, flags_parser=_parse_flags)
