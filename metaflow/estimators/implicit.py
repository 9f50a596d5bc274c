"""`Implicit`: implicit differentiation at theta_T (iMAML, Rajeswaran et al.,
2019), an approximation.

The loop runs forward only and the meta-gradient comes from conjugate
gradient on ``(H_tt + cg_damping I) u = grad_theta V`` with at most
``cg_steps`` Hessian-vector products, then ``-H_et u`` (the derivation, what
it assumes and when it is wrong: `metaflow.implicit`). Memory does not grow
with T: one theta_T is stored. Exact when theta_T is a stationary point of
L; blind to eta's effect on the path (learned learning rates, a learned
update rule) and to theta0
(a learned initialisation needs `MetaParams.proximal`), both refused by
`check_meta_params`. Takes none of the memory options.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

from metaflow import implicit, mixflow
from metaflow._checks import check_int, check_number
from metaflow.estimators.base import Loop, Loss, Strategy, ValueAndGrad

if TYPE_CHECKING:
  from metaflow.meta_params import MetaParams


@dataclasses.dataclass(frozen=True)
class Implicit(Strategy):
  """Implicit differentiation at theta_T (module docstring).

  Attributes:
    cg_steps: the most Hessian-vector products (conjugate-gradient
      iterations) spent on the linear solve.
    cg_damping: lambda_d >= 0 in ``(H + lambda_d I) u = v`` (regularises an
      ill-conditioned or indefinite H; biases the gradient).
  """

  cg_steps: int = 20
  cg_damping: float = 0.0

  mode: ClassVar[str] = "implicit"

  def __post_init__(self):
    object.__setattr__(self, "cg_steps",
                       check_int("Implicit.cg_steps", self.cg_steps))
    object.__setattr__(self, "cg_damping",
                       check_number("Implicit.cg_damping", self.cg_damping))

  def inner_value_and_grad(self, inner_loss: Loss) -> ValueAndGrad:
    # The loop is never differentiated itself (`around_loop`).
    return mixflow.standard_value_and_grad(inner_loss)

  def around_loop(self, make_loop: Callable[[Loss], Loop],
                  inner_loss: Loss) -> Loop:
    return implicit.at_solution(make_loop, inner_loss, self.cg_steps,
                                self.cg_damping)

  def stored_carries(self, num_steps: int) -> int:
    """1: only theta_T, where the backward pass starts."""
    del num_steps
    return 1

  def static_bytes(self, num_steps: int, carry_bytes: int,
                   theta_bytes: int) -> int:
    """The one theta_T its backward pass starts from (no optimiser
    state)."""
    del num_steps, carry_bytes
    return theta_bytes

  def check_meta_params(self, spec: "MetaParams",
                        outer_reads: Optional[Callable[[str], bool]] = None
                        ) -> None:
    """Learned learning rates (or a learned update rule) steer only the
    path to theta_T, not the stationary point of L that implicit
    differentiation differentiates; a learned initialisation without
    ``proximal`` does not move it either: both would get a zero
    meta-gradient."""
    del outer_reads
    for learned, what in ((spec.learning_rate_is_learned, "learning rates"),
                          (spec.optimizer is not None, "an update rule")):
      if learned:
        raise ValueError(
            f"Strategy 'implicit' cannot learn {what}: they enter only "
            "the inner optimiser Phi (the path to theta_T), not the "
            "stationary point of L that implicit differentiation "
            "differentiates, so their implicit meta-gradient is zero. Use "
            "an exact strategy (mixflow) or first_order.")
    if spec.learn_init and not spec.proximal:
      raise ValueError(
          "Strategy 'implicit' with a learned initialisation needs "
          "MetaParams(proximal=lam > 0) (the built-in tasks: "
          "--config.task.proximal): without the proximal term the "
          "stationary point of L does not depend on theta0, so its implicit "
          "meta-gradient is zero.")
