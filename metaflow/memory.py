"""Compiled memory of a (meta-)gradient function, from XLA's own analysis.

``jax.jit(f).lower(*args).compile().memory_analysis()`` is exact and
repeatable: it reports the buffer assignment XLA made, not a sample of a run.
`analyze` adds the paper's split of the temporary memory into

* static memory: the T copies of the inner-loop carry ``(theta, s)`` that the
  scan keeps for the backward pass (MixFlow-MG does not change it; sharding
  does; segments of K steps keep ceil(T/K) + K, nested ones ceil(T/K1) +
  ceil(K1/K2) + ... + Kn, `Strategy.stored_carries`),
  and
* dynamic memory: everything else, i.e. the working set of the inner and outer
  gradient computations, which is what MixFlow-MG reduces.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax


def format_bytes(n: float) -> str:
  """``1536 -> '1.50 KiB'``: binary units, two decimals."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """XLA's compiled memory statistics, in bytes.

  Attributes:
    temp_bytes: scratch buffers live during the computation (the number that
      strategies change).
    argument_bytes, output_bytes, alias_bytes: inputs, outputs, and the part of
      the outputs that reuses input buffers.
    generated_code_bytes: size of the compiled code.
    peak_bytes: XLA's peak-memory estimate (0 where the backend gives none).
    static_bytes: the stored copies of ``(theta, s)`` when known, else None.
    population_bytes: with online learners (`metaflow.online`), their
      state (P carries (theta, s) and ages), held between meta-steps: in
      the arguments (and, donated, the outputs), not the temporaries; the
      rest of the static memory. None otherwise.
  """

  temp_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  generated_code_bytes: int
  peak_bytes: int
  static_bytes: Optional[int] = None
  population_bytes: Optional[int] = None

  @property
  def dynamic_bytes(self) -> Optional[int]:
    """``temp_bytes - static_bytes``: memory beyond the stored carries."""
    if self.static_bytes is None:
      return None
    return self.temp_bytes - self.static_bytes

  @property
  def total_bytes(self) -> int:
    """Arguments + outputs + temporaries, less what outputs alias."""
    return (self.argument_bytes + self.output_bytes + self.temp_bytes
            - self.alias_bytes)

  def as_dict(self) -> dict[str, Optional[int]]:
    d = dataclasses.asdict(self)
    d["dynamic_bytes"] = self.dynamic_bytes
    d["total_bytes"] = self.total_bytes
    return d

  def __str__(self) -> str:
    parts = [f"temp {format_bytes(self.temp_bytes)}"]
    if self.static_bytes is not None and self.dynamic_bytes is not None:
      parts.append(f"(static {format_bytes(self.static_bytes)}, "
                   f"dynamic {format_bytes(self.dynamic_bytes)})")
    if self.population_bytes is not None:
      parts.append(f"population {format_bytes(self.population_bytes)}")
    parts.append(f"args {format_bytes(self.argument_bytes)}, "
                 f"out {format_bytes(self.output_bytes)}")
    return " ".join(parts)


def report(compiled: jax.stages.Compiled,
           static_bytes: Optional[int] = None,
           population_bytes: Optional[int] = None) -> MemoryReport:
  """The `MemoryReport` of an already compiled function."""
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError("This backend gives no compiled memory analysis.")
  return MemoryReport(
      temp_bytes=int(stats.temp_size_in_bytes),
      argument_bytes=int(stats.argument_size_in_bytes),
      output_bytes=int(stats.output_size_in_bytes),
      alias_bytes=int(stats.alias_size_in_bytes),
      generated_code_bytes=int(stats.generated_code_size_in_bytes),
      peak_bytes=int(getattr(stats, "peak_memory_in_bytes", 0) or 0),
      static_bytes=static_bytes, population_bytes=population_bytes)


def analyze(fn: Callable[..., Any], *args: Any,
            static_bytes: Optional[int] = None,
            population_bytes: Optional[int] = None) -> MemoryReport:
  """Compiles ``fn(*args)`` with ``jax.jit`` and reports its memory.

  Args:
    fn: any function of arrays; a `metaflow.MetaGradient` (what
      `metaflow.meta_value_and_grad` returns) also gets the static/dynamic
      split computed from its carry shapes.
    *args: example arguments (arrays or ``jax.ShapeDtypeStruct`` leaves;
      nothing is executed).
    static_bytes: overrides the static memory (e.g. for a vmapped function,
      the meta-batch size times that of one task).
    population_bytes: an online population's state among the arguments.
  """
  if static_bytes is None and hasattr(fn, "static_bytes"):
    static_bytes = fn.static_bytes(*args)
  compiled = jax.jit(fn).lower(*args).compile()
  return report(compiled, static_bytes, population_bytes)
