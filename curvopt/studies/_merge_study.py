"""The merging capability study: a base, one AdamW expert per task, every merge method.

The base is a light multi-task warm-up (optionally from a pretrained LM), each expert is
fine-tuned from it on one task with AdamW, so its checkpoint keeps Adam's `nu`. Existing runs
can stand in for either: `config.base_from` (a run whose params are the base, no warm-up) and
`config.expert_runs` ({task: run}, runs trained with Adam-family optimizers). Every merge
method of curvopt.merge runs in memory on the experts' params and `nu`, and each merged model
is scored by greedy exact match on every task. A capability's score is normalized by its own
expert's accuracy on it.

Resumable: training runs resume from their checkpoints (a finished one costs nothing), and
each evaluated (model, task) accuracy is appended to <workdir>/evals.json as soon as it is
measured, so a rerun only evaluates what is missing.
"""

import dataclasses
import itertools
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from curvopt import data as data_lib
from curvopt import merge
from curvopt import models
from curvopt import train
from curvopt.studies import _report

LAYER_TYPES = ('attn', 'mlp', 'embed', 'head', 'norm', 'other')
_EVALS_FILE = 'evals.json'
# Merge methods that produce one merged model (the baselines OTA+FFG is compared against).
_BASELINE_PREFIXES = ('linear', 'ta_', 'ties', 'dare_ties', 'fisher')


def base_dir(workdir: str) -> str:
  return os.path.join(workdir, 'base')


def expert_dir(workdir: str, task: str) -> str:
  return os.path.join(workdir, 'experts', task)


def layer_type(name: str) -> str:
  """The layer type of a parameter named by its '/'-joined key path."""
  parts = name.lower().split('/')
  if any('norm' in p for p in parts):
    return 'norm'
  if any('embed' in p for p in parts):
    return 'embed'
  if any(p in ('head', 'lm_head', 'unembed') for p in parts):
    return 'head'
  if any(p.startswith('attn') or p.startswith('attention') for p in parts):
    return 'attn'
  if any(p.startswith('mlp') or p.startswith('ffn') for p in parts):
    return 'mlp'
  return 'other'


def _named_leaves(tree: Any) -> dict[str, np.ndarray]:
  pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): np.asarray(leaf)
    for path, leaf in pairs
  }


def normalized_scores(
  accuracy: Mapping[str, float], expert_accuracy: Mapping[str, float]
) -> dict[str, float]:
  """Each task's accuracy over its own expert's, plus their 'mean'.

  A task whose expert scores 0 has no normalized score (nan) and is left out of the mean;
  the mean is nan when no task has one.
  """
  out = {}
  for task, expert in expert_accuracy.items():
    if task not in accuracy:
      raise ValueError(f'no accuracy for task {task!r}; have {sorted(accuracy)}')
    out[task] = float(accuracy[task]) / float(expert) if expert > 0 else math.nan
  finite = [v for v in out.values() if math.isfinite(v)]
  out['mean'] = float(np.mean(finite)) if finite else math.nan
  return out


def mask_jaccard(mask_a: Any, mask_b: Any) -> float:
  """|a & b| / |a | b| over all leaves of two bool mask pytrees (1.0 when both are empty)."""
  a, b = _named_leaves(mask_a), _named_leaves(mask_b)
  if set(a) != set(b):
    raise ValueError(f'masks differ in leaves: {sorted(set(a) ^ set(b))[:5]}')
  inter = sum(int(np.sum(a[n].astype(bool) & b[n].astype(bool))) for n in a)
  union = sum(int(np.sum(a[n].astype(bool) | b[n].astype(bool))) for n in a)
  return inter / union if union else 1.0


def cosine_similarity(tree_a: Any, tree_b: Any) -> float:
  """Cosine of the angle between two pytrees flattened into one vector each (fp64)."""
  a, b = _named_leaves(tree_a), _named_leaves(tree_b)
  if set(a) != set(b):
    raise ValueError(f'trees differ in leaves: {sorted(set(a) ^ set(b))[:5]}')
  dot = sum(float(np.vdot(a[n].astype(np.float64), b[n].astype(np.float64))) for n in a)
  norm_a = math.sqrt(sum(float(np.sum(np.square(a[n], dtype=np.float64))) for n in a))
  norm_b = math.sqrt(sum(float(np.sum(np.square(b[n], dtype=np.float64))) for n in b))
  if norm_a == 0 or norm_b == 0:
    return math.nan
  return dot / (norm_a * norm_b)


def mask_concentration(mask: Any) -> dict[str, dict[str, float]]:
  """Per layer type: 'share' of all kept entries, and 'density' (kept / entries of the type)."""
  kept = {t: 0 for t in LAYER_TYPES}
  size = {t: 0 for t in LAYER_TYPES}
  for name, leaf in _named_leaves(mask).items():
    kind = layer_type(name)
    kept[kind] += int(np.sum(leaf.astype(bool)))
    size[kind] += int(leaf.size)
  total = sum(kept.values())
  return {
    t: {
      'share': kept[t] / total if total else math.nan,
      'density': kept[t] / size[t] if size[t] else math.nan,
    }
    for t in LAYER_TYPES
    if size[t]
  }


@dataclasses.dataclass
class MergeStudy:
  """What the study measured (see `merge_study_report`)."""

  tasks: tuple[str, ...]
  accuracy: dict[str, dict[str, float]]  # model name -> task -> greedy exact match
  expert_accuracy: dict[str, float]  # task -> its own expert's accuracy on it
  normalized: dict[str, dict[str, float]]  # model name -> task / 'mean' -> normalized score
  concentration: dict[str, dict[str, dict[str, float]]]  # task -> layer type -> share/density
  mask_jaccard: dict[tuple[str, str], float]
  nu_cosine: dict[tuple[str, str], float]
  options: dict[str, Any]


def _train_all(config, workdir, train_fn) -> tuple[str, str, dict[str, str]]:
  """Trains what the config does not give: (tasks' data dir, base run, {task: expert run})."""
  data_dir = config.data_dir or os.path.join(workdir, 'tfds')
  given = dict(config.get('expert_runs') or {})
  unknown = sorted(set(given) - set(config.tasks))
  if unknown:  # before any training
    raise ValueError(f'expert_runs names task(s) {unknown} outside tasks {list(config.tasks)}')
  base_run = config.get('base_from') or base_dir(workdir)
  if not config.get('base_from'):
    base = config.base.copy_and_resolve_references()
    base.data.data_dir = data_dir
    base.data.tasks = ml_collections.ConfigDict({t: 1.0 for t in config.tasks})
    logging.info('merge study: base in %s', base_run)
    train_fn(base, base_run)
  expert_runs = {}
  for task in config.tasks:
    if task in given:
      expert_runs[task] = given[task]
      continue
    expert = config.expert.copy_and_resolve_references()
    expert.data.data_dir = data_dir
    expert.data.tasks = ml_collections.ConfigDict({task: 1.0})
    expert.eval.tasks = task
    expert.init_from = base_run
    expert_runs[task] = expert_dir(workdir, task)
    logging.info('merge study: expert %s in %s', task, expert_runs[task])
    train_fn(expert, expert_runs[task])
  return data_dir, base_run, expert_runs


def _read(reader) -> Any:
  with reader:
    return jax.tree.map(lambda x: np.asarray(x, np.float32), reader.read_tree())


class _EvalCache:
  """{model: {task: accuracy}} kept in a JSON file, written after every measurement."""

  def __init__(self, path: str, settings: dict):
    self._path = path
    # As JSON holds it (tuples become lists), so a rerun compares like with like.
    self._settings = json.loads(json.dumps(settings))
    self.values: dict[str, dict[str, float]] = {}
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
      if saved.get('settings') == self._settings:
        self.values = saved['accuracy']
      else:
        logging.warning(
          'evaluation settings changed (%s -> %s): re-evaluating everything',
          saved.get('settings'),
          self._settings,
        )

  def missing(self, model: str, tasks: Sequence[str]) -> list[str]:
    return [t for t in tasks if t not in self.values.get(model, {})]

  def put(self, model: str, task: str, value: float) -> None:
    self.values.setdefault(model, {})[task] = float(value)
    _report.write_text(
      self._path,
      json.dumps({'settings': self._settings, 'accuracy': self.values}, indent=1, sort_keys=True),
    )


def _fmt(x: float) -> str:
  return f'{x:g}'


def model_names(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Every merged model the study evaluates: name -> description."""
  m = config.merge
  names = {'linear': 'linear (mean of the experts)'}
  for s in m.ta_scales:
    names[f'ta_s{_fmt(s)}'] = f'task arithmetic, scale {s:g}'
  names[f'ties_d{_fmt(m.ties_density)}'] = f'TIES, density {m.ties_density:g}'
  names[f'dare_ties_p{_fmt(m.dare_drop)}'] = f'DARE-TIES, drop {m.dare_drop:g}'
  names['fisher'] = 'Fisher merge (Adam nu as the Fisher)'
  names['ota'] = 'OTA'
  for d in sorted(set(m.ffg_densities) | {m.ffg_density}):
    names[f'ota_ffg_d{_fmt(d)}'] = f'OTA+FFG, density {d:g}'
  names[f'ota_ffg_rank1_d{_fmt(m.ffg_density)}'] = (
    f'OTA+FFG on rank-1 moments, density {m.ffg_density:g}'
  )
  return names


def run_merge_study(
  config: ml_collections.ConfigDict, workdir: str, *, train_fn: Callable = train.train_sft
) -> MergeStudy:
  """Trains (or resumes) the base and experts, merges them every way, evaluates, analyses."""
  tasks = tuple(config.tasks)
  if len(tasks) < 2:
    raise ValueError(f'a merge study needs at least 2 tasks, got {tasks!r}')
  unknown = sorted(set(tasks) - set(data_lib.TASK_NAMES))
  if unknown:
    raise ValueError(f'unknown task(s) {unknown}; valid: {list(data_lib.TASK_NAMES)}')
  os.makedirs(workdir, exist_ok=True)
  data_dir, base_run, expert_runs = _train_all(config, workdir, train_fn)

  base = _read(merge.orbax_params_reader(base_run))
  experts = [_read(merge.orbax_params_reader(expert_runs[t])) for t in tasks]
  nus = [_read(merge.orbax_moments_reader(expert_runs[t])) for t in tasks]

  ecfg, m = config.eval, config.merge
  model = models.Decoder(train.model_config_from(config.base.model))
  rollout = train.Rollout(
    model,
    data_lib.ByteTokenizer(),
    max_prompt_len=ecfg.max_prompt_len,
    max_new_tokens=ecfg.max_new_tokens,
  )
  examples = {}
  for t in tasks:
    source = data_lib.task_source(t, 'test', data_dir=data_dir)
    examples[t] = source[: min(ecfg.num_prompts, len(source))]
  cache = _EvalCache(
    os.path.join(workdir, _EVALS_FILE),
    {
      'num_prompts': ecfg.num_prompts,
      'max_prompt_len': ecfg.max_prompt_len,
      'max_new_tokens': ecfg.max_new_tokens,
      'merge': m.to_dict(),
    },
  )

  def evaluate(name: str, build: Callable[[], Any], on: Sequence[str]) -> None:
    todo = cache.missing(name, on)
    if not todo:
      return
    params = build()
    for t in todo:
      acc = rollout.accuracy(params, examples[t])
      cache.put(name, t, acc)
      logging.info('merge study: %s on %s: %.4f', name, t, acc)

  evaluate('base', lambda: base, tasks)
  for t, expert in zip(tasks, experts):
    evaluate(f'expert/{t}', lambda e=expert: e, [t])

  masks_cache: dict[tuple[float, bool], list] = {}

  def masks(density: float, rank1: bool = False):
    if (density, rank1) not in masks_cache:
      moments = [merge.rank1_compress(v) for v in nus] if rank1 else nus
      masks_cache[(density, rank1)] = [
        merge.ffg_mask(base, e, v, density=density) for e, v in zip(experts, moments)
      ]
    return masks_cache[(density, rank1)]

  ota_options = dict(power=m.ota_power, eps=m.ota_eps)
  builders: dict[str, Callable[[], Any]] = {
    'linear': lambda: merge.linear(experts),
    'fisher': lambda: merge.fisher(experts, nus),
    'ota': lambda: merge.ota(base, experts, nus, **ota_options),
  }
  for s in m.ta_scales:
    builders[f'ta_s{_fmt(s)}'] = lambda s=s: merge.task_arithmetic(base, experts, scale=s)
  builders[f'ties_d{_fmt(m.ties_density)}'] = lambda: merge.ties(
    base, experts, density=m.ties_density
  )
  builders[f'dare_ties_p{_fmt(m.dare_drop)}'] = lambda: merge.dare(
    base, experts, drop=m.dare_drop, key=jax.random.key(m.seed), combine='ties'
  )
  for d in sorted(set(m.ffg_densities) | {m.ffg_density}):
    builders[f'ota_ffg_d{_fmt(d)}'] = lambda d=d: merge.ota(
      base, experts, nus, masks=masks(d), **ota_options
    )
  builders[f'ota_ffg_rank1_d{_fmt(m.ffg_density)}'] = lambda: merge.ota(
    base,
    experts,
    [merge.rank1_compress(v) for v in nus],
    masks=masks(m.ffg_density, True),
    **ota_options,
  )
  for name in model_names(config):
    evaluate(name, builders[name], tasks)
  # A graft is one expert's localized task vector on the base: scored on its own task only.
  graft = f'ffg_graft_d{_fmt(m.ffg_density)}'
  for i, t in enumerate(tasks):
    evaluate(
      f'{graft}/{t}', lambda i=i: merge.ffg_graft(base, experts[i], masks(m.ffg_density)[i]), [t]
    )

  acc = cache.values
  expert_accuracy = {t: acc[f'expert/{t}'][t] for t in tasks}
  accuracy = {name: dict(acc[name]) for name in ['base', *model_names(config)]}
  accuracy[graft] = {t: acc[f'{graft}/{t}'][t] for t in tasks}
  normalized = {name: normalized_scores(a, expert_accuracy) for name, a in accuracy.items()}

  default_masks = masks(m.ffg_density)
  base_description = (
    'base (multi-task warm-up)'
    if not config.get('base_from')
    else f'base (the run {os.path.basename(base_run.rstrip("/"))}, no warm-up)'
  )
  pairs = list(itertools.combinations(range(len(tasks)), 2))
  return MergeStudy(
    tasks=tasks,
    accuracy=accuracy,
    expert_accuracy=expert_accuracy,
    normalized=normalized,
    concentration={t: mask_concentration(mk) for t, mk in zip(tasks, default_masks)},
    mask_jaccard={
      (tasks[i], tasks[j]): mask_jaccard(default_masks[i], default_masks[j]) for i, j in pairs
    },
    nu_cosine={(tasks[i], tasks[j]): cosine_similarity(nus[i], nus[j]) for i, j in pairs},
    options={
      'descriptions': {
        **model_names(config),
        'base': base_description,
        graft: f'FFG graft of each expert alone, density {m.ffg_density:g} (one model per task)',
      },
      'ffg_density': m.ffg_density,
      'ffg_densities': sorted(set(m.ffg_densities) | {m.ffg_density}),
      'ta_scales': list(m.ta_scales),
    },
  )


def _is_baseline(name: str) -> bool:
  return name.startswith(_BASELINE_PREFIXES)


def _bar_plot(values: Mapping[str, float], path: str, *, title: str, ylabel: str) -> str:
  plt = _report._pyplot()  # pylint: disable=protected-access
  fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
  names = list(values)
  ax.bar(range(len(names)), [values[n] for n in names], color='tab:blue')
  ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize=7)
  ax.axhline(1.0, color='gray', lw=0.8, ls='--')
  ax.set(title=title, ylabel=ylabel)
  ax.grid(alpha=0.3, axis='y')
  return _report._save(fig, path)  # pylint: disable=protected-access


def merge_study_report(study: MergeStudy, workdir: str) -> str:
  """Markdown tables of the study and its PNG plots (written into `workdir`)."""
  tasks = study.tasks
  opts = study.options
  desc = opts['descriptions']
  d0 = _fmt(opts['ffg_density'])
  main = [
    'base',
    'linear',
    *[f'ta_s{_fmt(s)}' for s in opts['ta_scales']],
    *[n for n in study.accuracy if n.startswith(('ties', 'dare_ties'))],
    'fisher',
    f'ffg_graft_d{d0}',
    'ota',
    f'ota_ffg_d{d0}',
    f'ota_ffg_rank1_d{d0}',
  ]
  parts = []
  parts.append(
    'Expert accuracy on its own task (the normalizer): '
    + ', '.join(f'{t} {study.expert_accuracy[t]:.3f}' for t in tasks)
    + '.'
  )
  rows = [
    [
      n,
      *[study.normalized[n][t] for t in tasks],
      study.normalized[n]['mean'],
      float(np.mean([study.accuracy[n][t] for t in tasks])),
    ]
    for n in main
  ]
  parts.append(
    "Normalized score (accuracy / own expert's accuracy) per capability, their "
    'mean, and the mean raw accuracy:\n\n'
    + _report.markdown_table(['model', *tasks, 'mean normalized', 'mean raw acc'], rows)
  )
  parts.append(
    'Raw greedy exact-match accuracy:\n\n'
    + _report.markdown_table(
      ['model', *tasks], [[n, *[study.accuracy[n][t] for t in tasks]] for n in main]
    )
  )
  parts.append('Models: ' + '; '.join(f'`{n}`: {desc[n]}' for n in main) + '.')

  baselines = {n: study.normalized[n]['mean'] for n in study.accuracy if _is_baseline(n)}
  best = max(baselines, key=lambda n: -math.inf if math.isnan(baselines[n]) else baselines[n])
  ota_ffg = study.normalized[f'ota_ffg_d{d0}']['mean']
  rank1 = study.normalized[f'ota_ffg_rank1_d{d0}']['mean']
  parts.append(
    f'Goal checks: OTA+FFG (density {d0}) mean normalized {ota_ffg:.4f} vs the best '
    f'baseline `{best}` {baselines[best]:.4f}: '
    f'**{"beats" if ota_ffg > baselines[best] else "does not beat"}** every baseline '
    f'(margin {100 * (ota_ffg - baselines[best]):+.2f} points). Rank-1 moments '
    f'{rank1:.4f} vs full {ota_ffg:.4f}: {100 * (rank1 - ota_ffg):+.2f} points '
    f'(**{"within" if abs(rank1 - ota_ffg) <= 0.01 else "outside"}** 1 point).'
  )

  ta = {s: study.normalized[f'ta_s{_fmt(s)}']['mean'] for s in opts['ta_scales']}
  ffg = {d: study.normalized[f'ota_ffg_d{_fmt(d)}']['mean'] for d in opts['ffg_densities']}
  parts.append(
    'Task-arithmetic scale sweep (mean normalized):\n\n'
    + _report.markdown_table(
      ['scale', *tasks, 'mean'],
      [[s, *[study.normalized[f'ta_s{_fmt(s)}'][t] for t in tasks], v] for s, v in ta.items()],
    )
  )
  parts.append(
    'OTA+FFG density sweep (global FFG cutoff per expert):\n\n'
    + _report.markdown_table(
      ['density', *tasks, 'mean'],
      [
        [d, *[study.normalized[f'ota_ffg_d{_fmt(d)}'][t] for t in tasks], v] for d, v in ffg.items()
      ],
    )
  )
  types = [t for t in LAYER_TYPES if any(t in c for c in study.concentration.values())]
  parts.append(
    f"FFG mask concentration by layer type (density {d0}): share of the expert's kept "
    "entries in each type, and in brackets the kept fraction of that type's entries:\n\n"
    + _report.markdown_table(
      ['expert', *types],
      [
        [t, *[f'{c[k]["share"]:.3f} ({c[k]["density"]:.3f})' for k in types]]
        for t, c in study.concentration.items()
      ],
    )
  )
  parts.append(
    'Curvature overlap between experts: Jaccard of the FFG masks (density '
    f'{d0}) and cosine similarity of the Adam `nu` vectors:\n\n'
    + _report.markdown_table(
      ['pair', 'mask Jaccard', 'nu cosine'],
      [
        [f'{a} / {b}', study.mask_jaccard[(a, b)], study.nu_cosine[(a, b)]]
        for a, b in study.mask_jaccard
      ],
    )
  )

  bar = _bar_plot(
    {n: study.normalized[n]['mean'] for n in main},
    os.path.join(workdir, 'merge_normalized.png'),
    title='mean normalized score per model',
    ylabel='accuracy / expert accuracy',
  )
  sweep = _report.plot_curves(
    {
      'task arithmetic (x = scale)': (list(ta), list(ta.values())),
      'OTA+FFG (x = density)': (list(ffg), list(ffg.values())),
    },
    os.path.join(workdir, 'merge_sweeps.png'),
    title='sweeps',
    xlabel='scale / density',
    ylabel='mean normalized score',
  )
  parts.append(f'![normalized]({os.path.basename(bar)})\n\n![sweeps]({os.path.basename(sweep)})')
  return '\n\n'.join(parts)
