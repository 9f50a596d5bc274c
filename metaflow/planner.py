"""Choosing a strategy for a memory budget: ``strategy="auto"``.

`candidates` lists the exact strategies worth trying for a loop of T steps
and a batch, in the order of their expected speed (fewest recomputations
first); `choose` compiles them one at a time, shapes only (nothing runs),
and takes the first whose compiled memory fits the budget. All candidates
compute the same meta-gradient (they are exact), so the choice changes only
memory and time, never the result.

The order, and why:

1. ``mixflow``: nothing is recomputed.
2. ``mixflow+remat+saved_inner_grads``: each step's optimiser update is
   recomputed in the backward pass (cheap: elementwise), the inner
   gradient is not.
3. ``mixflow+microbatches=M`` for M = 2, 4, 8, 16 dividing every batch's
   leading axis: the same arithmetic in M smaller pieces, a little slower per
   piece as M grows.
4. ``mixflow+remat+saved_inner_grads+segments=...``, an explicit schedule
   of `metaflow.segments` per number of levels (`segment_schedules`), in
   the order of their recomputation: one level (K near sqrt T: one more
   forward pass of the inner loop, about a third more work), then the
   two-level schedule that stores the fewest carries (two more passes),
   three levels, and the schedule that stores the fewest of all (``auto``'s,
   about ln T levels); each only where it stores fewer carries than the one
   before (`metaflow.segments.stored_carries`), at most `MAX_SCHEDULES`.
   Each is followed by itself with ``+microbatches=M``, M ascending, before
   the next level: a level is a whole forward pass more, micro-batches only
   smaller pieces of the same work. The last is the leanest.

Standard (reverse-over-reverse) strategies are not candidates: each needs
more memory than its MixFlow-MG counterpart and is not faster. The
approximate estimators (implicit, first_order) are never chosen: they change
the meta-gradient.

What "fits" means: the compiled figure of the whole jitted meta-step per
device (arguments + outputs + temporaries - aliased, `MemoryReport.
total_bytes`), which is XLA's buffer assignment for this backend. On XLA:CPU
it is the compiler's plan, not a measurement; an accelerator's compiler
fuses and schedules differently and its allocator adds fragmentation and
runtime buffers, so keep a margin (the budget is the memory you give the
step, not the device's nominal size).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence, Union

from metaflow import segments
from metaflow.estimators import Strategy
from metaflow.memory import MemoryReport, format_bytes

#: The most segment schedules among the candidates (each is compiled, with
#: each micro-batch count, before ``auto`` goes further).
MAX_SCHEDULES = 4

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9,
          "gb": 1e9, "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Union[str, int, float]) -> int:
  """``"16GiB" -> 17179869184``; ``"80GB"`` is decimal, ``1e9`` or ``"512MiB"``
  also work. ValueError for anything else or a size <= 0."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    number, unit = float(value), ""
  else:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*",
                         str(value).lower())
    if not match or match.group(2) not in _UNITS:
      raise ValueError(
          f"memory_budget {value!r} is not a size: use e.g. 16GiB, 512MiB, "
          "80GB or a number of bytes.")
    number, unit = float(match.group(1)), match.group(2)
  size = int(number * _UNITS[unit])
  if size <= 0:
    raise ValueError(f"memory_budget must be > 0 bytes, got {value!r}.")
  return size


def microbatch_options(batch_divisor: int) -> tuple[int, ...]:
  """M in 2, 4, 8, 16 that divide ``batch_divisor`` (the gcd of every
  batch's leading axis)."""
  return tuple(m for m in (2, 4, 8, 16) if batch_divisor % m == 0)


def segment_schedules(num_steps: int) -> tuple[tuple[int, ...], ...]:
  """The segment schedules among the candidates for T = ``num_steps``,
  fewest levels first: the least-memory schedule of 1, 2, 3, ... levels
  up to the least-memory one of all (`metaflow.segments.schedule`), each
  storing fewer carries than the one before (the first fewer than T), the
  levels between the third and the last left out beyond `MAX_SCHEDULES`."""
  best = segments.schedule(num_steps)
  levels = list(range(1, len(best) + 1))
  if len(levels) > MAX_SCHEDULES:
    levels = levels[:MAX_SCHEDULES - 1] + levels[-1:]
  chosen: list[tuple[int, ...]] = []
  fewest = num_steps
  for n in levels:
    lengths = segments.schedule(num_steps, n)
    stored = segments.stored_carries(num_steps, lengths)
    if stored < fewest:
      chosen.append(lengths)
      fewest = stored
  return tuple(chosen)


def candidates(num_steps: int, batch_divisor: int) -> tuple[Strategy, ...]:
  """The exact strategies `choose` tries, fastest first (module docstring)."""
  ms = microbatch_options(batch_divisor)
  names = ["mixflow", "mixflow+remat+saved_inner_grads"]
  names += [f"mixflow+microbatches={m}" for m in ms]
  for lengths in segment_schedules(num_steps):
    segmented = ("mixflow+remat+saved_inner_grads+segments="
                 + "/".join(map(str, lengths)))
    names.append(segmented)
    names += [f"{segmented}+microbatches={m}" for m in ms]
  return tuple(Strategy.parse(n) for n in names)


def recomputation(strategy: Strategy, num_steps: int) -> str:
  """What a strategy recomputes, for the verdicts: ``""`` without
  segments, else e.g. ``"segments=64/8: 3 stored levels, 20 stored
  carries of T=256, recompute factor 3"``."""
  factor = strategy.recompute_factor(num_steps)
  if factor == 1:
    return ""
  token = next(t for t in strategy.name.split("+")
               if t.startswith("segments="))
  return (f"{token}: {factor} stored levels, "
          f"{strategy.stored_carries(num_steps)} stored carries of "
          f"T={num_steps}, recompute factor {factor}")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One row of the table: a strategy, its compiled memory, whether it fits."""
  strategy: Strategy
  memory: MemoryReport
  fits: bool

  def as_dict(self) -> dict:
    return {"strategy": self.strategy.name, "fits": self.fits,
            **self.memory.as_dict()}


class NothingFitsError(ValueError):
  """No candidate strategy fits the memory budget; ``rows`` is the table."""

  def __init__(self, message: str, rows: Sequence[Candidate] = ()):
    super().__init__(message)
    self.rows = list(rows)


def table(rows: Sequence[Candidate], budget: int) -> str:
  """The candidates as printable lines (per-device figures)."""
  width = max([8] + [len(r.strategy.name) for r in rows])
  lines = [f"{'strategy':{width}s} {'static':>10s} {'dynamic':>10s} "
           f"{'total':>10s}  fits {format_bytes(budget)}"]
  for r in rows:
    m = r.memory
    lines.append(f"{r.strategy.name:{width}s} "
                 f"{format_bytes(m.static_bytes or 0):>10s} "
                 f"{format_bytes(m.dynamic_bytes or 0):>10s} "
                 f"{format_bytes(m.total_bytes):>10s}  "
                 f"{'yes' if r.fits else 'no'}")
  return "\n".join(lines)


def fit_hint(num_steps: int) -> str:
  """What would make a meta-step fit, for the one-line refusals."""
  return (f"to fit, lower T (now {num_steps}), the batch or sequence length, "
          "or the model size, split theta over more fsdp devices "
          "(--config.mesh.fsdp), or raise the budget")


def choose(measure: Callable[[Strategy], MemoryReport],
           options: Sequence[Strategy], budget: int,
           hint: str = "") -> tuple[Strategy, list[Candidate]]:
  """The first of ``options`` whose ``measure(strategy).total_bytes`` is at
  most ``budget``, and the table of those compiled (stopping at it).

  Raises:
    NothingFitsError: none fits; one line with the smallest figure found
      and ``hint`` (what would make it fit).
  """
  rows = []
  for strategy in options:
    report = measure(strategy)
    rows.append(Candidate(strategy, report, report.total_bytes <= budget))
    if rows[-1].fits:
      return strategy, rows
  best = min(rows, key=lambda r: r.memory.total_bytes)
  raise NothingFitsError(
      f"no exact strategy fits the memory budget of {format_bytes(budget)} "
      f"per device: the smallest of {len(rows)} candidates is "
      f"{best.strategy.name} at {format_bytes(best.memory.total_bytes)}"
      + (f"; {hint}" if hint else "") + ".", rows)
