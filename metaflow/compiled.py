"""Compiled memory of meta-training, from shapes only, and ``strategy="auto"``.

Everything here lowers a program's jitted functions on abstract arguments
(``jax.ShapeDtypeStruct`` leaves with the layout's shardings) and reads XLA's
buffer assignment (`metaflow.memory`): exact, repeatable, and nothing runs,
so sizes this machine could not hold can be planned. Figures are per
device.

* `compiled_memory`: one meta-gradient over a meta-batch (or the whole
  jitted meta-step), with the paper's static memory (what the estimator
  stores of the loop) split out;
* `floor_memory`: the two computations an exact meta-gradient repeats at
  every inner step, the least working set of a strategy taking the batch
  whole;
* `choose_strategy`: ``strategy="auto"``, the first of `metaflow.planner`'s
  candidates (fastest first) whose compiled meta-step fits a budget.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import jax
from absl import logging

from metaflow import memory, mixflow, planner, sharding
from metaflow.estimators import Strategy
from metaflow.layout import Layout
from metaflow.program import Model, Program
from metaflow.step import jit_meta_step, value_and_grad


def _abstract_args(layout: Layout):
  """Abstract eta, meta-batch and model, with shardings."""
  s = layout.state_shardings
  return (layout.abstract(layout.state_shapes.eta, s.eta),
          layout.abstract(layout.batch_shapes, layout.batch_shardings),
          Model(*(layout.abstract(x, sh) for x, sh in
                  zip(layout.model_shapes, layout.model_shardings))))


def static_bytes(program: Program, layout: Layout) -> int:
  """One device's share of the paper's static memory: what the estimator
  stores of each of its episodes' loops (`Strategy.static_bytes`: T
  carries (theta, s), ceil(T/K1) + ... + Kn with segments, theta_T for
  implicit), each carry the device's shard of it."""
  eta = layout.state_shapes.eta
  theta0 = jax.eval_shape(program.spec.theta0, eta, layout.model_shapes.theta)
  inner_state = jax.eval_shape(
      lambda eta, theta: program.inner_optimizer(eta).init(theta), eta, theta0)
  theta_shardings = layout.theta_shardings
  carry = sharding.shard_bytes(
      (theta0, inner_state),
      (theta_shardings, layout.inner_state_shardings(program, inner_state)))
  theta = sharding.shard_bytes(theta0, theta_shardings)
  return layout.episodes_per_device * program.strategy.static_bytes(
      program.num_inner_steps, carry, theta)


def compiled_memory(program: Program, layout: Layout,
                    whole_step: bool = False) -> memory.MemoryReport:
  """XLA's compiled memory of one meta-gradient over a meta-batch of B
  episodes (``whole_step``: of the jitted meta-step that training runs, the
  outer update and the donated `TrainState` included: what ``"auto"``
  compares with the budget). With online learners the population's state,
  an argument of the step, is the rest of the static memory
  (``population_bytes``)."""
  eta, batch, model = _abstract_args(layout)
  state, shardings = layout.state_shapes, layout.state_shardings
  static = static_bytes(program, layout)
  learners, population = None, None
  if program.learning.enabled:
    learners = layout.abstract(state.learners, shardings.learners)
    population = sharding.shard_bytes(state.learners, shardings.learners)
  if whole_step:
    compiled = jit_meta_step(program, layout).lower(
        layout.abstract(state, shardings), batch, model).compile()
    return memory.report(compiled, static, population)
  return memory.analyze(functools.partial(value_and_grad, program, layout),
                        eta, batch, model, learners, static_bytes=static,
                        population_bytes=population)


def floor_memory(program: Program, layout: Layout
                 ) -> dict[str, memory.MemoryReport]:
  """XLA's compiled memory of the two computations an exact meta-gradient
  repeats at every inner step, each at one episode's first inner batch
  (the full batch, this layout's mesh):

  * ``"gradient"``: one plain gradient ``grad_theta L(theta, eta, x_t)``
    (what a training step computes, and the forward pass of every step);
  * ``"hvp"``: one forward-over-reverse Hessian-vector product ``(H_tt v,
    H_et v)`` (`metaflow.mixflow.gradient_jvp` with respect to theta and
    eta: MixFlow-MG's backward step).

  The larger temp figure is the least working set a strategy that takes
  the batch whole can have beyond its stored carries: compare it with a
  strategy's ``dynamic_bytes``. Micro-batches go below it.
  """
  eta, batch, model = _abstract_args(layout)

  def at_first_batch(make):
    def run(eta, batch, model):
      loss = program.functional(model.rest, layout.gathered).inner_loss
      inner, _ = program.task.split_episode(
          jax.tree.map(lambda x: x[0], batch), program.num_inner_steps)
      theta = program.spec.theta0(eta, model.theta)
      return make(loss)(theta, eta, jax.tree.map(lambda x: x[0], inner))
    return memory.analyze(run, eta, batch, model)

  def hvp(loss):
    jvp = mixflow.gradient_jvp(loss, argnums=(0, 1))
    return lambda theta, eta, x: jvp(theta, eta, x, theta)

  return {"gradient": at_first_batch(jax.grad), "hvp": at_first_batch(hvp)}


def batch_divisor(program: Program, layout: Layout) -> int:
  """The gcd of the leading (example) axes of one episode's inner batches
  (per step) and outer batch: what ``microbatches`` must divide."""
  episode = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                         layout.batch_shapes)
  inner, outer = jax.eval_shape(
      lambda e: program.task.split_episode(e, program.num_inner_steps),
      episode)
  sizes = ([x.shape[1] for x in jax.tree.leaves(inner) if x.ndim > 1]
           + [x.shape[0] for x in jax.tree.leaves(outer) if x.ndim > 0])
  return math.gcd(*sizes) if sizes else 1


def strategy_candidates(program: Program, layout: Layout
                        ) -> tuple[list[Strategy], dict[str, str]]:
  """``strategy="auto"``'s candidates for this T and batch
  (`metaflow.planner.candidates`, fastest first) that the task and its
  meta-parameters accept, and ``{name: reason}`` of those refused."""
  accepted, refused = [], {}
  for s in planner.candidates(program.num_inner_steps,
                              batch_divisor(program, layout)):
    try:
      program.with_strategy(s)
    except ValueError as e:
      refused[s.name] = str(e)
      continue
    accepted.append(s)
  return accepted, refused


def memory_with(program: Program, layout: Layout,
                strategy: Union[str, Strategy]) -> memory.MemoryReport:
  """`compiled_memory` ``(whole_step=True)`` of the meta-step with another
  exact ``strategy``."""
  strategy = Strategy.parse(strategy)
  if not strategy.exact:
    raise ValueError(f"memory_with compares exact strategies, got "
                     f"{strategy.name!r}.")
  return compiled_memory(program.with_strategy(strategy), layout,
                         whole_step=True)


def auto_budget(strategy: Union[str, Strategy],
                memory_budget: Union[None, str, int]) -> Optional[int]:
  """The budget in bytes of ``strategy="auto"``, None for any other
  strategy; ValueError for ``"auto"`` without a budget or a budget with
  another strategy."""
  auto = isinstance(strategy, str) and strategy.strip().lower() == "auto"
  if auto and memory_budget is None:
    raise ValueError("strategy='auto' needs a memory_budget (e.g. '16GiB'): "
                     "the memory one device may use for the meta-step.")
  if memory_budget is not None and not auto:
    raise ValueError("memory_budget applies to strategy='auto' only (got "
                     f"strategy={strategy!r}).")
  return None if memory_budget is None else planner.parse_bytes(memory_budget)


def choose_strategy(program: Program, layout: Layout, budget: int
                    ) -> tuple[Strategy, list[planner.Candidate]]:
  """Resolves ``strategy="auto"``: compiles the candidates' meta-steps
  shapes-only, fastest first, and returns the first that fits ``budget``
  bytes per device with the table of those compiled (logged).

  Raises:
    metaflow.planner.NothingFitsError: none fits (one line).
  """
  options, refused = strategy_candidates(program, layout)
  for name, reason in refused.items():
    logging.info("strategy auto: %s skipped: %s", name, reason)
  try:
    choice, table = planner.choose(
        functools.partial(memory_with, program, layout), options, budget,
        planner.fit_hint(program.num_inner_steps))
  except planner.NothingFitsError as e:
    logging.info("strategy auto, candidates per device:\n%s",
                 planner.table(e.rows, budget))
    raise
  logging.info("strategy auto, candidates per device:\n%s\nchosen: %s",
               planner.table(table, budget), choice.name)
  return choice, table
