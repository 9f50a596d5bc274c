r"""Micro-batched losses and gradients: dynamic memory divided by M.

Strategy option ``microbatches`` (string ``+microbatches=M``), for the exact
modes.

**The floor it lowers.** Without segments' static part, what is left of an
exact meta-gradient's memory is the working set of one inner step's
differentiation (MixFlow-MG: one forward-over-reverse JVP of the inner
gradient; standard: the inner backward pass's residuals and their reverse)
and of the outer loss's gradient. Both scale with the batch: B examples, or
B x L tokens with attention's ``[B, heads, L, L]``.

**The statement M makes.** When a loss is a mean over the leading axis of its
batch, ``f(x) = (1/B) sum_i l(x_i)``, then for M chunks ``x^(m)`` of B/M
examples each

    f(x) = (1/M) sum_m f(x^(m)),

and every derivative of f is the same mean of the chunks' derivatives:
``g = (1/M) sum_m grad f(x^(m))`` and, in MixFlow-MG's backward rule,
``H v = (1/M) sum_m H^(m) v`` (each a JVP of one chunk's gradient). So L,
g_t, the rule's Hessian-vector products and the outer loss V with its
gradient can each be computed one chunk at a time and accumulated: a
``jax.lax.scan`` over the M chunks holds one chunk's working set, not M.
The arithmetic is the same; only the parallelism of each kernel is lower.
Choosing ``microbatches=M`` is the user's statement that L and V are such
means (true for the built-in tasks; a loss that normalises by a count over
the whole batch, e.g. of non-padding tokens, is not). Anything added to the
mean that does not depend on the batch (`MetaParams.proximal`'s term) stays
exact: the mean of ``f(x^(m)) + r`` is ``f(x) + r``.

**How each part is differentiated.** The accumulation is a scan whose body
evaluates one chunk. The outer reverse pass differentiates that scan
chunk by chunk, accumulating the cotangents of theta and eta (loop
constants of the scan). MixFlow-MG's custom rule needs nothing more: the
rule runs per chunk, with residuals (theta, eta, chunk) whose theta and eta
are the scan's constants. Plain gradients (standard mode's inner gradient,
V) are wrapped in ``jax.checkpoint``, so their reverse pass recomputes one
chunk at a time instead of storing all M chunks' intermediates.

**Which examples form a chunk.** Chunk m holds examples m, m + M, m + 2M, ...
(a strided split): a leading axis sharded over devices keeps its sharding,
each device contributing to every chunk.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from metaflow._checks import PyTree


def split(batch: PyTree, num_chunks: int, what: str = "batch") -> PyTree:
  """``batch`` with every leaf ``[B, ...]`` reshaped to ``[M, B/M, ...]``,
  chunk m holding examples ``m, m + M, ...``.

  Raises:
    ValueError: a leaf without a leading axis divisible by M (``what`` names
      the batch in the message).
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    shape = jnp.shape(leaf)
    if not shape or shape[0] % num_chunks:
      size = shape[0] if shape else "none (a scalar)"
      raise ValueError(
          f"microbatches={num_chunks}: {what} leaf "
          f"{jax.tree_util.keystr(path) or '<root>'} has leading axis {size}, "
          f"which {num_chunks} does not divide. Choose M dividing every "
          "batch's leading (example) axis.")
  return jax.tree.map(
      lambda x: jnp.swapaxes(
          x.reshape((x.shape[0] // num_chunks, num_chunks) + x.shape[1:]),
          0, 1), batch)


def mean_over_chunks(fn: Callable[[PyTree, PyTree, PyTree], PyTree],
                     num_chunks: int, what: str = "batch", remat: bool = False
                     ) -> Callable[[PyTree, PyTree, PyTree], PyTree]:
  """``(theta, eta, batch) -> mean over M chunks of fn(theta, eta, chunk)``.

  ``fn`` returns a pytree of float arrays (a loss, or a loss and its
  gradient); the result has the same structure. It equals ``fn(theta, eta,
  batch)`` when every output of ``fn`` is a mean over the batch's leading
  axis. ``remat``: wrap ``fn`` in ``jax.checkpoint`` (for an ``fn`` that
  reverse mode would otherwise store the intermediates of, for every chunk).
  M = 1 returns ``fn`` itself.
  """
  if num_chunks == 1:
    return fn
  if remat:
    fn = jax.checkpoint(fn, prevent_cse=False)  # inside the scan below

  def mean(theta, eta, batch):
    chunks = split(batch, num_chunks, what)
    first = jax.tree.map(lambda x: x[0], chunks)
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(fn, theta, eta, first))

    def add(total, chunk):
      return jax.tree.map(jnp.add, total, fn(theta, eta, chunk)), None

    total, _ = jax.lax.scan(add, total, chunks)
    return jax.tree.map(lambda t: t / num_chunks, total)

  return mean
