"""Inner optimisers that are safe to differentiate through.

These are ordinary optax ``GradientTransformation`` objects; they differ
from optax's own constructors in two ways that matter for meta-learning:

* the learning rate may be a pytree (per-parameter-tensor or per-parameter-
  element learning rates, e.g. ``exp(eta["log_lr"])``), not only a scalar or a
  schedule; a traced scalar or pytree lets eta enter the update Phi;
* `adam` uses ``eps_root=DEFAULT_EPS_ROOT`` (not optax's 0.0). Adam divides by
  ``sqrt(nu + eps_root) + eps``; with ``eps_root = 0`` the derivative of the
  square root at ``nu = 0`` (a parameter whose gradient is exactly zero, e.g. at
  the first step or an unused embedding row) is infinite and the meta-gradient
  becomes NaN. A tiny ``eps_root`` keeps it finite and barely changes the inner
  update (see `DEFAULT_EPS_ROOT`); pass ``eps_root`` to choose another value.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import optax

from metaflow._checks import PyTree

LearningRate = Union[float, jax.Array, optax.Schedule, PyTree]

#: Default ``eps_root`` of `adam`: the derivative of ``sqrt(nu + eps_root)`` at
#: ``nu = 0`` becomes ``0.5 / sqrt(eps_root) = 5e3``, finite in float32; for
#: gradient magnitudes above ~1e-3 the update changes by less than 0.5%.
DEFAULT_EPS_ROOT = 1e-8


def _is_scalar(x) -> bool:
  return isinstance(x, (int, float)) or (
      hasattr(x, "shape") and jnp.ndim(x) == 0)


def _scale(updates: PyTree, learning_rate) -> PyTree:
  """``-learning_rate * updates`` for a scalar or a params-shaped pytree
  rate."""
  if _is_scalar(learning_rate):
    return jax.tree.map(lambda u: (-learning_rate * u).astype(u.dtype), updates)
  try:
    return jax.tree.map(
        lambda u, lr: (-lr * u).astype(u.dtype), updates, learning_rate)
  except ValueError as e:
    raise ValueError(
        "A pytree learning rate must have the structure of the parameters "
        f"({jax.tree.structure(updates)}); got "
        f"{jax.tree.structure(learning_rate)}.") from e


def scale_by_learning_rate(
    learning_rate: LearningRate) -> optax.GradientTransformation:
  """Multiplies updates by ``-learning_rate``.

  Args:
    learning_rate: a scalar; a pytree with the structure of the parameters
      whose leaves broadcast against them (scalars for per-tensor rates, full
      shapes for per-element rates); or a schedule ``count -> scalar or
      pytree``, where ``count`` is the number of updates done so far (a
      schedule over learned per-step rates ``lr[t]`` gives each inner step its
      own learned learning rate).

  Returns:
    A stateless transformation, or one whose state is the update count for a
    schedule.
  """
  if callable(learning_rate):
    schedule = learning_rate

    def init_schedule(params):
      del params
      return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_schedule(updates, state, params=None):
      del params
      scaled = _scale(updates, schedule(state.count))
      return scaled, optax.ScaleByScheduleState(
          count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_schedule, update_schedule)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return _scale(updates, learning_rate), state

  return optax.GradientTransformation(init_fn, update_fn)


def sgd(learning_rate: LearningRate, momentum: Optional[float] = None,
        nesterov: bool = False) -> optax.GradientTransformation:
  """SGD, optionally with (Nesterov) momentum; see `scale_by_learning_rate`."""
  parts = []
  if momentum is not None:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def adam(learning_rate: LearningRate, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, eps_root: float = DEFAULT_EPS_ROOT
         ) -> optax.GradientTransformation:
  """Adam with a differentiable default ``eps_root`` (see the module doc)."""
  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
      scale_by_learning_rate(learning_rate))


#: Names accepted by `create`.
NAMES = ("sgd", "momentum", "adam")


def create(name: str,
           learning_rate: LearningRate) -> optax.GradientTransformation:
  """An inner optimiser by name: ``"sgd"``, ``"momentum"`` (SGD with momentum
  0.9) or ``"adam"`` (with the differentiable default ``eps_root``)."""
  if name == "sgd":
    return sgd(learning_rate)
  if name == "momentum":
    return sgd(learning_rate, momentum=0.9)
  if name == "adam":
    return adam(learning_rate)
  raise ValueError(
      f"Unknown inner optimiser {name!r}; expected one of {NAMES}.")
