"""`Strategy`: the one interface of the meta-gradient estimators.

An estimator says how the outer reverse pass gets through the T unrolled
inner steps (Kemaev et al., 2025, notation: theta, eta, L, V, T, Phi):

    g_t = grad_theta L(theta_t, eta, x_t)
    (theta_{t+1}, s_{t+1}) = Phi(g_t, theta_t, s_t, eta)
    meta-objective V(theta_T, eta, x_val), differentiated in eta.

The loop itself (`metaflow.unroll.inner_loop`) is the same for every
estimator; an estimator supplies its parts of it, and nothing outside the
estimators asks which estimator it has:

* `inner_value_and_grad`: the function ``(theta, eta, x) -> (L_t, g_t)`` whose
  differentiation rule IS the estimator (plain reverse mode, MixFlow-MG's
  forward-over-reverse rule, a stop-gradient);
* `scan`: the ``lax.scan`` over the T steps, with what it stores for the
  backward pass (per-step remat, segments);
* `around_loop`: the loop as a whole, built from the inner loss, for
  estimators that do not differentiate through it at all (implicit
  differentiation);
* `outer_value`: how V is evaluated (in chunks, with micro-batches);
* `stored_carries` / `static_bytes`: the static memory it keeps, and
  `recompute_factor`: the forward passes of the loop that costs;
* `check_meta_params`: refusals, before anything is compiled, of the
  meta-parameters whose meta-gradient it cannot see.

An estimator is a small frozen object carrying only its own options (an
"adjoint" in optimistix/diffrax terms), one class per file:
`metaflow.estimators.Standard`, `MixFlow` (the two exact ones, which take
the memory options of `metaflow.estimators.exact.Exact`), `Implicit` and
`FirstOrder` (approximations). Strings name them for the command line and
checkpoints: ``Strategy.parse("mixflow+remat+segments=auto")`` is
``MixFlow(remat=True, segment_length="auto")``, and ``Strategy(mode,
**options)`` builds the estimator named ``mode``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import (
  TYPE_CHECKING,
  Any,
  Callable,
  ClassVar,
  NamedTuple,
  Optional,
  Union,
  cast,
)

import jax

from metaflow._checks import PyTree

if TYPE_CHECKING:
  from metaflow.meta_params import MetaParams

Loss = Callable[[PyTree, PyTree, PyTree], jax.Array]
ValueAndGrad = Callable[[PyTree, PyTree, PyTree], tuple[jax.Array, PyTree]]
Step = Callable[[PyTree, PyTree], tuple[PyTree, jax.Array]]
Loop = Callable[..., Any]

#: The options a strategy string may add, for error messages.
OPTIONS_HELP = ("each exact one optionally +segments=K (or K1/K2/..., or "
                "auto) and/or +microbatches=M")


class Option(NamedTuple):
  """One ``+token`` of a strategy string and the field it sets.

  ``kind``: ``"flag"`` (``+remat``: True), ``"count"`` (``+microbatches=4``:
  an int >= 1) or ``"lengths_or_auto"`` (``+segments=4``, ``+segments=64/8``:
  the tuple ``(64, 8)`` of decreasing ints, or ``+segments=auto``).
  """
  token: str
  field: str
  kind: str


#: mode -> estimator class, in the order the classes were defined (the
#: package imports them exact first).
_ESTIMATORS: dict[str, type["Strategy"]] = {}


class _FromMode(abc.ABCMeta):
  """``Strategy(mode, **options)`` builds the estimator named ``mode``
  (`from_mode`); an estimator class builds itself."""

  def __call__(cls, *args, **kwargs):
    if cls is Strategy:
      return from_mode(*args, **kwargs)
    return super().__call__(*args, **kwargs)


class Strategy(metaclass=_FromMode):
  """A meta-gradient estimator (see the module docstring).

  Subclasses are frozen dataclasses; they set ``mode`` (their name in
  strategy strings), ``exact`` and, if strings may set their options,
  ``string_options``, and implement `inner_value_and_grad`.
  """

  #: The estimator's name in strategy strings.
  mode: ClassVar[str] = ""
  #: Whether it computes the exact meta-gradient of the T unrolled steps.
  exact: ClassVar[bool] = False
  #: The ``+options`` a strategy string may give it, in canonical order.
  string_options: ClassVar[tuple[Option, ...]] = ()

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "mode" in cls.__dict__:
      _ESTIMATORS[cls.mode] = cls

  # ---------------------------------------------------- its parts of the loop
  @abc.abstractmethod
  def inner_value_and_grad(self, inner_loss: Loss) -> ValueAndGrad:
    """``(theta, eta, x) -> (L, g)``, L a scalar and g shaped like theta;
    what the outer reverse pass does with g is the estimator."""

  def scan(self, step: Step, carry: PyTree, xs: PyTree, num_steps: int
           ) -> tuple[PyTree, jax.Array]:
    """``jax.lax.scan(step, carry, xs)`` over the T inner steps: the carry
    ``(theta, s)`` of every step is stored for the backward pass."""
    return jax.lax.scan(step, carry, xs, length=num_steps)

  def around_loop(self, make_loop: Callable[[Loss], Loop],
                  inner_loss: Loss) -> Loop:
    """The whole loop ``(eta, theta0, inner_batches, opt_state0) ->
    InnerLoopResult`` as differentiated, given ``make_loop(L)``, the plain
    loop of an inner loss: ``make_loop(inner_loss)`` by default."""
    return make_loop(inner_loss)

  def outer_value(self, outer_loss: Loss) -> Loss:
    """How ``V(theta_T, eta, x_val)`` is evaluated (and differentiated)."""
    return outer_loss

  # ------------------------------------------------------------------ memory
  def stored_carries(self, num_steps: int) -> int:
    """How many inner carries ``(theta, s)`` the backward pass holds at its
    peak: T by default."""
    return num_steps

  def recompute_factor(self, num_steps: int) -> int:
    """Forward passes of the inner loop per meta-step, relative to the
    loop without segments: 1 by default (each level of segments adds one)."""
    del num_steps
    return 1

  def static_bytes(self, num_steps: int, carry_bytes: int,
                   theta_bytes: int) -> int:
    """The paper's static memory, given one carry's bytes and theta's:
    the `stored_carries`."""
    del theta_bytes
    return self.stored_carries(num_steps) * carry_bytes

  # ------------------------------------------------------------------ checks
  def check_meta_params(self, spec: "MetaParams",
                        outer_reads: Optional[Callable[[str], bool]] = None
                        ) -> None:
    """Raises ValueError, before anything is compiled, for meta-parameters
    of ``spec`` whose meta-gradient this estimator cannot see.

    ``outer_reads(field)``: whether V itself reads that field of eta (for
    estimators that miss the paths through g_t); None: not known.
    """
    del spec, outer_reads

  # ------------------------------------------------------------------- names
  @classmethod
  def variants(cls) -> tuple[str, ...]:
    """Its canonical strings without numbered options (for help texts)."""
    return (cls.mode,)

  @property
  def name(self) -> str:
    """The canonical string, e.g. ``"mixflow+remat+segments=64/8"``
    (options at their defaults are left out; nested lengths joined by
    ``/``)."""
    parts = [self.mode]
    defaults = _defaults(type(self))
    for option in self.string_options:
      value = getattr(self, option.field)
      if option.kind == "flag" and value:
        parts.append(option.token)
      elif option.kind != "flag" and value != defaults[option.field]:
        text = ("/".join(map(str, value)) if isinstance(value, tuple)
                else value)
        parts.append(f"{option.token}={text}")
    return "+".join(parts)

  @property
  def fingerprint(self) -> str:
    """What a resumed run must match: ``"exact"`` for every exact
    estimator (they compute the same meta-gradient and may be switched),
    else the approximation with its settings, e.g.
    ``"implicit(cg_steps=20, cg_damping=0.0)"``."""
    if self.exact:
      return "exact"
    fields = [f"{f.name}={getattr(self, f.name)!r}"
              for f in dataclasses.fields(cast(Any, self))]
    return f"{self.mode}({', '.join(fields)})" if fields else self.mode

  def __str__(self) -> str:
    return self.name

  @classmethod
  def parse(cls, spec: Union[str, "Strategy"], **settings: Any) -> "Strategy":
    """The estimator a string such as ``"mixflow+remat"`` names.

    ``settings``: fields that override the string's (e.g.
    ``cg_steps=50``, ``microbatches=1``), refused for an estimator that
    does not have them unless at that field's default.

    Raises:
      ValueError: an unknown or contradictory string; the message lists
        the valid ones.
      TypeError: ``spec`` neither a string nor a Strategy.
    """
    if isinstance(spec, Strategy):
      if not settings:
        return spec
      own = {f.name: getattr(spec, f.name)
             for f in dataclasses.fields(cast(Any, spec))}
      return from_mode(spec.mode, **{**own, **settings})
    if not isinstance(spec, str):
      raise TypeError(
          f"strategy must be a metaflow.Strategy or a string, got {spec!r}.")
    mode, fields = _parse_string(spec)
    return from_mode(mode, **{**fields, **settings})


def _defaults(cls: type) -> dict[str, Any]:
  return {f.name: f.default for f in dataclasses.fields(cls)}


def _modes() -> tuple[str, ...]:
  return tuple(_ESTIMATORS)


def _owners(field: str) -> list[str]:
  """The modes whose estimator has the field ``field``."""
  return [mode for mode, cls in _ESTIMATORS.items()
          if field in _defaults(cls)]


def _valid() -> str:
  return f"{', '.join(valid_strategy_names())} ({OPTIONS_HELP})"


def from_mode(mode: str = "mixflow", **options: Any) -> Strategy:
  """The estimator named ``mode`` with ``options`` (its fields); what
  ``Strategy(mode, **options)`` returns.

  An option of another estimator is ignored at that estimator's default
  (``cg_steps=20`` for ``mixflow``) and refused otherwise, one line naming
  the modes it applies to.
  """
  if mode not in _ESTIMATORS:
    raise ValueError(
        f"Unknown strategy mode {mode!r}; valid modes are {_modes()}. "
        f"Valid strategy strings: {', '.join(valid_strategy_names())}.")
  cls = _ESTIMATORS[mode]
  own = _defaults(cls)
  foreign = {k: v for k, v in options.items() if k not in own}
  unknown = sorted(k for k in foreign if not _owners(k))
  if unknown:
    raise TypeError(f"Strategy has no option(s) {', '.join(unknown)}; the "
                    "options of every estimator: "
                    + ", ".join(sorted({f for c in _ESTIMATORS.values()
                                        for f in _defaults(c)})) + ".")
  refused = {k: v for k, v in foreign.items()
             if not _same(v, _defaults(_ESTIMATORS[_owners(k)[0]])[k])}
  if refused:
    owners = sorted({m for k in refused for m in _owners(k)},
                    key=_modes().index)
    raise ValueError(
        f"Strategy(mode={mode!r}) does not take "
        + ", ".join(f"{k}={v!r}" for k, v in refused.items())
        + f" (options that apply to mode{'s' if len(owners) > 1 else ''} "
        + ", ".join(repr(m) for m in owners) + " only)"
        + (f"; {mode!r} composes with nothing" if not cls.string_options
           else "") + ".")
  return cls(**{k: v for k, v in options.items() if k in own})


def _same(value: Any, default: Any) -> bool:
  if isinstance(value, bool) != isinstance(default, bool):
    return False
  try:
    return bool(value == default)
  except Exception:  # noqa: BLE001 (an array or other odd value: not same)
    return False


def _parse_string(spec: str) -> tuple[str, dict[str, Any]]:
  """``(mode, fields)`` of a strategy string (its options checked)."""
  tokens = [t.strip() for t in spec.strip().lower().split("+")]
  mode, given = tokens[0], tokens[1:]
  known = {o.token: o for c in _ESTIMATORS.values()
           for o in c.string_options}
  chosen: dict[str, Option] = {}
  text: dict[str, str] = {}
  for item in given:
    token, sep, value = item.partition("=")
    option = known.get(token)
    if (option is None or token in chosen
        or bool(sep) != (option.kind != "flag")):
      raise ValueError(
          f"Unknown strategy {spec!r}: bad or repeated option {item!r}. "
          f"Valid strategies: {_valid()}.")
    chosen[token], text[token] = option, value
  if mode not in _ESTIMATORS:
    raise ValueError(f"Unknown strategy {spec!r}. Valid strategies: "
                     f"{_valid()}.")
  cls = _ESTIMATORS[mode]
  if given and not cls.string_options:
    tokens_all = [o.token for o in known.values()]
    raise ValueError(
        f"Strategy {spec!r}: {mode!r} composes with nothing ("
        f"{', '.join(tokens_all[:-1])} and {tokens_all[-1]} apply to the "
        f"exact modes only). Valid strategies: {_valid()}.")
  foreign = [t for t in chosen if chosen[t] not in cls.string_options]
  if foreign:
    raise ValueError(f"Strategy {spec!r}: {mode!r} takes no "
                     f"+{', +'.join(foreign)}. Valid strategies: {_valid()}.")
  fields = {}
  for token, option in chosen.items():
    if option.kind == "flag":
      fields[option.field] = True
    elif option.kind == "lengths_or_auto" and text[token] == "auto":
      fields[option.field] = "auto"
    elif (counts := _counts(text[token], option.kind)) is not None:
      fields[option.field] = counts
    else:
      what = ("an int >= 1, K1/K2/... with K1 > K2 > ... >= 1, or 'auto'"
              if option.kind == "lengths_or_auto" else "an int >= 1")
      raise ValueError(f"Strategy {spec!r}: {token}= must be {what}, got "
                       f"{text[token]!r}. Valid strategies: {_valid()}.")
  return mode, fields


def _counts(text: str, kind: str) -> Union[None, int, tuple[int, ...]]:
  """``"4" -> 4``; with ``kind`` ``"lengths_or_auto"`` also ``"64/8" ->
  (64, 8)`` (decreasing); None for anything else."""
  parts = text.split("/") if kind == "lengths_or_auto" else [text]
  if not all(p.isdigit() and int(p) >= 1 for p in parts):
    return None
  counts = tuple(int(p) for p in parts)
  if any(a <= b for a, b in zip(counts, counts[1:])):
    return None
  return counts[0] if len(counts) == 1 else counts


def exact_strategy_names() -> tuple[str, ...]:
  """The canonical strings of the exact strategies (same meta-gradient),
  without segments or micro-batches."""
  return tuple(name for cls in _ESTIMATORS.values() if cls.exact
               for name in cls.variants())


def valid_strategy_names() -> tuple[str, ...]:
  """The canonical strategy strings without segments or microbatches (which
  take a number: `OPTIONS_HELP`): the exact ones, then the approximate
  ones (``implicit``, ``first_order``)."""
  return exact_strategy_names() + tuple(
      name for cls in _ESTIMATORS.values() if not cls.exact
      for name in cls.variants())


def exact_strategies() -> tuple[Strategy, ...]:
  """Every exact Strategy, in the order of `exact_strategy_names`."""
  return tuple(Strategy.parse(n) for n in exact_strategy_names())


def all_strategies() -> tuple[Strategy, ...]:
  """Every valid Strategy (default settings), in the order of
  `valid_strategy_names`."""
  return tuple(Strategy.parse(n) for n in valid_strategy_names())
