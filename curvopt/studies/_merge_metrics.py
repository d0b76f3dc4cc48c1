"""The fine-tuning merge study's numbers, as pure functions.

- Accuracies and gains from per-prompt outcomes (1/0 for a greedy completion, the share of k
  sampled completions that are right): every model is scored on the same test prompts, so the
  prompt is the sampling unit and a difference or a ratio of two models' accuracies is a mean
  of paired per-prompt values. Standard errors are the sample spread of those values over
  sqrt(n) (for one greedy accuracy this is the binomial sqrt(p (1 - p) / n), up to
  n / (n - 1)); the share of an expert's gain that a merge keeps,
  (merged - base) / (expert - base), gets its standard error by the delta method for a ratio
  of paired means.
- Task-vector geometry: ||tau|| / ||theta0|| and the cosine between two task vectors.
- The automatic FFG density: the knee of the sorted saliency curve.
- The expert learning-rate rule and the study's two decision rules, applied to per-seed
  scores exactly as docs/merge_experiments.md states them.
"""

import dataclasses
import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np


class Estimate(NamedTuple):
  """A measured value and its standard error (nan where it is not defined)."""

  value: float
  se: float


def _outcomes(name: str, x: Any) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 1 or x.size < 2:
    raise ValueError(f'{name} must be per-prompt outcomes [n >= 2], got shape {x.shape}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} holds non-finite outcomes')
  return x


def _paired(**outcomes: Any) -> list[np.ndarray]:
  arrays = [_outcomes(name, x) for name, x in outcomes.items()]
  sizes = {name: a.size for name, a in zip(outcomes, arrays)}
  if len(set(sizes.values())) > 1:
    raise ValueError(f'paired outcomes need the same prompts; got sizes {sizes}')
  return arrays


def _mean_se(x: np.ndarray) -> Estimate:
  return Estimate(float(np.mean(x)), float(np.std(x, ddof=1) / math.sqrt(x.size)))


def accuracy_estimate(outcomes: Any) -> Estimate:
  """Mean per-prompt outcome and its standard error."""
  return _mean_se(_outcomes('outcomes', outcomes))


def gain_estimate(model: Any, base: Any) -> Estimate:
  """model - base accuracy on the same prompts, with the paired standard error."""
  m, b = _paired(model=model, base=base)
  return _mean_se(m - b)


def gain_kept(merged: Any, base: Any, expert: Any) -> Estimate:
  """(merged - base) / (expert - base) on the same prompts, with its delta-method error.

  With a_i = merged_i - base_i and d_i = expert_i - base_i the ratio is r = mean(a) / mean(d),
  and to first order r_hat - r = mean(a - r d) / mean(d), so
  se = sd(a - r d) / (sqrt(n) mean(d)): the covariance between the merged model's and the
  expert's gains over the prompts is counted, not assumed away. nan when the expert gained
  nothing (mean(d) <= 0): there is no gain to keep.
  """
  m, b, e = _paired(merged=merged, base=base, expert=expert)
  a, d = m - b, e - b
  d_mean = float(np.mean(d))
  if d_mean <= 0:
    return Estimate(math.nan, math.nan)
  r = float(np.mean(a)) / d_mean
  return Estimate(r, float(np.std(a - r * d, ddof=1) / (math.sqrt(a.size) * d_mean)))


def mean_over_tasks(estimates: Sequence[Estimate]) -> Estimate:
  """The mean of the finite estimates; tasks have disjoint prompts, so errors add in quadrature."""
  finite = [e for e in estimates if math.isfinite(e.value)]
  if not finite:
    return Estimate(math.nan, math.nan)
  se = math.sqrt(sum(e.se**2 for e in finite)) / len(finite)
  return Estimate(float(np.mean([e.value for e in finite])), se)


def seed_spread(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample standard deviation) of the finite values; the sd is nan below two."""
  finite = np.asarray([v for v in values if math.isfinite(v)], np.float64)
  if not finite.size:
    return math.nan, math.nan
  return float(np.mean(finite)), float(np.std(finite, ddof=1)) if finite.size > 1 else math.nan


def _leaves64(tree: Any) -> list[np.ndarray]:
  return [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]


def _task_vector(base: Any, expert: Any) -> list[np.ndarray]:
  if jax.tree.structure(base) != jax.tree.structure(expert):
    raise ValueError('base and expert are different trees')
  b, e = _leaves64(base), _leaves64(expert)
  shapes = [(x.shape, y.shape) for x, y in zip(b, e) if x.shape != y.shape]
  if shapes:
    raise ValueError(f'base and expert leaves differ in shape: {shapes[:3]}')
  return [y - x for x, y in zip(b, e)]


def _norm(leaves: Sequence[np.ndarray]) -> float:
  return math.sqrt(sum(float(np.dot(x, x)) for x in leaves))


def relative_size(base: Any, expert: Any) -> float:
  """||theta_t - theta0|| / ||theta0|| over all leaves (fp64)."""
  return _norm(_task_vector(base, expert)) / _norm(_leaves64(base))


def task_vector_cosine(base: Any, expert_a: Any, expert_b: Any) -> float:
  """Cosine between the task vectors theta_a - theta0 and theta_b - theta0 (fp64)."""
  a, b = _task_vector(base, expert_a), _task_vector(base, expert_b)
  norms = _norm(a) * _norm(b)
  if norms == 0:
    return math.nan
  return sum(float(np.dot(x, y)) for x, y in zip(a, b)) / norms


def knee_threshold(saliencies: Any) -> float:
  """The FFG cutoff at the knee of the sorted saliency curve: the mean saliency.

  Sort the N saliencies in decreasing order and let F(k) be the share of their total held by
  the first k. The knee, the k farthest above the diagonal k / N (the Kneedle point of a
  concave curve), is where F's increment s_(k) / S falls below 1 / N: the entries above the
  mean saliency S / N. Keeping s >= mean therefore keeps the knee's entries, with no held-out
  data, no tuned constant and no sort. Where saliency is spread evenly the knee keeps about
  half the entries; the more a few entries dominate, the fewer it keeps.
  """
  leaves = _leaves64(saliencies)
  count = sum(x.size for x in leaves)
  if not count:
    raise ValueError('knee_threshold needs at least one saliency')
  total = sum(float(np.sum(x)) for x in leaves)
  if not math.isfinite(total) or any(float(np.min(x, initial=0.0)) < 0 for x in leaves):
    raise ValueError('saliencies must be finite and non-negative')
  return total / count


def mask_density(mask: Any) -> float:
  """The kept fraction of all entries of a bool mask pytree."""
  leaves = [np.asarray(x).astype(bool) for x in jax.tree.leaves(mask)]
  size = sum(x.size for x in leaves)
  return sum(int(np.sum(x)) for x in leaves) / size if size else math.nan


AUTO_RULES = ('knee', 'mass<share>')


def parse_auto_rule(rule: str) -> tuple[str, float | None]:
  """'knee' -> ('knee', None); 'mass0.9' -> ('mass', 0.9) (FFG's kept saliency share)."""
  if rule == 'knee':
    return 'knee', None
  match = re.fullmatch(r'mass(\d*\.?\d+)', str(rule))
  if match and 0 < float(match.group(1)) <= 1:
    return 'mass', float(match.group(1))
  raise ValueError(
    f'unknown automatic density rule {rule!r}; valid: {list(AUTO_RULES)} (share in (0, 1])'
  )


def z_score(estimate: Estimate) -> float:
  """value / se: +-inf for a nonzero value without spread, nan for 0 / 0."""
  if estimate.se:
    return estimate.value / estimate.se
  return math.copysign(math.inf, estimate.value) if estimate.value else math.nan


def clearly_better(estimate: Estimate, min_z: float) -> bool:
  """A positive gain at least min_z standard errors above 0."""
  return estimate.value > 0 and estimate.value >= min_z * estimate.se


def choose_rate(
  gains: Mapping[float, Mapping[str, Estimate]], *, min_z: float | None
) -> float | None:
  """The smallest rate at which every task's expert is clearly better than the base.

  Args:
    gains: rate -> task -> the expert's gain over the base on its own task.
    min_z: the gain must reach min_z standard errors; None takes the smallest rate untested.

  Returns:
    The rate, or None when no rate passes.
  """
  if not gains:
    raise ValueError('choose_rate needs at least one rate')
  for rate in sorted(gains):
    if min_z is None or all(clearly_better(g, min_z) for g in gains[rate].values()):
      return rate
  return None


def best_setting(scores: Mapping[str, Sequence[float]], names: Sequence[str]) -> str:
  """The name with the highest mean over seeds (the first on ties; nan counts as lowest)."""
  if not names:
    raise ValueError('best_setting needs at least one name')

  def key(name):
    mean = seed_spread(scores[name])[0]
    return -math.inf if math.isnan(mean) else mean

  return max(names, key=key)


def _differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
  if len(a) != len(b):
    raise ValueError(f'per-seed scores differ in length: {len(a)} vs {len(b)}')
  return [x - y for x, y in zip(a, b)]


@dataclasses.dataclass(frozen=True)
class Comparison:
  """The candidate against one baseline family's best setting, over paired seeds."""

  family: str
  setting: str  # the family's best setting (a model name)
  value: float  # that setting's mean over seeds
  margin: float  # mean over seeds of candidate - baseline
  spread: float  # sample sd over seeds of candidate - baseline

  @property
  def beaten(self) -> bool:
    return self.margin > self.spread  # False when either is nan


def compare_to_baselines(
  scores: Mapping[str, Sequence[float]], candidate: str, baselines: Mapping[str, Sequence[str]]
) -> list[Comparison]:
  """The first decision rule's comparisons: candidate vs each family's best setting.

  Args:
    scores: model name -> per-seed score (same seed order for every name), e.g. the mean
      over tasks of the gain kept.
    candidate: the candidate's model name (its best setting, chosen by the caller).
    baselines: family -> the model names of its settings.
  """
  out = []
  for family, names in baselines.items():
    best = best_setting(scores, names)
    margin, spread = seed_spread(_differences(scores[candidate], scores[best]))
    out.append(Comparison(family, best, seed_spread(scores[best])[0], margin, spread))
  return out


def within_points(
  scores: Mapping[str, Sequence[float]], a: str, b: str, *, points: float = 1.0
) -> tuple[float, float, bool]:
  """(mean, sd) over seeds of a - b, and whether |mean| <= points / 100 (scores as fractions)."""
  mean, sd = seed_spread(_differences(scores[a], scores[b]))
  return mean, sd, bool(abs(mean) <= points / 100 + 1e-12)  # not undone by rounding
