"""Diagonal empirical Fisher: the curvature source when there is no Adam nu.

A model trained with Muon, LANTON or SGD keeps no second moment for its
matrices; F = mean over examples of (d loss_i / d theta)^2 stands in for it
in `ota`, `ffg_mask` and `fisher`.
"""

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from curvopt.merge._paths import path_str

F32 = jnp.float32


def _batch_size(batch: Any, index: int) -> int:
  pairs = jax.tree_util.tree_flatten_with_path(batch)[0]
  if not pairs:
    raise ValueError(f'batch {index} has no array leaves')
  sizes = {}
  for path, leaf in pairs:
    if jnp.ndim(leaf) < 1:
      raise ValueError(
        f'batch {index} leaf {path_str(path)!r} is a scalar; '
        'every batch leaf needs a leading example axis'
      )
    sizes[path_str(path)] = jnp.shape(leaf)[0]
  if len(set(sizes.values())) != 1:
    raise ValueError(f'batch {index} leaves disagree on the number of examples: {sizes}')
  return next(iter(sizes.values()))


def estimate_fisher(loss_fn: Callable[[Any, Any], Any], params: Any, batches: Iterable[Any]) -> Any:
  """Mean of squared per-example gradients, per parameter entry, in fp32.

  Args:
    loss_fn: loss_fn(params, example) -> scalar loss of ONE example (e.g.
      the negative log-likelihood of its target tokens).
    params: the pytree of parameters the Fisher is taken at.
    batches: an iterable of pytrees of examples, each leaf with a leading
      example axis (sizes may differ between batches). Per-example
      gradients are taken with `jax.vmap` over that axis.

  Returns:
    A pytree like `params` of fp32 arrays: sum over all examples of all
    batches of grad_i^2, divided by the number of examples.

  Raises:
    ValueError: no examples at all, or a batch whose leaves disagree on
      the number of examples.
  """
  per_example_grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))

  @jax.jit
  def accumulate(total, params, batch):
    grads = per_example_grads(params, batch)
    return jax.tree.map(
      lambda acc, g: acc + jnp.sum(jnp.square(g.astype(F32)), axis=0), total, grads
    )

  total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), F32), params)
  count = 0
  for index, batch in enumerate(batches):
    size = _batch_size(batch, index)
    if size == 0:
      continue
    total = accumulate(total, params, batch)
    count += size
  if count == 0:
    raise ValueError('estimate_fisher needs at least one example; batches was empty')
  return jax.tree.map(lambda acc: acc / count, total)
