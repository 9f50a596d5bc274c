r"""Segmented trajectory checkpointing: nested segments of the inner loop.

Strategy option ``segment_length`` (string ``+segments=K``,
``+segments=K1/K2/...`` or ``+segments=auto``), for the exact modes.

**The floor it lowers.** Reverse mode through T inner steps needs, for step t,
the carry ``c_t = (theta_t, s_t)`` it started from (MixFlow-MG's rule keeps
exactly that and the step's batch). A plain scan stores all T carries: with
inner Adam, T copies of (theta, mu, nu) are the static memory that MixFlow-MG
does not change and that dominates long horizons.

**One level.** Cut the T steps into segments of K (the last one shorter when K
does not divide T) and store only each segment's first carry. The backward
pass meets the segments in reverse order; for each, it runs the K steps
forward again from the stored carry (this time storing their K carries) and
back-propagates through them as before. The meta-gradient is unchanged (the
same operations on the same values), and

    stored carries at the peak = ceil(T/K)  (segment boundaries)
                               + K          (the segment being recomputed),

least near K = sqrt T (2 sqrt T instead of T), for one extra forward pass of
the inner loop (every step is run twice; the backward pass's own work is the
same). ``jax.checkpoint`` around a scan body expresses it: the outer scan over
segments keeps only its carries, and the checkpointed body (itself a scan over
K steps) is rematerialised when it is differentiated.

**Nested levels.** The recomputed segment is itself a loop of K steps, and
need not store all of them: with lengths K1 > K2 > ... > Kn the T steps are
cut into segments of K1, each of those into pieces of K2, and so on; the
pieces of Kn are plain scans. The backward pass meets the segments of K1 in
reverse order; for one, it runs its K1 steps forward storing only the first
carry of each of its pieces of K2, then meets those in reverse order, and so
on down to a piece of Kn, whose Kn carries it stores. At the peak it holds
the boundaries of one piece of every level:

    stored(T; K1, ..., Kn) = ceil(T/K1) + stored(K1; K2, ..., Kn),
    stored(m; ) = m,

that is ceil(T/K1) + ceil(K1/K2) + ... + ceil(K_{n-1}/Kn) + Kn
(`stored_carries`), each K first capped at the length of the piece it cuts
(a K1 >= T is one segment of T). A ragged last piece (m not a multiple of K:
its own lengths capped at its m mod K steps) never stores more than a full
one, since stored(m; ...) does not decrease with m, so the full pieces set
the peak and the count is exact. Every level costs one more forward pass: a
step runs once in the forward pass and once more each time a piece holding it
is recomputed, once per level, so the inner loop runs forward 1 + n times per
meta-step (`recompute_factor`: 2 for ``+segments=K``, 3 for ``K1/K2``).

**The least memory** (``+segments=auto``, `schedule`). With q_i =
ceil(K_{i-1}/K_i) (K_0 = T) the count is q_1 + ... + q_n + Kn, and since every
q_i K_i >= K_{i-1}, these n + 1 numbers multiply to at least T. n + 1 equal
factors T^(1/(n+1)) sum to (n+1) T^(1/(n+1)), least at n + 1 = ln T with ratio
e between levels: about e ln T carries (26.4 for T = 16384, against 256 for one
level of K = 128) for about ln T - 1 extra forward passes. In integers the
ratios are mostly 3 (T = 16384: 27 carries, 8 levels, recompute factor 9).
`schedule` searches the integer schedules exactly (a dynamic programme over n
and the pieces' lengths): ``auto`` is the least count for T, ties broken toward
fewer levels (less recomputation). Its lengths are each a multiple of the next
(T = 16384: 8748/2916/972/324/108/36/12/4): the least count always has such a
schedule (the same q_i below the top, a longer K1), and with it the full pieces
of a level are all cut alike: only the last piece of each level is ragged, and
the program holds at most n + 1 distinct innermost scans instead of up to 2^n
when ragged pieces are cut raggedly again (T = 16384: 7 against 67 for
8192/2731/.../12/4, which stores as many carries; a small step's meta-gradient
then compiles about 8 times faster). For T <= 5 no schedule stores fewer than T
carries, and ``auto`` is no segments.

**What the count leaves out.** `stored_carries` counts carries, the
paper's static memory. The scan over a piece of Kn steps also keeps each
step's other residuals for its backward pass: without ``+remat``, for
MixFlow-MG with inner Adam, as many bytes again as the carry (the update's
g_t and normalisation terms); with ``+saved_inner_grads``, g_t. They are in
the dynamic part of `metaflow.memory`'s split, which therefore shrinks with
Kn too; with ``+remat`` alone a step keeps only its carry, and the dynamic
part does not depend on the schedule. (tests/test_segments_microbatches.py:
at T = 256 a nested schedule's compiled total is its carries plus the
dynamic part of one level with the same Kn, or with ``+remat`` any K,
within 2%.)

**Griewank's schedules.** Splitting a loop into checkpointed segments, and
those again, is the recursive checkpointing of reverse-mode automatic
differentiation (Griewank, 1992; for networks, Chen et al., 2016: sqrt(n)
memory for one more forward pass, O(log n) memory recursively): memory and
recomputation both logarithmic in T. It is not the optimum. Griewank's
binomial schedules, generated by revolve (Griewank and Walther, 2000), are
provably optimal: with s checkpoint slots and each step advanced at most r
times they reverse up to binomial(s + r, s) steps. Nested segments advance
each step 1 + n times, so r = 1 + n; for T = 256 and r = 3, binomial(s + 3,
3) >= 256 at s = 10 slots, where two levels here (64/8) store 20 carries.
Revolve gets there by placing checkpoints unevenly and reusing a slot as
soon as the part of the loop it served has been reversed: its schedule is a
sequence of forward runs of varying length, stores and restores, decided
step by step. A fixed nesting of ``lax.scan`` under ``jax.checkpoint``
expresses only even pieces, one length per level, with shapes XLA knows when
it compiles; what is traded for that static form (and the exact compiled
memory figures it gives) is a constant factor in the carries stored.

Per-step remat (``+remat``) composes with it: inside a recomputed piece of Kn
each step is checkpointed as without segments.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence, Union, cast

import jax
import jax.numpy as jnp

from metaflow._checks import PyTree, check_int

Step = Callable[[PyTree, PyTree], tuple[PyTree, jax.Array]]
#: One segment length K, or nested lengths K1 > K2 > ... >= 1.
Lengths = Union[int, Sequence[int]]


def check_lengths(lengths: Lengths) -> tuple[int, ...]:
  """``lengths`` as a tuple: an int K >= 1 is ``(K,)``; a sequence must be
  ints K1 > K2 > ... >= 1 (at least one), as strategies give them.

  Raises:
    ValueError: anything else (one line).
  """
  try:
    items = _levels(lengths)
  except ValueError:
    items = ()
  if not items or any(a <= b for a, b in zip(items, items[1:])):
    raise ValueError("segment lengths must be an int K >= 1 or decreasing "
                     f"ints K1 > K2 > ... >= 1, got {lengths!r}.")
  return items


def capped(num_steps: int, lengths: Lengths) -> tuple[int, ...]:
  """The lengths a loop of T = ``num_steps`` steps is cut by: each K capped
  at the piece it cuts, ``(min(K1, T), min(K2, K1'), ...)`` (capped lengths
  may repeat: a K1 >= T is one segment of T steps, still recomputed)."""
  piece, out = num_steps, []
  for k in _levels(lengths):
    piece = min(k, piece)
    out.append(piece)
  return tuple(out)


def stored_carries(num_steps: int, lengths: Lengths = ()) -> int:
  """Carries ``(theta, s)`` the backward pass holds at its peak, for T =
  ``num_steps`` steps cut by ``lengths`` (``()``: no segments, T):
  ceil(T/K1) + ceil(K1/K2) + ... + Kn, each K capped (module docstring)."""
  count, piece = 0, check_int("num_steps (T)", num_steps)
  for k in capped(piece, lengths):
    count += -(-piece // k)
    piece = k
  return count + piece


def recompute_factor(lengths: Lengths = ()) -> int:
  """Forward passes of the inner loop per meta-step, relative to the loop
  without segments (``()``): 1 + the number of levels."""
  return 1 + len(_levels(lengths))


def _levels(lengths: Lengths) -> tuple[int, ...]:
  """``lengths`` as a tuple of ints >= 1 (an int K: ``(K,)``; ``()``: no
  segments); ValueError otherwise."""
  items = cast(Sequence[Any], lengths if isinstance(lengths, (tuple, list))
               else (lengths,))
  if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1
         for k in items):
    raise ValueError("segment lengths must be ints >= 1, got "
                     f"{lengths!r}.")
  return tuple(int(k) for k in items)


def schedule(num_steps: int, levels: Optional[int] = None
             ) -> tuple[int, ...]:
  """The lengths K1 > ... > Kn (each below the piece it cuts) that store the
  fewest carries for T = ``num_steps`` steps: with ``levels`` = n levels,
  or over every n >= 0 when None (ties: fewer levels; ``()``: no segments).
  Each length is a multiple of the next where the count allows (module
  docstring). Exact, and fast: the dynamic programme visits only lengths
  ceil(m/q) and lengths up to sqrt(m) for each piece m it reaches.

  Raises:
    ValueError: T < 1, or n levels of T <= n steps (there are no n
      lengths below T).
  """
  num_steps = check_int("num_steps (T)", num_steps)
  memo: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {}
  if levels is not None:
    levels = check_int("levels", levels, minimum=0)
    if levels >= num_steps:
      raise ValueError(f"{levels} levels of segments need T > {levels} "
                       f"steps (lengths T > K1 > ... > K{levels} >= 1), "
                       f"got T={num_steps}.")
    return _aligned(num_steps, _least(num_steps, levels, memo)[1])
  best, n = (num_steps, ()), 1
  # Every level stores q_i >= 2 carries and the last piece Kn >= 1, so n
  # levels store at least 2n + 1: no deeper n can do better.
  while n < num_steps and 2 * n + 1 < best[0]:
    # ... nor an n whose equal-ratio bound (n+1) T^(1/(n+1)) is no better.
    if (n + 1) * num_steps ** (1 / (n + 1)) < best[0] + 1e-9:
      found = _least(num_steps, n, memo)
      best = found if found[0] < best[0] else best
    n += 1
  return _aligned(num_steps, best[1])


def _aligned(num_steps: int, lengths: tuple[int, ...]) -> tuple[int, ...]:
  """The same counts q_i = ceil(K_{i-1}/K_i) below the top with each length
  a multiple of the next (Kn, q_n Kn, q_{n-1} q_n Kn, ...): K1 grows, so
  ceil(T/K1) does not, and the full pieces of a level are cut alike (at
  most n + 1 distinct innermost scans, not up to 2^n). Unchanged where K1
  would reach T or store more."""
  out = list(lengths)
  for i in range(len(out) - 2, -1, -1):
    out[i] = -(-lengths[i] // lengths[i + 1]) * out[i + 1]
  if out and out[0] < num_steps and (stored_carries(num_steps, out)
                                     <= stored_carries(num_steps, lengths)):
    return tuple(out)
  return lengths


def _least(m: int, n: int, memo: dict) -> tuple[int, tuple[int, ...]]:
  """(fewest stored carries, lengths) for a piece of m steps cut by n
  levels of lengths m > K1 > ... > Kn >= 1 (m > n).

  stored(m) = ceil(m/K) + stored(K), and stored(K) does not decrease with
  K, so for each count q = ceil(m/K) the least K with that count (ceil(m/q),
  or n, the least that n - 1 further levels fit under) is the best."""
  if n == 0:
    return m, ()
  if (m, n) not in memo:
    root = math.isqrt(m)
    lengths = {n, *range(n, root + 2), *(-(-m // q) for q in
                                        range(2, root + 2))}
    best = None
    for k in sorted(k for k in lengths if n <= k < m):
      q = -(-m // k)
      inner, rest = _least(k, n - 1, memo)
      if best is None or (q + inner, q) < best[0]:
        best = ((q + inner, q), (k, *rest))
    assert best is not None  # m > n: k = n is a length
    memo[m, n] = (best[0][0], best[1])
  return memo[m, n]


def segmented_scan(step: Step, carry: PyTree, xs: PyTree, length: int,
                   lengths: Lengths) -> tuple[PyTree, jax.Array]:
  """``jax.lax.scan(step, carry, xs, length)`` whose reverse mode stores the
  carry only at the boundaries of nested segments (module docstring).

  Args:
    step: ``(carry, x) -> (carry, y)`` with a scalar-per-step output ``y``.
    carry: the initial carry.
    xs: pytree whose leaves have leading axis ``length`` (T).
    length: T >= 1.
    lengths: K (one level: the carry stored every K steps) or K1 > K2 >
      ... >= 1 (segments of K1 steps, each cut into pieces of K2, ...),
      each capped at the piece it cuts; ``()``: the plain scan.

  Returns:
    ``(carry_T, ys)`` with ``ys`` stacked to ``[T, ...]``, equal to the plain
    scan's.
  """
  lengths = _levels(lengths)
  if not lengths:
    return jax.lax.scan(step, carry, xs, length=length)
  # K1 capped at T; each piece caps the lengths inside it.
  k, inner = min(lengths[0], length), lengths[1:]
  full, rest = divmod(length, k)

  def piece(size):
    return lambda carry, piece_xs: segmented_scan(step, carry, piece_xs, size,
                                                  inner)

  head = jax.tree.map(
      lambda x: x[:full * k].reshape((full, k) + x.shape[1:]), xs)
  # prevent_cse=False is safe (and cheaper) inside a scan.
  carry, ys = jax.lax.scan(jax.checkpoint(piece(k), prevent_cse=False),
                           carry, head)
  ys = jax.tree.map(lambda y: y.reshape((full * k,) + y.shape[2:]), ys)
  if rest:
    tail = jax.tree.map(lambda x: x[full * k:], xs)
    carry, tail_ys = jax.checkpoint(piece(rest))(carry, tail)
    ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail_ys)
  return carry, ys
