"""`Standard`: reverse-over-reverse, the plain exact meta-gradient.

g_t is ``jax.value_and_grad(L)`` inside the loop, and the outer reverse
pass differentiates it again in reverse mode: every intermediate of each
inner step's backward pass becomes a residual of the outer one, kept for
all T steps (what MixFlow-MG avoids). The reference the other estimators
are checked against; takes the memory options of `Exact`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from metaflow import mixflow
from metaflow.estimators.base import Loss, ValueAndGrad
from metaflow.estimators.exact import Exact


@dataclasses.dataclass(frozen=True)
class Standard(Exact):
  """Plain ``jax.grad`` inside the loop (module docstring)."""

  mode: ClassVar[str] = "standard"
  # Its per-chunk gradient is rematerialised under micro-batches: a plain
  # gradient's reverse pass would otherwise keep every chunk's intermediates.
  remat_chunks: ClassVar[bool] = True

  def rule(self, inner_loss: Loss) -> ValueAndGrad:
    return mixflow.standard_value_and_grad(inner_loss)
