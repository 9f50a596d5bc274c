r"""Segmented trajectory checkpointing: O(sqrt T) stored inner carries.

Strategy option ``segment_length`` (string ``+segments=K`` or
``+segments=auto``), for the exact modes.

**The floor it lowers.** Reverse mode through T inner steps needs, for step t,
the carry ``c_t = (theta_t, s_t)`` it started from (MixFlow-MG's rule keeps
exactly that and the step's batch). A plain scan stores all T carries: with
inner Adam, T copies of (theta, mu, nu) are the static memory that MixFlow-MG
does not change and that dominates long horizons.

**The trade.** Cut the T steps into segments of K (the last one shorter when K
does not divide T) and store only each segment's first carry. The backward
pass meets the segments in reverse order; for each, it runs the K steps
forward again from the stored carry (this time storing their K carries) and
back-propagates through them as before. The meta-gradient is unchanged (the
same operations on the same values), and

    stored carries at the peak = ceil(T/K)  (segment boundaries)
                               + K          (the segment being recomputed),

least near K = sqrt T (2 sqrt T instead of T), for one extra forward pass of
the inner loop (every step is run twice; the backward pass's own work is the
same). It is the classic checkpointing of Griewank's binomial schedules at
one level, which is what ``jax.checkpoint`` around a scan body expresses:
the outer scan over segments keeps only its carries, and the checkpointed
body (itself a scan over K steps) is rematerialised when it is differentiated.
Per-step remat (``+remat``) composes with it: inside a recomputed segment each
step is checkpointed as without segments.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from metaflow._checks import PyTree

Step = Callable[[PyTree, PyTree], tuple[PyTree, jax.Array]]


def segmented_scan(step: Step, carry: PyTree, xs: PyTree, length: int,
                   segment_length: int) -> tuple[PyTree, jax.Array]:
  """``jax.lax.scan(step, carry, xs, length)`` whose reverse mode stores the
  carry only every ``segment_length`` (K) steps.

  Args:
    step: ``(carry, x) -> (carry, y)`` with a scalar-per-step output ``y``.
    carry: the initial carry.
    xs: pytree whose leaves have leading axis ``length`` (T).
    length: T >= 1.
    segment_length: K, 1 <= K <= T.

  Returns:
    ``(carry_T, ys)`` with ``ys`` stacked to ``[T, ...]``, equal to the plain
    scan's.
  """
  full, rest = divmod(length, segment_length)

  def segment(carry, segment_xs):
    return jax.lax.scan(step, carry, segment_xs)

  head = jax.tree.map(
      lambda x: x[:full * segment_length].reshape(
          (full, segment_length) + x.shape[1:]), xs)
  # prevent_cse=False is safe (and cheaper) inside a scan.
  carry, ys = jax.lax.scan(jax.checkpoint(segment, prevent_cse=False),
                           carry, head)
  ys = jax.tree.map(lambda y: y.reshape((full * segment_length,) + y.shape[2:]),
                    ys)
  if rest:
    tail = jax.tree.map(lambda x: x[full * segment_length:], xs)
    carry, tail_ys = jax.checkpoint(segment)(carry, tail)
    ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail_ys)
  return carry, ys
