"""Linear minimization oracles as (direction, dual norm) pairs.

For a norm ||.|| the LMO of a momentum B is the unit-ball point that
minimizes <B, O>; its value is minus the dual norm:
    <B, -direction(B)> = dual_norm(B).
`direction` returns O itself (a descent direction, to be added), so
optimizers step X <- X + lr * O.

Matrix LMOs take arrays in the Flax layout [..., d_in, d_out] (y = x @ W);
leading axes are independent matrices: the norm of a stack is the max of the
matrices' norms, so its dual norm is the sum of theirs.

spectral (RMS->RMS norm sqrt(d_in/d_out) |W|_2):
    O = -sqrt(d_out/d_in) polar(B);       dual(D) = sqrt(d_out/d_in) |D|_*
sign (l1->l_inf norm max_ij |W_ij|):
    O = -sign(B);                         dual(D) = sum_ij |D_ij|
colnorm (l1->RMS norm max_i RMS(W[i, :]), per input row):
    O_i = -sqrt(d_out) B[i]/|B[i]|;       dual(D) = sqrt(d_out) sum_i |D[i]|
rownorm (RMS->l_inf norm max_j sqrt(d_in) |W[:, j]|, per output column):
    O_j = -B[:,j]/(sqrt(d_in)|B[:,j]|);   dual(D) = sum_j |D[:,j]| / sqrt(d_in)
bias_rms (RMS norm of the whole leaf, n entries):
    O = -B / RMS(B);                      dual(D) = sqrt(n) |D|_2

The spectral polar factor and its nuclear norm |D|_* = <D, polar(D)> use
Newton-Schulz by default (approximate; `NewtonSchulz(polar='svd')` is exact
and slow).
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from curvopt.optim import _batched
from curvopt.optim import _newton_schulz


class LMO(NamedTuple):
  """A linear minimization oracle: pure functions of one array."""

  name: str
  direction: Callable[[jax.Array], jax.Array]
  dual_norm: Callable[[jax.Array], jax.Array]
  matrix: bool  # True: takes the [..., d_in, d_out] matrix view of a leaf.
  options: dict[str, Any]


def _check_matrix(name: str, x: jax.Array) -> None:
  if x.ndim < 2:
    raise ValueError(f'the {name} LMO needs a matrix [..., d_in, d_out], got shape {x.shape}')


def spectral_scale(d_in: int, d_out: int) -> float:
  """sqrt(d_out / d_in): the RMS->RMS unit-ball radius of polar factors."""
  return (d_out / d_in) ** 0.5


def polar_factor(x: jax.Array, ns: _newton_schulz.NewtonSchulz) -> jax.Array:
  """polar(x) for x [..., m, n], by Newton-Schulz or by SVD."""
  if ns.polar == 'svd':
    return _batched.svd_polar(x)
  return _newton_schulz.newton_schulz(
    x, steps=ns.steps, coeffs=ns.coeffs, dtype=ns.dtype, eps=ns.eps
  )


def spectral(
  *,
  newton_schulz: _newton_schulz.NewtonSchulz = _newton_schulz.NewtonSchulz(dtype='float32'),
) -> LMO:
  """The RMS->RMS operator-norm LMO (Muon's geometry).

  Args:
    newton_schulz: how its polar factors are computed (fp32 by default, like
      `newton_schulz`; the optimizers pass their own).

  Returns:
    An LMO; its options are {'newton_schulz': newton_schulz}.
  """
  _newton_schulz.check_options(newton_schulz)
  polar_fn = functools.partial(polar_factor, ns=newton_schulz)

  def direction(b):
    _check_matrix('spectral', b)
    scale = spectral_scale(b.shape[-2], b.shape[-1])
    return -scale * polar_fn(b)

  def dual_norm(d):
    _check_matrix('spectral', d)
    scale = spectral_scale(d.shape[-2], d.shape[-1])
    o = polar_fn(d).astype(jnp.float32)
    return scale * jnp.sum(d.astype(jnp.float32) * o)

  return LMO('spectral', direction, dual_norm, True, {'newton_schulz': newton_schulz})


def sign() -> LMO:
  """The l1->l_inf operator-norm LMO (Signum), for embeddings and heads."""

  def direction(b):
    return -jnp.sign(b)

  def dual_norm(d):
    return jnp.sum(jnp.abs(d.astype(jnp.float32)))

  return LMO('sign', direction, dual_norm, False, {})


def colnorm(*, eps: float = 1e-8) -> LMO:
  """The l1->RMS operator-norm LMO: each input row W[i, :] to RMS 1."""

  def direction(b):
    _check_matrix('colnorm', b)
    d_out = b.shape[-1]
    norms = jnp.linalg.norm(b, axis=-1, keepdims=True)
    return -(d_out**0.5) * b / (norms + eps)

  def dual_norm(d):
    _check_matrix('colnorm', d)
    d_out = d.shape[-1]
    return d_out**0.5 * jnp.sum(jnp.linalg.norm(d.astype(jnp.float32), axis=-1))

  return LMO('colnorm', direction, dual_norm, True, {'eps': eps})


def rownorm(*, eps: float = 1e-8) -> LMO:
  """The RMS->l_inf operator-norm LMO: each output column W[:, j]."""

  def direction(b):
    _check_matrix('rownorm', b)
    d_in = b.shape[-2]
    norms = jnp.linalg.norm(b, axis=-2, keepdims=True)
    return -b / ((d_in**0.5) * norms + eps)

  def dual_norm(d):
    _check_matrix('rownorm', d)
    d_in = d.shape[-2]
    return jnp.sum(jnp.linalg.norm(d.astype(jnp.float32), axis=-2)) / (d_in**0.5)

  return LMO('rownorm', direction, dual_norm, True, {'eps': eps})


def bias_rms(*, eps: float = 1e-8) -> LMO:
  """The RMS-norm LMO over a whole leaf (Scion's BiasRMS): -B / RMS(B)."""

  def direction(b):
    rms = jnp.sqrt(jnp.mean(jnp.square(b)))
    return -b / (rms + eps)

  def dual_norm(d):
    d = d.astype(jnp.float32)
    return (d.size**0.5) * jnp.sqrt(jnp.sum(jnp.square(d)))

  return LMO('bias_rms', direction, dual_norm, False, {'eps': eps})


_FACTORIES: dict[str, Callable[..., LMO]] = {
  'spectral': spectral,
  'sign': sign,
  'colnorm': colnorm,
  'rownorm': rownorm,
  'bias_rms': bias_rms,
}
LMO_NAMES = tuple(_FACTORIES)


def lmo(name: str, **options: Any) -> LMO:
  """The LMO called `name`, built with `options`.

  Args:
    name: one of 'spectral', 'sign', 'colnorm', 'rownorm', 'bias_rms'.
    **options: keyword options of that LMO's factory.

  Returns:
    An LMO.

  Raises:
    ValueError: unknown name (the message lists the valid ones).
  """
  if name not in _FACTORIES:
    raise ValueError(f'unknown LMO {name!r}; valid names: {list(LMO_NAMES)}')
  return _FACTORIES[name](**options)


def as_lmo(spec: Any) -> LMO:
  """An LMO from a name or an LMO."""
  if isinstance(spec, LMO):
    return spec
  if isinstance(spec, str):
    return lmo(spec)
  raise TypeError(f'expected an LMO name or an LMO, got {spec!r}')
