"""Streaming merge: a few leaves of every input in memory, never a model.

`merge_streaming` visits the leaves in batches of about `batch_bytes` (over
all inputs), reads each batch from every reader (the next batch is read on
a background thread while the current one merges), calls the operator's
per-leaf core (`linear_leaf`, `ota_leaf`, ...) on each leaf, and hands each
result to the writer at once. Peak memory is about two batches plus the
largest leaf's outputs, whatever the model size. A global FFG cutoff needs
every saliency first: it is found in two extra streamed passes
(`_stream_cutoff`), exact for a density.

Options follow mergekit: any option may be a list of rules
`[{'filter': REGEX, 'value': x}, ..., {'value': default}]`, resolved per
tensor (the first rule whose regex `re.search`es the name wins), and
per-expert options (weights, density, drop, scales, ...) are lists with one
such value per expert. `include` / `exclude` choose the merged tensors
(others are copied from the base, or expert 0 without one); per-expert
`expert_include` / `expert_exclude` leave an expert out of some tensors.
"""

import concurrent.futures
import dataclasses
import inspect
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.merge import _dare
from curvopt.merge import _ffg
from curvopt.merge import _fisher_merge
from curvopt.merge import _linear
from curvopt.merge import _lowrank
from curvopt.merge import _options
from curvopt.merge import _ota
from curvopt.merge import _ota_ffg
from curvopt.merge import _radix
from curvopt.merge import _rank1
from curvopt.merge import _sources
from curvopt.merge import _stream_cutoff
from curvopt.merge import _ties
from curvopt.merge import _topk
from curvopt.merge import _tree

EXTRA_TENSORS = ('error', 'drop')
METHODS = ('linear', 'task_arithmetic', 'ties', 'dare', 'fisher', 'ota', 'ffg_graft')
# Methods that read a base model, and those that read second moments.
_NEEDS_BASE = ('task_arithmetic', 'ties', 'dare', 'ffg_graft')
_NEEDS_MOMENTS = ('fisher', 'ota')
# Options with one entry per expert (subset when a tensor leaves some out).
PER_EXPERT_OPTIONS = (
  'weights',
  'density',
  'drop',
  'scales',
  'bias_correction',
  'mass',
  'threshold',
)


@dataclasses.dataclass
class StreamResult:
  """What a streaming merge did."""

  names: tuple[str, ...]  # tensors written, in order
  merged: tuple[str, ...]  # of those, the ones merged (not copied)
  thresholds: tuple[float | None, ...] | None  # global FFG cutoffs
  passes: int  # reads of the inputs (1, or 3 with a global FFG density)
  bytes_read: int
  dropped: tuple[tuple[str, ...], ...] = ()  # per expert, tensors the reference lacks


class MemoryWriter:
  """Collects the outputs in a dict (tests, small models)."""

  def __init__(self):
    self.values: dict[str, Any] = {}

  def write(self, name: str, value: Any) -> None:
    self.values[name] = value

  def tree(self) -> dict[str, Any]:
    return _sources.unflatten_names(self.values)


# Each method's per-leaf core: its keyword options are the method's options.
_LEAF_CORES = {
  'linear': _linear.linear_leaf,
  'task_arithmetic': _linear.task_arithmetic_leaf,
  'ties': _ties.ties_leaf,
  'dare': _dare.dare_leaf,
  'fisher': _fisher_merge.fisher_leaf,
  'ota': _ota.ota_leaf,
  'ffg_graft': None,  # options through ffg=
}
# Leaf-core arguments a streaming merge supplies itself.
_SUPPLIED = ('name', 'masks', 'index')
REQUIRED = inspect.Parameter.empty


def method_options(method: str) -> dict[str, Any]:
  """The options a streaming merge accepts for `method`, with their defaults
  (`REQUIRED` where the method has none, e.g. ties' density).

  Raises:
    ValueError: an unknown method.
  """
  _options.choice(method, METHODS, what='method')
  core = _LEAF_CORES[method]
  if core is None:
    return {}
  return {
    name: param.default
    for name, param in inspect.signature(core).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in _SUPPLIED
  }


def check_options(method: str, options: Mapping[str, Any], *, renamed=None) -> None:
  """Unknown option names fail with the method's valid ones.

  `renamed` maps an option name as the caller spells it to the leaf core's
  (e.g. {'seed': 'key'} for dare in a spec)."""
  valid = dict(method_options(method))
  for outer, inner in (renamed or {}).items():
    if inner in valid:
      valid[outer] = valid.pop(inner)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(
      f'unknown option{"s" if len(unknown) > 1 else ""} {", ".join(map(repr, unknown))} for '
      f'method {method!r}; valid: {sorted(valid) or "none (ffg_graft takes ffg options)"}'
    )
  missing = sorted(k for k, v in valid.items() if v is REQUIRED and k not in options)
  if missing:
    raise ValueError(f'method {method!r} needs the option(s) {missing}')


def _is_rules(value: Any) -> bool:
  return (
    isinstance(value, (list, tuple))
    and bool(value)
    and all(isinstance(r, Mapping) and 'value' in r for r in value)
  )


def resolve(value: Any, name: str, *, what: str = 'option') -> Any:
  """`value` for the tensor `name`: itself, or the first matching rule's."""
  if not _is_rules(value):
    return value
  for rule in value:
    pattern = rule.get('filter')
    if pattern is None or re.search(pattern, name):
      return rule['value']
  raise ValueError(
    f'no rule of {what} matches the tensor {name!r} and none '
    f'is a default (without filter): {value!r}'
  )


def _leaf_options(
  options: Mapping[str, Any], name: str, keep: Sequence[int], num: int
) -> dict[str, Any]:
  out = {}
  for key, value in options.items():
    value = resolve(value, name, what=key)
    if key in PER_EXPERT_OPTIONS and isinstance(value, (list, tuple)) and not _is_rules(value):
      if len(value) != num:
        raise ValueError(f'{key} needs a scalar or one value per expert ({num}), got {value!r}')
      value = [resolve(value[t], name, what=f'{key} of expert {t}') for t in keep]
    out[key] = value
  return out


def _matches(patterns: Sequence[str] | None, name: str) -> bool:
  return any(re.search(p, name) for p in patterns or ())


def _is_float(dtype) -> bool:
  return jnp.issubdtype(np.dtype(dtype), jnp.floating)


def _check_specs(reference, reader, names, *, what, moment=False):
  """Checks `reader`'s shapes (and dtypes) against `reference`; returns the
  names whose floating dtype differs (merged after a cast to fp32)."""
  mixed = set()
  for name in names:
    try:
      got = reader.spec(name)
    except ValueError as e:
      raise ValueError(f'{what}: {e}') from e
    want = reference.spec(name)
    if tuple(got.shape) != tuple(want.shape):
      raise ValueError(
        f'{what} at tensor {name!r} has shape '
        f'{tuple(got.shape)}, the reference has '
        f'{tuple(want.shape)}'
      )
    if moment or np.dtype(got.dtype) == np.dtype(want.dtype):
      continue
    if _is_float(got.dtype) and _is_float(want.dtype):
      mixed.add(name)
      continue
    raise ValueError(
      f'{what} at tensor {name!r} has dtype {got.dtype}, the reference has {want.dtype}'
    )
  return mixed


def _extra_tensors(reference, reader, *, what, reference_what, extra):
  """The tensors of `reader` that the reference lacks: an error, or dropped."""
  names = set(reference.names)
  found = [n for n in reader.names if n not in names]
  if found and extra == 'error':
    raise ValueError(
      f'{what} ({reader.description}) has {len(found)} tensors that {reference_what} lacks, '
      f'e.g. {found[:5]}; the merge would lose them: drop them explicitly with '
      "extra_tensors='drop' (--config.extra_tensors=drop), or merge without that expert"
    )
  return found


def _batches(names, sizes, batch_bytes):
  batch, size = [], 0
  for name in names:
    if batch and size + sizes[name] > batch_bytes:
      yield batch
      batch, size = [], 0
    batch.append(name)
    size += sizes[name]
  if batch:
    yield batch


@dataclasses.dataclass
class _Plan:
  method: str
  names: tuple[str, ...]
  merged: frozenset
  experts_of: dict[str, tuple[int, ...]]  # tensor -> participating experts
  base: Any
  experts: tuple
  moments: tuple | None
  rank1: bool
  place: Callable[[str, Any], Any]
  mixed: frozenset = frozenset()  # tensors whose inputs differ in float dtype
  moment_rank: int | None = None

  def load(self, name: str, value: Any) -> Any:
    """A base or expert tensor, placed; in fp32 where the inputs' float
    dtypes differ (the operators compute in fp32 anyway)."""
    value = self.place(name, value)
    return value.astype(jnp.float32) if name in self.mixed else value


def _read_batch(plan: _Plan, batch: list[str], *, moments: bool):
  """{'base': {...}, 'experts': [{...}], 'moments': [{...}]} for a batch."""
  num = len(plan.experts)
  wanted = [[n for n in batch if t in plan.experts_of.get(n, ())] for t in range(num)]
  out = {'base': {}, 'experts': [], 'moments': []}
  nbytes = 0
  if plan.base is not None:
    out['base'] = plan.base.read(batch)
    nbytes += sum(plan.base.nbytes(n) for n in batch)
  else:
    wanted[0] = list(batch)
  for t, reader in enumerate(plan.experts):
    out['experts'].append(reader.read(wanted[t]))
    nbytes += sum(reader.nbytes(n) for n in wanted[t])
    if moments and plan.moments is not None:
      names = [n for n in wanted[t] if t in plan.experts_of.get(n, ())]
      out['moments'].append(plan.moments[t].read(names))
      nbytes += sum(plan.moments[t].nbytes(n) for n in names)
  return out, nbytes


def _moment(plan, values, t, name):
  v = values['moments'][t][name]
  if _rank1.is_rank1(v):
    return v
  v = plan.place(name, v)
  if plan.rank1 and np.ndim(v) == 2:
    return _rank1.rank1_compress_leaf(v, name=name, index=t)
  if plan.moment_rank and np.ndim(v) == 2:
    return _lowrank.lowrank_moment_leaf(v, plan.moment_rank, name=name)
  return v


def _stream(plan: _Plan, names, *, moments: bool, batch_bytes: int, prefetch: bool):
  """Yields (batch, values, nbytes) with the next batch read ahead."""
  sizes = {}
  for n in names:
    size = plan.experts[0].nbytes(n) * (len(plan.experts) + 1)
    if moments and plan.moments is not None:
      size += sum(m.nbytes(n) for m in plan.moments if n in m)
    sizes[n] = size
  batches = list(_batches(names, sizes, batch_bytes))
  if not prefetch:
    for batch in batches:
      yield (batch,) + _read_batch(plan, batch, moments=moments)
    return
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = None
    for i, batch in enumerate(batches):
      if pending is None:
        pending = pool.submit(_read_batch, plan, batch, moments=moments)
      values, nbytes = pending.result()
      pending = (
        pool.submit(_read_batch, plan, batches[i + 1], moments=moments)
        if i + 1 < len(batches)
        else None
      )
      yield batch, values, nbytes


def _ffg_selectors(ffg: Mapping[str, Any], num: int):
  kinds = [k for k in ('density', 'mass', 'threshold') if ffg.get(k) is not None]
  if len(kinds) != 1:
    raise ValueError(f'ffg needs exactly one of density, mass and threshold, got {dict(ffg)!r}')
  kind = kinds[0]
  value = ffg[kind]
  values = list(value) if isinstance(value, (list, tuple)) else [value] * num
  if len(values) != num:
    raise ValueError(f'ffg {kind} needs a scalar or one value per expert ({num}), got {value!r}')
  return kind, values


def _each_saliency(plan, names, score, batch_bytes, prefetch, wanted, use):
  """One pass over the inputs: use(t, saliency) for every tensor of every
  expert t with wanted(t). Returns the bytes read."""
  nbytes = 0
  for batch, got, size in _stream(
    plan, names, moments=score == 'fisher', batch_bytes=batch_bytes, prefetch=prefetch
  ):
    nbytes += size
    for name in batch:
      base = plan.load(name, got['base'][name])
      for t in plan.experts_of[name]:
        if not wanted(t):
          continue
        moment = _moment(plan, got, t, name) if score == 'fisher' else None
        use(
          t,
          _ffg.ffg_saliency(
            base,
            plan.load(name, got['experts'][t][name]),
            moment,
            score=score,
            name=name,
            index=t,
          ),
        )
  return nbytes


def _sampled_cutoffs(plan, names, densities, score, batch_bytes, prefetch):
  """Per-expert cutoffs as `ffg_threshold(..., quantile='sampled')`: one
  pass, or None where a model is too small to sample (then exact)."""
  num = len(plan.experts)
  specs = [[plan.experts[t].spec(n) for n in names if t in plan.experts_of[n]] for t in range(num)]
  strides = [_ffg.sample_stride(specs[t]) for t in range(num)]
  if not all(strides):
    return None
  parts = [[] for _ in range(num)]
  nbytes = _each_saliency(
    plan,
    names,
    score,
    batch_bytes,
    prefetch,
    lambda t: True,
    lambda t, s: parts[t].append(jnp.ravel(s)[:: strides[t]]),
  )
  cutoffs = [
    float(
      _ffg.sampled_threshold(parts[t], _ffg.sampled_rank(specs[t], float(densities[t]), strides[t]))
    )
    for t in range(num)
  ]
  return cutoffs, 1, nbytes


def _exact_cutoffs(plan, names, totals, densities, score, batch_bytes, prefetch):
  """Per-expert global density cutoffs by the two-pass radix select
  (`_radix`): each pass reads every tensor once, computes every expert's
  saliencies and adds their histograms up on the device; the host only
  picks a bin between the passes. Exact: `ffg_threshold`'s cutoff."""
  num = len(plan.experts)
  selects = [
    _radix.Select(
      int(_topk.num_kept(_options.density(densities[t], 1, what='density')[0], totals[t])),
      totals[t],
    )
    for t in range(num)
  ]
  passes, nbytes = 0, 0
  for stage in (0, 1):
    if all(s.done for s in selects):
      break
    passes += 1
    prefixes = np.asarray([s.prefix for s in selects], np.int32)
    counts = _radix.Totals(num, _radix.bins(stage))
    for batch, got, size in _stream(
      plan, names, moments=score == 'fisher', batch_bytes=batch_bytes, prefetch=prefetch
    ):
      nbytes += size
      checks = _tree.ValueChecks()
      for name in batch:
        keep = tuple(t for t in plan.experts_of[name] if not selects[t].done)
        if not keep:
          continue
        base = plan.place(name, got['base'][name])
        experts = tuple(plan.place(name, got['experts'][t][name]) for t in keep)
        moments = tuple(_moment(plan, got, t, name) if score == 'fisher' else None for t in keep)
        entries = int(np.size(base))
        if entries > _radix.MAX_ROW:
          rows = _ffg.saliency_histograms(
            (base,),
            tuple((e,) for e in experts),
            tuple((v,) for v in moments),
            prefixes[list(keep)],
            score=score,
            stage=stage,
          )
          for i, t in enumerate(keep):
            counts.add_host(t, rows[i])
          checked = stage == 0 and score == 'fisher'
          ok = _tree.moments_ok(moments) if checked else np.ones(len(keep), bool)
        else:
          device, ok = _ffg.leaf_histograms_into(
            counts.device(entries),
            base,
            experts,
            moments,
            prefixes,
            score=score,
            stage=stage,
            keep=keep,
          )
          counts.update(device)
        checks.add(
          ok, lambda i, name=name, keep=keep: _tree.moment_message(name, 'second moment')(keep[i])
        )
      # Once per batch: a bad moment stops the pass early, and the device
      # work of a batch is dispatched before the host waits on it.
      checks.raise_if_failed()
    for select, hist in zip(selects, counts.result()):
      select.feed(hist)
  return [float(s.value) for s in selects], passes, nbytes


def _global_cutoffs(plan, kind, values, score, batch_bytes, prefetch, quantile):
  """Per-expert global cutoffs, streamed (two passes unless trivial; one
  with quantile='sampled')."""
  num = len(plan.experts)
  names = [n for n in plan.names if n in plan.merged]
  if quantile == 'sampled' and kind == 'density':
    sampled = _sampled_cutoffs(plan, names, values, score, batch_bytes, prefetch)
    if sampled is not None:
      return sampled
  totals = [0] * num
  for name in plan.merged:
    for t in plan.experts_of[name]:
      totals[t] += int(np.prod(plan.experts[t].spec(name).shape, dtype=np.int64))
  if kind == 'density':
    return _exact_cutoffs(plan, names, totals, values, score, batch_bytes, prefetch)
  cutoffs = [
    _stream_cutoff.StreamedCutoff(total=totals[t], **{kind: values[t]}) for t in range(num)
  ]
  passes, nbytes = 0, 0
  while not all(c.done for c in cutoffs):
    passes += 1
    nbytes += _each_saliency(
      plan,
      names,
      score,
      batch_bytes,
      prefetch,
      lambda t: not cutoffs[t].done,
      lambda t, s: cutoffs[t].add(s),
    )
    for c in cutoffs:
      c.end_pass()
  return [c.threshold for c in cutoffs], passes, nbytes


def _leaf_masks(name, base, experts, moments, ffg, kind, values, cutoffs, keep):
  """FFG masks of one tensor for the participating experts."""
  if ffg is None:
    return None
  score = ffg.get('score', 'fisher')
  masks = []
  for i, t in enumerate(keep):
    moment = moments[i] if score == 'fisher' else None
    if cutoffs is not None:
      if cutoffs[t] == float('inf'):
        masks.append(jnp.zeros(base.shape, bool))
        continue
      selector = {'threshold': cutoffs[t]}
    else:
      selector = {kind: resolve(values[t], name, what=f'ffg {kind}')}
    masks.append(
      _ffg.ffg_mask_leaf(base, experts[i], moment, score=score, name=name, index=t, **selector)
    )
  return masks


def _merge_leaf(plan, name, got, options, keep, ffg, kind, values, cutoffs):
  num = len(plan.experts)
  opts = _leaf_options(options, name, keep, num)
  method = plan.method
  base = plan.load(name, got['base'][name]) if plan.base is not None else None
  experts = [plan.load(name, got['experts'][t][name]) for t in keep]
  moments = None
  if method in _NEEDS_MOMENTS or (ffg is not None and ffg.get('score', 'fisher') == 'fisher'):
    moments = [_moment(plan, got, t, name) for t in keep]
  if method == 'linear':
    return _linear.linear_leaf(experts, name=name, **opts)
  if method == 'task_arithmetic':
    return _linear.task_arithmetic_leaf(base, experts, name=name, **opts)
  if method == 'ties':
    return _ties.ties_leaf(base, experts, name=name, **opts)
  if method == 'dare':
    key = opts.pop('key')
    return _dare.dare_leaf(base, experts, key=_dare.leaf_key(key, name), name=name, **opts)
  if method == 'fisher':
    return _fisher_merge.fisher_leaf(experts, moments, name=name, **opts)
  if method == 'ota' and cutoffs is not None:
    # The masks fused into the merge's pass: no bool mask per expert.
    return _ota_ffg.ota_ffg_leaf(
      base,
      experts,
      moments,
      cutoffs=[cutoffs[t] for t in keep],
      score=ffg.get('score', 'fisher'),
      name=name,
      **opts,
    )
  masks = _leaf_masks(name, base, experts, moments, ffg, kind, values, cutoffs, keep)
  if method == 'ffg_graft':
    return _ffg.ffg_graft_leaf(base, experts[0], masks[0], name=name)
  return _ota.ota_leaf(base, experts, moments, masks=masks, name=name, **opts)


def _placer(sharding):
  if sharding is None:
    return lambda name, x: x if isinstance(x, jax.Array) else jnp.asarray(x)
  if isinstance(sharding, jax.sharding.Sharding):
    return lambda name, x: jax.device_put(x, sharding)
  return lambda name, x: jax.device_put(x, sharding(name, np.shape(x)))


def merge_streaming(
  method: str,
  experts: Sequence[_sources.LeafReader],
  writer: Any,
  *,
  base: _sources.LeafReader | None = None,
  moments: Sequence[_sources.LeafReader] | None = None,
  options: Mapping[str, Any] | None = None,
  ffg: Mapping[str, Any] | None = None,
  rank1: bool = False,
  include: Sequence[str] | None = None,
  exclude: Sequence[str] | None = None,
  expert_include: Sequence[Any] | None = None,
  expert_exclude: Sequence[Any] | None = None,
  sharding: Any = None,
  batch_bytes: int = 1 << 28,
  prefetch: bool = True,
  progress: Callable[[str], None] | None = None,
  dtype: Any = None,
  extra_tensors: str = 'error',
  moment_rank: int | None = None,
) -> StreamResult:
  """Merges models tensor by tensor from readers into a writer.

  The result equals the in-memory operator on the same inputs (`linear`,
  `task_arithmetic`, `ties`, `dare`, `fisher`, `ota` with or without FFG
  masks, `ffg_graft`), leaf for leaf.

  Args:
    method: one of METHODS.
    experts: T >= 1 readers (`SafetensorsReader`, `orbax_params_reader`,
      `TreeReader`) with the same tensor names and shapes. Floating dtypes
      may differ between the inputs: a tensor whose inputs differ is merged
      from their fp32 values and written in the output dtype.
    writer: anything with `write(name, array)` (`SafetensorsWriter`,
      `OrbaxWriter`, `MemoryWriter`); it receives every tensor of the
      reference (base, else expert 0), in the reference's order.
    base: reader of the base model; needed by task_arithmetic, ties, dare,
      ffg_graft and FFG, optional for ota (theta0 + ...).
    moments: T readers of second moments (Adam nu, exp_avg_sq, a Fisher)
      named like the weights; needed by fisher, ota and FFG's fisher score.
    options: keyword options of the method's leaf core (e.g. `weights`,
      `density`, `scale`, `power`, `eps`, `normalise`; dare's `key` is the
      merge's key, folded per tensor like `dare`). Values may be rule lists
      and per-expert lists (module docstring).
    ffg: for ota / ffg_graft: {'density' | 'mass' | 'threshold': scalar or
      one per expert, 'scope': 'global' (default) or 'per_tensor',
      'score': 'fisher' (default) or 'magnitude', 'quantile': 'exact'
      (default; the global density cutoff in two passes) or 'sampled'
      (`ffg_threshold`'s sampled quantile, in one pass)}.
    rank1: compress every 2-D second moment to its rank-1 factors as it is
      read (`rank1_compress`), before FFG and OTA use it.
    moment_rank: instead, replace every 2-D second moment by its rank-r SVD
      fit as it is read (`lowrank_moment`, the OTA reference's `rank`).
    include: regexes; only matching tensors are merged (None: all).
    exclude: regexes; matching tensors are not merged. Tensors not merged
      are copied from the base (expert 0 without a base).
    expert_include: per expert, None or regexes of the tensors it joins.
    expert_exclude: per expert, None or regexes of tensors it stays out of.
      A tensor no expert joins is copied.
    sharding: None (default device), a `jax.sharding.Sharding` for every
      leaf, or `fn(name, shape) -> Sharding`; leaves are placed so as they
      are read and merged sharded.
    batch_bytes: bytes read per batch (over all inputs); at least one tensor.
    prefetch: read the next batch on a thread while merging this one.
    progress: called with each tensor's name once it is written.
    dtype: the dtype of every floating output tensor (merged or copied);
      None: the reference's dtype, tensor by tensor. A tensor whose inputs
      have another dtype is merged from their fp32 values.
    extra_tensors: what to do with an expert's tensors that the reference
      lacks (e.g. an untied `lm_head.weight` beside a tied base): 'error'
      (default, naming them) or 'drop' (listed in `StreamResult.dropped`).

  Returns:
    A `StreamResult`.

  Raises:
    ValueError: an unknown method; missing inputs; a tensor that an input
      lacks or holds with another shape or dtype (named); bad options.
  """
  _options.choice(method, METHODS, what='method')
  experts = tuple(experts)
  if not experts:
    raise ValueError('merge_streaming needs at least one expert reader')
  num = len(experts)
  if method in _NEEDS_BASE and base is None:
    raise ValueError(f'method {method!r} needs a base model reader')
  if method == 'ffg_graft' and num != 1:
    raise ValueError(f'ffg_graft grafts one expert, got {num}')
  if method == 'ffg_graft' and ffg is None:
    raise ValueError('ffg_graft needs ffg= options (density, mass or threshold)')
  if ffg is not None and method not in ('ota', 'ffg_graft'):
    raise ValueError(f'ffg masks apply to ota and ffg_graft, not {method!r}')
  if ffg is not None and base is None:
    raise ValueError('FFG needs a base model reader (task vectors)')
  score = (ffg or {}).get('score', 'fisher')
  needs_moments = method in _NEEDS_MOMENTS or (ffg is not None and score == 'fisher')
  if needs_moments and (moments is None or len(moments) != num):
    raise ValueError(
      f'method {method!r} needs one second-moment reader per '
      f'expert ({num}), got '
      f'{None if moments is None else len(moments)}'
    )
  options = dict(options or {})
  if method == 'dare' and 'key' not in options:
    raise ValueError("dare needs options['key'], a jax PRNG key")
  check_options(method, options)
  reference = base if base is not None else experts[0]
  names = reference.names
  merged = [
    n for n in names if (include is None or _matches(include, n)) and not _matches(exclude, n)
  ]
  for which, patterns in (('expert_include', expert_include), ('expert_exclude', expert_exclude)):
    if patterns is not None and len(patterns) != num:
      raise ValueError(f'{which} needs one entry per expert ({num}), got {len(patterns)}')
  experts_of = {}
  for name in merged:
    keep = tuple(
      t
      for t in range(num)
      if (expert_include is None or expert_include[t] is None or _matches(expert_include[t], name))
      and not (expert_exclude is not None and _matches(expert_exclude[t], name))
    )
    if keep:
      experts_of[name] = keep
  merged = [n for n in merged if n in experts_of]
  _options.choice(extra_tensors, EXTRA_TENSORS, what='extra_tensors')
  if moment_rank is not None:
    if rank1:
      raise ValueError('give rank1 or moment_rank, not both')
    moment_rank = _lowrank.check_rank(moment_rank)
  out_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
  if out_dtype is not None and not _is_float(out_dtype):
    raise ValueError(f'the output dtype must be a floating dtype, got {dtype!r}')
  mixed, dropped = set(), []
  for t, reader in enumerate(experts):
    mine = [n for n in merged if t in experts_of[n]]
    if base is None and t == 0:
      mine = list(names)
    mixed |= _check_specs(reference, reader, mine, what=f'expert {t}')
    dropped.append(
      tuple(
        _extra_tensors(
          reference,
          reader,
          what=f'expert {t}',
          reference_what='the base' if base is not None else 'expert 0',
          extra=extra_tensors,
        )
      )
    )
    if needs_moments:
      _check_specs(
        reference,
        moments[t],
        [n for n in mine if t in experts_of.get(n, ())],
        what=f'second moments of expert {t}',
        moment=True,
      )
  if out_dtype is not None:
    # Merged from fp32 inputs, rounded once to the output dtype (not first to the inputs').
    mixed |= {n for n in merged if np.dtype(reference.spec(n).dtype) != out_dtype}
  plan = _Plan(
    method,
    tuple(names),
    frozenset(merged),
    experts_of,
    base,
    experts,
    tuple(moments) if needs_moments else None,
    bool(rank1),
    _placer(sharding),
    frozenset(mixed),
    moment_rank,
  )

  kind = values = cutoffs = None
  passes, nbytes = 0, 0
  if ffg is not None:
    _options.choice(ffg.get('scope', 'global'), _ffg.SCOPES, what='ffg scope')
    _options.choice(score, _ffg.SCORES, what='ffg score')
    kind, values = _ffg_selectors(ffg, num)
    if kind != 'threshold' and ffg.get('scope', 'global') == 'global':
      cutoffs, passes, nbytes = _global_cutoffs(
        plan,
        kind,
        values,
        score,
        batch_bytes,
        prefetch,
        _options.choice(ffg.get('quantile', 'exact'), _ffg.QUANTILES, what='ffg quantile'),
      )
    elif kind == 'threshold':
      cutoffs = [float(resolve(v, '', what='ffg threshold')) for v in values]

  passes += 1
  for batch, got, size in _stream(
    plan, list(names), moments=needs_moments, batch_bytes=batch_bytes, prefetch=prefetch
  ):
    nbytes += size
    for name in batch:
      if name in plan.merged:
        out = _merge_leaf(plan, name, got, options, experts_of[name], ffg, kind, values, cutoffs)
      else:
        source = got['base'] if base is not None else got['experts'][0]
        out = source[name]
      want = out_dtype if out_dtype is not None else np.dtype(reference.spec(name).dtype)
      if _is_float(want) and np.dtype(out.dtype) != want:
        out = out.astype(want)
      writer.write(name, out)
      if progress is not None:
        progress(name)
  return StreamResult(
    tuple(names),
    tuple(merged),
    None if cutoffs is None else tuple(cutoffs),
    passes,
    nbytes,
    tuple(dropped),
  )
