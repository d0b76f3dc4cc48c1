"""The merging study in the fine-tuning regime: a competent base, brief low-rate experts.

Merging methods are built for small fine-tuning deltas from a base that already has some of
every capability. This study makes that regime and measures what each merge keeps:
1. Base: a pretrained code-corpus LM, then a multi-task warm-up (`config.base.total_steps`
   steps) until it has partial skill on every task. Its greedy exact match on each task must
   lie in `config.base_band`; otherwise the study stops (`StudyStopped`) and says what to
   change.
2. Experts: AdamW fine-tunes of the base, one per task. A short rate sweep on the first seed
   (`config.expert_lrs`) picks the smallest rate at which every expert gains at least
   `config.expert_min_z` standard errors over the base on its own task (`choose_rate`); the
   other seeds (`config.expert_seeds`, a seed sets the data order) are trained at that rate.
3. Merges, per seed, through curvopt.merge: linear, task arithmetic (scale sweep), TIES and
   DARE-TIES (density sweeps), Fisher (Adam's nu as the Fisher), OTA, OTA+FFG (density sweep,
   full and rank-1 moments), OTA+FFG at automatic per-expert densities (`config.merge.auto_rules`),
   and FFG grafts of each expert alone.
4. Scores: every model on the same test prompts of every task, greedy (1/0 per prompt) and
   sampled (the share of `config.eval.num_samples` completions at `temperature` that are right,
   from curvopt.rl's sampler through train.Rollout). The measure is the share of the expert's
   gain a merge keeps, (merged - base) / (expert - base), per task, with its standard error
   (`_merge_metrics`).

Resumable: training runs resume from their checkpoints, and each (model, task, metric)'s
per-prompt outcomes are appended to <study dir>/evals.jsonl as soon as they are measured.
The study dir, <workdir>/warmup<steps>[_w<weights>], is per warm-up: a different warm-up
trains its own base and experts beside the first.
"""

import dataclasses
import functools
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
from curvopt import models as models_lib
from curvopt import train
from curvopt.studies import _merge_metrics as mm
from curvopt.studies import _merge_study
from curvopt.studies import _report

METRICS = ('greedy', 'sampled')
BASELINES = ('linear', 'task arithmetic', 'TIES', 'DARE-TIES', 'Fisher')
CANDIDATE = 'OTA+FFG'
RANK1 = 'OTA+FFG rank-1'
_EVALS_FILE = 'evals.jsonl'


class StudyStopped(ValueError):
  """The study cannot go on as designed (the base outside its band, no expert rate passes)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  family: str
  setting: Any  # the swept value (scale, density or automatic rule); None when nothing is swept
  description: str
  graft: bool = False  # one model per task, scored on its own task only


def gain_models(config: ml_collections.ConfigDict) -> dict[str, ModelSpec]:
  """Every model the study builds per seed, in report order: name -> spec."""
  m = config.merge
  out = {'linear': ModelSpec('linear', None, 'mean of the experts')}
  for s in m.ta_scales:
    out[f'ta_s{s:g}'] = ModelSpec('task arithmetic', s, f'base + {s:g} * sum of task vectors')
  for d in m.ties_densities:
    out[f'ties_d{d:g}'] = ModelSpec('TIES', d, f'TIES, density {d:g} per tensor')
  for d in m.dare_densities:
    out[f'dare_ties_d{d:g}'] = ModelSpec('DARE-TIES', d, f'DARE-TIES, keep {d:g} (drop {1 - d:g})')
  out['fisher'] = ModelSpec('Fisher', None, 'Fisher merge, Adam nu as the Fisher')
  out['ota'] = ModelSpec('OTA', None, f'OTA, p = {m.ota_power:g}')
  for d in m.ffg_densities:
    out[f'ota_ffg_d{d:g}'] = ModelSpec(CANDIDATE, d, f'OTA+FFG, global density {d:g}')
  for d in m.ffg_densities:
    out[f'ota_ffg_rank1_d{d:g}'] = ModelSpec(RANK1, d, f'OTA+FFG on rank-1 moments, density {d:g}')
  for rule in m.auto_rules:
    mm.parse_auto_rule(rule)
    out[f'ota_ffg_{rule}'] = ModelSpec('OTA+FFG auto', rule, f'OTA+FFG, density per expert: {rule}')
  for d in m.ffg_densities:
    out[f'ffg_graft_d{d:g}'] = ModelSpec('FFG graft', d, f'FFG graft alone, density {d:g}', True)
  for rule in m.auto_rules:
    out[f'ffg_graft_{rule}'] = ModelSpec('FFG graft auto', rule, f'FFG graft alone, {rule}', True)
  return out


def study_dir(workdir: str, config: ml_collections.ConfigDict) -> str:
  """<workdir>/warmup<steps>, plus _w<weights> for a non-uniform warm-up mixture."""
  name = f'warmup{config.base.total_steps}'
  if tuple(config.warmup_weights):
    name += '_w' + '-'.join(f'{w:g}' for w in config.warmup_weights)
  return os.path.join(workdir, name)


def expert_dir(sub: str, rate: float, seed: int, task: str) -> str:
  return os.path.join(sub, 'experts', f'lr{rate:g}', f'seed{seed}', task)


def _expert_key(rate: float, seed: int, task: str) -> str:
  return f'lr{rate:g}/seed{seed}/expert/{task}'


def _model_key(rate: float, seed: int, name: str, task: str | None = None) -> str:
  return f'lr{rate:g}/seed{seed}/{name}' + (f'/{task}' if task else '')


class Backend:
  """The study's contact with training runs and models; tests swap in a fake.

  `correct` scores params on the first `config.eval.num_prompts` test prompts of a task: the
  number of right completions per prompt, greedy (0/1) or out of `config.eval.num_samples`
  sampled at `config.eval.temperature` (common random numbers: the same key for every model).
  """

  def __init__(self, config, data_dir: str, *, train_fn: Callable = train.train_sft):
    self._config = config
    self._data_dir = data_dir
    self._train_fn = train_fn
    self._rollout = None
    self._examples = {}

  def train(self, run_config, run_dir: str) -> None:
    self._train_fn(run_config, run_dir)

  def read(self, run_dir: str) -> Any:
    return _merge_study._read(merge.orbax_params_reader(run_dir))  # pylint: disable=protected-access

  def read_moments(self, run_dir: str) -> Any:
    return _merge_study._read(merge.orbax_moments_reader(run_dir))  # pylint: disable=protected-access

  def correct(self, params, task: str, *, sampled: bool) -> np.ndarray:
    ecfg = self._config.eval
    if self._rollout is None:
      model = models_lib.Decoder(train.model_config_from(self._config.base.model))
      self._rollout = train.Rollout(
        model,
        data_lib.ByteTokenizer(),
        max_prompt_len=ecfg.max_prompt_len,
        max_new_tokens=ecfg.max_new_tokens,
      )
    if task not in self._examples:
      source = data_lib.task_source(task, 'test', data_dir=self._data_dir)
      self._examples[task] = source[: min(ecfg.num_prompts, len(source))]
    examples = self._examples[task]
    k = ecfg.num_samples if sampled else 1
    key = jax.random.fold_in(jax.random.key(ecfg.sample_seed), data_lib.TASK_NAMES.index(task))
    right = self._rollout.per_prompt_correct(
      params,
      examples,
      key,
      num_samples=k,
      temperature=ecfg.temperature if sampled else 0.0,
      max_rows=ecfg.batch_size,
    )
    return right.sum(axis=1).astype(np.int64)


class _OutcomeCache:
  """(model, task, metric) -> per-prompt right counts, one JSON line each, appended when measured.

  The first line holds the evaluation settings; a file written under other settings is set
  aside (renamed) and everything is measured again.
  """

  def __init__(self, path: str, settings: dict):
    self._path = path
    self._settings = json.loads(json.dumps(settings))  # as JSON holds it: tuples become lists
    self._values: dict[tuple[str, str, str], list[int]] = {}
    if os.path.exists(path):
      with open(path) as f:
        lines = f.read().splitlines()
      header = json.loads(lines[0]) if lines else {}
      if header.get('settings') == self._settings:
        for line in lines[1:]:
          try:
            r = json.loads(line)
          except json.JSONDecodeError:  # a line cut short by a crash: measured again
            continue
          self._values[(r['model'], r['task'], r['metric'])] = r['correct']
        return
      n = 1
      while os.path.exists(f'{path}.{n}'):
        n += 1
      aside = f'{path}.{n}'
      logging.warning('evaluation settings changed: %s set aside as %s', path, aside)
      os.replace(path, aside)
    with open(path, 'w') as f:
      f.write(json.dumps({'settings': self._settings}) + '\n')

  def has(self, model: str, task: str, metric: str) -> bool:
    return (model, task, metric) in self._values

  def get(self, model: str, task: str, metric: str) -> np.ndarray:
    return np.asarray(self._values[(model, task, metric)], np.float64)

  def put(self, model: str, task: str, metric: str, correct: Sequence[int]) -> None:
    correct = [int(c) for c in correct]
    self._values[(model, task, metric)] = correct
    line = {'model': model, 'task': task, 'metric': metric, 'correct': correct}
    with open(self._path, 'a') as f:
      f.write(json.dumps(line) + '\n')


class _Scorer:
  """Measures what the cache lacks; per-prompt outcomes in [0, 1] (right / completions)."""

  def __init__(self, cache: _OutcomeCache, backend: Backend, metrics, num_samples: int):
    self._cache, self._backend = cache, backend
    self.metrics = tuple(metrics)
    self._per_prompt = {'greedy': 1, 'sampled': num_samples}

  def score(self, model: str, build: Callable[[], Any], tasks, metrics=None) -> None:
    todo = [
      (t, m) for t in tasks for m in (metrics or self.metrics) if not self._cache.has(model, t, m)
    ]
    if not todo:
      return
    params = build()
    for t, m in todo:
      correct = self._backend.correct(params, t, sampled=m == 'sampled')
      self._cache.put(model, t, m, correct)
      logging.info(
        'merge study: %s on %s (%s): %.4f', model, t, m, self.outcome(model, t, m).mean()
      )

  def outcome(self, model: str, task: str, metric: str) -> np.ndarray:
    return self._cache.get(model, task, metric) / self._per_prompt[metric]


@dataclasses.dataclass
class GainStudy:
  """What the study measured (`gain_study_report` applies the decision rules to it)."""

  tasks: tuple[str, ...]
  seeds: tuple[int, ...]
  rate: float  # the experts' learning rate, chosen by the rate rule
  metrics: tuple[str, ...]
  models: dict[str, ModelSpec]
  base: dict[str, dict[str, mm.Estimate]]  # metric -> task -> accuracy
  sweep: dict[float, dict[str, dict[str, Any]]]  # rate -> task -> accuracy, gain, size (seed 0)
  experts: dict[str, dict[int, dict[str, mm.Estimate]]]  # metric -> seed -> task -> own accuracy
  relative_size: dict[int, dict[str, float]]  # seed -> task -> ||tau|| / ||theta0||
  cosine: dict[int, dict[tuple[str, str], float]]  # seed -> task pair -> cosine of task vectors
  gain_kept: dict[str, dict[str, dict[int, dict[str, mm.Estimate]]]]  # metric/model/seed/task
  auto_density: dict[str, dict[int, dict[str, float]]]  # rule -> seed -> task -> kept density
  options: dict[str, Any]


def _check(config) -> tuple[str, ...]:
  tasks = tuple(config.tasks)
  if len(tasks) < 2:
    raise ValueError(f'a merge study needs at least 2 tasks, got {tasks!r}')
  unknown = sorted(set(tasks) - set(data_lib.TASK_NAMES))
  if unknown:
    raise ValueError(f'unknown task(s) {unknown}; valid: {list(data_lib.TASK_NAMES)}')
  weights = tuple(config.warmup_weights)
  if weights and len(weights) != len(tasks):
    raise ValueError(
      f'warmup_weights {weights} needs one weight per task {tasks} (or () for uniform)'
    )
  if not config.expert_lrs or not config.expert_seeds:
    raise ValueError('expert_lrs and expert_seeds each need at least one value')
  lo, hi = config.base_band
  if not 0 <= lo <= hi <= 1:
    raise ValueError(f'base_band must be (low, high) with 0 <= low <= high <= 1, got {(lo, hi)}')
  for rule in config.merge.auto_rules:
    mm.parse_auto_rule(rule)
  if config.eval.sampled_models not in ('best', 'all'):
    raise ValueError(
      f"eval.sampled_models must be 'best' or 'all', got {config.eval.sampled_models!r}"
    )
  if not config.merge.ffg_densities:
    raise ValueError('merge.ffg_densities needs at least one density (the candidate, OTA+FFG)')
  return tasks


def _base_config(config, tasks, data_dir):
  base = config.base.copy_and_resolve_references()
  base.data.data_dir = data_dir
  weights = tuple(config.warmup_weights) or (1.0,) * len(tasks)
  base.data.tasks = ml_collections.ConfigDict(dict(zip(tasks, map(float, weights))))
  return base


def _expert_config(config, data_dir, task, rate, seed, base_run):
  expert = config.expert.copy_and_resolve_references()
  expert.data.data_dir = data_dir
  expert.data.tasks = ml_collections.ConfigDict({task: 1.0})
  expert.eval.tasks = task
  expert.init_from = base_run
  expert.optimizer.learning_rate = float(rate)
  expert.seed = int(seed)
  return expert


def _fmt_acc(e: mm.Estimate) -> str:
  return f'{e.value:.3f} ± {e.se:.3f}'


def _check_band(config, tasks, base_acc, sub) -> None:
  lo, hi = config.base_band
  out = [t for t in tasks if not lo <= base_acc[t].value <= hi]
  if not out:
    return
  where = ', '.join(
    f'{t} {base_acc[t].value:.3f} ({"below" if base_acc[t].value < lo else "above"})' for t in out
  )
  every = ', '.join(f'{t} {_fmt_acc(base_acc[t])}' for t in tasks)
  raise StudyStopped(
    f'the base is outside base_band [{lo:g}, {hi:g}] of greedy exact match on {where} '
    f'(all tasks: {every}). Change the warm-up: --config.base.total_steps '
    f'(now {config.base.total_steps}; more steps, higher accuracy) or the mixture '
    f'--config.warmup_weights (one weight per task of {list(tasks)}, now '
    f'{tuple(config.warmup_weights) or "uniform"}); each warm-up trains its own base beside '
    f'{sub}. Or widen --config.base_band.'
  )


def _rate_failure(config, sweep, first_seed) -> StudyStopped:
  lines = '; '.join(
    f'lr {r:g}: '
    + ', '.join(
      f'{t} {g["gain"].value:+.3f} (z {mm.z_score(g["gain"]):.1f})' for t, g in by_task.items()
    )
    for r, by_task in sorted(sweep.items())
  )
  return StudyStopped(
    f'no rate in expert_lrs {sorted(config.expert_lrs)} makes every expert clearly better than '
    f'the base (a gain of >= {config.expert_min_z:g} standard errors on its own task, greedy, '
    f'seed {first_seed}): {lines}. Add a larger rate to --config.expert_lrs or lengthen '
    f'--config.expert.total_steps (now {config.expert.total_steps}).'
  )


def _auto_masks(rule, base, experts, nus):
  kind, share = mm.parse_auto_rule(rule)
  if kind == 'mass':
    return [merge.ffg_mask(base, e, v, mass=share) for e, v in zip(experts, nus)]
  masks = []
  for e, v in zip(experts, nus):
    saliency = jax.tree.map(lambda b, x, m: merge.ffg_saliency(b, x, m), base, e, v)
    masks.append(merge.ffg_mask(base, e, v, threshold=mm.knee_threshold(saliency)))
  return masks


class _Merger:
  """Builds one seed's merged models, sharing the FFG masks and rank-1 moments between them."""

  def __init__(self, config, seed, base, experts, nus):
    self._m = config.merge
    self._seed = seed
    self._base, self._experts, self._nus = base, experts, nus
    self._ota = dict(power=self._m.ota_power, eps=self._m.ota_eps)
    self._memo: dict[Any, Any] = {}

  def forget(self) -> None:
    """Drops the masks and rank-1 moments built so far (they are rebuilt on demand)."""
    self._memo.clear()

  def _cached(self, key, fn):
    if key not in self._memo:
      self._memo[key] = fn()
    return self._memo[key]

  def _rank1(self):
    return self._cached('rank1', lambda: [merge.rank1_compress(v) for v in self._nus])

  def masks(self, setting, rank1: bool = False) -> list:
    """Each expert's FFG mask at a density, or at an automatic rule's (a str)."""
    base, experts = self._base, self._experts
    if isinstance(setting, str):
      return self._cached(setting, lambda: _auto_masks(setting, base, experts, self._nus))
    moments = self._rank1() if rank1 else self._nus
    return self._cached(
      (setting, rank1),
      lambda: [merge.ffg_mask(base, e, v, density=setting) for e, v in zip(experts, moments)],
    )

  def graft(self, setting, index: int):
    return merge.ffg_graft(self._base, self._experts[index], self.masks(setting)[index])

  def merged(self, spec: ModelSpec):
    base, experts, nus, s = self._base, self._experts, self._nus, spec.setting
    if spec.family == 'linear':
      return merge.linear(experts)
    if spec.family == 'task arithmetic':
      return merge.task_arithmetic(base, experts, scale=s)
    if spec.family == 'TIES':
      return merge.ties(base, experts, density=s)
    if spec.family == 'DARE-TIES':
      key = jax.random.key(self._seed)
      return merge.dare(base, experts, drop=1.0 - s, key=key, combine='ties')
    if spec.family == 'Fisher':
      return merge.fisher(experts, nus)
    if spec.family == 'OTA':
      return merge.ota(base, experts, nus, **self._ota)
    if spec.family == RANK1:
      return merge.ota(base, experts, self._rank1(), masks=self.masks(s, True), **self._ota)
    if spec.family in (CANDIDATE, 'OTA+FFG auto'):
      return merge.ota(base, experts, nus, masks=self.masks(s), **self._ota)
    raise ValueError(f'no merge for family {spec.family!r}')


def sampled_models(models: Mapping[str, ModelSpec], greedy: Mapping[str, Sequence[float]]):
  """The models sampled accuracy re-measures: each method's best setting on greedy accuracy
  (mean over seeds of the task mean), rank-1 OTA+FFG at full OTA+FFG's best density, and every
  automatic-density model (they are compared with the best hand-picked density)."""
  families = dict.fromkeys(spec.family for spec in models.values())
  chosen = {}
  for family in families:
    names = [n for n, spec in models.items() if spec.family == family]
    if family.endswith('auto'):
      chosen.update(dict.fromkeys(names))
    elif family != RANK1:
      chosen[mm.best_setting(greedy, names)] = None
  candidates = [n for n in chosen if models[n].family == CANDIDATE]
  for name, spec in models.items():
    if spec.family == RANK1 and candidates and spec.setting == models[candidates[0]].setting:
      chosen[name] = None
  return [n for n in models if n in chosen]


class _Study:
  """One study dir's runs and scores: trains (or resumes) what a step needs, scores what the
  cache lacks."""

  def __init__(self, config, workdir, backend):
    self.config = config
    self.tasks = _check(config)
    self.sub = study_dir(workdir, config)
    os.makedirs(self.sub, exist_ok=True)
    self.data_dir = config.data_dir or os.path.join(workdir, 'tfds')
    self.backend = backend or Backend(config, self.data_dir)
    ecfg, m = config.eval, config.merge
    self.metrics = METRICS if ecfg.num_samples else METRICS[:1]
    # Everything an outcome depends on (the sampler's draws follow its batches' layout).
    keys = ('num_prompts', 'max_prompt_len', 'max_new_tokens', 'num_samples', 'temperature')
    settings = {k: ecfg[k] for k in keys + ('sample_seed', 'batch_size')}
    settings.update(ota_power=m.ota_power, ota_eps=m.ota_eps)
    cache = _OutcomeCache(os.path.join(self.sub, _EVALS_FILE), settings)
    self.scorer = _Scorer(cache, self.backend, self.metrics, ecfg.num_samples)
    self.base_run = os.path.join(self.sub, 'base')
    self.seeds = tuple(int(s) for s in config.expert_seeds)
    self.models = gain_models(config)
    self.base = None  # the base's params, once trained
    self.rate = None  # the experts' rate, once chosen

  def outcome(self, model, task, metric):
    return self.scorer.outcome(model, task, metric)

  def accuracy(self, model, task, metric) -> mm.Estimate:
    return mm.accuracy_estimate(self.outcome(model, task, metric))

  def train_base(self):
    logging.info('merge study: base in %s', self.base_run)
    self.backend.train(_base_config(self.config, self.tasks, self.data_dir), self.base_run)
    self.base = self.backend.read(self.base_run)
    self.scorer.score('base', lambda: self.base, self.tasks)

  def expert(self, rate, seed, task):
    run = expert_dir(self.sub, rate, seed, task)
    run_config = _expert_config(self.config, self.data_dir, task, rate, seed, self.base_run)
    self.backend.train(run_config, run)
    return run, self.backend.read(run)

  def rate_sweep(self) -> dict[float, dict[str, dict[str, Any]]]:
    seed, sweep = self.seeds[0], {}
    for rate in sorted(self.config.expert_lrs):
      sweep[rate] = {}
      for t in self.tasks:
        _, params = self.expert(rate, seed, t)
        key = _expert_key(rate, seed, t)
        self.scorer.score(key, lambda p=params: p, [t], ['greedy'])
        sweep[rate][t] = {
          'accuracy': self.accuracy(key, t, 'greedy'),
          'gain': mm.gain_estimate(
            self.outcome(key, t, 'greedy'), self.outcome('base', t, 'greedy')
          ),
          'size': mm.relative_size(self.base, params),
        }
    return sweep

  def seed_models(self, seed):
    """(experts, their nu) at the chosen rate; each expert scored on its own task."""
    experts, nus = [], []
    for t in self.tasks:
      run, params = self.expert(self.rate, seed, t)
      experts.append(params)
      nus.append(self.backend.read_moments(run))
      self.scorer.score(_expert_key(self.rate, seed, t), lambda p=params: p, [t])
    return experts, nus

  def score_merges(self, seed, merger, names, metrics):
    for name in names:
      spec = self.models[name]
      if spec.graft:
        for i, t in enumerate(self.tasks):
          build = functools.partial(merger.graft, spec.setting, i)
          self.scorer.score(_model_key(self.rate, seed, name, t), build, [t], metrics)
      else:
        build = functools.partial(merger.merged, spec)
        self.scorer.score(_model_key(self.rate, seed, name), build, self.tasks, metrics)

  def gain_kept(self, metric, names) -> dict[str, dict[int, dict[str, mm.Estimate]]]:
    return {
      name: {
        seed: {
          t: mm.gain_kept(
            self.outcome(
              _model_key(self.rate, seed, name, t if self.models[name].graft else None), t, metric
            ),
            self.outcome('base', t, metric),
            self.outcome(_expert_key(self.rate, seed, t), t, metric),
          )
          for t in self.tasks
        }
        for seed in self.seeds
      }
      for name in names
    }


def run_gain_study(
  config: ml_collections.ConfigDict, workdir: str, *, backend: Backend | None = None
) -> GainStudy:
  """Trains (or resumes) the base and experts, merges them every way, scores, analyses.

  Greedy accuracy scores every model; sampled accuracy (the second metric) the models
  `sampled_models` picks on greedy, or all with `config.eval.sampled_models = 'all'`.

  Raises:
    StudyStopped: the base is outside `config.base_band`, or no rate of `config.expert_lrs`
      passes the rate rule (the message says what to change; finished runs are kept).
    ValueError: a bad config field (named in the message).
  """
  study = _Study(config, os.path.abspath(workdir), backend)
  tasks, seeds, m = study.tasks, study.seeds, config.merge
  study.train_base()
  base_acc = {x: {t: study.accuracy('base', t, x) for t in tasks} for x in study.metrics}
  _check_band(config, tasks, base_acc['greedy'], study.sub)

  sweep = study.rate_sweep()
  study.rate = mm.choose_rate(
    {r: {t: g['gain'] for t, g in s.items()} for r, s in sweep.items()},
    min_z=config.expert_min_z,
  )
  if study.rate is None:
    raise _rate_failure(config, sweep, seeds[0])
  logging.info('merge study: experts at lr %g', study.rate)

  pairs = list(itertools.combinations(range(len(tasks)), 2))
  sizes, cosines, auto = {}, {}, {r: {} for r in m.auto_rules}
  mergers = {}
  for seed in seeds:
    experts, nus = study.seed_models(seed)
    sizes[seed] = {t: mm.relative_size(study.base, e) for t, e in zip(tasks, experts)}
    cosines[seed] = {
      (tasks[i], tasks[j]): mm.task_vector_cosine(study.base, experts[i], experts[j])
      for i, j in pairs
    }
    mergers[seed] = _Merger(config, seed, study.base, experts, nus)
    for rule in m.auto_rules:
      masks = mergers[seed].masks(rule)
      auto[rule][seed] = {t: mm.mask_density(mk) for t, mk in zip(tasks, masks)}
    study.score_merges(seed, mergers[seed], study.models, ['greedy'])
    mergers[seed].forget()  # masks of every density and seed would outgrow the experts

  gain_kept = {'greedy': study.gain_kept('greedy', study.models)}
  if 'sampled' in study.metrics:
    names = list(study.models)
    if config.eval.sampled_models == 'best':
      greedy = {
        n: [mm.mean_over_tasks(list(by_task.values())).value for by_task in by_seed.values()]
        for n, by_seed in gain_kept['greedy'].items()
      }
      names = sampled_models(study.models, greedy)
    for seed in seeds:
      study.score_merges(seed, mergers[seed], names, ['sampled'])
      mergers[seed].forget()
    gain_kept['sampled'] = study.gain_kept('sampled', names)
  return GainStudy(
    tasks=tasks,
    seeds=seeds,
    rate=study.rate,
    metrics=study.metrics,
    models=study.models,
    base=base_acc,
    sweep=sweep,
    experts={
      x: {s: {t: study.accuracy(_expert_key(study.rate, s, t), t, x) for t in tasks} for s in seeds}
      for x in study.metrics
    },
    relative_size=sizes,
    cosine=cosines,
    gain_kept=gain_kept,
    auto_density=auto,
    options={
      'warmup_steps': config.base.total_steps,
      'warmup_weights': tuple(config.warmup_weights),
      'base_band': tuple(config.base_band),
      'expert_steps': config.expert.total_steps,
      'expert_min_z': config.expert_min_z,
      'num_prompts': {t: len(study.outcome('base', t, 'greedy')) for t in tasks},
      'num_samples': config.eval.num_samples,
      'temperature': config.eval.temperature,
      'sampled_models': config.eval.sampled_models,
    },
  )


# ------------------------------------------------------------------------------------- report


def task_means(study: GainStudy, metric: str) -> dict[str, list[float]]:
  """model -> per-seed mean over tasks of the gain kept (the decision rules' scores), for the
  models measured on `metric`."""
  return {
    name: [mm.mean_over_tasks(list(by_seed[s].values())).value for s in study.seeds]
    for name, by_seed in study.gain_kept[metric].items()
  }


def _family(study: GainStudy, family: str, metric: str) -> list[str]:
  """The family's models measured on `metric`, in config order."""
  measured = study.gain_kept[metric]
  return [n for n, spec in study.models.items() if spec.family == family and n in measured]


@dataclasses.dataclass(frozen=True)
class Decision:
  """The two decision rules on one metric (docs/merge_experiments.md, written before any run).

  A verdict is None where the rule cannot be applied: rule 1 without a finite margin and seed
  spread for every baseline (fewer than two seeds, or no gain to keep), rule 2 without a finite
  difference.
  """

  metric: str
  candidate: str  # OTA+FFG's best density
  comparisons: list[mm.Comparison]  # against each baseline family's best setting
  beats_every_baseline: bool | None
  rank1: str
  rank1_difference: tuple[float, float]  # mean and sd over seeds of rank-1 - full
  rank1_within: bool | None


def decide(study: GainStudy, metric: str) -> Decision:
  """Applies the decision rules as written to the study's per-seed scores on `metric`."""
  scores = task_means(study, metric)
  candidate = mm.best_setting(scores, _family(study, CANDIDATE, metric))
  baselines = {f: _family(study, f, metric) for f in BASELINES if _family(study, f, metric)}
  comparisons = mm.compare_to_baselines(scores, candidate, baselines)
  applicable = bool(comparisons) and all(
    math.isfinite(c.margin) and math.isfinite(c.spread) for c in comparisons
  )
  rank1 = candidate.replace('ota_ffg_d', 'ota_ffg_rank1_d')
  mean, sd, within = mm.within_points(scores, rank1, candidate, points=1.0)
  return Decision(
    metric=metric,
    candidate=candidate,
    comparisons=comparisons,
    beats_every_baseline=all(c.beaten for c in comparisons) if applicable else None,
    rank1=rank1,
    rank1_difference=(mean, sd),
    rank1_within=within if math.isfinite(mean) else None,
  )


_CHOSEN_ON_GREEDY = (
  ". Sampled accuracy re-measures the models greedy accuracy chose: each method's best "
  'setting, rank-1 OTA+FFG at the best OTA+FFG density, and the automatic densities'
)


def _pct(x: float) -> str:
  return 'nan' if not math.isfinite(x) else f'{100 * x:.1f}'


def _pm(values: Sequence[float]) -> str:
  mean, sd = mm.seed_spread(values)
  return _pct(mean) + ('' if not math.isfinite(sd) else f' ± {_pct(sd)}')


def _decision_text(d: Decision, primary: bool) -> str:
  rows = [
    [c.family, f'`{c.setting}`', _pct(c.value), _pct(c.margin), _pct(c.spread), c.beaten]
    for c in d.comparisons
  ]
  verdict = {
    None: '**not applicable** (no finite margin and seed spread: fewer than two seeds, or no '
    'gain to keep)',
    True: '**holds**: OTA+FFG beats every baseline by more than the seed spread',
    False: '**fails**: OTA+FFG does not beat every baseline by more than the seed spread',
  }[d.beats_every_baseline]
  mean, sd = d.rank1_difference
  return (
    f"{'Primary' if primary else 'Secondary'} metric, {d.metric} accuracy. OTA+FFG's best "
    f'density: `{d.candidate}`.\n\n'
    + _report.markdown_table(
      [
        'baseline',
        'best setting',
        'its gain kept %',
        'OTA+FFG margin (points)',
        'seed sd of margin',
        'beaten',
      ],
      rows,
    )
    + f'\n\nRule 1: {verdict}.\n'
    f'Rule 2: `{d.rank1}` - `{d.candidate}` = {_pct(mean)} points (seed sd {_pct(sd)}): '
    + {True: '**within** one point', False: '**outside** one point', None: '**not applicable**'}[
      d.rank1_within
    ]
    + '.'
  )


def _bar_plot(values, errors, path, *, title, ylabel) -> str:
  plt = _report._pyplot()  # pylint: disable=protected-access
  fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
  names = list(values)
  ax.bar(
    range(len(names)),
    [values[n] for n in names],
    yerr=[0 if not math.isfinite(errors[n]) else errors[n] for n in names],
    color='tab:blue',
    capsize=3,
  )
  ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize=7)
  ax.axhline(100.0, color='gray', lw=0.8, ls='--')
  ax.set(title=title, ylabel=ylabel)
  ax.grid(alpha=0.3, axis='y')
  return _report._save(fig, path)  # pylint: disable=protected-access


def gain_study_report(study: GainStudy, workdir: str) -> str:
  """Markdown tables of the study, the decision rules applied, and PNG plots (in `workdir`)."""
  tasks, seeds, o = study.tasks, study.seeds, study.options
  parts = []
  lo, hi = o['base_band']
  rate_rule = (
    'no rate rule: the smallest rate'
    if o['expert_min_z'] is None
    else 'the rate rule: the smallest rate at which every expert gains >= '
    f'{o["expert_min_z"]:g} standard errors on its own task'
  )
  parts.append(
    f'Tasks: {", ".join(tasks)}. Base: {o["warmup_steps"]}-step multi-task warm-up '
    f'(mixture {o["warmup_weights"] or "uniform"}). Experts: {o["expert_steps"]} AdamW steps '
    f'at lr {study.rate:g} ({rate_rule}), seeds {list(seeds)}. Test '
    f'prompts per task: {", ".join(f"{t} {n}" for t, n in o["num_prompts"].items())}; sampled '
    f'accuracy: {o["num_samples"]} completions per prompt at temperature {o["temperature"]:g}.'
  )
  parts.append(
    f'Base accuracy (± standard error over the prompts), band [{lo:g}, {hi:g}] on greedy:\n\n'
    + _report.markdown_table(
      ['task', *study.metrics, 'in band'],
      [
        [
          t,
          *[_fmt_acc(study.base[x][t]) for x in study.metrics],
          lo <= study.base['greedy'][t].value <= hi,
        ]
        for t in tasks
      ],
    )
  )
  parts.append(
    f'Rate sweep (seed {seeds[0]}, greedy): own-task accuracy, gain over the base (z = gain / '
    'its paired standard error), ||tau|| / ||theta0||:\n\n'
    + _report.markdown_table(
      ['lr', *tasks, 'chosen'],
      [
        [
          f'{r:g}',
          *[
            f'{s[t]["accuracy"].value:.3f} ({s[t]["gain"].value:+.3f}, '
            f'z {mm.z_score(s[t]["gain"]):.1f}; '
            f'{s[t]["size"]:.3g})'
            for t in tasks
          ],
          r == study.rate,
        ]
        for r, s in sorted(study.sweep.items())
      ],
    )
  )

  def spread(values, signed=''):
    mean, sd = mm.seed_spread(values)
    return f'{mean:{signed}.3f} ± {sd:.3f}'

  parts.append(
    f'Experts at lr {study.rate:g}: own-task accuracy and greedy gain over the base (mean ± sd '
    'over seeds), task-vector size ||tau|| / ||theta0||:\n\n'
    + _report.markdown_table(
      ['task', *[f'{x} accuracy' for x in study.metrics], 'greedy gain', '||tau|| / ||theta0||'],
      [
        [
          t,
          *[spread([study.experts[x][s][t].value for s in seeds]) for x in study.metrics],
          spread(
            [study.experts['greedy'][s][t].value - study.base['greedy'][t].value for s in seeds],
            '+',
          ),
          '{:.4g} ± {:.2g}'.format(*mm.seed_spread([study.relative_size[s][t] for s in seeds])),
        ]
        for t in tasks
      ],
    )
  )
  parts.append(
    'Cosine between task vectors (mean ± sd over seeds):\n\n'
    + _report.markdown_table(
      ['pair', 'cosine'],
      [
        [
          f'{a} / {b}',
          '{:.4f} ± {:.2g}'.format(*mm.seed_spread([study.cosine[s][(a, b)] for s in seeds])),
        ]
        for a, b in itertools.combinations(tasks, 2)
      ],
    )
  )
  for x in study.metrics:
    scores = task_means(study, x)
    rows = []
    for name in study.gain_kept[x]:
      spec = study.models[name]
      cells = []
      for t in tasks:
        kept = [study.gain_kept[x][name][s][t] for s in seeds]
        mean = mm.seed_spread([k.value for k in kept])[0]
        se = mm.seed_spread([k.se for k in kept])[0]
        cells.append(f'{_pct(mean)} ({_pct(se)})')
      se = mm.seed_spread(
        [mm.mean_over_tasks(list(study.gain_kept[x][name][s].values())).se for s in seeds]
      )[0]
      rows.append([f'`{name}`', spec.description, *cells, _pm(scores[name]), _pct(se)])
    parts.append(
      f'Gain kept, {x} accuracy: (model - base) / (expert - base) in % per task, mean over '
      "seeds (in brackets one seed's standard error over the prompts, delta method); the mean "
      "over tasks ± its sd over seeds, and one seed's prompt standard error of that mean. "
      'Grafts are one model per task, each scored on its own task'
      + (_CHOSEN_ON_GREEDY if x == 'sampled' and o['sampled_models'] == 'best' else '')
      + ':\n\n'
      + _report.markdown_table(['model', 'what', *tasks, 'mean over tasks', 'prompt se'], rows)
    )
  families = list(dict.fromkeys(spec.family for spec in study.models.values()))
  best = {}
  for x in study.metrics:
    scores = task_means(study, x)
    best[x] = {f: mm.best_setting(scores, _family(study, f, x)) for f in families}
  parts.append(
    'Best setting per method (highest mean gain kept over seeds), mean ± seed sd in %:\n\n'
    + _report.markdown_table(
      ['method', *[f'{x}: best setting' for x in study.metrics], *study.metrics],
      [
        [
          f,
          *[f'`{best[x][f]}`' for x in study.metrics],
          *[_pm(task_means(study, x)[best[x][f]]) for x in study.metrics],
        ]
        for f in families
      ],
    )
  )
  parts.append(
    '### Decision rules, applied as written\n\n'
    + '\n\n'.join(_decision_text(decide(study, x), x == 'greedy') for x in study.metrics)
  )
  auto_rows = []
  for rule, by_seed in study.auto_density.items():
    for x in study.metrics:
      scores = task_means(study, x)
      for auto, family in ((f'ota_ffg_{rule}', CANDIDATE), (f'ffg_graft_{rule}', 'FFG graft')):
        hand = mm.best_setting(scores, _family(study, family, x))
        mean, sd, _ = mm.within_points(scores, auto, hand)
        auto_rows.append(
          [
            f'`{auto}`',
            x,
            ', '.join(
              f'{t} {mm.seed_spread([by_seed[s][t] for s in seeds])[0]:.3f}' for t in tasks
            ),
            _pm(scores[auto]),
            f'`{hand}` {_pm(scores[hand])}',
            _pct(mean) + ('' if not math.isfinite(sd) else f' ± {_pct(sd)}'),
          ]
        )
  if auto_rows:
    parts.append(
      'Automatic density (per expert, from its own nu tau^2, no held-out data) against the best '
      'hand-picked density of the same method (which the test prompts chose): gain kept in %, '
      'mean ± seed sd; the difference is auto - hand-picked, per seed:\n\n'
      + _report.markdown_table(
        ['model', 'metric', 'density kept per expert', 'auto', 'best hand-picked', 'auto - hand'],
        auto_rows,
      )
    )

  scores = task_means(study, 'greedy')
  b = best['greedy']
  bar = _bar_plot(
    {f: 100 * mm.seed_spread(scores[b[f]])[0] for f in families},
    {f: 100 * mm.seed_spread(scores[b[f]])[1] for f in families},
    os.path.join(workdir, 'merge_gain_kept.png'),
    title="gain kept at each method's best setting (greedy; bars: seed sd)",
    ylabel="% of the expert's gain",
  )
  curves = {}
  for f in families:
    swept = [n for n in _family(study, f, 'greedy') if isinstance(study.models[n].setting, float)]
    if len(swept) > 1:
      xs = [study.models[n].setting for n in swept]
      curves[f] = (xs, [100 * mm.seed_spread(scores[n])[0] for n in swept])
  parts_png = [f'![gain kept]({os.path.basename(bar)})']
  if curves:
    sweep = _report.plot_curves(
      curves,
      os.path.join(workdir, 'merge_gain_sweeps.png'),
      title='sweeps (greedy, mean over seeds)',
      xlabel='scale (task arithmetic) / density',
      ylabel="% of the expert's gain kept",
    )
    parts_png.append(f'![sweeps]({os.path.basename(sweep)})')
  parts.append('\n\n'.join(parts_png))
  return '\n\n'.join(parts)
