"""Per-parameter importance estimates for continual-learning regularizers.

This module is self-contained: it depends only on ``jax`` and the standard
library, so it can be copied into any project.

- :func:`fisher_diagonal`: diagonal Fisher from batch-gradient squares (for
  ``ewc``).
- :func:`mas_importance`: Memory Aware Synapses importance (for ``mas``).

Both take the data of one task as ``batches``: either an iterable of batch
pytrees (each batch is processed by one jitted step, compiled once per call),
or, with ``stacked=True``, a single pytree whose leaves carry a leading
"batch index" axis, processed with ``jax.lax.scan`` so that the whole call can
itself be placed inside ``jax.jit``. Accumulation happens in (at least)
float32, and the result has the structure and shapes of ``params``.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

__all__ = ["fisher_diagonal", "mas_importance"]

PyTree = Any


def _wide(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _zeros_acc(params: PyTree) -> PyTree:
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _wide(p).dtype), params)


def _reduce(
    step: Callable[[PyTree, jax.Array, PyTree, PyTree], tuple[PyTree, jax.Array]],
    params: PyTree,
    batches: Any,
    *,
    stacked: bool,
    max_batches: int | None,
    who: str,
) -> PyTree:
  """Runs ``(acc, count) = step(acc, count, params, batch)`` over all batches
    and returns ``acc / count``."""
  if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
    raise ValueError(f"{who}: max_batches must be a positive int or None, got {max_batches!r}.")
  acc0 = _zeros_acc(params)
  count0 = jnp.zeros((), jnp.float32)

  if stacked:
    leaves = jax.tree.leaves(batches)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
      raise ValueError(f"{who}: with stacked=True, `batches` must be a pytree of arrays "
                       "with a leading batch-index axis.")
    if max_batches is not None:
      batches = jax.tree.map(lambda x: x[:max_batches], batches)
    if jax.tree.leaves(batches)[0].shape[0] == 0:
      raise ValueError(f"{who}: `batches` is empty.")

    def body(carry, batch):
      acc, count = carry
      return step(acc, count, params, batch), None

    (acc, count), _ = jax.lax.scan(body, (acc0, count0), batches)
  else:
    jstep = jax.jit(step)
    acc, count = acc0, count0
    n = 0
    for batch in itertools.islice(iter(batches), max_batches):
      acc, count = jstep(acc, count, params, batch)
      n += 1
    if n == 0:
      raise ValueError(f"{who}: `batches` is empty.")

  return jax.tree.map(lambda a: a / count.astype(a.dtype), acc)


def fisher_diagonal(
    loss_fn: Callable[[PyTree, PyTree], Any],
    params: PyTree,
    batches: Iterable[PyTree] | PyTree,
    *,
    has_aux: bool = False,
    max_batches: int | None = None,
    stacked: bool = False,
) -> PyTree:
  r"""Diagonal Fisher estimate from squared batch gradients.

    For batches ``b = 1..N`` of one task::

        F_i = 1/N * sum_b ( d loss_fn(params, batch_b) / d theta_i )^2

    i.e. the element-wise square of the gradient of the *batch* loss, averaged
    over batches ("batch-gradient squares").

    Why not the per-example (empirical) Fisher ``mean_n (d l_n / d theta)^2``:
    in an in-batch contrastive objective (InfoNCE/CLIP) each example's loss
    term depends on every other example of the batch through the softmax
    denominator, so there is no per-example likelihood and the per-example
    gradient is not well defined independently of the batch; it would also
    cost one backward pass per example. The batch-gradient square is
    well defined for any scalar loss and costs one backward pass per batch.
    Its scale depends on the batch size (averaging ``B`` gradients shrinks
    their noise part by ``~1/B``), so the EWC ``strength`` should be tuned for
    the batch size used here. No per-example option is offered for that reason.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` when
        ``has_aux``), differentiable in ``params``.
      params: parameters at which the Fisher is evaluated (end of the task).
      batches: an iterable of batch pytrees (each passed to ``loss_fn``); or,
        with ``stacked=True``, one pytree whose leaves have a leading
        batch-index axis of length ``N``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is ignored.
      max_batches: use at most this many batches (handy for infinite loaders).
      stacked: see ``batches``; makes the function traceable under ``jax.jit``.

    Returns:
      A pytree like ``params`` (float32 or wider) of non-negative values.

    Raises:
      ValueError: if there are no batches.

    Example::

        fisher = fisher_diagonal(loss_fn, params, task_batches, max_batches=50)
        opt_state = consolidate(opt_state, params, importance=fisher)
    """
  grad_fn = jax.grad(loss_fn, has_aux=has_aux)

  def step(acc, count, p, batch):
    g = grad_fn(p, batch)
    if has_aux:
      g = g[0]
    acc = jax.tree.map(lambda a, gi: a + jnp.square(_wide(gi)).astype(a.dtype), acc, g)
    return acc, count + 1.0

  return _reduce(step, params, batches, stacked=stacked, max_batches=max_batches, who="fisher_diagonal")


def _mean_sq_norm(outputs: PyTree) -> jax.Array:
  """Sum over output leaves of the example-averaged squared L2 norm.

    A leaf of shape ``[B, ...]`` contributes ``1/B sum_n ||leaf[n]||^2``; a
    scalar leaf contributes its square.
    """
  total = jnp.zeros((), jnp.float32)
  for leaf in jax.tree.leaves(outputs):
    x = _wide(leaf)
    sq = jnp.sum(jnp.square(x))
    total = total + (sq if x.ndim == 0 else sq / x.shape[0])
  return total


def mas_importance(
    output_fn: Callable[[PyTree, PyTree], PyTree],
    params: PyTree,
    batches: Iterable[PyTree] | PyTree,
    *,
    per_example: bool = False,
    max_batches: int | None = None,
    stacked: bool = False,
) -> PyTree:
  r"""Memory Aware Synapses importance ``Omega`` (Aljundi et al. 2018).

    Let ``f(x)`` be the model output for one example and ``s(x) = ||f(x)||_2^2``
    (summed over all output arrays if ``output_fn`` returns a pytree, e.g. image
    and text embeddings). MAS defines::

        Omega_i = 1/N_examples * sum_n | d s(x_n) / d theta_i |       (1)

    ``per_example=True`` computes (1) exactly: one gradient per example
    (sequentially with ``jax.lax.scan`` inside each batch, so memory stays at
    one gradient), averaged over all examples of all batches. It requires that
    ``output_fn`` can be called on a batch of size 1 and that an example's
    output depends only on that example (true for dual encoders without
    batch-statistics layers).

    ``per_example=False`` (default) is the cheap approximation that takes the
    absolute value *after* averaging over a batch's examples::

        Omega_i = 1/N_batches * sum_b | d/d theta_i ( 1/B_b sum_{n in b} s(x_n) ) |   (2)

    i.e. one backward pass per batch. Since ``|mean g| <= mean |g|``, (2) is a
    lower bound of (1) that can be smaller where example gradients disagree in
    sign, and it depends somewhat on the batch size.

    Note: if the embeddings are L2-normalised, ``s(x)`` is constant and
    ``Omega = 0``; give ``output_fn`` the embeddings *before* normalisation (or
    the logits).

    Args:
      output_fn: ``output_fn(params, batch) -> array [B, ...]`` or a pytree of
        such arrays (all with the batch as leading axis).
      params: parameters at which the importance is evaluated.
      batches: an iterable of batch pytrees; or, with ``stacked=True``, one
        pytree whose leaves have a leading batch-index axis.
      per_example: exact per-example MAS (1) instead of the approximation (2).
      max_batches: use at most this many batches.
      stacked: see ``batches``; makes the function traceable under ``jax.jit``.

    Returns:
      A pytree like ``params`` (float32 or wider) of non-negative values.

    Raises:
      ValueError: if there are no batches.

    Example::

        embed = lambda p, b: model.apply(p, b, method=model.unnormalized_embed)
        omega = mas_importance(embed, params, task_batches, per_example=True)
        opt_state = consolidate(opt_state, params, importance=omega)
    """

  def objective(p, batch):
    return _mean_sq_norm(output_fn(p, batch))

  grad_fn = jax.grad(objective)

  def add_abs(acc, g):
    return jax.tree.map(lambda a, gi: a + jnp.abs(_wide(gi)).astype(a.dtype), acc, g)

  if not per_example:

    def step(acc, count, p, batch):
      return add_abs(acc, grad_fn(p, batch)), count + 1.0

  else:

    def step(acc, count, p, batch):
      leaves = jax.tree.leaves(batch)
      if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError("mas_importance(per_example=True): every batch leaf needs a "
                         "leading example axis.")
      size = leaves[0].shape[0]

      def body(a, example):
        one = jax.tree.map(lambda x: x[None], example)
        return add_abs(a, grad_fn(p, one)), None

      acc, _ = jax.lax.scan(body, acc, batch)
      return acc, count + jnp.asarray(size, count.dtype)

  return _reduce(step, params, batches, stacked=stacked, max_batches=max_batches, who="mas_importance")
