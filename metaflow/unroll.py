"""The unrolled inner loop and the meta-gradient through it.

Notation (Kemaev et al., 2025): inner parameters theta, optimiser state s,
meta-parameters eta, inner batches x_t, T inner steps, inner loss L and outer
(validation) loss V. One inner step is

    g_t = grad_theta L(theta_t, eta, x_t)
    (theta_{t+1}, s_{t+1}) = Phi(g_t, theta_t, s_t, eta)      # optax update

and the meta-objective is ``V(theta_T, eta, x_val)``, differentiated with
respect to eta through all T steps (truncated back-propagation through time).
The loop is a ``jax.lax.scan`` whose carry is ``(theta, s)``: the optimiser
state is part of the carry and the gradient is an explicit argument of Phi (the
paper's reparameterisation), so compile time does not grow with T.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from metaflow._checks import PyTree, check_int
from metaflow.estimators import Strategy

Loss = Callable[[PyTree, PyTree, PyTree], jax.Array]
OptimizerSpec = Union[optax.GradientTransformation,
                      Callable[[PyTree], optax.GradientTransformation]]


class MetaAux(NamedTuple):
  """Auxiliary outputs of a meta-gradient evaluation (nothing recomputed).

  Attributes:
    outer_loss: scalar ``V(theta_T, eta, x_val)``.
    inner_losses: ``[T]``, ``L(theta_t, eta, x_t)`` for ``t = 0 .. T-1``
      (each evaluated before the step that uses it).
    params: theta_T, the end of the inner loop (not differentiated through
      the aux output; what an online learner carries to its next window).
    opt_state: s_T, the inner optimiser's state at the end.
  """
  outer_loss: jax.Array
  inner_losses: jax.Array
  params: PyTree = None
  opt_state: PyTree = None


class InnerLoopResult(NamedTuple):
  """Result of `inner_loop`: ``theta_T``, ``s_T`` and the ``[T]`` loss trace."""
  params: PyTree
  opt_state: PyTree
  inner_losses: jax.Array


def _as_optimizer_fn(optimizer: OptimizerSpec
                     ) -> Callable[[PyTree], optax.GradientTransformation]:
  if isinstance(optimizer, optax.GradientTransformation):
    return lambda eta: optimizer
  if callable(optimizer):
    def optimizer_fn(eta):
      opt = optimizer(eta)
      if not isinstance(opt, optax.GradientTransformation):
        raise TypeError(
            "optimizer(eta) must return an optax.GradientTransformation, got "
            f"{type(opt).__name__}.")
      return opt
    return optimizer_fn
  raise TypeError(
      "optimizer must be an optax.GradientTransformation or a callable "
      f"eta -> optax.GradientTransformation, got {type(optimizer).__name__}.")


def tree_bytes(tree: PyTree) -> int:
  """Bytes of the arrays (or shapes) of ``tree``."""
  return sum(math.prod(jnp.shape(x)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def check_num_steps(num_steps: Any) -> int:
  """``num_steps`` (T) as an int; ValueError unless an int >= 1."""
  return check_int("num_steps (T)", num_steps)


def _check_leading_axis(inner_batches: PyTree, num_steps: int) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(inner_batches):
    shape = jnp.shape(leaf)
    if not shape or shape[0] != num_steps:
      size = shape[0] if shape else "none (a scalar)"
      raise ValueError(
          f"inner_batches leaf {jax.tree_util.keystr(path) or '<root>'} has "
          f"leading axis {size}, but num_steps (T) is {num_steps}: every leaf "
          "of inner_batches must have leading axis T.")


def _check_scalar_loss(name: str, loss_fn: Loss, *args) -> None:
  out = jax.eval_shape(loss_fn, *args)
  if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == ()
          and jnp.issubdtype(out.dtype, jnp.floating)):
    desc = (f"shape {out.shape} and dtype {out.dtype}"
            if isinstance(out, jax.ShapeDtypeStruct)
            else f"a {type(out).__name__} pytree")
    raise ValueError(
        f"{name}(theta, eta, batch) must return a float scalar, but it "
        f"returned {desc}. Reduce it (e.g. with jnp.mean) to a scalar.")


def _check_opt_state(opt_state0: PyTree, expected: PyTree) -> None:
  """``opt_state0`` must have the structure and shapes of ``opt.init``'s."""
  if jax.tree.structure(opt_state0) != jax.tree.structure(expected):
    raise ValueError(
        "opt_state0 must have the structure of the inner optimiser's state "
        f"opt.init(theta0), {jax.tree.structure(expected)}; got "
        f"{jax.tree.structure(opt_state0)}.")
  for path, got, want in zip(
      (p for p, _ in jax.tree_util.tree_leaves_with_path(expected)),
      jax.tree.leaves(opt_state0), jax.tree.leaves(expected)):
    if jnp.shape(got) != want.shape:
      raise ValueError(
          f"opt_state0 leaf {jax.tree_util.keystr(path)} has shape "
          f"{jnp.shape(got)}, but opt.init(theta0) gives {want.shape}.")


def inner_loop(inner_loss: Loss, optimizer: OptimizerSpec, num_steps: int,
               strategy: Union[str, Strategy] = "mixflow"
               ) -> Callable[..., InnerLoopResult]:
  """Builds ``(eta, theta0, inner_batches, opt_state0=None) ->
  InnerLoopResult``: T inner steps.

  The returned function runs ``jax.lax.scan`` over the leading axis (length T)
  of ``inner_batches``, with carry ``(theta, s)`` starting at ``(theta0,
  opt_state0)`` (``opt_state0=None``: a fresh ``opt.init(theta0)``; given,
  e.g. the state an online learner carries from its previous window, it
  must have that structure). It is differentiable with respect to ``eta``
  and ``theta0``; how is set by ``strategy`` (for ``implicit``, theta_T is
  differentiated implicitly, `metaflow.implicit`).
  """
  strategy = Strategy.parse(strategy)
  num_steps = check_num_steps(num_steps)
  optimizer_fn = _as_optimizer_fn(optimizer)
  return strategy.around_loop(
      functools.partial(_loop, strategy, optimizer_fn, num_steps), inner_loss)


def _loop(strategy: Strategy, optimizer_fn: Callable, num_steps: int,
          inner_loss: Loss) -> Callable[..., InnerLoopResult]:
  """`inner_loop`'s loop for one inner loss (what ``around_loop`` builds)."""
  # (L_t, g_t) with the estimator's differentiation rule.
  value_and_grad = strategy.inner_value_and_grad(inner_loss)

  def run(eta, theta0, inner_batches, opt_state0=None):
    _check_leading_axis(inner_batches, num_steps)
    one_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)),
        inner_batches)
    _check_scalar_loss("inner_loss", inner_loss, theta0, eta, one_batch)
    opt = optimizer_fn(eta)

    def step(carry, batch):
      theta, s = carry
      loss, g = value_and_grad(theta, eta, batch)
      updates, s = opt.update(g, s, theta)
      theta = optax.apply_updates(theta, updates)
      return (theta, s), loss

    if opt_state0 is None:
      opt_state0 = opt.init(theta0)
    else:
      _check_opt_state(opt_state0, jax.eval_shape(opt.init, theta0))
    # The scan, and what it stores, is the estimator's.
    (theta_T, s_T), losses = strategy.scan(step, (theta0, opt_state0),
                                           inner_batches, num_steps)
    return InnerLoopResult(theta_T, s_T, losses)

  return run


@dataclasses.dataclass(frozen=True, eq=False)
class MetaGradient:
  """``(eta, theta0, inner_batches, outer_batch[, opt_state0]) -> (value,
  meta_grads)``.

  Built by `meta_value_and_grad` (or, with ``has_aux=True``, by
  `meta_value_and_grad_with_aux`, which returns ``((value, MetaAux),
  meta_grads)``). ``value`` is the scalar ``V(theta_T, eta, x_val)`` and
  ``meta_grads = dV/deta`` has the structure of ``eta``. Jit- and vmap-able.

  ``opt_state0`` (default None: ``opt.init(theta0)``) is the inner
  optimiser's state at the start, e.g. an online learner's carried s. Only
  eta is differentiated: ``theta0`` and ``opt_state0`` are constants of it
  (the truncated meta-gradient of a window that starts from a carried
  state).
  """

  inner_loss: Loss
  outer_loss: Loss
  optimizer: OptimizerSpec
  num_steps: int
  strategy: Strategy
  init_params: Optional[Callable[[PyTree], PyTree]] = None
  has_aux: bool = False

  def __post_init__(self):
    for name in ("inner_loss", "outer_loss"):
      if not callable(getattr(self, name)):
        raise TypeError(f"{name} must be a callable (theta, eta, batch) -> "
                        f"scalar, got {getattr(self, name)!r}.")
    if self.init_params is not None and not callable(self.init_params):
      raise TypeError("init_params must be None or a callable eta -> theta0, "
                      f"got {self.init_params!r}.")
    _as_optimizer_fn(self.optimizer)
    object.__setattr__(self, "num_steps", check_num_steps(self.num_steps))
    object.__setattr__(self, "strategy", Strategy.parse(self.strategy))

  def objective(self, eta: PyTree, theta0: PyTree, inner_batches: PyTree,
                outer_batch: PyTree, opt_state0: PyTree = None
                ) -> tuple[jax.Array, MetaAux]:
    """``(V(theta_T, eta, x_val), MetaAux)``: the meta-objective itself.

    Differentiating it with respect to eta (e.g. after ``jax.vmap`` over
    tasks and a mean) gives the meta-gradient with this object's strategy;
    `__call__` is ``jax.value_and_grad`` of it for one task.
    """
    if self.init_params is not None:
      theta0 = self.init_params(eta)
    elif theta0 is None:
      raise ValueError("theta0 is None but no init_params was given to "
                       "meta_value_and_grad.")
    result = inner_loop(self.inner_loss, self.optimizer, self.num_steps,
                        self.strategy)(eta, theta0, inner_batches, opt_state0)
    _check_scalar_loss("outer_loss", self.outer_loss, result.params, eta,
                       outer_batch)
    value = self.strategy.outer_value(self.outer_loss)(result.params, eta,
                                                       outer_batch)
    return value, MetaAux(value, result.inner_losses, result.params,
                          result.opt_state)

  def __call__(self, eta, theta0, inner_batches, outer_batch,
               opt_state0=None):
    (value, aux), meta_grads = jax.value_and_grad(
        self.objective, has_aux=True)(eta, theta0, inner_batches, outer_batch,
                                      opt_state0)
    if self.has_aux:
      return (value, aux), meta_grads
    return value, meta_grads

  def carry_bytes(self, eta, theta0) -> int:
    """Bytes of one inner-loop carry ``(theta, s)`` (shapes only, no
    compute)."""
    def carry(eta, theta0):
      if self.init_params is not None:
        theta0 = self.init_params(eta)
      return theta0, _as_optimizer_fn(self.optimizer)(eta).init(theta0)
    return tree_bytes(jax.eval_shape(carry, eta, theta0))

  def static_bytes(self, eta, theta0, inner_batches=None,
                   outer_batch=None) -> int:
    """The paper's static memory: what the estimator stores of the loop
    (`Strategy.static_bytes`: T copies of ``(theta, s)``, ceil(T/K1) + ...
    + Kn with segments, theta_T alone for implicit)."""
    del inner_batches, outer_batch
    theta = self.init_params(eta) if self.init_params is not None else theta0
    return self.strategy.static_bytes(self.num_steps,
                                      self.carry_bytes(eta, theta0),
                                      tree_bytes(theta))


def meta_value_and_grad(
    inner_loss: Loss,
    outer_loss: Loss,
    optimizer: OptimizerSpec,
    num_steps: int,
    strategy: Union[str, Strategy] = "mixflow",
    init_params: Optional[Callable[[PyTree], PyTree]] = None,
) -> MetaGradient:
  """The meta-gradient of the outer loss through T unrolled inner steps.

  ``fn = meta_value_and_grad(L, V, optimizer, T, strategy, init_params)``, then
  ``value, meta_grads = fn(eta, theta0, inner_batches, outer_batch)``
  (optionally ``opt_state0``: the inner optimiser's state to start from,
  default a fresh one).

  Args:
    inner_loss: ``L(theta, eta, batch) -> scalar``.
    outer_loss: ``V(theta, eta, batch) -> scalar``, evaluated at ``theta_T``.
    optimizer: an ``optax.GradientTransformation``, or a callable
      ``eta -> GradientTransformation`` for learned optimiser hyper-parameters
      (see `metaflow.optim` for inner optimisers that are safe to
      differentiate, Adam in particular).
    num_steps: T >= 1.
    strategy: a `Strategy` or a string such as ``"mixflow+remat"``.
    init_params: optional ``eta -> theta0`` (MAML); when given, the ``theta0``
      argument is ignored and may be None.

  Returns:
    A `MetaGradient` ``fn(eta, theta0, inner_batches, outer_batch) ->
    (value, meta_grads)``: ``inner_batches`` is a pytree whose leaves have
    leading axis T (step t gets slice t), ``value`` the scalar outer loss and
    ``meta_grads`` ``dV/deta`` shaped like ``eta``. Only eta is differentiated.

  Raises:
    ValueError: unknown strategy, ``T < 1``; when called, a leading axis of
      ``inner_batches`` different from T, or a loss that is not a scalar.
  """
  return MetaGradient(inner_loss, outer_loss, optimizer, num_steps,
                      Strategy.parse(strategy),
                      init_params, has_aux=False)


def meta_value_and_grad_with_aux(
    inner_loss: Loss,
    outer_loss: Loss,
    optimizer: OptimizerSpec,
    num_steps: int,
    strategy: Union[str, Strategy] = "mixflow",
    init_params: Optional[Callable[[PyTree], PyTree]] = None,
) -> MetaGradient:
  """As `meta_value_and_grad`, but ``fn(...)`` returns ``((value, MetaAux),
  meta_grads)`` with the inner-loss trace ``[T]`` and the outer loss."""
  return dataclasses.replace(
      meta_value_and_grad(inner_loss, outer_loss, optimizer, num_steps,
                          strategy, init_params), has_aux=True)
