"""Gradient strategies: how the meta-gradient is differentiated through the inner loop.

A `Strategy` names three independent choices:

* ``mode``: how the inner gradient ``g_t = grad_theta L(theta_t, eta, x_t)`` is
  differentiated by the outer reverse pass.

  - ``"standard"``: plain ``jax.grad`` inside the loop. The meta-gradient is
    reverse-over-reverse and keeps every inner step's backward intermediates.
  - ``"mixflow"``: MixFlow-MG (Kemaev et al., 2025). ``g_t`` has a custom VJP
    whose backward rule is one forward-over-reverse JVP; only the step's inputs
    are kept (see `metaflow.mixflow`).

* ``remat``: wrap each inner step in ``jax.checkpoint`` so its intermediates are
  recomputed in the backward pass instead of stored.
* ``save_inner_grads``: under ``remat``, keep ``g_t`` as a named residual so the
  backward pass does not recompute the inner gradient (needs ``remat``).

Strings compose the same choices with ``+``: ``"mixflow+remat+saved_inner_grads"``.

With ``mixflow``, remat saves little (the step's residuals are already just its
inputs and the optimiser update's) and costs a recomputation of g_t in the
backward pass; on XLA:CPU that recomputation's working set is not shared with
the JVP's (XLA materialises the zero-initialised stacks of both loops at the
start of the step), so ``mixflow+remat`` needs MORE memory than ``mixflow``.
``mixflow+remat+saved_inner_grads`` avoids the recomputation.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Union

Mode = Literal["standard", "mixflow"]
MODES: tuple[str, ...] = ("standard", "mixflow")

_REMAT = "remat"
_SAVED = "saved_inner_grads"

#: Name under which the inner gradient g_t is saved by ``save_inner_grads``.
INNER_GRAD_NAME = "metaflow_inner_grad"


@dataclasses.dataclass(frozen=True)
class Strategy:
  """How to differentiate through the unrolled inner loop.

  Attributes:
    mode: ``"standard"`` (reverse-over-reverse) or ``"mixflow"``
      (forward-over-reverse custom VJP of the inner gradient).
    remat: rematerialise each inner step in the backward pass.
    save_inner_grads: with ``remat``, store each inner gradient g_t (named
      ``INNER_GRAD_NAME``) instead of recomputing it. Requires ``remat``.
  """

  mode: Mode = "mixflow"
  remat: bool = False
  save_inner_grads: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(
          f"Unknown strategy mode {self.mode!r}; valid modes are {MODES}. "
          f"Valid strategy strings: {', '.join(valid_strategy_names())}.")
    for name in ("remat", "save_inner_grads"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"Strategy.{name} must be a bool, got "
                        f"{getattr(self, name)!r}.")
    if self.save_inner_grads and not self.remat:
      raise ValueError(
          "Strategy(save_inner_grads=True) requires remat=True: without remat "
          "every residual, g_t included, is already stored. Valid strategy "
          f"strings: {', '.join(valid_strategy_names())}.")

  @property
  def name(self) -> str:
    """The canonical string form, e.g. ``"mixflow+remat"``."""
    parts = [self.mode]
    if self.remat:
      parts.append(_REMAT)
    if self.save_inner_grads:
      parts.append(_SAVED)
    return "+".join(parts)

  def __str__(self) -> str:
    return self.name

  @classmethod
  def parse(cls, spec: Union[str, "Strategy"]) -> "Strategy":
    """Builds a Strategy from a string such as ``"mixflow+remat"``.

    Raises:
      ValueError: for an unknown or contradictory string; the message lists
        the valid ones.
    """
    if isinstance(spec, Strategy):
      return spec
    if not isinstance(spec, str):
      raise TypeError(
          f"strategy must be a metaflow.Strategy or a string, got {spec!r}.")
    valid = valid_strategy_names()
    tokens = [t.strip() for t in spec.strip().lower().split("+")]
    mode, options = tokens[0], tokens[1:]
    if (mode not in MODES or len(set(options)) != len(options)
        or not set(options) <= {_REMAT, _SAVED}):
      raise ValueError(
          f"Unknown strategy {spec!r}. Valid strategies: {', '.join(valid)}.")
    if _SAVED in options and _REMAT not in options:
      raise ValueError(
          f"Contradictory strategy {spec!r}: '{_SAVED}' needs '{_REMAT}'. "
          f"Valid strategies: {', '.join(valid)}.")
    return cls(mode=mode, remat=_REMAT in options,
               save_inner_grads=_SAVED in options)


def valid_strategy_names() -> tuple[str, ...]:
  """All canonical strategy strings, e.g. for a command-line ``choices=``."""
  names = []
  for mode in MODES:
    names += [mode, f"{mode}+{_REMAT}", f"{mode}+{_REMAT}+{_SAVED}"]
  return tuple(names)


def all_strategies() -> tuple[Strategy, ...]:
  """Every valid Strategy, in the order of `valid_strategy_names`."""
  return tuple(Strategy.parse(n) for n in valid_strategy_names())
