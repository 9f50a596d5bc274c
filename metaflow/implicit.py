r"""The implicit meta-gradient (iMAML): implicit differentiation at theta_T.

The estimator `metaflow.estimators.Implicit` (``"implicit"``; ``cg_steps``,
``cg_damping``).

**What it assumes.** theta_T, the end of the inner loop, is a stationary point
of the inner loss, ``grad_theta L(theta_T, eta) = 0`` (L with its regulariser,
e.g. iMAML's proximal term ``lam/2 ||theta - eta["init"]||^2``, see
`MetaParams.proximal`), with H = d^2 L / d theta^2 invertible there. The
implicit function theorem then makes theta* a differentiable function of eta:
differentiating ``grad_theta L(theta*(eta), eta) = 0`` gives

    H_tt dtheta*/deta + H_te = 0   =>   dtheta*/deta = -H_tt^{-1} H_te,

where ``H_tt = d^2 L / dtheta^2`` and ``H_te = d(grad_theta L)/deta``. So for
the cotangent ``v = grad_theta V(theta_T, eta, x_val)`` the meta-gradient is

    dV/deta = dV/deta|_direct - H_et u,   with   (H_tt + lambda_d I) u = v,

using ``H_te^T = H_et = d(grad_eta L)/dtheta`` (symmetry of second derivatives)
and ``lambda_d = cg_damping`` (0: the exact formula). u is found by conjugate
gradient (``jax.scipy.sparse.linalg.cg``, which assumes H symmetric positive
definite) with at most ``cg_steps`` products ``H_tt w``; each, and the final
``H_et u``, is one forward-over-reverse JVP of the inner gradient
(`metaflow.mixflow.gradient_jvp`, the primitive of MixFlow-MG's rule). For
MAML with the proximal term, ``H_et u = -lam u`` and the formula is iMAML's
``(I + H_L / lam)^{-1} v`` (H_L the Hessian of the unregularised loss).

**What it costs.** The loop runs forward only, inside the custom VJP's
forward: nothing of the T steps is stored, only theta_T, eta and the batch
that H is taken on. Memory does not grow with T and the inner optimiser can
be anything (Adam, momentum, ...); time is T inner steps plus cg_steps + 1
Hessian-vector products.

**What it cannot do.** eta that only steers the path (learned learning rates,
the optimiser's hyper-parameters) and theta0 itself (a learned
initialisation without a proximal term) do not move the stationary point:
their implicit gradient is zero, and `Implicit.check_meta_params` refuses
them. The gradient is wrong when the inner problem is not solved (theta_T not
stationary: too few inner steps, too small a learning rate) or the solve is
not (too few ``cg_steps`` for H's condition number, or H not positive
definite: a non-convex L far from a minimum; CG then still returns a
finite direction, just not H^{-1} v). Because it is blind to the
path, meta-training with it can also move eta to where the actual T-step
loop diverges (``experiments.estimators``: sinusoid_maml at T=5).

**Which batch.** H is taken on the last inner batch ``x_{T-1}``: the
inner problem itself when every inner step sees the same batch (MAML's
full-batch support set), a one-batch estimate when the inner batches are a
stream.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.scipy.sparse.linalg import cg

from metaflow import mixflow
from metaflow._checks import PyTree

Loss = Callable[[PyTree, PyTree, PyTree], jax.Array]


def implicit_solve(inner_loss: Loss, theta: PyTree, eta: PyTree, batch: PyTree,
                   v: PyTree, cg_steps: int, cg_damping: float = 0.0) -> PyTree:
  """u with ``(H_tt + cg_damping I) u = v`` at ``(theta, eta, batch)``, by at
  most ``cg_steps`` conjugate-gradient iterations (one H_tt product each).

  Shapes: ``theta``, ``v`` and ``u`` are pytrees of the same structure.
  """
  hvp = mixflow.gradient_jvp(inner_loss, argnums=0)

  def matvec(w):
    _, h_w = hvp(theta, eta, batch, w)
    return jax.tree.map(lambda hw, wi: hw + cg_damping * wi, h_w, w)

  # tol=0: exactly cg_steps iterations unless the residual vanishes.
  u, _ = cg(matvec, v, maxiter=cg_steps, tol=0.0)
  return u


def implicit_meta_grad(inner_loss: Loss, theta: PyTree, eta: PyTree,
                       batch: PyTree, v: PyTree, cg_steps: int,
                       cg_damping: float = 0.0) -> PyTree:
  """``-H_et u`` (shaped like eta) with u from `implicit_solve`: the
  eta-cotangent of theta* for the theta-cotangent ``v``."""
  u = implicit_solve(inner_loss, theta, eta, batch, v, cg_steps, cg_damping)
  _, h_et_u = mixflow.gradient_jvp(inner_loss, argnums=1)(theta, eta, batch, u)
  return jax.tree.map(jnp.negative, h_et_u)


def at_solution(make_loop: Callable[[Loss], Callable], inner_loss: Loss,
                cg_steps: int, cg_damping: float = 0.0) -> Callable:
  """The loop ``make_loop(inner_loss)`` (``(eta, theta0, inner_batches,
  opt_state0=None) -> InnerLoopResult``), run forward only, with theta_T
  differentiated implicitly (see the module docstring).

  The returned function has the same signature and outputs. Its custom VJP
  takes the cotangent of ``params`` (theta_T); cotangents of the optimiser
  state and the loss trace are dropped (V is a function of theta_T alone),
  and theta0, the starting optimiser state and the batches get zero (the
  stationary point does not depend on where the loop started). Values L
  closes over are inputs of the rule (`metaflow.mixflow.hoist_closure`);
  a floating-point one gets its implicit cotangent like eta.
  """

  # loss: L with its closed-over values as inputs (``loss(theta, eta, x,
  # consts)``, `metaflow.mixflow.hoist_closure`), a static argument; the
  # loop runs on it with the values passed in, so that nothing of the trace
  # around the rule is closed over inside it.
  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def solution(loss, eta, theta0, inner_batches, opt_state0, consts):
    return make_loop(lambda th, et, b: loss(th, et, b, consts))(
        eta, theta0, inner_batches, opt_state0)

  def fwd(loss, eta, theta0, inner_batches, opt_state0, consts):
    result: Any = solution(loss, eta, theta0, inner_batches, opt_state0,
                           consts)
    last = jax.tree.map(lambda x: x[-1], inner_batches)
    return result, (result.params, eta, last, consts)

  def bwd(loss, residuals, cotangent):
    theta_T, eta, last, (floats, others) = residuals
    # A closed-over float c is a parameter of L like eta, d theta*/dc =
    # -H_tt^{-1} H_tc: its cotangent is -H_ct u, from the same solve.
    eta_bar, floats_bar = implicit_meta_grad(
        lambda th, eta_floats, b: loss(th, eta_floats[0], b,
                                       (eta_floats[1], others)),
        theta_T, (eta, floats), last, cotangent.params, cg_steps, cg_damping)
    return (eta_bar, None, None, None,
            (floats_bar, tuple(None for _ in others)))

  solution.defvjp(fwd, bwd)

  def run(eta, theta0, inner_batches, opt_state0=None):
    last = jax.tree.map(lambda x: x[-1], inner_batches)
    loss, consts = mixflow.hoist_closure(inner_loss, theta0, eta, last)
    return solution(loss, eta, theta0, inner_batches, opt_state0, consts)

  return run
