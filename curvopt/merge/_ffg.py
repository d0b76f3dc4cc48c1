"""Fast Fisher Grafting (FFG): keep the task-vector entries that matter.

Mahdavi et al. 2025 (arXiv 2509.11167), with OTA (`ota`).

Saliency s = v * tau^2 ('fisher', v raw or rank-1; not v^p) or |tau|
('magnitude'). With the diagonal Fisher v, s / 2 estimates how much the
expert's loss rises when that entry is reset to the base. An entry is kept
where s >= thr. With scope 'global' (the paper's) thr is one cutoff for the
whole model (`ffg_threshold`); with 'per_tensor' each tensor ranks its own
entries. The cutoff comes from one of:
- density d: keep the top round(d * N) entries (the paper's tuned knob);
- mass m: keep the fewest top entries whose saliency sums to m times the
  total, i.e. give up at most (1 - m) of the estimated loss change of the
  full graft. An automatic density choice (not the paper's): this option
  sets the density per expert from its own saliency distribution;
- threshold: an absolute cutoff, e.g. computed by a streaming pass.
The graft is theta0 + tau * mask.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.merge import _options
from curvopt.merge import _radix
from curvopt.merge import _rank1
from curvopt.merge import _topk
from curvopt.merge import _tree

F32 = jnp.float32
SCORES = ('fisher', 'magnitude')
SCOPES = ('global', 'per_tensor')
QUANTILES = ('exact', 'sampled')


def saliency(base, expert, moment, *, score: str):
  """FFG saliency of one tensor in fp32 (traceable)."""
  tau = expert.astype(F32) - base.astype(F32)
  if score == 'fisher':
    return _rank1.dense_moment(moment) * jnp.square(tau)
  return jnp.abs(tau)


def _valid(moment, score):
  if score == 'fisher':
    return _tree.moment_ok(moment)
  return jnp.asarray(True)


@functools.partial(jax.jit, static_argnames=('score',))
def _saliency_kernel(base, expert, moment, *, score):
  return saliency(base, expert, moment, score=score), _valid(moment, score)


@functools.partial(jax.jit, static_argnames=('score',))
def _threshold_mask_kernel(base, expert, moment, threshold, *, score):
  s = saliency(base, expert, moment, score=score)
  # A cutoff of +inf (density 0) keeps nothing, even a saliency that
  # overflowed to inf.
  return (s >= threshold) & (threshold < jnp.inf), _valid(moment, score)


@functools.partial(jax.jit, static_argnames=('score',))
def _count_mask_kernel(base, expert, moment, kept, *, score):
  s = saliency(base, expert, moment, score=score)
  return _topk.top_mask(s, k=kept), _valid(moment, score)


@functools.partial(jax.jit, static_argnames=('score',))
def _mass_mask_kernel(base, expert, moment, mass, *, score):
  s = saliency(base, expert, moment, score=score)
  return _topk.top_mask(s, mass=mass), _valid(moment, score)


@jax.jit
def _at_least(s, threshold):
  return s >= threshold


@jax.jit
def _sums_at_least(saliencies, threshold):
  return jnp.stack([jnp.sum(jnp.where(s >= threshold, s, 0.0)) for s in saliencies])


@jax.jit
def _graft_kernel(base, expert, mask):
  return jnp.where(mask != 0, expert, base)


_INF_BITS = _radix.INF_BITS
_SAMPLE = 1 << 16  # entries sampled by quantile='sampled'


def _bisect(passes, lo, hi):
  """`largest_passing` over the bit patterns [lo, hi], in a lax loop.

  lo and hi may be arrays: one search per entry, in one loop (`passes` then
  maps an array of candidates to an array of flags).
  """

  def body(bounds):
    lo, hi = bounds
    active = lo < hi
    mid = lo + (hi - lo + 1) // 2
    ok = passes(jax.lax.bitcast_convert_type(mid, F32))
    return (jnp.where(active & ok, mid, lo), jnp.where(active & ~ok, mid - 1, hi))

  lo, _ = jax.lax.while_loop(
    lambda b: jnp.any(b[0] < b[1]), body, (jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32))
  )
  return lo


def _sample(leaves, stride):
  """Every `stride`-th entry of each leaf, as fp32 in [0, inf]."""
  parts = [jnp.ravel(s)[::stride].astype(F32) for s in leaves]
  sample = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
  return jnp.where(sample > 0, sample, 0.0)  # NaN, -0.0 -> 0


def sample_stride(leaves) -> int:
  """The stride of the ~65k-entry saliency sample over `leaves`; 0 where
  there is no sample: small models, and Explicit-sharded leaves, which
  cannot be strided (the cutoff is then exact)."""
  total = sum(int(np.size(s)) for s in leaves)
  sampled = total > 4 * _SAMPLE and not any(
    _topk.explicit_spec(s) is not None for s in leaves if isinstance(s, jax.Array)
  )
  return total // _SAMPLE if sampled else 0


@functools.partial(jax.jit, static_argnames=('stage',))
def _value_histograms(leaves, prefixes, *, stage):
  """[1, r, bins] radix-stage histograms of saliencies given as arrays."""
  return _radix.histograms(
    [_radix.bin_index(s, prefixes[0], stage=stage) for s in leaves], stage=stage
  )[None]


@functools.partial(jax.jit, static_argnames=('score', 'stage'))
def _saliency_histograms(bases, experts_T, moments_T, prefixes_T, *, score, stage):
  """[T, r, bins] radix-stage histograms of T experts' saliencies, computed
  from their weights and moments inside the counting pass (never stored)."""
  return jnp.stack(
    [
      _radix.histograms(
        [
          _radix.bin_index(saliency(b, e, v, score=score), prefixes_T[t], stage=stage)
          for b, e, v in zip(bases, experts, moments)
        ],
        stage=stage,
      )
      for t, (experts, moments) in enumerate(zip(experts_T, moments_T))
    ]
  )


@functools.partial(jax.jit, static_argnames=('score', 'stage', 'keep'), donate_argnums=0)
def leaf_histograms_into(totals, base, experts, moments, prefixes_T, *, score, stage, keep):
  """One step of a streamed radix stage: the histograms of one tensor's
  saliencies for the experts `keep` (whose leaves `experts` and `moments`
  are), added to their rows of totals [T, bins]; with the moments'
  validity flags in stage 0 (the pass that checks them). The tensor has at
  most `_radix.MAX_ROW` entries."""
  for i, t in enumerate(keep):
    index = _radix.bin_index(
      saliency(base, experts[i], moments[i], score=score), prefixes_T[t], stage=stage
    )
    totals = totals.at[t].add(_radix.histograms([index], stage=stage)[0])
  if stage:
    return totals, jnp.ones(len(keep), bool)
  return totals, jnp.stack([_valid(v, score) for v in moments])


def saliency_histograms(bases, experts_T, moments_T, prefixes_T, *, score, stage):
  """`_saliency_histograms`: [T, r, bins] radix-stage histograms of T
  experts' saliencies over `bases`' leaves (any number of entries)."""
  return _saliency_histograms(
    tuple(bases), experts_T, moments_T, prefixes_T, score=score, stage=stage
  )


def exact_cutoffs(bases, experts_T, moments_T, densities, *, score: str) -> np.ndarray:
  """Each of T experts' global density cutoff: the k-th largest saliency
  over all its leaves, k = `num_kept(d, N)` (+inf for k = 0), by the
  two-pass radix select (`_radix`): [T] float32, a sort's k-th largest bit
  for bit. Leaves may be sharded in any way."""
  total = sum(int(np.size(b)) for b in bases)
  ks = [int(_topk.num_kept(float(d), total)) for d in densities]
  return _radix.kth_largest(
    lambda prefixes, stage: _saliency_histograms(
      tuple(bases), experts_T, moments_T, prefixes, score=score, stage=stage
    ),
    ks,
    [total] * len(ks),
  )


def _sampled_kth_largest(saliencies, rank, *, stride):
  """The rank-th largest of every stride-th saliency (fp32; +inf for rank 0)."""
  sample = _sample(saliencies, stride)
  count = rank.astype(F32)
  bits = _bisect(lambda t: jnp.sum(jnp.where(sample >= t, 1.0, 0.0)) >= count, 0, _INF_BITS)
  return jnp.where(rank >= 1, jax.lax.bitcast_convert_type(bits, F32), jnp.inf)


_sampled_threshold_kernel = jax.jit(_sampled_kth_largest, static_argnames=('stride',))


def sampled_threshold(samples, rank) -> jax.Array:
  """The rank-th largest over sample arrays already taken (fp32, +inf for
  rank 0): the last step of the sampled quantile."""
  return _sampled_threshold_kernel(tuple(samples), rank, stride=1)


@functools.partial(jax.jit, static_argnames=('score', 'stride'))
def sampled_cutoffs_kernel(bases, experts_T, moments_T, ranks_T, *, score, stride):
  """`ffg_threshold(..., quantile='sampled')` of T experts' saliencies
  (computed from their weights and moments in one strided pass each), by one
  bisection over all T samples at once: [T] fp32, +inf where a rank is 0."""
  samples = jnp.stack(
    [
      _sample(
        [_strided_saliency(b, e, v, stride, score) for b, e, v in zip(bases, experts, moments)], 1
      )
      for experts, moments in zip(experts_T, moments_T)
    ]
  )
  counts = ranks_T.astype(F32)
  num = len(experts_T)
  bits = _bisect(
    lambda t: jnp.sum(jnp.where(samples >= t[:, None], 1.0, 0.0), axis=1) >= counts,
    jnp.zeros([num], jnp.int32),
    jnp.full([num], _INF_BITS, jnp.int32),
  )
  return jnp.where(ranks_T >= 1, jax.lax.bitcast_convert_type(bits, F32), jnp.inf)


def _strided_saliency(base, expert, moment, stride, score):
  """Every stride-th saliency of one tensor, from its strided inputs."""
  if moment is not None and _rank1.is_rank1(moment):
    return jnp.ravel(saliency(base, expert, moment, score=score))[::stride]
  take = lambda x: None if x is None else jnp.ravel(x)[::stride]  # noqa: E731
  return saliency(take(base), take(expert), take(moment), score=score)


def sampled_rank(leaves, density: float, stride: int) -> np.int32:
  """The rank in a stride-`stride` sample that matches density over all."""
  sizes = [int(np.size(s)) for s in leaves]
  k = int(_topk.num_kept(density, sum(sizes))) if density > 0 else 0
  sample = sum(-(-n // stride) for n in sizes)
  return np.int32(0 if k == 0 else max(1, round(k * sample / sum(sizes))))


def largest_passing(passes: Callable[[float], bool]) -> float:
  """The largest fp32 t in [0, inf] with passes(t), for a monotone test.

  `passes` must hold at 0 and, once false, stay false for larger t (as
  "at least k values are >= t" does). Bisection over the fp32 bit patterns
  of [0, inf], which are monotone in the value: 31 evaluations, no sort
  and no copy of the values, so leaves may be sharded in any way or
  streamed from disk.

  Args:
    passes: t -> bool, monotone as above.

  Returns:
    The largest passing t as a Python float (fp32-representable).
  """
  lo, hi = 0, _INF_BITS
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if passes(float(np.int32(mid).view(np.float32))):
      lo = mid
    else:
      hi = mid - 1
  return float(np.int32(lo).view(np.float32))


def _one_selector(density, threshold, mass):
  given = {
    k: v
    for k, v in (('density', density), ('threshold', threshold), ('mass', mass))
    if v is not None
  }
  if len(given) != 1:
    raise ValueError(
      'give exactly one of density, threshold and mass; got '
      f'density={density!r}, threshold={threshold!r}, '
      f'mass={mass!r}'
    )
  ((kind, value),) = given.items()
  if kind == 'threshold':
    return kind, _options.finite(value, what='threshold')
  return kind, float(_options.density(value, 1, what=kind)[0])


def ffg_threshold(
  saliencies: Any,
  *,
  density: float | None = None,
  mass: float | None = None,
  quantile: str = 'exact',
) -> float:
  """The global FFG cutoff over all leaves of `saliencies`.

  With density d: the k-th largest saliency, k = round(d * N) over all N
  entries (at least 1 when d > 0), exact (a sort's k-th largest bit for
  bit, NaN and -0.0 counted as 0) in two histogram passes over the fp32
  bits. With mass m: the largest t such that the saliencies >= t sum to at
  least m times the total. Keeping s >= t then
  keeps k entries (or mass m), or more where saliencies tie at the cutoff.
  Density or mass 0, or an all-zero total for mass, give +inf: keep nothing.

  Args:
    saliencies: a pytree (or list) of non-negative saliency arrays
      (`ffg_saliency`), sharded in any way.
    density: the fraction of entries to keep, in [0, 1].
    mass: the fraction of total saliency to keep, in [0, 1].
    quantile: 'exact', or 'sampled' for a density: the matching quantile of
      every (N / 65536)-th entry, one strided pass instead of two
      histogram passes over all entries; it keeps d * N entries to within a few parts per
      thousand (binomial spread of the sample). Exact anyway below ~262k
      entries or on Explicit-sharded leaves, which cannot be strided.

  Returns:
    The threshold as a Python float.

  Raises:
    ValueError: not exactly one of density and mass, or one outside
      [0, 1] (holding the value).
  """
  if (density is None) == (mass is None):
    raise ValueError(
      f'ffg_threshold needs exactly one of density and mass, got density={density!r}, mass={mass!r}'
    )
  kind, value = _one_selector(density, None, mass)
  _options.choice(quantile, QUANTILES, what='quantile')
  leaves = tuple(jax.tree.leaves(saliencies))
  if not leaves or value == 0:
    return float('inf')
  if kind == 'density':
    stride = sample_stride(leaves)
    if quantile == 'sampled' and stride:
      return float(
        _sampled_threshold_kernel(leaves, sampled_rank(leaves, value, stride), stride=stride)
      )
    total = sum(int(np.size(s)) for s in leaves)
    cutoff = _radix.kth_largest(
      lambda prefixes, stage: _value_histograms(leaves, prefixes, stage=stage),
      [int(_topk.num_kept(value, total))],
      [total],
    )
    return float(cutoff[0])
  else:

    def mass_at_least(t):
      sums = jax.device_get(_sums_at_least(leaves, np.float32(t)))
      return float(np.sum(sums, dtype=np.float64))

    target = value * mass_at_least(0.0)
    if target <= 0:
      return float('inf')

    def passes(t):
      return mass_at_least(t) >= target

  return largest_passing(passes)


def ffg_saliency(
  base: Any,
  expert: Any,
  second_moment: Any = None,
  *,
  score: str = 'fisher',
  name: str = 'leaf',
  index: int | None = None,
):
  """Saliencies of one tensor (fp32), for a streamed global threshold.

  `index`: the expert's position in a merge, named by a bad-moment error.
  """
  _options.choice(score, SCORES, what='score')
  second_moment = _check_leaf(base, expert, second_moment, score, name)
  s, ok = _saliency_kernel(base, expert, second_moment, score=score)
  _raise_if_invalid(ok, name, index)
  return s


def _check_leaf(base, expert, second_moment, score, name):
  _tree.check_leaf_group(base, [expert], name=name)
  if score != 'fisher':
    return None
  _tree.check_moment(second_moment, tuple(base.shape), name=name, what='second moment')
  return second_moment


def _raise_if_invalid(ok, name, index):
  checks = _tree.ValueChecks()
  checks.add(ok, _tree.expert_moment_message(name, 'second moment', index))
  checks.raise_if_failed()


def _per_tensor_mask(base, expert, moment, kind, value, score):
  if kind == 'threshold':
    return _threshold_mask_kernel(base, expert, moment, value, score=score)
  if kind == 'mass':
    return _mass_mask_kernel(base, expert, moment, value, score=score)
  return _count_mask_kernel(
    base, expert, moment, _topk.num_kept(value, int(np.size(base))), score=score
  )


def ffg_mask_leaf(
  base: Any,
  expert: Any,
  second_moment: Any = None,
  *,
  density: float | None = None,
  threshold: float | None = None,
  mass: float | None = None,
  score: str = 'fisher',
  name: str = 'leaf',
  index: int | None = None,
):
  """FFG mask of one tensor: its own top density or mass, or s >= threshold.

  A streaming merge with a global cutoff passes `threshold=`; `index` is the
  expert's position in a merge, named by a bad-moment error.
  """
  _options.choice(score, SCORES, what='score')
  kind, value = _one_selector(density, threshold, mass)
  second_moment = _check_leaf(base, expert, second_moment, score, name)
  mask, ok = _per_tensor_mask(base, expert, second_moment, kind, value, score)
  _raise_if_invalid(ok, name, index)
  return mask


def ffg_mask(
  base: Any,
  expert: Any,
  second_moment: Any = None,
  *,
  density: float | None = None,
  threshold: float | None = None,
  scope: str = 'global',
  score: str = 'fisher',
  mass: float | None = None,
) -> Any:
  """FFG mask of one expert: which task-vector entries to keep.

  Args:
    base: the pytree the expert was fine-tuned from.
    expert: a pytree like `base`.
    second_moment: the expert's second moments (leaves of the weights'
      shapes or `Rank1` factors of 2-D leaves); needed for score 'fisher',
      ignored for 'magnitude'.
    density: the fraction of entries to keep, in [0, 1]. Give exactly one of
      density, threshold and mass.
    threshold: keep entries whose saliency is >= threshold.
    scope: 'global' (one cutoff over all tensors, `ffg_threshold`) or
      'per_tensor' (each tensor keeps exactly round(density * size) entries,
      at least 1 when density > 0, or its own top mass; ties broken by flat
      index). Ignored when a threshold is given.
    score: 'fisher' (v tau^2) or 'magnitude' (|tau|).
    mass: the fraction of the expert's total saliency to keep, in [0, 1]
      (an automatic, per-expert density; see the module docstring).

  Returns:
    A pytree of bool arrays like `base`. Density 0 keeps nothing, density 1
    everything.

  Raises:
    ValueError: mismatched trees, shapes or dtypes; a missing, negative or
      non-finite second moment (naming the leaf); a density or mass outside
      [0, 1]; not exactly one of density, threshold and mass.
  """
  _options.choice(scope, SCOPES, what='scope')
  _options.choice(score, SCORES, what='score')
  kind, value = _one_selector(density, threshold, mass)
  gathered = _tree.gather(base, [expert])
  names = gathered.names
  experts = [leaves[0] for leaves in gathered.experts]
  if score == 'fisher':
    if second_moment is None:
      raise ValueError(
        "score='fisher' needs the expert's second moments; "
        "pass second_moment or use score='magnitude'"
      )
    moments = [m[0] for m in _tree.gather_moments(gathered, [second_moment], what='second moments')]
  else:
    moments = [None] * len(names)
  if kind == 'density' and scope == 'global':
    # The exact cutoff first; the masks then as for a given threshold.
    kind = 'threshold'
    value = float(
      exact_cutoffs(gathered.base, (tuple(experts),), (tuple(moments),), [value], score=score)[0]
    )
  checks = _tree.ValueChecks()
  if kind == 'threshold' or scope == 'per_tensor':
    masks = []
    for name, b, e, v in zip(names, gathered.base, experts, moments):
      mask, ok = _per_tensor_mask(b, e, v, kind, value, score)
      checks.add(ok, _tree.expert_moment_message(name, 'second moment', None))
      masks.append(mask)
    checks.raise_if_failed()
    return gathered.reference.unflatten(masks)
  saliencies = []
  for name, b, e, v in zip(names, gathered.base, experts, moments):
    s, ok = _saliency_kernel(b, e, v, score=score)
    checks.add(ok, _tree.expert_moment_message(name, 'second moment', None))
    saliencies.append(s)
  checks.raise_if_failed()
  cutoff = ffg_threshold(saliencies, **{kind: value})
  if cutoff == float('inf'):
    # Keep nothing, even a saliency that overflowed to inf.
    masks = [jnp.zeros(s.shape, bool) for s in saliencies]
  else:
    masks = [_at_least(s, cutoff) for s in saliencies]
  return gathered.reference.unflatten(masks)


def ffg_graft_leaf(base: Any, expert: Any, mask: Any, *, name: str = 'leaf'):
  """`ffg_graft` on one tensor."""
  _tree.check_leaf_group(base, [expert], name=name)
  _tree.check_mask(mask, tuple(base.shape), name=name, what='mask')
  return _graft_kernel(base, expert, mask)


def ffg_graft(base: Any, expert: Any, mask: Any) -> Any:
  """theta0 + tau * mask: the expert where the mask is set, else the base.

  Selected rather than computed as base + (expert - base) * mask, so kept
  entries equal the expert's bit for bit (density 1 returns the expert).

  Args:
    base: the pytree the expert was fine-tuned from.
    expert: a pytree like `base`.
    mask: a pytree of bool (or 0/1) arrays like `base`, e.g. `ffg_mask`.

  Returns:
    A pytree like `base`, each leaf in its input dtype.

  Raises:
    ValueError: mismatched trees, shapes or dtypes (naming the leaf).
  """
  gathered = _tree.gather(base, [expert])
  masks = _tree.align(gathered.reference, mask, what='mask', missing='mask')
  outs = []
  for name, b, leaves, m in zip(gathered.names, gathered.base, gathered.experts, masks):
    _tree.check_mask(m, tuple(b.shape), name=name, what='mask')
    outs.append(_graft_kernel(b, leaves[0], m))
  return gathered.reference.unflatten(outs)
