"""`FirstOrder`: the inner gradients as constants, an approximation.

g_t is ``jax.value_and_grad(L)`` under ``jax.lax.stop_gradient``
(`metaflow.mixflow.first_order_value_and_grad`): the outer reverse pass
keeps only eta's paths that avoid g_t, theta0 -> theta_t (first-order
MAML) and eta -> Phi (the first-order hypergradient of learned learning
rates). Nothing of the inner backward passes is stored; the T carries are.
Meta-parameters that reach V only through g_t would get zero: loss weights,
and user meta-parameters V does not read itself, both refused by
`check_meta_params`. Takes none of the memory options.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

from metaflow import mixflow
from metaflow.estimators.base import Loss, Strategy, ValueAndGrad

if TYPE_CHECKING:
  from metaflow.meta_params import MetaParams


@dataclasses.dataclass(frozen=True)
class FirstOrder(Strategy):
  """Stop-gradient inner gradients (module docstring)."""

  mode: ClassVar[str] = "first_order"

  def inner_value_and_grad(self, inner_loss: Loss) -> ValueAndGrad:
    return mixflow.first_order_value_and_grad(inner_loss)

  def check_meta_params(self, spec: "MetaParams",
                        outer_reads: Optional[Callable[[str], bool]] = None
                        ) -> None:
    """Loss weights reach V only through g_t; user meta-parameters too
    unless V reads them (``outer_reads("user")``, when known)."""
    if spec.loss_weights is not None:
      raise ValueError(
          "Strategy 'first_order' cannot learn loss weights: they reach V only "
          "through the inner gradients g_t, which first_order treats as "
          "constants, so their first-order meta-gradient is zero. Use an "
          "exact strategy (mixflow) or implicit.")
    if spec.user and outer_reads is not None and not outer_reads("user"):
      raise ValueError(
          "Strategy 'first_order' cannot learn these user meta-parameters: "
          "the outer loss V does not read them, so they reach it only through "
          "the inner gradients g_t, which first_order treats as constants "
          "(their meta-gradient would be zero). Use an exact strategy "
          "(mixflow) or implicit.")
