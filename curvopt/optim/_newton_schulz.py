"""Newton-Schulz orthogonalization (approximate polar factor U V^T)."""

import numbers
from typing import Any, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

from curvopt.optim import _sharding

DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = ('auto', 'float32', 'bfloat16')
POLARS = ('newton_schulz', 'svd')

Coeffs = Union[Sequence[float], Sequence[Sequence[float]]]


class NewtonSchulz(NamedTuple):
  """How the optimizers and the spectral LMO compute polar factors.

  Attributes:
    steps: Newton-Schulz iterations.
    coeffs: one (a, b, c) triple, or one triple per step (see `newton_schulz`).
    dtype: dtype of the iteration: 'auto' (bf16 on accelerators, fp32 on CPU),
      'float32', 'bfloat16' or a jnp floating dtype.
    eps: added to each matrix's Frobenius norm before dividing by it.
    polar: 'newton_schulz' (the iteration) or 'svd' (the exact polar factor;
      slow, for tests and references).
    sharding: on a mesh, how the optimizers lay out each stack of same-shape
      matrices: 'batch', 'replicated' or 'none' (see `orthogonalize_many`);
      ignored without a mesh and by the LMO's own `direction` and `dual_norm`.
  """

  steps: int = 5
  coeffs: Coeffs = DEFAULT_NS_COEFFS
  dtype: Any = 'auto'
  eps: float = 1e-8
  polar: str = 'newton_schulz'
  sharding: str = 'batch'


def check_options(ns: Any) -> NewtonSchulz:
  """Checks a `NewtonSchulz` before any array is seen.

  Args:
    ns: the options to check.

  Returns:
    `ns`.

  Raises:
    TypeError: `ns` is not a NewtonSchulz.
    ValueError: a field has an invalid value; the message names it.
  """
  if not isinstance(ns, NewtonSchulz):
    raise TypeError(f'expected optim.NewtonSchulz(...), got {ns!r}')
  # A traced integer is accepted: LANTON's noise_ns_steps is one under
  # optax.inject_hyperparams.
  integral = isinstance(ns.steps, numbers.Integral) or (
    isinstance(ns.steps, jax.Array) and jnp.issubdtype(ns.steps.dtype, jnp.integer)
  )
  if not integral or isinstance(ns.steps, bool):
    raise TypeError(f'NewtonSchulz steps must be an int, got {ns.steps!r}')
  if ns.polar not in POLARS:
    raise ValueError(f'unknown polar {ns.polar!r}; valid: {POLARS}')
  if ns.sharding not in _sharding.NS_SHARDINGS:
    raise ValueError(
      f'unknown Newton-Schulz sharding {ns.sharding!r}; valid: {_sharding.NS_SHARDINGS}'
    )
  resolve_ns_dtype(ns.dtype)
  coeff_schedule(ns.coeffs, ns.steps)
  return ns


def resolve_ns_dtype(dtype: Any) -> jnp.dtype:
  """'auto' -> bf16 on accelerators, fp32 on CPU; otherwise the dtype asked.

  Args:
    dtype: 'auto', 'float32', 'bfloat16' or a jnp floating dtype.

  Returns:
    A jnp dtype.
  """
  if isinstance(dtype, str):
    if dtype not in NS_DTYPES:
      raise ValueError(
        f'unknown Newton-Schulz dtype {dtype!r}; valid: {NS_DTYPES} or a floating dtype'
      )
    if dtype == 'auto':
      return jnp.dtype(jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16)
  try:
    resolved = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f'unknown Newton-Schulz dtype {dtype!r}') from e
  if not jnp.issubdtype(resolved, jnp.floating):
    raise ValueError(f'the Newton-Schulz dtype must be a floating dtype, got {dtype!r}')
  return resolved


class DynamicSchedule(NamedTuple):
  """One (a, b, c) triple for a traced number of steps (a fori_loop)."""

  coeffs: tuple[Any, Any, Any]
  steps: Any


Schedule = Union[list[tuple[Any, ...]], DynamicSchedule]


def _is_triple(coeffs: Any) -> bool:
  return len(coeffs) == 3 and all(jnp.ndim(c) == 0 for c in coeffs)


def coeff_schedule(coeffs: Coeffs, steps: Any) -> Schedule:
  """Per-step (a, b, c) triples, or a DynamicSchedule for traced `steps`.

  `steps` is traced when it is a hyperparameter under
  `optax.inject_hyperparams` (LANTON's `noise_ns_steps`) or an argument of a
  jit'd function; one triple then runs in a `fori_loop`.

  Args:
    coeffs: one triple, or one triple per step.
    steps: the number of iterations (an int, or a traced integer scalar).

  Returns:
    A list of triples (unrolled) or a DynamicSchedule.
  """
  try:
    steps = int(steps)
  except jax.errors.ConcretizationTypeError:
    if not _is_triple(coeffs):
      raise ValueError(
        f'per-step coefficients need a static number of steps, got a traced one; coeffs {coeffs!r}'
      ) from None
    return DynamicSchedule(tuple(coeffs), steps)
  if steps < 0:
    raise ValueError(f'Newton-Schulz steps must be >= 0, got {steps}')
  if _is_triple(coeffs):
    return [tuple(coeffs)] * steps
  try:
    rows = [tuple(row) for row in coeffs]
  except TypeError:  # e.g. a pair of numbers: not one triple, not triples
    rows = None
  if rows is None or any(len(r) != 3 for r in rows) or len(rows) != steps:
    raise ValueError(
      f'coeffs must be one (a, b, c) triple or one triple per step ({steps} steps), got {coeffs!r}'
    )
  return rows


def newton_schulz(
  x: jax.Array,
  *,
  steps: int = 5,
  coeffs: Coeffs = DEFAULT_NS_COEFFS,
  dtype: Any = jnp.float32,
  eps: float = 1e-8,
) -> jax.Array:
  """Approximates the polar factor U V^T of each matrix in `x`.

  Quintic iteration X <- a X + (b A + c A^2) X with A = X X^T, from
  X_0 = x / (||x||_F + eps) (per matrix, computed in fp32). Each matrix is
  transposed so that its short side comes first (A is then the small Gram
  matrix). With the default coefficients the singular values end up in about
  [0.7, 1.2] rather than exactly 1 (Jordan's Muon trade-off); convergent
  coefficients such as (1.5, -0.5, 0.0) with enough steps give U V^T.

  If the matrix axes of `x` are sharded, the matrices are gathered once (one
  all-gather) and the result is laid out like `x` again.

  Args:
    x: [..., m, n]; leading axes are a batch of independent matrices.
    steps: number of iterations.
    coeffs: one (a, b, c) triple, or one triple per step.
    dtype: dtype of the iteration: 'float32' (default), 'bfloat16', 'auto'
      (bf16 on accelerators, fp32 on CPU) or a jnp dtype.
    eps: added to the Frobenius norm before dividing.

  Returns:
    An array like `x` (same shape, dtype and layout).
  """
  if x.ndim < 2:
    raise ValueError(f'newton_schulz needs rank >= 2, got shape {x.shape}')
  schedule = coeff_schedule(coeffs, steps)
  ns_dtype = resolve_ns_dtype(dtype)
  mesh = _sharding.mesh_of(x)
  spec = _sharding.spec_of(x)
  gathered = mesh is not None and _sharding.is_sharded(spec[-2:])
  if gathered:
    x_in = _sharding.relayout(x, spec[:-2] + (None, None), mesh)
  else:
    x_in = x
  y = iterate(x_in, schedule, ns_dtype, eps).astype(x.dtype)
  if gathered:
    y = _sharding.relayout(y, spec, mesh)
  return y


def _step(y: jax.Array, a: Any, b: Any, c: Any) -> jax.Array:
  gram = y @ jnp.swapaxes(y, -1, -2)
  poly = b * gram + c * (gram @ gram)
  return a * y + poly @ y


def iterate(x: jax.Array, schedule: Schedule, ns_dtype: jnp.dtype, eps: Any) -> jax.Array:
  """The iteration on x [..., m, n] as is (no layout handling)."""
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(-2, -1), keepdims=True))
  y = (x32 / (norm + eps)).astype(ns_dtype)
  if isinstance(schedule, DynamicSchedule):
    a, b, c = (jnp.asarray(v).astype(ns_dtype) for v in schedule.coeffs)
    y = jax.lax.fori_loop(0, schedule.steps, lambda _, y: _step(y, a, b, c), y)
  else:
    for a, b, c in schedule:
      y = _step(y, a, b, c)
  if transposed:
    y = jnp.swapaxes(y, -1, -2)
  return y
