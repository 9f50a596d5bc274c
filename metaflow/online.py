r"""Persistent inner learners: meta-learning while the models train.

Offline (`BilevelTrainer`'s default) every meta-step starts T inner steps
from a fresh theta0, so meta-parameters that act *during* training (learning
rates, loss weights, a data rater) only ever see the first T steps of a
model's life: the short-horizon bias. Online, the trainer keeps a
population of P learners, learner p a triple ``(theta^p, s^p, a^p)``
(parameters, inner optimiser state, age in inner steps), and every
meta-step runs one *window* of T inner steps from each learner's carried
state:

    (theta^p_{k+T}, s^p_{k+T}) = Phi^T(theta^p_k, s^p_k; eta, x^p_{k..k+T-1})
    value(eta) = (1/P) sum_p V(theta^p_{k+T}(eta), eta, x^p_val)
    eta <- eta + outer_update(d value / d eta)

**What is differentiated.** Only the window: the carried start is a
constant of eta, ``d theta^p_k / d eta := 0`` and ``d s^p_k / d eta := 0``
(truncated back-propagation through the learner's life). Within the window
the meta-gradient is exact, computed by the engine unchanged (its
``theta0`` and ``opt_state0`` inputs are the carried state, so every
`Strategy` works); what it misses is how eta steered theta_k in earlier
windows. With P = 1 and lifetime N = T every window starts from a fresh
learner and this is exactly the offline meta-step.

**Life cycle.** After the window each learner carries
``(theta_{k+T}, s_{k+T})`` forward and ages by T. A learner whose age
reaches its lifetime N (a multiple of T) is replaced by a fresh model with
a fresh optimiser state at age 0; so is one whose carried state is not
finite (a diverged learner would make every later window non-finite).
Learners start staggered: learner p begins as if
``floor(p N / (P T)) T`` steps old (reached, before the first meta-step,
by running those steps with the initial eta: `warm_up`), so
the population always spans a model's whole life and eta is meta-learned
for every stage of it.

**Drawn lifetimes.** With ``lifetime_max`` above ``lifetime``, each life's
length is drawn when the learner is (re)initialised, log-uniform in whole
windows between ``lifetime`` and ``lifetime_max`` (`Online.draw_lifetimes`,
kept per learner in `Learners.lifetime`): what a learned optimizer needs so
as not to fit one training length (short lives are as likely per octave as
long ones, so the early steps of training are not drowned out).

**Cost.** The meta-batch is the population (one window per learner,
vmapped like offline episodes). A step costs what an offline step with
B = P episodes costs, plus the population's state: P carries (theta, s),
held between steps (counted in the static memory).
"""

from __future__ import annotations

import dataclasses
from typing import (
  Any,
  Callable,
  ClassVar,
  Iterator,
  NamedTuple,
  Optional,
  Union,
)

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from metaflow._checks import PyTree, check_int

#: ``key -> (theta, s)``: P fresh learners (leading axis P), drawn from key.
Fresh = Callable[[jax.Array], tuple[PyTree, PyTree]]


class Learners(NamedTuple):
  """The population of online inner learners; every leaf has a leading
  axis P.

  Attributes:
    params: theta of each learner (leaves ``[P, ...]``, like theta).
    opt_state: each learner's inner optimiser state s (leaves ``[P, ...]``).
    age: int32 ``[P]``, inner steps each learner has taken since it was
      (re-)initialised.
    lifetime: int32 ``[P]``, each learner's drawn lifetime (inner steps),
      or None when every life is ``Online.lifetime`` long.
  """
  params: PyTree
  opt_state: PyTree
  age: PyTree
  lifetime: PyTree = None


@dataclasses.dataclass(frozen=True)
class Online:
  """Persistent inner learners (see the module docstring).

  Attributes:
    population: P, learners kept (0, the default: off, every meta-step
      starts afresh). The meta-batch is the population.
    lifetime: N, inner steps a learner lives before it is replaced by a
      fresh one; a multiple of the window length T (checked by the trainer,
      which knows T).
    lifetime_max: 0 (every life is N long), or the longest life: each
      life is then drawn log-uniform in whole windows between ``lifetime``
      and ``lifetime_max`` (a multiple of T too).
  """
  population: int = 0
  lifetime: int = 0
  lifetime_max: int = 0

  def __post_init__(self):
    check_int("Online.population", self.population, 0)
    check_int("Online.lifetime", self.lifetime, 0)
    check_int("Online.lifetime_max", self.lifetime_max, 0)
    if self.lifetime_max and self.lifetime_max < self.lifetime:
      raise ValueError(
          f"Online.lifetime_max ({self.lifetime_max}) must be 0 (every life "
          f"is lifetime long) or at least lifetime ({self.lifetime}).")

  @property
  def drawn(self) -> bool:
    """Whether each life's length is drawn (`draw_lifetimes`)."""
    return self.lifetime_max > self.lifetime

  @property
  def enabled(self) -> bool:
    return self.population > 0

  def check(self, num_inner_steps: int) -> None:
    """ValueError unless the lifetime is a multiple >= 1 of T."""
    if not self.enabled:
      return
    t = num_inner_steps
    for name, n in (("lifetime", self.lifetime),
                    ("lifetime_max", self.lifetime_max if self.drawn else t)):
      if n < t or n % t:
        raise ValueError(
            f"Online.{name} (N={n}) must be a multiple of num_inner_steps "
            f"(T={t}) and at least T: a learner lives whole windows of T "
            "inner steps.")

  def draw_lifetimes(self, key: jax.Array, num_inner_steps: int
                     ) -> jax.Array:
    """int32 ``[P]``: lifetimes of P new lives, ``W T`` with the number of
    windows W = floor(exp(u)), u uniform in ``[log W_min, log(W_max +
    1))`` (log-uniform over whole windows, both ends included)."""
    t = num_inner_steps
    low, high = self.lifetime // t, self.lifetime_max // t
    u = jax.random.uniform(key, [self.population], jnp.float32,
                           np.log(low), np.log(high + 1))
    windows = jnp.clip(jnp.floor(jnp.exp(u)), low, high).astype(jnp.int32)
    return windows * t

  def initial_ages(self, num_inner_steps: int,
                   lifetimes: Optional[np.ndarray] = None) -> np.ndarray:
    """int32 ``[P]``: learner p's age before the first meta-step,
    ``floor(p N_p / (P T)) T`` (whole windows, staggered over a life; N_p
    its drawn lifetime, ``lifetimes``, if drawn)."""
    t, p = num_inner_steps, np.arange(self.population)
    n = self.lifetime if lifetimes is None else np.asarray(lifetimes)
    windows = (p * (n // t)) // self.population
    return (windows * t).astype(np.int32)

  # The protocol the meta-step uses (`Offline` has the same methods).
  def initial(self, fresh: Fresh, key: jax.Array, num_inner_steps: int
              ) -> Learners:
    """P fresh learners from ``key`` at age 0 (`warm_up` staggers them),
    with drawn lifetimes (from ``fold_in(key, 1)``) if `drawn`."""
    params, opt_state = fresh(key)
    lifetime = (self.draw_lifetimes(jax.random.fold_in(key, 1),
                                    num_inner_steps) if self.drawn else None)
    return Learners(params, opt_state,
                    jnp.zeros([self.population], jnp.int32), lifetime)

  def carried(self, learners: Any) -> tuple[PyTree, PyTree]:
    """What each episode of the meta-step starts from: the learners'
    ``(theta, s)``, leading axis P (vmapped with the episodes)."""
    return learners.params, learners.opt_state

  def start(self, carried: tuple[PyTree, PyTree],
            theta0: Callable[[], PyTree]) -> tuple[PyTree, PyTree]:
    """One episode's ``(theta0, s0)``: the learner's carried state, a
    constant of eta (``theta0``, the offline start, is not used)."""
    del theta0
    return carried

  def advance(self, learners: Any, params: PyTree, opt_state: PyTree,
              num_inner_steps: int, fresh: Callable[[], tuple[PyTree, PyTree]],
              key: jax.Array) -> Learners:
    """The population after the meta-step's windows (`advance`); new
    lives' lengths drawn from ``key`` if `drawn`."""
    if not self.drawn:
      return advance(params, opt_state, learners.age, num_inner_steps,
                     self.lifetime, fresh)
    return advance(params, opt_state, learners.age, num_inner_steps,
                   learners.lifetime, fresh,
                   lambda: self.draw_lifetimes(key, num_inner_steps))


@dataclasses.dataclass(frozen=True)
class Offline:
  """No persistent learners: every episode starts afresh from theta0(eta)
  with a fresh inner optimiser state (the same methods as `Online`; the
  state's ``learners`` is None, no leaves)."""
  enabled: ClassVar[bool] = False
  population: ClassVar[int] = 0

  def initial(self, fresh: Fresh, key: jax.Array,
              num_inner_steps: int) -> None:
    del fresh, key, num_inner_steps

  def carried(self, learners: Any) -> None:
    """Nothing is carried: episodes vmap over nothing else."""
    del learners

  def start(self, carried: Any, theta0: Callable[[], PyTree]
            ) -> tuple[PyTree, None]:
    """``(theta0(eta), None)``: None is a fresh optimiser state."""
    del carried
    return theta0(), None

  def advance(self, learners: Any, params: PyTree, opt_state: PyTree,
              num_inner_steps: int, fresh: Callable[[], Any],
              key: jax.Array) -> None:
    del learners, params, opt_state, num_inner_steps, fresh, key


Learning = Union[Offline, Online]


def learning(online: Optional[Online], num_inner_steps: int, *,
             learn_init: bool, per_step_lr: bool) -> Learning:
  """The learners of a run: `Offline` unless ``online`` has a population,
  checked (before compiling) against T and what is meta-learned.

  Raises:
    TypeError: ``online`` not an `Online`.
    ValueError: a lifetime that is not a multiple of T; a learned
      initialisation or per-step learning rates, which windows of carried
      learners cannot meta-learn.
  """
  if online is None:
    return Offline()
  if not isinstance(online, Online):
    raise TypeError(f"online must be a metaflow.Online, got "
                    f"{type(online).__name__}.")
  if not online.enabled:
    return Offline()
  online.check(num_inner_steps)
  if learn_init:
    raise ValueError(
        "Online learners cannot meta-learn an initialisation (learn_init): "
        "a window starts from a learner's carried state, a constant of "
        "eta, so eta.init would get no meta-gradient.")
  if per_step_lr:
    raise ValueError(
        "Online learners cannot use per-step learned learning rates "
        "(per_step=True): they index an episode's inner steps, and a "
        "learner's steps run on across windows.")
  return online


def _finite(tree: PyTree) -> jax.Array:
  """bool ``[P]``: every float entry of learner p's slice is finite."""
  leaves = [jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)
            for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves), axis=0)


def _select(mask: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Per learner: ``new`` where ``mask[p]``, else ``old``."""
  def one(n, o):
    return jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
  return jax.tree.map(one, new, old)


def advance(params: PyTree, opt_state: PyTree, age: jax.Array,
            num_inner_steps: int, lifetime: Union[int, jax.Array],
            fresh: Callable[[], tuple[PyTree, PyTree]],
            new_lifetimes: Optional[Callable[[], jax.Array]] = None
            ) -> Learners:
  """The population after a window: each learner at ``(params, opt_state)``
  (its theta_{k+T}, s_{k+T}) aged by T, and those that reached ``lifetime``
  (an int, or int32 ``[P]`` per learner) or are not finite replaced by
  ``fresh()`` (``(theta, s)`` with leading axis P, computed only when some
  learner is replaced) at age 0; with ``new_lifetimes`` (``() -> [P]``)
  the replaced learners' next lifetimes are drawn from it and kept in
  `Learners.lifetime`.
  """
  age = age + num_inner_steps
  reset = (age >= lifetime) | ~_finite((params, opt_state))
  drawn = new_lifetimes is not None

  def replace():
    new_params, new_state = fresh()
    kept = (_select(reset, new_params, params),
            _select(reset, new_state, opt_state))
    if new_lifetimes is not None:
      kept += (jnp.where(reset, new_lifetimes(), lifetime),)
    return kept

  def keep():
    return (params, opt_state) + ((jnp.asarray(lifetime),) if drawn else ())

  kept = jax.lax.cond(jnp.any(reset), replace, keep)
  return Learners(kept[0], kept[1], jnp.where(reset, 0, age),
                  kept[2] if drawn else None)


def warm_window(learners: Learners, params: PyTree, opt_state: PyTree,
                num_inner_steps: int, target_age: jax.Array) -> Learners:
  """One window of the warm-up: the learners still younger than
  ``target_age`` (int32 ``[P]``) take their window's result ``(params,
  opt_state)`` and age by T; the others stay as they are."""
  active = learners.age < target_age
  return Learners(_select(active, params, learners.params),
                  _select(active, opt_state, learners.opt_state),
                  learners.age + num_inner_steps * active, learners.lifetime)


Window = Callable[[Learners, PyTree, PyTree, Any], Learners]


def warm_up(learning: Learning, learners: Any, eta: PyTree, window: Window,
            batches: Iterator[PyTree], num_inner_steps: int,
            progress: Optional[Callable[[int], None]] = None) -> Any:
  """Staggers a fresh population: learner p trains with ``eta``, one
  window of T inner steps per meta-batch from ``batches``, until it is
  `Online.initial_ages` steps old; offline, ``learners`` as they are.

  ``window(learners, eta, batch, target_ages)`` runs one window of every
  learner still younger than its target (`warm_window`; jitted by the
  caller, the learners donated). Nothing is differentiated. One window is
  in flight at a time (see `metaflow.loop`).
  """
  if not isinstance(learning, Online):
    return learners
  target = learning.initial_ages(
      num_inner_steps, None if learners.lifetime is None
      else np.asarray(jax.device_get(learners.lifetime)))
  windows = int(target.max()) // num_inner_steps
  if windows:
    logging.info("Online: warming up %d learners to ages %s (%d windows of "
                 "T=%d inner steps).", learning.population, target.tolist(),
                 windows, num_inner_steps)
  for w in range(1, windows + 1):
    learners = window(learners, eta, next(batches), target)
    jax.block_until_ready(learners)
    if progress is not None:
      progress(w)
  return learners
