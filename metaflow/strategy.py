"""Gradient strategies: how the meta-gradient is differentiated through the
inner loop.

A `Strategy` is one switch over the meta-gradient estimators:

* ``mode``: the estimator.

  Exact (the gradient of T unrolled inner steps, truncated BPTT); they differ
  in how the inner gradient ``g_t = grad_theta L(theta_t, eta, x_t)`` is
  differentiated by the outer reverse pass:

  - ``"standard"``: plain ``jax.grad`` inside the loop. The meta-gradient is
    reverse-over-reverse and keeps every inner step's backward intermediates.
  - ``"mixflow"``: MixFlow-MG (Kemaev et al., 2025). ``g_t`` has a custom VJP
    whose backward rule is one forward-over-reverse JVP; only the step's inputs
    are kept (see `metaflow.mixflow`).

  Approximate (cheaper; `metaflow.implicit` and `metaflow.mixflow` say what
  each assumes):

  - ``"implicit"``: implicit differentiation at theta_T (iMAML, Rajeswaran et
    al., 2019): the loop runs forward only and the meta-gradient comes from
    conjugate gradient on ``(H + cg_damping I) u = grad_theta V`` with at most
    ``cg_steps`` Hessian-vector products. Memory does not grow with T. Exact
    when theta_T is a stationary point of L; blind to eta's effect on the path
    (learned learning rates) and to theta0 (needs `MetaParams.proximal`).
  - ``"first_order"``: ``g_t`` is a constant of eta and theta (stop-gradient):
    first-order MAML for a learned initialisation, the first-order
    hypergradient for learned learning rates; zero for eta that reach V only
    through ``g_t`` (loss weights).

The exact modes take two memory options (the approximate ones take neither):

* ``remat``: wrap each inner step in ``jax.checkpoint`` so its intermediates are
  recomputed in the backward pass instead of stored.
* ``save_inner_grads``: under ``remat``, keep ``g_t`` as a named residual so the
  backward pass does not recompute the inner gradient (needs ``remat``).

and two that lower the floors MixFlow-MG leaves (`metaflow.segments`,
`metaflow.microbatch` teach them):

* ``segment_length`` (K, or ``"auto"`` for round(sqrt T)): store the carry
  ``(theta, s)`` only every K steps and recompute each segment in the backward
  pass: static memory ceil(T/K) + K carries instead of T, for one more forward
  pass of the inner loop.
* ``microbatches`` (M): evaluate L, g_t, MixFlow-MG's JVP and V in M chunks of
  each batch's leading axis, accumulating: dynamic memory about 1/M, the same
  arithmetic. Choosing it states that L and V are means over that axis.

Strings compose the same choices with ``+``:
``"mixflow+remat+saved_inner_grads"``,
``"mixflow+segments=auto+microbatches=4"``.

With ``mixflow``, remat saves little (the step's residuals are already just its
inputs and the optimiser update's) and costs a recomputation of g_t in the
backward pass; on XLA:CPU that recomputation's working set is not shared with
the JVP's (XLA materialises the zero-initialised stacks of both loops at the
start of the step), so ``mixflow+remat`` needs MORE memory than ``mixflow``.
``mixflow+remat+saved_inner_grads`` avoids the recomputation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, Union, cast

from metaflow._checks import check_int, check_number

Mode = Literal["standard", "mixflow", "implicit", "first_order"]
#: Modes that compute the exact meta-gradient of the T unrolled steps.
EXACT_MODES: tuple[str, ...] = ("standard", "mixflow")
#: Modes that approximate it (and take no memory options).
APPROXIMATE_MODES: tuple[str, ...] = ("implicit", "first_order")
MODES: tuple[str, ...] = EXACT_MODES + APPROXIMATE_MODES

_REMAT = "remat"
_SAVED = "saved_inner_grads"
_SEGMENTS = "segments"
_MICROBATCHES = "microbatches"
#: The options an exact strategy string may add, for error messages.
OPTIONS_HELP = ("each exact one optionally +segments=K (or +segments=auto) "
                "and/or +microbatches=M")

#: Name under which the inner gradient g_t is saved by ``save_inner_grads``.
INNER_GRAD_NAME = "metaflow_inner_grad"


@dataclasses.dataclass(frozen=True)
class Strategy:
  """How to differentiate through the unrolled inner loop.

  Attributes:
    mode: ``"standard"`` (reverse-over-reverse), ``"mixflow"``
      (forward-over-reverse custom VJP of the inner gradient), ``"implicit"``
      or ``"first_order"`` (approximations, see the module docstring).
    remat: rematerialise each inner step in the backward pass (exact modes).
    save_inner_grads: with ``remat``, store each inner gradient g_t (named
      ``INNER_GRAD_NAME``) instead of recomputing it. Requires ``remat``.
    cg_steps: ``implicit`` only: the most Hessian-vector products (conjugate
      gradient iterations) spent on the linear solve.
    cg_damping: ``implicit`` only: lambda_d >= 0 in ``(H + lambda_d I) u = v``
      (regularises an ill-conditioned or indefinite H; biases the gradient).
    segment_length: exact modes: None (store every carry), an int K >= 1, or
      ``"auto"`` (K = round(sqrt T), `segment_length_for`).
    microbatches: exact modes: M >= 1 chunks of every inner and outer batch's
      leading axis (which M must divide).
  """

  mode: Mode = "mixflow"
  remat: bool = False
  save_inner_grads: bool = False
  cg_steps: int = 20
  cg_damping: float = 0.0
  segment_length: Union[None, int, str] = None
  microbatches: int = 1

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
    if self.mode in APPROXIMATE_MODES and self.remat:
      raise ValueError(
          f"Strategy(mode={self.mode!r}) composes with nothing: remat and "
          "saved_inner_grads apply to the exact (unrolled) modes only. Valid "
          f"strategy strings: {', '.join(valid_strategy_names())}.")
    steps = check_int("Strategy.cg_steps", self.cg_steps)
    damping = check_number("Strategy.cg_damping", self.cg_damping)
    object.__setattr__(self, "cg_steps", steps)
    object.__setattr__(self, "cg_damping", damping)
    default = Strategy.__dataclass_fields__
    if self.mode != "implicit" and (
        steps != default["cg_steps"].default
        or damping != default["cg_damping"].default):
      raise ValueError(
          f"Strategy.cg_steps and cg_damping apply to mode 'implicit' only, "
          f"not {self.mode!r}.")
    k = self.segment_length
    if k is not None and k != "auto" and (
        isinstance(k, bool) or not isinstance(k, int) or k < 1):
      raise ValueError("Strategy.segment_length must be None, an int >= 1 or "
                       f"'auto', got {k!r}.")
    m = check_int("Strategy.microbatches", self.microbatches)
    object.__setattr__(self, "microbatches", m)
    if self.mode in APPROXIMATE_MODES and (k is not None or m != 1):
      raise ValueError(
          f"Strategy(mode={self.mode!r}) composes with nothing: segments and "
          "microbatches apply to the exact (unrolled) modes only.")

  @property
  def exact(self) -> bool:
    """Whether this strategy computes the exact meta-gradient of the T
    unrolled steps (up to rounding)."""
    return self.mode in EXACT_MODES

  def segment_length_for(self, num_steps: int) -> Optional[int]:
    """K for a loop of T = ``num_steps`` steps: None (no segments), else
    ``segment_length`` (``"auto"``: round(sqrt T), at least 1) capped at T."""
    k = self.segment_length
    if k is None:
      return None
    if k == "auto":
      k = max(1, round(math.sqrt(num_steps)))
    return min(int(k), num_steps)

  def stored_carries(self, num_steps: int) -> int:
    """How many inner carries ``(theta, s)`` the backward pass holds at its
    peak: T unrolled; ceil(T/K) segment boundaries + the K of the segment
    being recomputed with segments; 1 (theta_T) for ``implicit``; the T
    that first_order's loop stores."""
    if self.mode == "implicit":
      return 1
    k = self.segment_length_for(num_steps)
    if k is None:
      return num_steps
    return -(-num_steps // k) + k

  @property
  def name(self) -> str:
    """The canonical string form, e.g. ``"mixflow+remat"`` (``"implicit"``
    whatever its CG settings, which `repr` shows)."""
    parts = [self.mode]
    if self.remat:
      parts.append(_REMAT)
    if self.save_inner_grads:
      parts.append(_SAVED)
    if self.segment_length is not None:
      parts.append(f"{_SEGMENTS}={self.segment_length}")
    if self.microbatches != 1:
      parts.append(f"{_MICROBATCHES}={self.microbatches}")
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
    valid = f"{', '.join(valid_strategy_names())} ({OPTIONS_HELP})"
    tokens = [t.strip() for t in spec.strip().lower().split("+")]
    mode, options = tokens[0], tokens[1:]
    flags, values = [], {}
    for option in options:
      key, sep, value = option.partition("=")
      if sep and key in (_SEGMENTS, _MICROBATCHES) and key not in values:
        values[key] = value
      elif not sep and option in (_REMAT, _SAVED) and option not in flags:
        flags.append(option)
      else:
        raise ValueError(
            f"Unknown strategy {spec!r}: bad or repeated option {option!r}. "
            f"Valid strategies: {valid}.")
    if mode not in MODES:
      raise ValueError(f"Unknown strategy {spec!r}. Valid strategies: {valid}.")
    if mode in APPROXIMATE_MODES and options:
      raise ValueError(
          f"Strategy {spec!r}: {mode!r} composes with nothing (remat, "
          "saved_inner_grads, segments and microbatches apply to the exact "
          f"modes only). Valid strategies: {valid}.")
    if _SAVED in flags and _REMAT not in flags:
      raise ValueError(
          f"Contradictory strategy {spec!r}: '{_SAVED}' needs '{_REMAT}'. "
          f"Valid strategies: {valid}.")
    segment_length = values.get(_SEGMENTS)
    if segment_length not in (None, "auto"):
      segment_length = _positive_int(spec, _SEGMENTS, segment_length, valid)
    microbatches = values.get(_MICROBATCHES)
    microbatches = (1 if microbatches is None else
                    _positive_int(spec, _MICROBATCHES, microbatches, valid))
    return cls(mode=cast(Mode, mode), remat=_REMAT in flags,
               save_inner_grads=_SAVED in flags,
               segment_length=segment_length, microbatches=microbatches)


def _positive_int(spec: str, key: str, value: str, valid: str) -> int:
  if not value.isdigit() or int(value) < 1:
    what = "an int >= 1 or 'auto'" if key == _SEGMENTS else "an int >= 1"
    raise ValueError(f"Strategy {spec!r}: {key}= must be {what}, got "
                     f"{value!r}. Valid strategies: {valid}.")
  return int(value)


def exact_strategy_names() -> tuple[str, ...]:
  """The canonical strings of the exact strategies (same meta-gradient)."""
  names = []
  for mode in EXACT_MODES:
    names += [mode, f"{mode}+{_REMAT}", f"{mode}+{_REMAT}+{_SAVED}"]
  return tuple(names)


def valid_strategy_names() -> tuple[str, ...]:
  """The canonical strategy strings without segments or microbatches (which
  take a number: `OPTIONS_HELP`): the exact ones, then ``implicit`` and
  ``first_order``."""
  return exact_strategy_names() + APPROXIMATE_MODES


def exact_strategies() -> tuple[Strategy, ...]:
  """Every exact Strategy, in the order of `exact_strategy_names`."""
  return tuple(Strategy.parse(n) for n in exact_strategy_names())


def all_strategies() -> tuple[Strategy, ...]:
  """Every valid Strategy (default settings), in the order of
  `valid_strategy_names`."""
  return tuple(Strategy.parse(n) for n in valid_strategy_names())
