r"""Merges fine-tuned experts tensor by tensor (OTA + FFG or a baseline); see configs/merge.py.

  python experiments/merge.py --config=configs/merge.py:ota_ffg --output=/tmp/merged \
      --config.base=/ckpt/base --config.experts=/ckpt/math,/ckpt/code [--overwrite]

Refuses an existing --output unless --overwrite; writes into a temporary sibling directory that is
renamed at the end.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags
import tqdm

from curvopt import merge

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/merge.py:ota.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output directory (must not exist).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing output directory.')
flags.mark_flags_as_required(['config', 'output'])


def _split(text, cast=str):
  return None if text is None else [cast(x.strip()) for x in text.split(',') if x.strip()]


def spec_from_config(config) -> dict:
  """The merge spec (curvopt.merge.merge_from_spec) of a configs/merge.py config."""
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
      raise app.UsageError(f'{len(values)} {field} values for {len(experts)} experts')
    for expert, value in zip(experts, values):
      expert[field] = (
        {'path': value, 'format': config.moments_format} if field == 'moments' else value
      )
  spec.setdefault('options', config.options.to_dict())
  if config.ffg.enabled and 'ffg' not in spec:
    ffg = {k: config.ffg[k] for k in ('scope', 'score', 'quantile')}
    given = {k: config.ffg[k] for k in ('mass', 'threshold') if config.ffg[k] is not None}
    ffg.update(given or {'density': config.ffg.density})
    spec['ffg'] = ffg
  for field in ('include', 'exclude'):
    if config[field]:
      spec[field] = _split(config[field])
  spec.setdefault('rank1', config.rank1)
  spec.setdefault(
    'output', {'format': config.output_format, 'max_shard_bytes': config.max_shard_bytes}
  )
  spec.setdefault('batch_bytes', config.batch_bytes)
  return spec


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  spec = spec_from_config(_CONFIG.value)
  bar = tqdm.tqdm(unit='tensor', desc='merge')
  try:
    result = merge.merge_from_spec(
      spec,
      _OUTPUT.value,
      overwrite=_OVERWRITE.value,
      progress=lambda name: bar.update(1),
      on_plan=lambda total: bar.reset(total=total),
    )
  except ValueError as e:
    raise SystemExit(f'merge failed: {e}') from e
  finally:
    bar.close()
  cutoffs = '' if result.thresholds is None else f', FFG cutoffs {list(result.thresholds)}'
  print(
    f'wrote {len(result.names)} tensors ({len(result.merged)} merged) to {_OUTPUT.value} in '
    f'{result.passes} passes over {result.bytes_read / 1e6:.1f} MB read{cutoffs}',
    flush=True,
  )


if __name__ == '__main__':
  app.run(main)
