"""`TrainState`: what meta-training carries from step to step, its
initialisation, and the fingerprint a resumed run must match.

``TrainState(step, eta, opt_state, rng, learners)`` is one Orbax checkpoint
item (`metaflow.checkpoint`); the same NamedTuple also holds its shapes
(``jax.eval_shape`` of `initial_state`) and its shardings
(`metaflow.layout.Layout.state_shardings`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaflow._checks import PyTree
from metaflow.program import Program


class TrainState(NamedTuple):
  """Everything meta-training carries from step to step (all checkpointed).

  Attributes:
    step: int32 scalar, meta-steps done (skipped ones included: the data
      position).
    eta: the meta-parameters (`metaflow.meta_params.Eta`).
    opt_state: the outer optimiser's state, inside
      ``optax.apply_if_finite``'s (``notfinite_count``: consecutive skipped
      meta-steps, ``total_notfinite``: all of them, ``inner_state``: the
      outer optimiser's own).
    rng: uint32[2] PRNG key (split once per meta-step).
    learners: with online learners, the population (`metaflow.online.
      Learners`: each learner's theta, s and age, leading axis P); None
      offline.
  """
  step: PyTree
  eta: PyTree
  opt_state: PyTree
  rng: PyTree
  learners: PyTree = None


def initial_state(program: Program, theta_init: PyTree) -> TrainState:
  """The initial state (deterministic given ``program.seed``) for a model
  initialised at ``theta_init``: eta from the spec, the outer optimiser's
  state, the RNG and (online) P fresh learners at age 0. Pure: jit it
  with shardings, or ``jax.eval_shape`` it for shapes."""
  key = jax.random.PRNGKey(program.seed)
  key, k_eta = jax.random.split(key)
  # Copies: the jitted step donates the state, which must not take
  # theta_init (copied into eta.init) with it.
  eta = jax.tree.map(jnp.copy, program.spec.init(k_eta, theta_init,
                                                 program.num_inner_steps))
  learners = program.learning.initial(
      lambda k: program.fresh_learners(k, eta),
      jax.random.fold_in(jax.random.PRNGKey(program.seed), 1),
      program.num_inner_steps)
  return TrainState(step=jnp.zeros([], jnp.int32), eta=eta,
                    opt_state=program.outer.init(eta), rng=key,
                    learners=learners)


def _shapes(tree: PyTree) -> dict[str, str]:
  return {jax.tree_util.keystr(path): f"{leaf.dtype}{list(leaf.shape)}"
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


#: Updates of the outer optimiser on the probe compared by a resume.
PROBE_STEPS = 3


def outer_probe(optimizer: optax.GradientTransformation, eta: PyTree
                ) -> list[float]:
  """What the outer optimiser does, in a few numbers: ``PROBE_STEPS``
  updates on fixed gradients, each summed with fixed weights, at
  parameters shaped like ``eta`` with every axis cut to 3 entries (a
  learning rate, momentum, clipping or decay that changes shows here;
  the state's structure is the fingerprint's ``state``). Computed on the
  host's CPU in the default float dtype, rounded to 6 significant
  digits."""
  def probe_leaf(x, phase):
    shape = tuple(min(int(d), 3) for d in x.shape)
    n = int(np.prod(shape, dtype=np.int64))
    return (np.sin(np.arange(n) + phase) + 0.5).reshape(shape)

  leaves, tree = jax.tree.flatten(eta)
  params = jax.tree.unflatten(tree, [probe_leaf(x, 0.0) for x in leaves])
  weights = jax.tree.unflatten(tree, [probe_leaf(x, 2.0) for x in leaves])
  cpu = jax.local_devices(backend="cpu")[0]
  with jax.default_device(cpu):
    params = jax.tree.map(jnp.asarray, params)
    state = optimizer.init(params)
    sums = []
    for step in range(PROBE_STEPS):
      grads = jax.tree.map(lambda p, s=step: jnp.cos(3.0 * p + s), params)
      updates, state = optimizer.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      sums.append(float(sum(jnp.sum(u * w) for u, w in zip(
          jax.tree.leaves(updates), jax.tree.leaves(weights)))))
  return [float(f"{v:.6g}") for v in sums]


def fingerprint(program: Program, state_shapes: TrainState,
                run_config: Optional[Mapping[str, Any]] = None) -> dict:
  """What must match for a checkpoint to be resumed (not the mesh: a
  checkpoint resumes on any number of devices and processes): the task
  and its settings, T, B, the seed, the learners, what is meta-learned,
  the estimator (its class: exact ones are interchangeable), the outer
  optimiser (`outer_probe`), the state's shapes and ``run_config``."""
  learning = program.learning
  return {
      "task": program.task.name or type(program.task).__qualname__,
      "task_config": program.task.config(),
      "num_inner_steps": program.num_inner_steps,
      "meta_batch_size": program.meta_batch_size,
      "seed": program.seed,
      **({"online": dataclasses.asdict(learning)}
         if learning.enabled else {}),
      "meta_params": program.spec.describe(),
      "estimator": program.strategy.fingerprint,
      "outer_optimizer": outer_probe(program.outer_optimizer,
                                     state_shapes.eta),
      "state": _shapes(state_shapes),
      "run": dict(run_config or {}),
  }
