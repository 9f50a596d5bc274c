"""`Program`: what meta-training computes, as one frozen value.

A program is everything the pure step functions (`metaflow.step`) are
functions of besides their array arguments: the task (L, V, the model's
structure, its episodes), what is meta-learned (`MetaParams`), the
estimator (`metaflow.Strategy`), T, the meta-batch size B, the outer
optimiser, the seed and the learners (`metaflow.online`: offline episodes
or persistent learners). It holds no arrays and nothing in it changes: a
run with another estimator is another program (`Program.with_strategy`),
so a jitted function built from one never sees another's trace.

The arrays a program's functions take are the `TrainState`, a meta-batch
and the `Model`: the model's initial parameters theta and its
non-trainable state (``rest``, e.g. BatchNorm statistics), which are
arguments of the jitted functions, not constants folded into them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import optax
from flax import nnx

from metaflow import online as online_lib
from metaflow._checks import PyTree, check_int
from metaflow.estimators import Strategy
from metaflow.meta_params import Eta, MetaParams
from metaflow.task import Functional, Task
from metaflow.unroll import check_num_steps

#: ``optax.apply_if_finite`` applies a non-finite update after this many
#: consecutive ones; `metaflow.loop.fit` stops long before.
NEVER_APPLY = 2**31 - 2


class Model(NamedTuple):
  """The inner model's arrays (pure dicts), arguments of every jitted
  function.

  Attributes:
    theta: the initialisation theta (``nnx.Param`` state, or the task's
      ``trainable`` filter): where episodes start unless theta0 is learned.
    rest: the other state (`Task`'s inner state policy: constants of the
      bilevel problem).
  """
  theta: PyTree
  rest: PyTree


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
  """What meta-training computes (module docstring); build one with
  `Program.build`, which checks every setting first.

  Attributes:
    task: the bilevel problem.
    spec: ``task.meta_params()``, what is meta-learned.
    strategy: the meta-gradient estimator.
    num_inner_steps: T, inner steps per episode (online: per window).
    meta_batch_size: B, episodes per meta-step (online: the population).
    outer_optimizer: the outer optax optimiser as given.
    outer: ``outer_optimizer`` inside ``optax.apply_if_finite``: what
      updates eta (a non-finite meta-step is not applied).
    seed: seeds the model, eta, the RNG and the data.
    learning: `metaflow.online.Offline` or `metaflow.online.Online`.
    graphdef: the inner model's structure.
  """
  task: Task
  spec: MetaParams
  strategy: Strategy
  num_inner_steps: int
  meta_batch_size: int
  outer_optimizer: optax.GradientTransformation
  outer: optax.GradientTransformation
  seed: int
  learning: online_lib.Learning
  graphdef: nnx.GraphDef

  @classmethod
  def build(cls, task: Task, strategy: Union[str, Strategy] = "mixflow", *,
            num_inner_steps: int = 5, meta_batch_size: Optional[int] = None,
            outer_optimizer: Optional[optax.GradientTransformation] = None,
            seed: int = 0, online: Optional[online_lib.Online] = None
            ) -> "Program":
    """The program of these settings (`metaflow.BilevelTrainer`'s
    arguments), every one checked before anything is traced.

    Raises:
      TypeError/ValueError: one line naming the setting.
    """
    if not isinstance(task, Task):
      raise TypeError(
          f"task must be a metaflow.Task, got {type(task).__name__}.")
    strategy = Strategy.parse(strategy)
    task.check_strategy(strategy)
    spec = task.meta_params()
    strategy.check_meta_params(spec)
    if (type(task).dataset is Task.dataset
        and type(task).episodes is Task.episodes):
      raise TypeError(
          f"Task {task.name or type(task).__name__!r} must implement "
          "dataset(split, seed) or episodes(split, seed, num_inner_steps).")
    num_inner_steps = check_num_steps(num_inner_steps)
    learning = online_lib.learning(
        online, num_inner_steps, learn_init=spec.learn_init,
        per_step_lr=spec.learning_rate_is_learned
        and getattr(spec.learning_rate, "per_step", False))
    if meta_batch_size is None:
      meta_batch_size = learning.population or 4
    check_int("meta_batch_size", meta_batch_size)
    check_int("seed", seed, 0)
    if learning.enabled and meta_batch_size != learning.population:
      raise ValueError(
          f"meta_batch_size ({meta_batch_size}) must equal the online "
          f"population ({learning.population}): each meta-step runs one "
          "window per learner; leave meta_batch_size unset.")
    if outer_optimizer is None:
      outer_optimizer = optax.adam(1e-3)
    if not isinstance(outer_optimizer, optax.GradientTransformation):
      raise TypeError(
          "outer_optimizer must be an optax.GradientTransformation, got "
          f"{type(outer_optimizer).__name__}.")
    graphdef = nnx.split(nnx.eval_shape(
        lambda: task.make_model(nnx.Rngs(seed))), task.trainable, ...)[0]
    return cls(task, spec, strategy, num_inner_steps, meta_batch_size,
               outer_optimizer,
               optax.apply_if_finite(outer_optimizer, NEVER_APPLY),
               seed, learning, graphdef)

  def with_strategy(self, strategy: Union[str, Strategy],
                    outer_reads: Optional[Callable[[str], bool]] = None
                    ) -> "Program":
    """This program with another estimator, checked first against the task
    and the meta-parameters (``outer_reads``: whether V reads a field of
    eta, `metaflow.step.outer_reads`, when known)."""
    strategy = Strategy.parse(strategy)
    self.task.check_strategy(strategy)
    strategy.check_meta_params(self.spec, outer_reads)
    return dataclasses.replace(self, strategy=strategy)

  # -------------------------------------------------------------- the model
  def init_model(self, key: Any) -> Model:
    """A freshly initialised model's arrays (``key``: a seed or a PRNG
    key)."""
    _, theta, rest = Functional.split(self.task,
                                      self.task.make_model(nnx.Rngs(key)))
    return Model(theta, rest)

  def functional(self, rest: PyTree, gathered: Optional[PyTree] = None
                 ) -> Functional:
    """The task's losses as pure functions of ``(theta, eta, batch)``
    around the model's ``rest`` (`metaflow.task.Functional`)."""
    return Functional(self.task, self.spec, self.graphdef, rest, gathered)

  def inner_optimizer(self, eta: Eta) -> optax.GradientTransformation:
    """Phi for meta-parameters eta (learned learning rates enter here)."""
    return self.spec.inner_optimizer(eta, self.task.inner_optimizer)

  def fresh_learners(self, key: jax.Array, eta: Eta
                     ) -> tuple[PyTree, PyTree]:
    """P fresh models (one key each) and fresh inner optimiser states:
    ``(theta, s)`` with leading axis P (online learners)."""
    theta = jax.vmap(lambda k: self.init_model(k).theta)(
        jax.random.split(key, self.learning.population))
    return theta, jax.vmap(self.inner_optimizer(eta).init)(theta)
