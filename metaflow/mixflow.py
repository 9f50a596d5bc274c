"""The inner gradient and its differentiation rules (standard, MixFlow-MG,
first-order).

One inner step needs the inner loss and its gradient,

    (L_t, g_t) = (L(theta_t, eta, x_t), grad_theta L(theta_t, eta, x_t)),

and the meta-gradient back-propagates through ``g_t``. Each function here
computes ``(L_t, g_t)``; they differ only in how the outer reverse pass
differentiates it, which is what an estimator (`metaflow.estimators`) picks.
`gradient_jvp` is the forward-over-reverse Hessian-vector product that
MixFlow-MG's rule and the implicit strategy's solver (`metaflow.implicit`)
are built on.
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.core
import jax.numpy as jnp

from metaflow._checks import PyTree

Loss = Callable[[PyTree, PyTree, PyTree], jax.Array]
ValueAndGrad = Callable[[PyTree, PyTree, PyTree], tuple[jax.Array, PyTree]]


def standard_value_and_grad(inner_loss: Loss) -> ValueAndGrad:
  """``(theta, eta, x) -> (L, grad_theta L)`` by plain ``jax.value_and_grad``.

  Differentiating it again in reverse mode is reverse-over-reverse: every
  intermediate of the inner backward pass becomes a residual of the outer one.
  """
  return jax.value_and_grad(inner_loss, argnums=0)


def gradient_jvp(inner_loss: Loss, argnums: Union[int, tuple[int, ...]]
                 ) -> Callable[[PyTree, PyTree, PyTree, PyTree],
                               tuple[PyTree, PyTree]]:
  """``(theta, eta, x, v) -> (grad, d grad / d theta . v)``,
  forward-over-reverse.

  ``grad`` is ``jax.grad(inner_loss, argnums)`` (theta is argument 0, eta 1)
  at ``(theta, eta, x)``; the tangent is its directional derivative along
  ``v`` (shaped like theta): ``H_tt v`` for argnums 0, ``H_et v`` for 1, both
  for ``(0, 1)``. One ``jax.jvp`` of the reverse-mode gradient: it keeps no
  more than one gradient evaluation's working set.
  """
  grad = jax.grad(inner_loss, argnums=argnums)

  def fn(theta, eta, batch, v):
    return jax.jvp(lambda th: grad(th, eta, batch), (theta,), (v,))

  return fn


def first_order_value_and_grad(inner_loss: Loss) -> ValueAndGrad:
  """``(theta, eta, x) -> (L, grad_theta L)`` with the gradient a constant.

  Both outputs are wrapped in ``jax.lax.stop_gradient``: the outer reverse
  pass treats ``g_t`` as data, so nothing of the inner backward pass is kept
  and the meta-gradient keeps only the paths that do not go through ``g_t``:
  theta0 -> theta_t (first-order MAML) and eta -> Phi (the first-order
  hypergradient of learned learning rates, ``-g_t`` per unit of rate for
  SGD). Meta-parameters that reach V only through ``g_t`` (loss weights)
  get zero.
  """
  value_and_grad = jax.value_and_grad(inner_loss, argnums=0)

  def fn(theta, eta, batch):
    return jax.lax.stop_gradient(value_and_grad(theta, eta, batch))

  return fn


#: JAX's tracers of forward-mode differentiation: values that an enclosing
#: ``jax.grad`` or ``jax.jvp`` differentiates. They are not hoisted: eta
#: must reach L as its argument, and a closure over it keeps failing loudly
#: (JAX's "closed-over value" error) rather than being differentiated a
#: second time through a first-order rule.
_DIFFERENTIATED = ("JVPTracer", "LinearizeTracer")


def _differentiated(x: object) -> bool:
  return any(c.__name__ in _DIFFERENTIATED for c in type(x).__mro__)


def hoist_closure(fn: Callable, *args: PyTree
                  ) -> tuple[Callable, tuple[tuple, tuple]]:
  """``fn`` with the traced values it closes over as explicit arguments.

  Returns ``(converted, consts)`` with ``converted(*args, consts) ==
  fn(*args)``; ``consts = (floats, others)``, the closed-over arrays of an
  enclosing ``jit``, ``scan`` or ``vmap`` (e.g. a model's non-trainable
  state, an argument of the jitted meta-step) split into floating-point
  ones (which have cotangents) and the rest (integers, keys). A custom
  derivative rule must take every traced value it uses as an input: JAX
  traces a backward rule later, inside the reverse pass of the loop, where
  a value of the trace around the rule is out of reach ("No constant
  handler"). Values under differentiation (`_DIFFERENTIATED`) stay closed
  over. With nothing to hoist, ``consts`` is ``((), ())`` and
  ``converted`` calls ``fn`` itself.
  """
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  traced = [i for i, c in enumerate(closed.consts)
            if isinstance(c, jax.core.Tracer) and not _differentiated(c)]
  if not traced:
    return (lambda *args_consts: fn(*args_consts[:-1])), ((), ())
  is_float = {i: jnp.issubdtype(jnp.result_type(closed.consts[i]), jnp.inexact)
              for i in traced}
  floats = tuple(closed.consts[i] for i in traced if is_float[i])
  others = tuple(closed.consts[i] for i in traced if not is_float[i])

  def converted(*args_consts):
    *call_args, (new_floats, new_others) = args_consts
    consts, f, o = list(closed.consts), iter(new_floats), iter(new_others)
    for i in traced:
      consts[i] = next(f) if is_float[i] else next(o)
    out = jax.core.eval_jaxpr(closed.jaxpr, consts,
                              *jax.tree.leaves(call_args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return converted, (floats, others)


def mixflow_value_and_grad(inner_loss: Loss) -> ValueAndGrad:
  r"""``(theta, eta, x) -> (L, grad_theta L)`` with MixFlow-MG's custom VJP.

  Shapes: ``theta`` and ``eta`` are arbitrary pytrees of float arrays, ``x``
  any pytree; the outputs are a scalar ``L`` and ``g`` shaped like ``theta``.

  Derivation of the backward rule. Write ``F(theta, eta) = (L, g)`` with
  ``g = grad_theta L`` (the batch x is held fixed). Reverse mode asks, for
  output cotangents ``(c, v)`` (c a scalar, v shaped like theta), for the input
  cotangents ``theta_bar = c * grad_theta L + (dg/dtheta)^T v`` and
  ``eta_bar = c * grad_eta L + (dg/deta)^T v``. Here ``dg/dtheta = H_tt`` and
  ``dg/deta = H_te`` are blocks of the Hessian of L. For twice continuously
  differentiable L the Hessian is symmetric (Schwarz), so ``H_tt^T v = H_tt v``
  and ``H_te^T v = H_et v``, where ``H_et = d(grad_eta L)/dtheta``. Both are the
  directional derivative along v of the joint gradient map
  ``theta -> (grad_theta L, grad_eta L)``, i.e. the tangent output of ONE
  forward-mode ``jax.jvp`` of that map at theta along v (forward-over-reverse);
  its primal output ``(g, grad_eta L)`` supplies the ``c`` terms. So the
  forward pass only has to save its inputs ``(theta, eta, x)``, not the
  intermediates of the inner backward pass that reverse-over-reverse keeps, and
  the backward pass does about one extra gradient's worth of arithmetic.
  Cotangents for the batch x are returned as zero: the engine never
  differentiates with respect to data.

  Everything eta influences inside L must reach it through the explicit
  ``eta`` argument: a closure over a value that an enclosing ``jax.grad``
  differentiates makes JAX raise an error ("...with respect to a
  closed-over value") instead of silently dropping that gradient. Other
  traced values L closes over (arrays of the trace around the loop: a
  model's non-trainable state, an argument of the jitted step) are hoisted
  into explicit inputs of the rule (`hoist_closure`); a floating-point one,
  c, gets its cotangent by the same argument as eta, ``c_bar = c_coef *
  grad_c L + H_ct v`` with ``H_ct v = d(grad_c L)/dtheta . v``, one more
  output of the same JVP (exact if a transformation applied later, such as
  ``jax.grad`` of a jitted function, differentiates it); integers and keys
  get none. With nothing closed over the rule is exactly the two-output one
  above.
  The rule is first-order only: third derivatives through it are not defined.
  Inside ``shard_map``, a ``theta`` or ``eta`` replicated over a manual mesh
  axis gets its cotangent summed over that axis (`_typed_like`), as JAX's own
  rules do for a replicated input (the transpose of its implicit broadcast).
  """
  def value_and_grad(theta, eta, batch):
    loss, consts = hoist_closure(inner_loss, theta, eta, batch)
    return _mixflow_rule(loss)(theta, eta, batch, consts)

  return value_and_grad


def _mixflow_rule(loss: Callable) -> Callable:
  """The custom-VJP ``(theta, eta, x, consts) -> (L, g)`` of
  `mixflow_value_and_grad` for ``loss(theta, eta, x, consts)``."""

  @jax.custom_vjp
  def value_and_grad(theta, eta, batch, consts):
    return jax.value_and_grad(loss, argnums=0)(theta, eta, batch, consts)

  def fwd(theta, eta, batch, consts):
    return (value_and_grad(theta, eta, batch, consts),
            (theta, eta, batch, consts))

  def bwd(residuals, cotangents):
    theta, eta, batch, (floats, others) = residuals
    c, v = cotangents
    # The joint gradient map theta -> (grad_theta, grad_eta, grad_floats) L.
    grads = jax.grad(lambda th, et, fl: loss(th, et, batch, (fl, others)),
                     argnums=(0, 1, 2))
    (g_theta, g_eta, g_floats), (h_tt_v, h_et_v, h_ft_v) = jax.jvp(
        lambda th: grads(th, eta, floats), (theta,), (v,))
    bar = lambda h, g, p: _typed_like(h + c * g, p)
    return (jax.tree.map(bar, h_tt_v, g_theta, theta),
            jax.tree.map(bar, h_et_v, g_eta, eta), None,
            (jax.tree.map(bar, h_ft_v, g_floats, floats),
             tuple(None for _ in others)))

  value_and_grad.defvjp(fwd, bwd)
  return value_and_grad


def _varying_axes(x: jax.Array) -> frozenset:
  """The manual mesh axes (inside ``shard_map``) over which ``x`` varies."""
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", ()))


def _typed_like(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
  """``cotangent`` with the manual-axis type of ``primal`` (a no-op outside
  ``shard_map``): summed over the axes ``primal`` is replicated over (the
  transpose of broadcasting it), broadcast over those it varies over."""
  summed = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
  if summed:
    cotangent = jax.lax.psum(cotangent, summed)
  varying = tuple(sorted(_varying_axes(primal) - _varying_axes(cotangent)))
  if varying:
    cotangent = jax.lax.pcast(cotangent, varying, to="varying")
  return cotangent
