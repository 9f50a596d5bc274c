"""The meta-step as pure functions of a `Program`, a `Layout` and arrays,
and the builders that jit them with shardings.

One meta-step, for a meta-batch of B episodes stacked on a leading axis:

    value(eta) = mean_b V(theta_T^b(eta), eta, x_val^b)        (vmapped over b)
    eta <- eta + outer_update(d value / d eta)

where ``theta_T^b`` is T inner steps of Phi on episode b's inner batches
from ``theta0 = eta.init`` (learned) or the model's initialisation, or,
with online learners, from learner b's carried ``(theta, s)``
(`metaflow.online`). How ``d value / d eta`` is computed is the estimator's
business (`program.strategy`); the step only hands it to the engine
(`metaflow.unroll`). A meta-step whose outer loss or meta-gradient is not
finite is not applied (``optax.apply_if_finite``): eta and the outer
optimiser's state stay, step and RNG move on (`metaflow.loop.fit` stops
after too many in a row).

Every function here is pure: ``program`` and ``layout`` are frozen, the
arrays are arguments. `jit_meta_step` and `jit_value_and_grad` bind the
first two (``functools.partial``) and jit the rest with the layout's
shardings, the state donated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, cast

import jax
import jax.numpy as jnp
import optax

from metaflow import online as online_lib
from metaflow._checks import PyTree
from metaflow.layout import Layout
from metaflow.meta_params import Eta
from metaflow.online import Learners
from metaflow.program import Model, Program
from metaflow.task import Functional
from metaflow.train_state import TrainState
from metaflow.unroll import (
  InnerLoopResult,
  MetaGradient,
  inner_loop,
  meta_value_and_grad_with_aux,
)


def functional(program: Program, layout: Layout, rest: PyTree) -> Functional:
  """The task's L and V as pure functions, theta gathered where used."""
  return program.functional(rest, layout.gathered)


def meta_gradient(program: Program, layout: Layout, rest: PyTree
                  ) -> MetaGradient:
  """The engine's meta-gradient of one episode with the program's
  estimator (`metaflow.meta_value_and_grad_with_aux`)."""
  f = functional(program, layout, rest)
  return meta_value_and_grad_with_aux(f.inner_loss, f.outer_loss, f.optimizer,
                                      program.num_inner_steps,
                                      program.strategy)


def adapt(program: Program, layout: Layout, rest: PyTree
          ) -> Callable[..., InnerLoopResult]:
  """``(eta, theta0, inner_batches, opt_state0=None) -> InnerLoopResult``:
  T inner steps, not to be differentiated (evaluation, warm-up)."""
  f = functional(program, layout, rest)
  return inner_loop(f.inner_loss, f.optimizer, program.num_inner_steps,
                    "standard")


def theta_base(program: Program, key: jax.Array, theta_init: PyTree
               ) -> PyTree:
  """Where a meta-step's episodes start when theta0 is not learned: the
  model's initialisation, or with ``task.resample_init`` a fresh one drawn
  from ``key``."""
  if program.task.resample_init and not program.spec.learn_init:
    return program.init_model(key).theta
  return theta_init


def value_and_grad(program: Program, layout: Layout, eta: Eta,
                   batch: PyTree, model: Model,
                   learners: Optional[Learners] = None):
  """``((mean V, MetaAux of each episode), d mean V / d eta)`` over a
  meta-batch (leaves ``[B, ...]``): episodes from ``theta0(eta,
  model.theta)``, or, online, windows from each learner's carried (theta,
  s), constants of eta."""
  grad = meta_gradient(program, layout, model.rest)
  carried = program.learning.carried(learners)

  def value(eta):
    def one(episode, carried):
      inner, outer = program.task.split_episode(episode,
                                                program.num_inner_steps)
      theta0, s0 = program.learning.start(
          carried, lambda: program.spec.theta0(eta, model.theta))
      theta0 = jax.lax.with_sharding_constraint(theta0,
                                                layout.theta_shardings)
      return grad.objective(eta, theta0, inner, outer, s0)
    values, aux = layout.vmap(one)(batch, carried)
    return jnp.mean(values), aux
  return jax.value_and_grad(value, has_aux=True)(eta)


def meta_step(program: Program, layout: Layout, state: TrainState,
              batch: PyTree, model: Model
              ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One meta-step: the meta-gradient over ``batch`` and the outer update
  (skipped when not finite), the learners advanced; returns the new state
  and the step's metrics (device scalars)."""
  rng, key = jax.random.split(state.rng)
  start = model._replace(theta=theta_base(program, key, model.theta))
  (outer_loss, aux), meta_grads = value_and_grad(
      program, layout, state.eta, batch, start, state.learners)
  # apply_if_finite looks at the meta-gradient only: a non-finite outer
  # loss (with a finite meta-gradient, e.g. an inf in a term without eta)
  # marks it too. A skipped step's update is zero: eta and the outer
  # optimiser's state stay as they were; step and rng move on.
  meta_grads = jax.tree.map(
      lambda g: jnp.where(jnp.isfinite(outer_loss), g, jnp.nan), meta_grads)
  updates, opt_state = program.outer.update(meta_grads, state.opt_state,
                                            state.eta)
  finite_state = cast(optax.ApplyIfFiniteState, opt_state)
  eta = cast(Eta, optax.apply_updates(state.eta, updates))
  step_metrics = {
      "outer_loss": outer_loss,
      "inner_loss_first": jnp.mean(aux.inner_losses[:, 0]),
      "inner_loss_last": jnp.mean(aux.inner_losses[:, -1]),
      "meta_grad_norm": optax.tree.norm(meta_grads),
      "mask": finite_state.last_finite,
      "skipped_steps": finite_state.total_notfinite,
      "consecutive_skips": finite_state.notfinite_count,
  }
  # Carried forward; replaced at the lifetime (online).
  learners = program.learning.advance(
      state.learners, aux.params, aux.opt_state, program.num_inner_steps,
      lambda: program.fresh_learners(key, eta), jax.random.fold_in(key, 1))
  return (TrainState(state.step + 1, eta, opt_state, rng, learners),
          step_metrics)


def warm_window(program: Program, layout: Layout, learners: Learners,
                eta: Eta, batch: PyTree, target_age: jax.Array,
                rest: PyTree) -> Learners:
  """One window of `metaflow.online.warm_up`: T inner steps of every
  learner younger than ``target_age`` with eta frozen."""
  run = adapt(program, layout, rest)

  def one(episode, theta, s):
    inner, _ = program.task.split_episode(episode, program.num_inner_steps)
    theta = jax.lax.with_sharding_constraint(theta, layout.theta_shardings)
    result = run(eta, theta, inner, s)
    return result.params, result.opt_state

  params, opt_state = layout.vmap(one)(batch, learners.params,
                                       learners.opt_state)
  return online_lib.warm_window(learners, params, opt_state,
                                program.num_inner_steps, target_age)


def outer_reads(program: Program, layout: Layout, field: str) -> bool:
  """Whether V itself reads ``eta.<field>`` (traced on shapes only; for
  estimators that miss the paths through g_t)."""
  state, model = layout.state_shapes, layout.model_shapes
  episode = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                         layout.batch_shapes)
  outer = jax.eval_shape(lambda e: program.task.split_episode(
      e, program.num_inner_steps)[1], episode)

  def outer_loss(read, eta, theta, rest, batch):
    return program.functional(rest).outer_loss(
        theta, eta._replace(**{field: read}), batch)

  read = getattr(state.eta, field)
  jaxpr = jax.make_jaxpr(outer_loss)(read, state.eta._replace(**{field: None}),
                                     model.theta, model.rest, outer).jaxpr
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  used |= {id(v) for v in jaxpr.outvars}
  return any(id(v) in used for v in jaxpr.invars[:len(jax.tree.leaves(read))])


# ------------------------------------------------------------ jitted builders
def jit_meta_step(program: Program, layout: Layout):
  """``(state, batch, model) -> (state, metrics)``, jitted with the
  layout's shardings; ``state`` is donated."""
  s = layout.state_shardings
  return jax.jit(functools.partial(meta_step, program, layout),
                 donate_argnums=0,
                 in_shardings=(s, layout.batch_shardings,
                               layout.model_shardings),
                 out_shardings=(s, layout.replicated))


def jit_value_and_grad(program: Program, layout: Layout, carried: bool):
  """``(eta, batch, model, learners) -> ((value, aux), grads)`` jitted
  with shardings: from an online population's state (``carried``), or
  from fresh models (the same program offline; ``learners`` None)."""
  s = layout.state_shardings
  if not carried:
    program = dataclasses.replace(program, learning=online_lib.Offline())
  return jax.jit(functools.partial(value_and_grad, program, layout),
                 in_shardings=(s.eta, layout.batch_shardings,
                               layout.model_shardings,
                               s.learners if carried else None))


def jit_warm_window(program: Program, layout: Layout):
  """`warm_window` jitted; the learners are donated."""
  s = layout.state_shardings
  return jax.jit(functools.partial(warm_window, program, layout),
                 donate_argnums=0,
                 in_shardings=(s.learners, s.eta, layout.batch_shardings,
                               layout.replicated, layout.model_shardings.rest),
                 out_shardings=s.learners)
