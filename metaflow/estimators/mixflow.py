"""`MixFlow`: MixFlow-MG (Kemaev et al., ICML 2025), the default.

g_t carries a custom VJP whose backward rule is ONE forward-over-reverse
JVP of the joint gradient map ``theta -> (grad_theta L, grad_eta L)``
along the cotangent v, giving ``H_tt v`` and ``H_et v`` (the derivation is
next to the rule, `metaflow.mixflow.mixflow_value_and_grad`). Each step
keeps only its inputs ``(theta_t, eta, x_t)`` instead of the inner backward
pass's intermediates: exact, and over 10x less memory than `Standard` on
the paper's models. Takes the memory options of `Exact`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from metaflow import mixflow
from metaflow.estimators.base import Loss, ValueAndGrad
from metaflow.estimators.exact import Exact


@dataclasses.dataclass(frozen=True)
class MixFlow(Exact):
  """Forward-over-reverse differentiation of g_t (module docstring)."""

  mode: ClassVar[str] = "mixflow"

  def rule(self, inner_loss: Loss) -> ValueAndGrad:
    return mixflow.mixflow_value_and_grad(inner_loss)
