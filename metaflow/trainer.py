"""`BilevelTrainer`: the outer loop around the engine.

One meta-step, for a meta-batch of B episodes (tasks) stacked on a leading
axis and an outer optax optimiser:

    value(eta) = mean_b V(theta_T^b(eta), eta, x_val^b)        (vmapped over b)
    eta <- eta + outer_update(d value / d eta)

where ``theta_T^b`` is T inner steps of Phi on episode b's inner batches from
``theta0 = eta["init"]`` (learned) or the model's initialisation. How
``d value / d eta`` is computed (standard, MixFlow-MG, remat, ...) is the
`Strategy`'s business; the trainer only passes it to the engine. With
``online=Online(population=P, lifetime=N)`` the B = P episodes are windows of
P persistent learners instead, each starting from its carried (theta, s)
(`metaflow.online`).

The trainer also evaluates (outer loss after T inner steps on held-out
episodes, and at the initial eta for comparison), writes metrics through clu
(TensorBoard event files and console lines), shows progress, and checkpoints
and resumes with Orbax (`metaflow.checkpoint`).

**Devices and processes.** Everything runs on a ``(data, fsdp)`` mesh
(`metaflow.sharding`; by default every device of every process on ``data``,
so one device is the plain single-device run). The meta-step, the
evaluation and the initial state are jitted once with shardings: each
device computes on its share of the meta-batch (whole episodes, or the
examples of every batch for tasks with `Task.example_axes`), theta, its
optimiser state and the T stored carries are split over ``fsdp`` by the
task's partition rules, eta is replicated (a learned initialisation is
split like theta) and XLA inserts the collectives (the mean over episodes,
the gathers of FSDP). With several processes each process reads only its
share of every meta-batch through Grain and the global arrays are built
from the shares; metrics are written by process 0; checkpoints are written
and restored by all processes together.
"""

# No `from __future__ import annotations`: clu reads TrainMetrics annotations.

import dataclasses
import functools
import math
import os
from typing import Any, Mapping, NamedTuple, Optional, Union, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from metaflow import checkpoint as checkpoint_lib
from metaflow import data, memory, mixflow, planner, sharding
from metaflow import metrics as metrics_lib
from metaflow import online as online_lib
from metaflow import preemption as preemption_lib
from metaflow._checks import PyTree, check_int
from metaflow.meta_params import LearnedLearningRates
from metaflow.online import Learners, Online
from metaflow.strategy import Strategy
from metaflow.task import Functional, Task
from metaflow.unroll import (
  check_num_steps,
  inner_loop,
  meta_value_and_grad_with_aux,
)


class TrainState(NamedTuple):
  """Everything meta-training carries from step to step (all checkpointed).

  Attributes:
    step: int32 scalar, meta-steps done (skipped ones included: the data
      position).
    eta: the meta-parameters (a dict, see `MetaParams`).
    opt_state: the outer optimiser's state, inside
      ``optax.apply_if_finite``'s (``notfinite_count``: consecutive skipped
      meta-steps, ``total_notfinite``: all of them, ``inner_state``: the
      outer optimiser's own).
    rng: uint32[2] PRNG key (split once per meta-step).
    learners: with online learners, the population (`metaflow.online.
      Learners`: each learner's theta, s and age, leading axis P); None
      offline.
  """
  # PyTree: the same structure also holds shapes (jax.eval_shape) and
  # shardings (`BilevelTrainer.state_shardings`).
  step: PyTree
  eta: PyTree
  opt_state: PyTree
  rng: PyTree
  learners: PyTree = None


class FitResult(NamedTuple):
  """Result of `BilevelTrainer.fit`.

  Attributes:
    state: the final `TrainState`.
    initial_eval: evaluation at the initial eta (same held-out episodes).
    final_eval: evaluation at the final eta ({} when preempted).
    history: logged rows ``{"step": int, name: float, ...}``, training
      averages and evaluations, in order (of this process's run only).
    preempted: the name of the signal that stopped the run early (after a
      checkpoint), or None.
  """
  state: TrainState
  initial_eval: dict
  final_eval: dict
  history: list
  preempted: Optional[str] = None


class NonFiniteError(RuntimeError):
  """Too many consecutive meta-steps had a non-finite outer loss or
  meta-gradient (`BilevelTrainer.fit`'s ``max_skipped_steps``)."""


#: ``optax.apply_if_finite`` applies a non-finite update after this many
#: consecutive ones; `BilevelTrainer.fit` stops long before.
_NEVER_APPLY = 2**31 - 2


@struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Meta-training metrics, averaged over the applied meta-steps of a logging
  interval (the model output ``mask`` leaves the skipped, non-finite ones
  out)."""
  # clu's idiom: a metric's class is the field's annotation.
  outer_loss: clu_metrics.Average.from_output("outer_loss")  # pyright: ignore[reportInvalidTypeForm]
  inner_loss_first: clu_metrics.Average.from_output("inner_loss_first")  # pyright: ignore[reportInvalidTypeForm]
  inner_loss_last: clu_metrics.Average.from_output("inner_loss_last")  # pyright: ignore[reportInvalidTypeForm]
  meta_grad_norm: clu_metrics.Average.from_output("meta_grad_norm")  # pyright: ignore[reportInvalidTypeForm]


def _shapes(tree: PyTree) -> dict[str, str]:
  return {jax.tree_util.keystr(path): f"{leaf.dtype}{list(leaf.shape)}"
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class BilevelTrainer:
  """Meta-trains a `Task` with a gradient `Strategy`.

  Args:
    task: the bilevel problem.
    strategy: a `Strategy` or its name, e.g. ``"mixflow"`` (default) or
      ``"standard+remat"``; or ``"auto"``: the fastest exact strategy whose
      compiled meta-step fits ``memory_budget`` (`metaflow.planner`; the
      candidates are compiled shapes-only when the trainer is built, the
      table is logged and kept in ``auto_table``).
    num_inner_steps: T, inner steps per episode (training and evaluation);
      with online learners, the window.
    meta_batch_size: B, episodes per meta-step (vmapped); default 4, or P
      with online learners (the meta-batch is the population).
    outer_optimizer: optax transformation for eta (default Adam, 1e-3),
      applied through ``optax.apply_if_finite``: a meta-step with a
      non-finite outer loss or meta-gradient is skipped (`fit`).
    seed: seeds the model initialisation, eta, the RNG and the data.
    eval_split: split of the held-out evaluation episodes.
    num_eval_tasks: number of evaluation episodes.
    num_workers: Grain worker processes for training data (0: in process).
    mesh: the ``(data, fsdp)`` device mesh (`metaflow.sharding.make_mesh`);
      default: every device of every process on ``data``.
    memory_budget: with ``strategy="auto"`` (only), the memory one device
      may use for the meta-step: bytes or a string such as ``"16GiB"``.
    shapes_only: build for `compiled_memory` only (planning): the model is
      never initialised, so a preset far larger than this machine's memory
      can be analysed; training methods refuse.
    online: `Online(population=P, lifetime=N)`: P persistent inner learners
      whose windows of T steps continue across meta-steps
      (`metaflow.online`); default off (every episode starts afresh).

  Raises:
    ValueError/TypeError: bad settings, a strategy the task does not
      support, or a batch the mesh does not divide; all before anything is
      compiled. `metaflow.planner.NothingFitsError` (a ValueError): no
      candidate of ``"auto"`` fits the budget.
  """

  def __init__(self, task: Task, *, strategy: Union[str, Strategy] = "mixflow",
               num_inner_steps: int = 5,
               meta_batch_size: Optional[int] = None,
               outer_optimizer: Optional[optax.GradientTransformation] = None,
               seed: int = 0, eval_split: str = "validation",
               num_eval_tasks: int = 64, num_workers: int = 0,
               mesh: Optional[jax.sharding.Mesh] = None,
               memory_budget: Union[None, str, int] = None,
               shapes_only: bool = False, online: Optional[Online] = None):
    if not isinstance(task, Task):
      raise TypeError(
          f"task must be a metaflow.Task, got {type(task).__name__}.")
    self.task = task
    auto = isinstance(strategy, str) and strategy.strip().lower() == "auto"
    if auto and memory_budget is None:
      raise ValueError("strategy='auto' needs a memory_budget (e.g. '16GiB'): "
                       "the memory one device may use for the meta-step.")
    if memory_budget is not None and not auto:
      raise ValueError("memory_budget applies to strategy='auto' only (got "
                       f"strategy={strategy!r}).")
    budget = (None if memory_budget is None
              else planner.parse_bytes(memory_budget))
    self.shapes_only = bool(shapes_only)
    # "auto" is resolved below, once the meta-gradient can be compiled; every
    # candidate is exact MixFlow-MG, checked here as plain "mixflow".
    self.strategy = Strategy.parse("mixflow" if auto else strategy)
    task.check_strategy(self.strategy)
    self.spec = task.meta_params()
    self.spec.check_strategy(self.strategy)
    if (type(task).dataset is Task.dataset
        and type(task).episodes is Task.episodes):
      raise TypeError(
          f"Task {task.name or type(task).__name__!r} must implement "
          "dataset(split, seed) or episodes(split, seed, num_inner_steps).")
    self.online = self._check_online(online, num_inner_steps)
    if meta_batch_size is None:
      meta_batch_size = self.online.population if self.online.enabled else 4
    for name, value, low in (("meta_batch_size", meta_batch_size, 1),
                             ("num_eval_tasks", num_eval_tasks, 1),
                             ("num_workers", num_workers, 0),
                             ("seed", seed, 0)):
      check_int(name, value, low)
    data.check_split(eval_split)
    if self.online.enabled and meta_batch_size != self.online.population:
      raise ValueError(
          f"meta_batch_size ({meta_batch_size}) must equal the online "
          f"population ({self.online.population}): each meta-step runs one "
          "window per learner; leave meta_batch_size unset.")
    if outer_optimizer is None:
      outer_optimizer = optax.adam(1e-3)
    if not isinstance(outer_optimizer, optax.GradientTransformation):
      raise TypeError(
          "outer_optimizer must be an optax.GradientTransformation, got "
          f"{type(outer_optimizer).__name__}.")
    self.meta_batch_size = meta_batch_size
    self.outer_optimizer = outer_optimizer
    # A meta-step whose outer loss or meta-gradient is not finite is not
    # applied (eta and the optimiser state stay; `_meta_step`).
    self._outer = optax.apply_if_finite(outer_optimizer, _NEVER_APPLY)
    self.seed = seed
    self.eval_split = eval_split
    self.num_eval_tasks = num_eval_tasks
    self.num_workers = num_workers

    self.mesh = (sharding.make_mesh() if mesh is None
                 else sharding.check_mesh(mesh))
    graphdef, theta_shapes, rest_shapes = Functional.split(
        task, nnx.eval_shape(lambda: task.make_model(nnx.Rngs(seed))))
    self.num_inner_steps = check_num_steps(num_inner_steps)
    self._split_examples = task.example_axes is not None
    self._layout_batches()
    self._check_first_order_user(graphdef, theta_shapes, rest_shapes)
    theta_specs = (sharding.param_specs(theta_shapes, self.mesh,
                                        task.partition_rules())
                   if self._split_examples else
                   jax.tree.map(lambda _: PartitionSpec(), theta_shapes))
    self.theta_shardings = sharding.named(self.mesh, theta_specs)
    self._replicated = sharding.replicated(self.mesh)
    # The model is initialised by a jitted function straight into its
    # shardings (no device ever holds a large model whole); the non-trained
    # rest is a constant of the inner loop.
    init = jax.jit(self._init_model, static_argnums=0,
                   out_shardings=(self.theta_shardings, self._replicated))
    if self.shapes_only:  # theta's initialisation is dead code, never run
      rest = jax.jit(lambda seed: init(seed)[1], static_argnums=0)(seed)
      self.theta_init = self._abstract(theta_shapes, self.theta_shardings)
    else:
      self.theta_init, rest = init(seed)
    self.functional = Functional(
        task, self.spec, graphdef, jax.tree.map(np.asarray, rest),
        gathered=jax.tree.map(lambda _: self._replicated, theta_shapes))
    f = self.functional
    self.meta_gradient = meta_value_and_grad_with_aux(
        f.inner_loss, f.outer_loss, f.optimizer, self.num_inner_steps,
        self.strategy)
    self._adapt = inner_loop(f.inner_loss, f.optimizer, self.num_inner_steps,
                             "standard")
    if self.online.enabled:
      theta_per_learner = (self._chunked(self.theta_shardings)
                           if self._split_examples else
                           jax.tree.map(lambda _: self._population_sharding(),
                                        theta_shapes))
      self._learner_theta_shardings = theta_per_learner
    self.state_shardings = self._state_shardings()
    #: With strategy="auto": the `planner.Candidate`s compiled, in order.
    self.auto_table: Optional[list] = None
    if budget is not None:
      self._choose_strategy(budget)
    self._init = jax.jit(self._initial_state,
                         out_shardings=self.state_shardings)
    self._step = self._jit_step()
    # From fresh models, and (online) from the population's carried state.
    self._jit_value_and_grad = {
        carried: jax.jit(self._value_and_grad, in_shardings=(
            self.state_shardings.eta, self._batch_shardings,
            self.theta_shardings,
            self.state_shardings.learners if carried else None))
        for carried in (False, True)}
    self._eval_cache = {}

  # ------------------------------------------------------------- sharding
  def _jit_step(self):
    """The meta-step, jitted with shardings (a fresh function each call, so
    nothing traced for another strategy is reused)."""
    return jax.jit(
        lambda state, batch, theta_init: self._meta_step(state, batch,
                                                         theta_init),
        donate_argnums=0,
        in_shardings=(self.state_shardings, self._batch_shardings,
                      self.theta_shardings),
        out_shardings=(self.state_shardings, self._replicated))

  def _use_strategy(self, strategy: Strategy) -> None:
    self.strategy = strategy
    self.meta_gradient = dataclasses.replace(self.meta_gradient,
                                             strategy=strategy)

  def _batch_divisor(self) -> int:
    """The gcd of the leading (example) axes of one episode's inner batches
    (per step) and outer batch: what ``microbatches`` must divide."""
    episode = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
        self._batch_shapes)
    inner, outer = jax.eval_shape(
        lambda e: self.task.split_episode(e, self.num_inner_steps), episode)
    sizes = ([x.shape[1] for x in jax.tree.leaves(inner) if x.ndim > 1]
             + [x.shape[0] for x in jax.tree.leaves(outer) if x.ndim > 0])
    return math.gcd(*sizes) if sizes else 1

  def strategy_candidates(self) -> tuple[list[Strategy], dict[str, str]]:
    """``strategy="auto"``'s candidates for this trainer's T and batches
    (`metaflow.planner.candidates`, fastest first) that the task accepts,
    and ``{name: reason}`` of those it refuses."""
    accepted, refused = [], {}
    for s in planner.candidates(self.num_inner_steps, self._batch_divisor()):
      try:
        self.task.check_strategy(s)
        self.spec.check_strategy(s)
      except ValueError as e:
        refused[s.name] = str(e)
        continue
      accepted.append(s)
    return accepted, refused

  def memory_with(self, strategy: Union[str, Strategy]) -> memory.MemoryReport:
    """`compiled_memory` ``(whole_step=True)`` of the meta-step with another
    exact ``strategy`` (shapes only; this trainer's own is kept)."""
    strategy = Strategy.parse(strategy)
    if not strategy.exact:
      raise ValueError(f"memory_with compares exact strategies, got "
                       f"{strategy.name!r}.")
    own = self.strategy
    try:
      self._use_strategy(strategy)
      return self.compiled_memory(whole_step=True)
    finally:
      self._use_strategy(own)

  def _choose_strategy(self, budget: int) -> None:
    """Resolves ``strategy="auto"`` (`metaflow.planner`): compiles the
    candidates' meta-steps shapes-only, fastest first, keeps the first that
    fits ``budget`` bytes per device, and logs the table."""
    options, refused = self.strategy_candidates()
    for name, reason in refused.items():
      logging.info("strategy auto: %s skipped: %s", name, reason)
    try:
      choice, self.auto_table = planner.choose(
          self.memory_with, options, budget,
          planner.fit_hint(self.num_inner_steps))
    except planner.NothingFitsError as e:
      logging.info("strategy auto, candidates per device:\n%s",
                   planner.table(e.rows, budget))
      raise
    self._use_strategy(choice)
    logging.info("strategy auto, candidates per device:\n%s\nchosen: %s",
                 planner.table(self.auto_table, budget), choice.name)

  def _check_online(self, online: Optional[Online],
                    num_inner_steps: int) -> Online:
    """The online setting, refused (before compiling) where it cannot
    work."""
    if online is None:
      return Online()
    if not isinstance(online, Online):
      raise TypeError(f"online must be a metaflow.Online, got "
                      f"{type(online).__name__}.")
    if not online.enabled:
      return online
    online.check(check_num_steps(num_inner_steps))
    if self.spec.learn_init:
      raise ValueError(
          "Online learners cannot meta-learn an initialisation (learn_init): "
          "a window starts from a learner's carried state, a constant of "
          "eta, so eta['init'] would get no meta-gradient.")
    lr = self.spec.learning_rate
    if isinstance(lr, LearnedLearningRates) and lr.per_step:
      raise ValueError(
          "Online learners cannot use per-step learned learning rates "
          "(per_step=True): they index an episode's inner steps, and a "
          "learner's steps run on across windows.")
    return online

  def _require_concrete(self, what: str) -> None:
    if self.shapes_only:
      raise RuntimeError(
          f"BilevelTrainer.{what}: this trainer was built with "
          "shapes_only=True (for compiled_memory and planning); build one "
          "without it to train or evaluate.")

  def _init_model(self, seed_or_key) -> tuple[PyTree, PyTree]:
    """``(theta, rest)`` of a fresh model (pure dicts)."""
    _, theta, rest = Functional.split(
        self.task, self.task.make_model(nnx.Rngs(seed_or_key)))
    return theta, rest

  def _layout_batches(self) -> None:
    """The shapes and shardings of a meta-batch, and this process's share.

    A meta-batch has leaves ``[B, ...]`` (B = meta_batch_size). Its split
    axis is B (episodes over devices) or, with `Task.example_axes`, the
    examples axis of every leaf; the mesh must divide it.
    """
    first = data.take(
        self.task.episodes("train", self.seed, self.num_inner_steps), 1)
    self._batch_shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((self.meta_batch_size,) + x.shape[1:],
                                       x.dtype), first)
    name = self.task.name or type(self.task).__name__
    if self._split_examples:
      try:
        axes = jax.tree.map(
            lambda axis, sub: jax.tree.map(lambda _: axis + 1, sub),
            self.task.example_axes, self._batch_shapes)
      except ValueError as e:
        raise ValueError(f"Task {name!r}: example_axes "
                         f"{self.task.example_axes!r} is not a prefix of its "
                         f"episodes' structure: {e}") from None
    else:
      axes = jax.tree.map(lambda _: 0, self._batch_shapes)
    sizes = {x.shape[axis] if 0 <= axis < x.ndim else -1 for x, axis in
             zip(jax.tree.leaves(self._batch_shapes), jax.tree.leaves(axes))}
    if len(sizes) != 1 or -1 in sizes:
      raise ValueError(f"Task {name!r}: its episodes' example axes "
                       f"{self.task.example_axes!r} must exist and have one "
                       f"size in every leaf; found sizes {sizes}.")
    (size,) = sizes
    if self._split_examples:
      sharding.check_batch_divisible(
          f"Task {name!r}: the number of examples per batch (its "
          "example_axes, split over the devices)", size, self.mesh,
          "the built-in language-model tasks: --config.task.batch_size")
    else:
      sharding.check_batch_divisible("meta_batch_size", size, self.mesh,
                                     "--config.meta_batch_size")
    self._split_size = size
    self._share = sharding.process_share(self.mesh, size)
    self._batch_shardings = jax.tree.map(
        lambda x, axis: NamedSharding(self.mesh,
                                      sharding.batch_spec(x.ndim, axis)),
        self._batch_shapes, axes)

  def _check_first_order_user(self, graphdef: nnx.GraphDef, theta: PyTree,
                              rest: PyTree) -> None:
    """``first_order`` keeps only eta's paths that avoid g_t: user
    meta-parameters that V does not read itself would get zero. Refused
    before compiling: V is traced on shapes (``theta``, ``rest``) only."""
    if self.strategy.mode != "first_order" or "user" not in self.spec.kinds:
      return
    eta = jax.eval_shape(
        lambda theta: self.spec.init(jax.random.PRNGKey(0), theta,
                                     self.num_inner_steps), theta)
    episode = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                           self._batch_shapes)
    outer = jax.eval_shape(
        lambda e: self.task.split_episode(e, self.num_inner_steps)[1], episode)
    others = {k: v for k, v in eta.items() if k != "user"}

    def outer_loss(user, others, theta, rest, batch):
      f = Functional(self.task, self.spec, graphdef, rest)
      return f.outer_loss(theta, {**others, "user": user}, batch)

    jaxpr = jax.make_jaxpr(outer_loss)(eta["user"], others, theta, rest,
                                       outer).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    used |= {id(v) for v in jaxpr.outvars}
    user_vars = jaxpr.invars[:len(jax.tree.leaves(eta["user"]))]
    if not any(id(v) in used for v in user_vars):
      raise ValueError(
          "Strategy 'first_order' cannot learn these user meta-parameters: "
          "the outer loss V does not read them, so they reach it only through "
          "the inner gradients g_t, which first_order treats as constants "
          "(their meta-gradient would be zero). Use an exact strategy "
          "(mixflow) or implicit.")

  def _episodes(self, split: str) -> tuple[Any, tuple[tuple[int, int], ...]]:
    """This process's episodes of ``split`` and the meta-batch positions it
    reads (its share: positions of episodes, or examples within them)."""
    if not self._split_examples:
      return (self.task.episodes(split, self.seed, self.num_inner_steps),
              self._share)
    everything = ((0, self.meta_batch_size),)
    if self._share == ((0, self._split_size),):
      return (self.task.episodes(split, self.seed, self.num_inner_steps),
              everything)
    return (self.task.local_episodes(split, self.seed, self.num_inner_steps,
                                     self._share), everything)

  def _global(self, local: PyTree, chunks: Optional[int] = None) -> PyTree:
    """Global arrays of this process's share of a meta-batch (leaves
    ``[B, ...]``), or of ``chunks`` stacked meta-batches."""
    shapes, shardings = self._batch_shapes, self._batch_shardings
    if chunks is not None:
      shapes = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct((chunks,) + x.shape, x.dtype), shapes)
      shardings = self._chunked(shardings)
    return sharding.global_batch(local, shardings, shapes)

  def _chunked(self, shardings: PyTree) -> PyTree:
    return jax.tree.map(
        lambda s: NamedSharding(self.mesh, PartitionSpec(None, *s.spec)),
        shardings)

  def _state_shardings(self) -> TrainState:
    state = jax.eval_shape(self._initial_state, self.theta_init)
    eta = {kind: (self.theta_shardings if kind == "init" else
                  jax.tree.map(lambda _: self._replicated, value))
           for kind, value in state.eta.items()}
    return TrainState(
        step=self._replicated, eta=eta,
        opt_state=sharding.optimizer_state_shardings(
            self._outer, state.opt_state, eta, self.mesh),
        rng=self._replicated,
        learners=self._learners_shardings(state))

  def _population_sharding(self) -> NamedSharding:
    """The learners' leading axis P split like a meta-batch's episodes."""
    return NamedSharding(self.mesh, PartitionSpec(sharding.BATCH_AXES))

  def _learners_shardings(self, state: TrainState) -> Optional[Learners]:
    """The population's shardings: per learner, theta and s laid out like
    the inner loop's carry (split over ``fsdp`` for `Task.example_axes`
    tasks, a replicated leading P), or whole learners split over the
    devices like episodes; None offline."""
    if state.learners is None:
      return None
    if not self._split_examples:
      return jax.tree.map(lambda _: self._population_sharding(),
                          state.learners)
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                       state.learners.opt_state)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state.eta)
    opt_state = sharding.optimizer_state_shardings(
        self.functional.optimizer(zeros), one, self.theta_shardings,
        self.mesh)
    return Learners(self._learner_theta_shardings, self._chunked(opt_state),
                    self._replicated)

  def _theta0(self, eta: dict, theta_base: PyTree) -> PyTree:
    """theta0, laid out like theta (the inner loop's carry follows it)."""
    return jax.lax.with_sharding_constraint(
        self.spec.theta0(eta, theta_base), self.theta_shardings)

  def _vmap(self, fn):
    """``jax.vmap`` over the episodes of a meta-batch; split over the
    devices when whole episodes are."""
    return jax.vmap(fn, spmd_axis_name=(None if self._split_examples
                                        else sharding.BATCH_AXES))

  # ------------------------------------------------------------------ state
  def _initial_state(self, theta_init: PyTree) -> TrainState:
    key = jax.random.PRNGKey(self.seed)
    key, k_eta = jax.random.split(key)
    # Copies: the jitted step donates the state, which must not take
    # theta_init (copied into eta["init"]) with it.
    eta = jax.tree.map(jnp.copy, self.spec.init(k_eta, theta_init,
                                                self.num_inner_steps))
    learners = None
    if self.online.enabled:  # at age 0; `warm_up` staggers them
      params, opt_state = self._fresh_learners(
          jax.random.fold_in(jax.random.PRNGKey(self.seed), 1), eta)
      learners = Learners(params, opt_state,
                          jnp.zeros([self.online.population], jnp.int32))
    return TrainState(step=jnp.zeros([], jnp.int32), eta=eta,
                      opt_state=self._outer.init(eta), rng=key,
                      learners=learners)

  def _fresh_learners(self, key: jax.Array, eta: PyTree
                      ) -> tuple[PyTree, PyTree]:
    """P fresh models (one key each) and fresh inner optimiser states:
    ``(theta, s)`` with leading axis P."""
    theta = jax.vmap(lambda k: self._init_model(k)[0])(
        jax.random.split(key, self.online.population))
    opt_state = jax.vmap(self.functional.optimizer(eta).init)(theta)
    return theta, opt_state

  def init_state(self) -> TrainState:
    """The initial `TrainState` (deterministic given ``seed``), laid out in
    `state_shardings`."""
    self._require_concrete("init_state")
    return self._init(self.theta_init)

  def fingerprint(self, run_config: Optional[Mapping[str, Any]] = None) -> dict:
    """What must match for a checkpoint to be resumed by this trainer (not
    the mesh: a checkpoint resumes on any number of devices)."""
    state = jax.eval_shape(self._initial_state, self.theta_init)
    return {
        "task": self.task.name or type(self.task).__qualname__,
        "task_config": self.task.config(),
        "num_inner_steps": self.num_inner_steps,
        "meta_batch_size": self.meta_batch_size,
        "seed": self.seed,
        **({"online": dataclasses.asdict(self.online)}
           if self.online.enabled else {}),
        "state": _shapes(state),
        "run": dict(run_config or {}),
    }

  def train_batches(self):
    """A fresh Grain iterator over training meta-batches: this process's
    share of each (the whole meta-batch on one process)."""
    episodes, owned = self._episodes("train")
    return iter(data.meta_batches(episodes, self.meta_batch_size,
                                  self.num_workers, owned=owned))

  @functools.cached_property
  def _warm_window(self):
    def window(learners, eta, batch, target_age):
      def one(episode, theta, s):
        inner, _ = self.task.split_episode(episode, self.num_inner_steps)
        theta = jax.lax.with_sharding_constraint(theta, self.theta_shardings)
        result = self._adapt(eta, theta, inner, s)
        return result.params, result.opt_state
      params, opt_state = self._vmap(one)(batch, learners.params,
                                          learners.opt_state)
      return online_lib.warm_window(learners, params, opt_state,
                                    self.num_inner_steps, target_age)
    shardings = self.state_shardings.learners
    return jax.jit(window, donate_argnums=0,
                   in_shardings=(shardings, self.state_shardings.eta,
                                 self._batch_shardings, self._replicated),
                   out_shardings=shardings)

  def warm_up(self, state: TrainState, batches) -> TrainState:
    """Staggers a fresh online population (`metaflow.online`): learner p
    trains with the state's eta, one window of T inner steps per training
    meta-batch read from ``batches`` (the iterator `fit` then continues),
    until it is `Online.initial_ages` steps old. Nothing is differentiated;
    the state's learners are donated. Offline: ``state`` as it is."""
    self._require_concrete("warm_up")
    if state.learners is None:
      return state
    target = self.online.initial_ages(self.num_inner_steps)
    windows = int(target.max()) // self.num_inner_steps
    if windows == 0:
      return state
    logging.info("Online: warming up %d learners to ages %s (%d windows of "
                 "T=%d inner steps).", self.online.population,
                 target.tolist(), windows, self.num_inner_steps)
    progress = metrics_lib.report_progress(windows, None)
    learners = state.learners
    target = jax.device_put(target, self._replicated)
    for w in range(1, windows + 1):
      learners = self._warm_window(learners, state.eta,
                                   self._global(next(batches)), target)
      jax.block_until_ready(learners)  # one in flight (see `_summarise`)
      progress(w)
    return state._replace(learners=learners)

  # --------------------------------------------------------------- the step
  def _theta_base(self, key: jax.Array, theta_init: PyTree) -> PyTree:
    if self.task.resample_init and not self.spec.learn_init:
      return self._init_model(key)[0]
    return theta_init

  def _value_and_grad(self, eta: dict, batch: PyTree, theta_base: PyTree,
                      learners: Optional[Learners] = None):
    """``((mean V, MetaAux of each episode), d mean V / d eta)`` over the
    meta-batch: episodes from ``theta0(eta, theta_base)``, or (``learners``
    given) windows from each learner's carried (theta, s), constants of
    eta."""
    carried = None if learners is None else (learners.params,
                                             learners.opt_state)

    def value(eta):
      def one(episode, carried):
        inner, outer = self.task.split_episode(episode, self.num_inner_steps)
        if carried is None:
          theta0, s0 = self._theta0(eta, theta_base), None
        else:
          theta0, s0 = carried
          theta0 = jax.lax.with_sharding_constraint(theta0,
                                                    self.theta_shardings)
        return self.meta_gradient.objective(eta, theta0, inner, outer, s0)
      values, aux = self._vmap(one)(batch, carried)
      return jnp.mean(values), aux
    return jax.value_and_grad(value, has_aux=True)(eta)

  def meta_value_and_grad(self, eta: dict, batch: PyTree,
                          learners: Optional[Learners] = None
                          ) -> tuple[jax.Array, dict]:
    """``(value, d value / d eta)`` for a meta-batch (leaves ``[B, ...]``;
    with several processes, this process's share, as `train_batches`
    yields): the mean outer loss after T inner steps over the B episodes,
    and its meta-gradient (with this trainer's strategy), from the model's
    initialisation unless theta0 is learned, or, given the population
    ``learners`` (an online trainer's ``state.learners``), from each
    learner's carried (theta, s): the meta-step's window meta-gradient.
    Jitted; nothing is updated."""
    self._require_concrete("meta_value_and_grad")
    if learners is not None and not self.online.enabled:
      raise ValueError("learners given to an offline trainer (online "
                       "population 0).")
    (value, _), grads = self._jit_value_and_grad[learners is not None](
        self._place_eta(eta), self._global(batch), self.theta_init,
        learners)
    return value, grads

  def _place_eta(self, eta: dict) -> dict:
    """eta in this trainer's layout (e.g. from another mesh, or numpy)."""
    return jax.device_put(eta, self.state_shardings.eta)

  def _abstract(self, tree: PyTree, shardings: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
        tree, shardings)

  def compiled_memory(self, whole_step: bool = False) -> memory.MemoryReport:
    """XLA's compiled memory of one meta-gradient (a meta-batch of B
    episodes, this trainer's strategy and mesh), from shapes only: nothing
    runs. Figures are per device. ``whole_step``: of the jitted meta-step
    that training runs instead (the meta-gradient, the outer update and the
    donated `TrainState`: what ``strategy="auto"`` compares with the budget).

    Static memory is the device's share of the B x T stored copies of the
    inner carry (theta, s) (B x `Strategy.stored_carries` with segments):
    its episodes' carries (B / devices when whole episodes are split), each
    of them the device's shard of (theta, s). With online learners the
    population's state, an argument of the step, is the rest of it
    (``population_bytes``).
    """
    state = jax.eval_shape(self._initial_state, self.theta_init)
    eta = self._abstract(state.eta, self.state_shardings.eta)
    batch = self._abstract(self._batch_shapes, self._batch_shardings)
    theta_init = self._abstract(self.theta_init, self.theta_shardings)
    theta0 = jax.eval_shape(self.spec.theta0, eta, theta_init)
    inner_state = jax.eval_shape(
        lambda eta, theta: self.functional.optimizer(eta).init(theta),
        eta, theta0)
    episodes_per_device = (self.meta_batch_size if self._split_examples else
                           self.meta_batch_size
                           // sharding.batch_size_divisor(self.mesh))
    if self.strategy.mode == "implicit":  # only theta_T is kept
      static = episodes_per_device * sharding.shard_bytes(
          theta0, self.theta_shardings)
    else:
      # The optimiser's structure (which state entries are shaped like theta)
      # needs a concrete eta (learned rates are read when it is built):
      # zeros that numpy allocates lazily and that are never written.
      zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state.eta)
      carry = sharding.shard_bytes(
          (theta0, inner_state),
          (self.theta_shardings, sharding.optimizer_state_shardings(
              self.functional.optimizer(zeros), inner_state,
              self.theta_shardings, self.mesh)))
      static = (episodes_per_device * carry
                * self.strategy.stored_carries(self.num_inner_steps))
    learners, population = None, None
    if state.learners is not None:
      learners = self._abstract(state.learners, self.state_shardings.learners)
      population = sharding.shard_bytes(state.learners,
                                        self.state_shardings.learners)
    if whole_step:
      compiled = self._jit_step().lower(
          self._abstract(state, self.state_shardings), batch,
          theta_init).compile()
      return memory.report(compiled, static, population)
    # A fresh function: nothing traced for another strategy is reused.
    return memory.analyze(lambda *args: self._value_and_grad(*args), eta,
                          batch, theta_init, learners, static_bytes=static,
                          population_bytes=population)

  def floor_memory(self) -> dict[str, memory.MemoryReport]:
    """XLA's compiled memory, per device and from shapes only, of the two
    computations an exact meta-gradient repeats at every inner step, each at
    one episode's first inner batch (the full batch, this trainer's mesh):

    * ``"gradient"``: one plain gradient ``grad_theta L(theta, eta, x_t)``
      (what a training step computes, and the forward pass of every step);
    * ``"hvp"``: one forward-over-reverse Hessian-vector product
      ``(H_tt v, H_et v)`` (`mixflow.gradient_jvp` with respect to theta and
      eta: MixFlow-MG's backward step).

    The larger temp figure is the least working set a strategy that takes
    the batch whole can have beyond its stored carries: compare it with a
    strategy's ``dynamic_bytes``. Microbatches go below it (each chunk's
    gradient and JVP are about 1/M of it).
    """
    state = jax.eval_shape(self._initial_state, self.theta_init)
    eta = self._abstract(state.eta, self.state_shardings.eta)
    batch = self._abstract(self._batch_shapes, self._batch_shardings)
    theta_init = self._abstract(self.theta_init, self.theta_shardings)
    loss = self.functional.inner_loss

    def at_first_batch(fn):
      def run(eta, batch, theta_init):
        inner, _ = self.task.split_episode(
            jax.tree.map(lambda x: x[0], batch), self.num_inner_steps)
        theta = self.spec.theta0(eta, theta_init)
        return fn(theta, eta, jax.tree.map(lambda x: x[0], inner))
      return memory.analyze(run, eta, batch, theta_init)

    hvp = mixflow.gradient_jvp(loss, argnums=(0, 1))
    return {
        "gradient": at_first_batch(jax.grad(loss)),
        "hvp": at_first_batch(lambda theta, eta, x: hvp(theta, eta, x, theta)),
    }

  def _meta_step(self, state: TrainState, batch: PyTree, theta_init: PyTree):
    rng, key = jax.random.split(state.rng)
    if state.learners is None:
      (outer_loss, aux), meta_grads = self._value_and_grad(
          state.eta, batch, self._theta_base(key, theta_init))
    else:  # one window per learner from its carried (theta, s)
      (outer_loss, aux), meta_grads = self._value_and_grad(
          state.eta, batch, None, state.learners)
    # apply_if_finite looks at the meta-gradient only: a non-finite outer
    # loss (with a finite meta-gradient, e.g. an inf in a term without eta)
    # marks it too. A skipped step's update is zero: eta and the outer
    # optimiser's state stay as they were; step and rng move on.
    meta_grads = jax.tree.map(
        lambda g: jnp.where(jnp.isfinite(outer_loss), g, jnp.nan), meta_grads)
    updates, opt_state = self._outer.update(meta_grads, state.opt_state,
                                            state.eta)
    finite_state = cast(optax.ApplyIfFiniteState, opt_state)
    eta = optax.apply_updates(state.eta, updates)
    step_metrics = {
        "outer_loss": outer_loss,
        "inner_loss_first": jnp.mean(aux.inner_losses[:, 0]),
        "inner_loss_last": jnp.mean(aux.inner_losses[:, -1]),
        "meta_grad_norm": optax.tree.norm(meta_grads),
        "mask": finite_state.last_finite,
        "skipped_steps": finite_state.total_notfinite,
        "consecutive_skips": finite_state.notfinite_count,
    }
    learners = state.learners
    if learners is not None:  # carried forward; replaced at the lifetime
      learners = online_lib.advance(
          aux.params, aux.opt_state, learners.age, self.num_inner_steps,
          self.online.lifetime, lambda: self._fresh_learners(key, eta))
    return (TrainState(state.step + 1, eta, opt_state, rng, learners),
            step_metrics)

  def step(self, state: TrainState, batch: PyTree
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One jitted meta-step on a meta-batch (leaves ``[B, ...]``; with
    several processes, this process's share, as `train_batches` yields).

    ``state`` is donated (its buffers are reused); use the returned one.
    """
    self._require_concrete("step")
    return self._step(state, self._global(batch), self.theta_init)

  # ------------------------------------------------------------- evaluation
  def _evaluate_episodes(self, eta: dict, theta_init: PyTree, episodes: PyTree,
                         num_tasks: int):
    f = self.functional

    def one(episode):
      inner, outer = self.task.split_episode(episode, self.num_inner_steps)
      theta0 = self._theta0(eta, theta_init)
      theta_T = self._adapt(eta, theta0, inner).params
      out = {"outer_loss": f.outer_loss(theta_T, eta, outer),
             "outer_loss_before_adaptation": f.outer_loss(theta0, eta, outer)}
      out.update(f.eval_metrics(theta_T, eta, outer))
      return out

    # Chunks of B episodes (laid out like a meta-batch), one after another.
    per_episode = jax.lax.map(self._vmap(one), episodes)  # leaves [C, B]
    return jax.tree.map(lambda v: jnp.mean(v.reshape(-1)[:num_tasks]),
                        per_episode)

  def eval_episodes(self, split: str, num_tasks: int) -> PyTree:
    """The fixed held-out episodes of ``split``: the first ``num_tasks``
    (rounded up to whole meta-batches), global arrays ``[chunks, B, ...]``
    (cached)."""
    key = (split, num_tasks)
    if key not in self._eval_cache:
      chunks = math.ceil(num_tasks / self.meta_batch_size)
      episodes, owned = self._episodes(split)
      read = data.MetaBatch(episodes, self.meta_batch_size, owned)
      self._eval_cache[key] = self._global(
          data.stack([read(c) for c in range(chunks)]), chunks)
    return self._eval_cache[key]

  @functools.cached_property
  def _evaluate(self):
    return jax.jit(
        self._evaluate_episodes, static_argnums=3,
        in_shardings=(self.state_shardings.eta, self.theta_shardings,
                      self._chunked(self._batch_shardings)),
        out_shardings=self._replicated)

  def evaluate(self, eta: dict, split: Optional[str] = None,
               num_tasks: Optional[int] = None) -> dict[str, float]:
    """Mean metrics over held-out episodes after T inner steps from
    ``theta0(eta)``: ``outer_loss`` (V at theta_T), the outer loss before
    adaptation, and the task's `Task.eval_metrics`."""
    self._require_concrete("evaluate")
    num_tasks = num_tasks or self.num_eval_tasks
    episodes = self.eval_episodes(split or self.eval_split, num_tasks)
    result = self._evaluate(self._place_eta(eta), self.theta_init, episodes,
                            num_tasks)
    return {k: float(v) for k, v in result.items()}

  @functools.cached_property
  def _curve_fns(self):
    """`inner_curve`'s jitted window ``(eta, theta, s, inner) -> (theta,
    s)`` and held-out loss ``(eta, theta, outer batches) -> mean V``."""
    f = self.functional
    window = jax.jit(lambda eta, theta, s, inner: self._adapt(
        eta, theta, inner, s)[:2])
    loss = jax.jit(lambda eta, theta, outer: jnp.mean(jax.lax.map(
        lambda batch: f.outer_loss(theta, eta, batch), outer)))
    return window, loss

  def inner_curve(self, eta: dict, num_steps: int, *, eval_every: int,
                  split: str = "test", num_eval_batches: int = 8,
                  seed: Optional[int] = None) -> list[tuple[int, float]]:
    """A fresh inner model trained for ``num_steps`` inner steps with
    ``eta`` frozen (nothing is differentiated), and its held-out loss curve.

    The model starts from this trainer's initialisation (``theta0(eta)``:
    the same start for every eta compared) with a fresh inner optimiser
    state, and trains on the inner batches of consecutive ``"train"``
    episodes (windows of T, the state carried across them: a stream of
    batches for the language-model tasks). Every ``eval_every`` steps (and
    at 0 and the end) it records V, the mean outer loss over the outer
    batches of the first ``num_eval_batches`` episodes of ``split``.
    Per-step learned learning rates past the T-th step use the last one.

    Returns:
      ``[(step, held-out loss), ...]``.
    """
    self._require_concrete("inner_curve")
    t = self.num_inner_steps
    check_int("num_steps", num_steps)
    check_int("eval_every", eval_every)
    check_int("num_eval_batches", num_eval_batches)
    data.check_split(split)
    if num_steps % t or eval_every % t:
      raise ValueError(f"num_steps ({num_steps}) and eval_every "
                       f"({eval_every}) must be multiples of T={t}: the "
                       "model trains in windows of T inner steps.")
    seed = self.seed if seed is None else seed
    episodes = self.task.episodes("train", seed, t)
    held_out = data.take(self.task.episodes(split, seed, t),
                         num_eval_batches)
    outer = jax.vmap(lambda e: self.task.split_episode(e, t)[1])(held_out)
    f = self.functional
    window, loss = self._curve_fns
    eta = jax.device_get(eta)
    theta = self.spec.theta0(eta, jax.device_get(self.theta_init))
    s = f.optimizer(eta).init(theta)
    curve = [(0, float(loss(eta, theta, outer)))]
    for k in range(num_steps // t):
      inner, _ = self.task.split_episode(episodes[k], t)
      theta, s = window(eta, theta, s, inner)
      done = (k + 1) * t
      if done % eval_every == 0 or done == num_steps:
        curve.append((done, float(loss(eta, theta, outer))))
    return curve

  # -------------------------------------------------------------- the loop
  @functools.cached_property
  def _summarise(self):
    """The means over a logging interval of its meta-steps' metrics (a list
    of dicts of scalars -> dict of scalars), through clu's `TrainMetrics`, as
    one jitted program.

    Why `fit` keeps at most one meta-step in flight and reduces the metrics
    in one program rather than a burst of eager ops: with several processes on
    XLA:CPU, every computation on global arrays is launched on every local
    device. Ten queued meta-steps followed by some twenty eager ops on their
    metrics hung a 2-process x 2-device run on 2 loaded cores (one run of
    three here, and once in CI): gdb showed one device's half of a
    meta-step's all-reduce blocked on a semaphore in XLA's CPU executable
    launch while later launches waited for that step's outputs, and the other
    process waiting for the missing half. With one step ahead the host still
    prepares the next batch while the device computes.
    """
    def summarise(rows):
      stacked = jax.tree.map(lambda *v: jnp.stack(v), *rows)
      means = TrainMetrics.single_from_model_output(**stacked).compute()
      return {**means, "skipped_steps": rows[-1]["skipped_steps"]}
    return jax.jit(summarise, out_shardings=self._replicated)

  def fit(self, num_meta_steps: int,
          workdir: Optional[str | os.PathLike] = None,
          *, log_every: int = 50, eval_every: int = 0,
          checkpoint_every: int = 0, keep_checkpoints: int = 3,
          max_skipped_steps: int = 10,
          run_config: Optional[Mapping[str, Any]] = None,
          console: bool = True) -> FitResult:
    """Meta-trains until ``num_meta_steps`` meta-steps are done.

    With a ``workdir``: resumes from its latest checkpoint that restores
    (refusing one from a different config; one that cannot be read is moved
    aside, `metaflow.checkpoint`), checkpoints every ``checkpoint_every``
    steps and at the end, and writes TensorBoard event files and console
    lines there.

    Survives: SIGTERM or SIGINT (`metaflow.preemption`) ends the run after
    the meta-step in flight with a checkpoint (``FitResult.preempted``; no
    final evaluation); a meta-step with a non-finite outer loss or
    meta-gradient is skipped inside the jitted step (eta and the outer
    optimiser's state stay, the data position moves on; counted in
    ``train/skipped_steps``), and after ``max_skipped_steps`` consecutive
    ones (checked one step behind, so the host never waits for the device)
    the run stops with a checkpoint of its last finite state and
    `NonFiniteError`.

    Args:
      num_meta_steps: total meta-steps (including those already done).
      workdir: run directory, or None for no files.
      log_every: steps between metric rows (averages over the interval).
      eval_every: steps between evaluations (0: only at the start and end).
      checkpoint_every: steps between checkpoints (0: only at the end).
      keep_checkpoints: the most recent checkpoints kept.
      max_skipped_steps: consecutive non-finite meta-steps that stop the run.
      run_config: extra settings that a resumed run must share (e.g. the
        launch config), stored in the checkpoint.
      console: also print metric rows (through absl logging).
    """
    for name, value, low in (("num_meta_steps", num_meta_steps, 0),
                             ("log_every", log_every, 1),
                             ("eval_every", eval_every, 0),
                             ("checkpoint_every", checkpoint_every, 0),
                             ("keep_checkpoints", keep_checkpoints, 1),
                             ("max_skipped_steps", max_skipped_steps, 1)):
      check_int(name, value, low)
    state = self.init_state()
    eta_initial = state.eta
    batches = self.train_batches()
    checkpointer = None
    logdir = None
    restored = None
    if workdir is not None:
      workdir = checkpoint_lib.check_workdir(workdir)
      logdir = workdir
      checkpointer = checkpoint_lib.Checkpointer(
          workdir, self.fingerprint(run_config), max_to_keep=keep_checkpoints,
          info={"strategy": self.strategy.name})
      restored = checkpointer.restore(state, batches)
      if restored is not None:
        state = restored
        logging.info("Resumed from %s at step %d (strategy %s, now %s).",
                     checkpointer.directory, int(state.step),
                     checkpointer.info(int(state.step)).get("strategy"),
                     self.strategy.name)
    if restored is None:  # a fresh online population is staggered first
      state = self.warm_up(state, batches)
    writer = metrics_lib.create_writer(logdir, console=console)
    progress = metrics_lib.report_progress(num_meta_steps, writer)
    history = []

    def write(step, row):
      writer.write_scalars(step, row)
      history.append({"step": step, **row})

    def save():
      if checkpointer:
        checkpointer.save(int(state.step), state, batches)

    start = int(state.step)
    initial_eval = self.evaluate(eta_initial)
    if start == 0:
      write(0, {f"eval/{k}": v for k, v in initial_eval.items()})
    collected, last = [], None
    final_eval = {}

    def write_train(step):
      write(step, {f"train/{k}": float(v)
                   for k, v in self._summarise(collected).items()})
      collected.clear()

    try:
      with preemption_lib.Preemption() as preemption:
        for step in range(start + 1, num_meta_steps + 1):
          state, step_metrics = self.step(state, next(batches))
          if last is not None:
            # At most this step in flight (see `_summarise`); the host waits
            # for the previous one, so the device never waits for the host.
            jax.block_until_ready(last)
            skips = int(last["consecutive_skips"])
            if skips >= max_skipped_steps:
              save()  # the state after this step: no update was non-finite
              raise NonFiniteError(
                  f"{skips} consecutive meta-steps had a non-finite outer "
                  f"loss or meta-gradient (the last at step {step - 1}; "
                  f"max_skipped_steps={max_skipped_steps}); stopped at step "
                  f"{step} with a checkpoint of the last finite state"
                  + (f" in {checkpointer.directory}" if checkpointer else "")
                  + ". Look for the data or the learning rate that diverges.")
          last = step_metrics
          collected.append(step_metrics)
          progress(step)
          if step % log_every == 0 or step == num_meta_steps:
            write_train(step)
          if preemption.reached(step):
            save()
            if collected:
              write_train(step)
            logging.warning(
                "%s: stopped after meta-step %d of %d%s; run the same "
                "command to resume.", preemption.signal_name, step,
                num_meta_steps,
                f", checkpoint in {checkpointer.directory}"
                if checkpointer else " (no workdir: nothing saved)")
            return FitResult(state, initial_eval, {}, history,
                             preemption.signal_name)
          if eval_every and step % eval_every == 0 and step != num_meta_steps:
            write(step, {f"eval/{k}": v
                         for k, v in self.evaluate(state.eta).items()})
          if checkpointer and checkpoint_every and step % checkpoint_every == 0:
            save()
      final_eval = self.evaluate(state.eta)
      if num_meta_steps > start:
        write(num_meta_steps, {f"eval/{k}": v for k, v in final_eval.items()})
      save()
    finally:
      writer.flush()
      writer.close()
      if checkpointer:
        checkpointer.close()
    return FitResult(state, initial_eval, final_eval, history)
