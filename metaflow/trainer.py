"""`BilevelTrainer`: the public facade of meta-training.

It builds a run's frozen pieces once and delegates to the modules that hold
each concept:

* `metaflow.program.Program`: what is computed (task, meta-parameters,
  estimator, T, B, outer optimiser, learners), checked first;
* `metaflow.layout.Layout`: where every array lives on the device mesh;
* `metaflow.step`: the meta-step and the meta-gradient as pure functions,
  jitted with shardings; `metaflow.evaluation`: held-out evaluation and
  inner learning curves; `metaflow.compiled`: compiled memory and
  ``strategy="auto"``; `metaflow.loop`: `fit`, beside checkpoints,
  preemption and metrics; `metaflow.online`: the learners' warm-up.

Nothing jitted closes over the trainer: each jitted function is built from
the (frozen) program and layout, and the model's arrays are arguments. A
trainer with another estimator is a new value, `with_strategy`, sharing
this one's layout and model.

**Devices and processes.** Everything runs on a ``(data, fsdp)`` mesh
(`metaflow.sharding`; by default every device of every process on
``data``, so one device is the plain single-device run). With several
processes each process reads only its share of every meta-batch through
Grain and the global arrays are built from the shares; metrics are written
by process 0; checkpoints are written and restored by all processes
together.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Optional, Union

import jax
import optax

from metaflow import (
  compiled,
  data,
  evaluation,
  loop,
  memory,
  sharding,
  train_state,
)
from metaflow import online as online_lib
from metaflow import step as step_lib
from metaflow._checks import PyTree, check_int
from metaflow.estimators import Strategy
from metaflow.layout import Layout
from metaflow.loop import FitResult, NonFiniteError
from metaflow.meta_params import Eta
from metaflow.online import Learners, Online
from metaflow.program import Model, Program
from metaflow.task import Functional, Task
from metaflow.train_state import TrainState

__all__ = ["BilevelTrainer", "FitResult", "NonFiniteError", "TrainState"]


class BilevelTrainer:
  """Meta-trains a `Task` with a meta-gradient estimator.

  Args:
    task: the bilevel problem.
    strategy: a `Strategy` or its name, e.g. ``"mixflow"`` (default) or
      ``"standard+remat"``; or ``"auto"``: the fastest exact strategy whose
      compiled meta-step fits ``memory_budget`` (`metaflow.compiled`; the
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
    budget = compiled.auto_budget(strategy, memory_budget)
    # "auto" is resolved below, once the meta-step can be compiled; every
    # candidate is exact MixFlow-MG, checked here as plain "mixflow".
    program = Program.build(
        task, strategy if budget is None else "mixflow",
        num_inner_steps=num_inner_steps,
        meta_batch_size=meta_batch_size, outer_optimizer=outer_optimizer,
        seed=seed, online=online)
    check_int("num_eval_tasks", num_eval_tasks)
    check_int("num_workers", num_workers, 0)
    data.check_split(eval_split)
    layout = Layout.build(program, sharding.make_mesh() if mesh is None
                          else mesh)
    # What needs shapes to check (first_order: does V read user entries?).
    program.strategy.check_meta_params(program.spec, functools.partial(
        step_lib.outer_reads, program, layout))
    #: With strategy="auto": each `planner.Candidate` compiled, in order.
    self.auto_table: Optional[list] = None
    if budget is not None:
      choice, self.auto_table = compiled.choose_strategy(program, layout,
                                                         budget)
      program = program.with_strategy(choice)
    if shapes_only:  # theta is never initialised
      model = Model(
          layout.abstract(layout.model_shapes.theta, layout.theta_shardings),
          jax.jit(lambda: program.init_model(seed).rest,
                  out_shardings=layout.model_shardings.rest)())
    else:  # straight into its shardings: no device holds a large model whole
      model = jax.jit(lambda: program.init_model(seed),
                      out_shardings=layout.model_shardings)()
    self._assemble(program, layout, model, eval_split, num_eval_tasks,
                   num_workers, bool(shapes_only))

  def _assemble(self, program: Program, layout: Layout, model: Model,
                eval_split: str, num_eval_tasks: int, num_workers: int,
                shapes_only: bool) -> None:
    self.program, self.layout, self.model = program, layout, model
    self.eval_split, self.num_eval_tasks = eval_split, num_eval_tasks
    self.num_workers, self.shapes_only = num_workers, shapes_only
    self._held_out: dict[tuple[str, int], PyTree] = {}

  def with_strategy(self, strategy: Union[str, Strategy]) -> "BilevelTrainer":
    """This trainer with another estimator: a new trainer sharing this
    one's layout and model (nothing is initialised again); its jitted
    functions are its own, compiled on first use."""
    program = self.program.with_strategy(
        strategy, functools.partial(step_lib.outer_reads, self.program,
                                    self.layout))
    other = object.__new__(type(self))
    other.auto_table = None
    other._assemble(program, self.layout, self.model, self.eval_split,
                    self.num_eval_tasks, self.num_workers, self.shapes_only)
    return other

  # ------------------------------------------------------------ the run
  task = property(lambda self: self.program.task)
  spec = property(lambda self: self.program.spec)
  strategy = property(lambda self: self.program.strategy)
  num_inner_steps = property(lambda self: self.program.num_inner_steps)
  meta_batch_size = property(lambda self: self.program.meta_batch_size)
  outer_optimizer = property(lambda self: self.program.outer_optimizer)
  seed = property(lambda self: self.program.seed)
  online = property(lambda self: self.program.learning)
  mesh = property(lambda self: self.layout.mesh)
  theta_init = property(lambda self: self.model.theta)
  theta_shardings = property(lambda self: self.layout.theta_shardings)
  state_shardings = property(lambda self: self.layout.state_shardings)

  @property
  def functional(self) -> Functional:
    """The task's losses as pure functions of ``(theta, eta, batch)``."""
    return step_lib.functional(self.program, self.layout, self.model.rest)

  @property
  def meta_gradient(self):
    """The engine's `metaflow.MetaGradient` of one episode."""
    return step_lib.meta_gradient(self.program, self.layout, self.model.rest)

  def _require_concrete(self, what: str) -> None:
    if self.shapes_only:
      raise RuntimeError(
          f"BilevelTrainer.{what}: this trainer was built with "
          "shapes_only=True (for compiled_memory and planning); build one "
          "without it to train or evaluate.")

  # ------------------------------------------------------------ state, data
  @functools.cached_property
  def _init(self):
    return jax.jit(functools.partial(train_state.initial_state, self.program),
                   out_shardings=self.layout.state_shardings)

  def init_state(self) -> TrainState:
    """The initial `TrainState` (deterministic given ``seed``), laid out in
    ``state_shardings``."""
    self._require_concrete("init_state")
    return self._init(self.model.theta)

  def fingerprint(self, run_config: Optional[Mapping[str, Any]] = None
                  ) -> dict:
    """What must match for a checkpoint to be resumed by this trainer
    (`metaflow.train_state.fingerprint`)."""
    return train_state.fingerprint(self.program, self.layout.state_shapes,
                                   run_config)

  def train_batches(self):
    """A fresh Grain iterator over training meta-batches: this process's
    share of each (the whole meta-batch on one process)."""
    episodes, owned = self.layout.episodes(self.program, "train")
    return iter(data.meta_batches(episodes, self.meta_batch_size,
                                  self.num_workers, owned=owned))

  def _place_eta(self, eta: Eta) -> Eta:
    """eta in this trainer's layout (e.g. from another mesh, or numpy)."""
    return jax.device_put(eta, self.layout.state_shardings.eta)

  # ------------------------------------------------------------- the step
  @functools.cached_property
  def _step(self):
    return step_lib.jit_meta_step(self.program, self.layout)

  def step(self, state: TrainState, batch: PyTree
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One jitted meta-step on a meta-batch (leaves ``[B, ...]``; with
    several processes, this process's share, as `train_batches` yields).

    ``state`` is donated (its buffers are reused); use the returned one.
    """
    self._require_concrete("step")
    return self._step(state, self.layout.global_batch(batch), self.model)

  @functools.cached_property
  def _value_and_grad(self):
    return {carried: step_lib.jit_value_and_grad(self.program, self.layout,
                                             carried)
            for carried in (False, True)}

  def meta_value_and_grad(self, eta: Eta, batch: PyTree,
                          learners: Optional[Learners] = None
                          ) -> tuple[jax.Array, Eta]:
    """``(value, d value / d eta)`` for a meta-batch (as `step` takes it):
    the mean outer loss after T inner steps over the B episodes, and its
    meta-gradient with this trainer's estimator, from the model's
    initialisation unless theta0 is learned, or, given the population
    ``learners`` (an online trainer's ``state.learners``), from each
    learner's carried (theta, s): the meta-step's window meta-gradient.
    Jitted; nothing is updated."""
    self._require_concrete("meta_value_and_grad")
    if learners is not None and not self.online.enabled:
      raise ValueError("learners given to an offline trainer (online "
                       "population 0).")
    (value, _), grads = self._value_and_grad[learners is not None](
        self._place_eta(eta), self.layout.global_batch(batch), self.model,
        learners)
    return value, grads

  @functools.cached_property
  def _warm_window(self):
    return step_lib.jit_warm_window(self.program, self.layout)

  def warm_up(self, state: TrainState, batches) -> TrainState:
    """Staggers a fresh online population with the state's eta, reading
    training meta-batches from ``batches`` (`metaflow.online.warm_up`; the
    state's learners are donated); offline, ``state`` as it is."""
    self._require_concrete("warm_up")
    window = lambda learners, eta, batch, target: self._warm_window(
        learners, eta, self.layout.global_batch(batch), target, self.model.rest)
    return state._replace(learners=online_lib.warm_up(
        self.program.learning, state.learners, state.eta, window, batches,
        self.num_inner_steps))

  # ------------------------------------------------------------ evaluation
  @functools.cached_property
  def _evaluate(self):
    return evaluation.jit_evaluate(self.program, self.layout)

  def eval_episodes(self, split: str, num_tasks: int) -> PyTree:
    """The fixed held-out episodes of ``split`` (cached;
    `metaflow.evaluation.held_out_episodes`)."""
    key = (split, num_tasks)
    if key not in self._held_out:
      self._held_out[key] = evaluation.held_out_episodes(
          self.program, self.layout, split, num_tasks)
    return self._held_out[key]

  def evaluate(self, eta: Eta, split: Optional[str] = None,
               num_tasks: Optional[int] = None) -> dict[str, float]:
    """Mean metrics over held-out episodes after T inner steps from
    ``theta0(eta)``: ``outer_loss`` (V at theta_T), the outer loss before
    adaptation, and the task's `Task.eval_metrics`."""
    self._require_concrete("evaluate")
    num_tasks = num_tasks or self.num_eval_tasks
    episodes = self.eval_episodes(split or self.eval_split, num_tasks)
    result = self._evaluate(self._place_eta(eta), self.model, episodes,
                            num_tasks)
    return {k: float(v) for k, v in result.items()}

  @functools.cached_property
  def _curve(self):
    return evaluation.jit_curve(self.program, self.layout)

  def inner_curve(self, eta: Eta, num_steps: int, *, eval_every: int,
                  split: str = "test", num_eval_batches: int = 8,
                  seed: Optional[int] = None) -> list[tuple[int, float]]:
    """A fresh model trained ``num_steps`` inner steps with ``eta`` frozen,
    and its held-out loss every ``eval_every`` steps
    (`metaflow.evaluation.inner_curve`)."""
    self._require_concrete("inner_curve")
    return evaluation.inner_curve(
        self.program, self._curve, eta, self.model, num_steps,
        eval_every=eval_every, split=split,
        num_eval_batches=num_eval_batches, seed=seed)

  # --------------------------------------------------------------- memory
  def compiled_memory(self, whole_step: bool = False) -> memory.MemoryReport:
    """XLA's compiled memory of one meta-gradient, per device, from shapes
    only (`metaflow.compiled.compiled_memory`)."""
    return compiled.compiled_memory(self.program, self.layout, whole_step)

  def floor_memory(self) -> dict[str, memory.MemoryReport]:
    """The least working set of an exact meta-gradient taking the batch
    whole (`metaflow.compiled.floor_memory`)."""
    return compiled.floor_memory(self.program, self.layout)

  def memory_with(self, strategy: Union[str, Strategy]) -> memory.MemoryReport:
    """The whole meta-step's compiled memory with another exact
    ``strategy`` (`metaflow.compiled.memory_with`)."""
    return compiled.memory_with(self.program, self.layout, strategy)

  def strategy_candidates(self) -> tuple[list[Strategy], dict[str, str]]:
    """``"auto"``'s candidates this task accepts, fastest first, and the
    refused ones' reasons (`metaflow.compiled.strategy_candidates`)."""
    return compiled.strategy_candidates(self.program, self.layout)

  # ------------------------------------------------------------- the loop
  def fit(self, num_meta_steps: int,
          workdir: Optional[str | os.PathLike] = None, *, log_every: int = 50,
          eval_every: int = 0, checkpoint_every: int = 0,
          keep_checkpoints: int = 3, max_skipped_steps: int = 10,
          run_config: Optional[Mapping[str, Any]] = None,
          console: bool = True) -> FitResult:
    """Meta-trains until ``num_meta_steps`` meta-steps are done, resuming
    from and checkpointing to ``workdir`` (`metaflow.loop.fit` says what
    each setting does)."""
    self._require_concrete("fit")
    return loop.fit(self, num_meta_steps, workdir, log_every=log_every,
                    eval_every=eval_every, checkpoint_every=checkpoint_every,
                    keep_checkpoints=keep_checkpoints,
                    max_skipped_steps=max_skipped_steps,
                    run_config=run_config, console=console)
