"""Evaluation: what a meta-parameter eta is worth on held-out data.

Two measures, neither differentiated:

* `evaluate_episodes`: the mean over held-out episodes of V after T inner
  steps from ``theta0(eta)`` (and before them), and the task's
  `Task.eval_metrics` (what training optimises, on data it never saw);
* `inner_curve`: a fresh model trained for many inner steps with eta
  frozen, and its held-out loss along the way (long-horizon behaviour of
  learned learning rates, loss weights or data raters: learned_optimization's
  "inner training curves");
* `optax_curves`: fresh models trained by any optax optimizer in a plain
  loop, over seeds (a learned update rule handed back by
  `metaflow.load_learned_optimizer` next to Adam).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from metaflow import data
from metaflow._checks import PyTree, check_int
from metaflow.layout import Layout
from metaflow.meta_params import Eta
from metaflow.program import Model, Program
from metaflow.step import adapt, functional
from metaflow.task import Functional, Task


def evaluate_episodes(program: Program, layout: Layout, eta: Eta,
                      model: Model, episodes: PyTree, num_tasks: int
                      ) -> dict[str, jax.Array]:
  """Mean metrics over the first ``num_tasks`` of ``episodes`` (leaves
  ``[chunks, B, ...]``, chunks of meta-batches computed one after another):
  ``outer_loss`` (V at theta_T), ``outer_loss_before_adaptation`` (V at
  theta0) and the task's eval metrics at theta_T."""
  f = functional(program, layout, model.rest)
  run = adapt(program, layout, model.rest)

  def one(episode):
    inner, outer = program.task.split_episode(episode,
                                              program.num_inner_steps)
    theta0 = jax.lax.with_sharding_constraint(
        program.spec.theta0(eta, model.theta), layout.theta_shardings)
    theta_T = run(eta, theta0, inner).params
    out = {"outer_loss": f.outer_loss(theta_T, eta, outer),
           "outer_loss_before_adaptation": f.outer_loss(theta0, eta, outer)}
    out.update(f.eval_metrics(theta_T, eta, outer))
    return out

  per_episode = jax.lax.map(layout.vmap(one), episodes)  # leaves [C, B]
  return jax.tree.map(lambda v: jnp.mean(v.reshape(-1)[:num_tasks]),
                      per_episode)


def jit_evaluate(program: Program, layout: Layout):
  """`evaluate_episodes` jitted with shardings (``num_tasks`` static)."""
  return jax.jit(
      functools.partial(evaluate_episodes, program, layout),
      static_argnums=3,
      in_shardings=(layout.state_shardings.eta, layout.model_shardings,
                    layout.chunked(layout.batch_shardings)),
      out_shardings=layout.replicated)


def held_out_episodes(program: Program, layout: Layout, split: str,
                      num_tasks: int) -> PyTree:
  """The fixed held-out episodes of ``split``: the first ``num_tasks``
  (rounded up to whole meta-batches), global arrays ``[chunks, B, ...]``
  (this process reads its share)."""
  chunks = math.ceil(num_tasks / program.meta_batch_size)
  episodes, owned = layout.episodes(program, split)
  read = data.MetaBatch(episodes, program.meta_batch_size, owned)
  return layout.global_batch(
      data.stack([read(c) for c in range(chunks)], what="meta-batch"), chunks)


def inner_curve(program: Program, curve_fns, eta: Eta, model: Model,
                num_steps: int, *, eval_every: int, split: str = "test",
                num_eval_batches: int = 8, seed: int | None = None
                ) -> list[tuple[int, float]]:
  """A fresh inner model trained for ``num_steps`` inner steps with ``eta``
  frozen (nothing is differentiated), and its held-out loss curve.

  The model starts from ``theta0(eta, model.theta)`` (the same start for
  every eta compared) with a fresh inner optimiser state, and trains on the
  inner batches of consecutive ``"train"`` episodes (windows of T, the
  state carried across them: a stream of batches for the language-model
  tasks). Every ``eval_every`` steps (and at 0 and the end) it records V,
  the mean outer loss over the outer batches of the first
  ``num_eval_batches`` episodes of ``split``. Per-step learned learning
  rates past the T-th step use the last one. Runs on the default device,
  with ``curve_fns`` (`jit_curve`).

  Returns:
    ``[(step, held-out loss), ...]``.
  """
  t = program.num_inner_steps
  check_int("num_steps", num_steps)
  check_int("eval_every", eval_every)
  check_int("num_eval_batches", num_eval_batches)
  data.check_split(split)
  if num_steps % t or eval_every % t:
    raise ValueError(f"num_steps ({num_steps}) and eval_every "
                     f"({eval_every}) must be multiples of T={t}: the "
                     "model trains in windows of T inner steps.")
  seed = program.seed if seed is None else seed
  task = program.task
  episodes = task.episodes("train", seed, t)
  held_out = data.take(task.episodes(split, seed, t), num_eval_batches)
  outer = jax.vmap(lambda e: task.split_episode(e, t)[1])(held_out)
  window, loss = curve_fns
  eta, model = jax.device_get((eta, model))
  theta = program.spec.theta0(eta, model.theta)
  s = program.inner_optimizer(eta).init(theta)
  curve = [(0, float(loss(eta, theta, outer, model.rest)))]
  for k in range(num_steps // t):
    inner, _ = task.split_episode(episodes[k], t)
    theta, s = window(eta, theta, s, inner, model.rest)
    done = (k + 1) * t
    if done % eval_every == 0 or done == num_steps:
      curve.append((done, float(loss(eta, theta, outer, model.rest))))
  return curve


def jit_curve(program: Program, layout: Layout):
  """`inner_curve`'s jitted window ``(eta, theta, s, inner, rest) ->
  (theta, s)`` and held-out loss ``(eta, theta, outer batches, rest) ->
  mean V``."""
  def window(eta, theta, s, inner, rest):
    return adapt(program, layout, rest)(eta, theta, inner, s)[:2]

  def loss(eta, theta, outer, rest):
    f = functional(program, layout, rest)
    return jnp.mean(jax.lax.map(
        lambda batch: f.outer_loss(theta, eta, batch), outer))

  return jax.jit(window), jax.jit(loss)


#: The seed of the fixed batches `optax_curves` measures on (the training
#: streams use the seeds themselves).
_EVAL_SEED = 10_000


def optax_curves(task: Task, optimizer: optax.GradientTransformation,
                 num_steps: int, *, seeds: Sequence[int], eval_every: int,
                 num_eval_batches: int = 8, split: str = "test"
                 ) -> dict[str, Any]:
  """Fresh models of ``task`` trained by ``optimizer`` in a plain optax loop,
  one per seed, and their training and held-out curves.

  Nothing is meta-learned or differentiated twice: model ``s`` is
  ``task.make_model(nnx.Rngs(seed))``, trained for ``num_steps`` steps on
  the inner batches of the ``"train"`` episodes of its own seed (a stream of
  windows of ``eval_every`` batches), ``theta <- theta +
  optimizer.update(grad L(theta), state, theta)``; the seeds run side by
  side (vmapped). This is how a user trains with an optimizer handed back
  by `metaflow.load_learned_optimizer`, and how it is compared with Adam.
  The losses use the task's initial eta (learned loss weights etc. are not
  applied).

  Every ``eval_every`` steps (and at 0) it records, per seed: the training
  loss L averaged over ``num_eval_batches`` fixed inner batches of
  ``"train"`` (data the model trains on), the held-out loss V and the
  task's `Task.eval_metrics` averaged over the outer batches of the first
  ``num_eval_batches`` episodes of ``split``.

  Returns:
    A dict of lists: ``step`` (E + 1 steps, E = num_steps / eval_every);
    ``train_loss``, ``test_loss`` and ``test_<metric>`` per task metric,
    each ``[S][E + 1]`` ("test" names the held-out split whatever
    ``split`` is); ``diverged`` ``[S]``: a seed diverged if its training
    loss became NaN or rose above twice its start.
  """
  check_int("num_steps", num_steps)
  check_int("eval_every", eval_every)
  check_int("num_eval_batches", num_eval_batches)
  data.check_split(split)
  seeds = [check_int("seed", s, minimum=0) for s in seeds]
  if not seeds:
    raise ValueError("seeds must name at least one seed.")
  if num_steps % eval_every:
    raise ValueError(f"num_steps ({num_steps}) must be a multiple of "
                     f"eval_every ({eval_every}).")
  models = [Functional.of(task, task.make_model(nnx.Rngs(s))) for s in seeds]
  f, theta = models[0]
  thetas = data.stack([theta for _, theta in models], what="seed")
  eta = f.spec.init(jax.random.key(0), theta, eval_every)

  def first(split_name: str) -> tuple[PyTree, PyTree]:
    """(inner, outer) batches of the first episodes of one inner step."""
    episodes = data.take(task.episodes(split_name, _EVAL_SEED, 1),
                         num_eval_batches)
    return jax.vmap(lambda e: task.split_episode(e, 1))(episodes)

  train_batches = jax.tree.map(lambda x: x[:, 0], first("train")[0])
  test_batches = first(split)[1]                     # leaves [n, B, ...]

  def window(theta, state, inner):  # one seed: eval_every steps
    def step(carry, batch):
      theta, state = carry
      grads = jax.grad(f.inner_loss)(theta, eta, batch)
      updates, state = optimizer.update(grads, state, theta)
      return (optax.apply_updates(theta, updates), state), None
    return jax.lax.scan(step, (theta, state), inner)[0]

  def measure(theta):  # one seed
    mean = lambda fn, b: jax.tree.map(jnp.mean, jax.lax.map(fn, b))  # noqa: E731
    out = {"train_loss": mean(lambda b: f.inner_loss(theta, eta, b),
                              train_batches),
           "test_loss": mean(lambda b: f.outer_loss(theta, eta, b),
                             test_batches)}
    metrics = mean(lambda b: f.eval_metrics(theta, eta, b), test_batches)
    out.update({f"test_{k}": v for k, v in metrics.items()})
    return out

  run = jax.jit(jax.vmap(window), donate_argnums=(0, 1))
  measured = jax.jit(jax.vmap(measure))
  states = jax.vmap(optimizer.init)(thetas)
  streams = [task.episodes("train", s, eval_every) for s in seeds]
  records = [measured(thetas)]
  for k in range(num_steps // eval_every):
    inner = data.stack([task.split_episode(stream[k], eval_every)[0]
                        for stream in streams], what="seed")
    thetas, states = run(thetas, states, inner)
    records.append(measured(thetas))
  curves = jax.tree.map(lambda *r: np.stack(r, axis=1), *records)  # [S, E+1]
  train = curves["train_loss"]
  diverged = ~np.isfinite(train).all(1) | (np.nan_to_num(
      train, nan=np.inf) > 2 * train[:, :1]).any(1)
  return {"step": [k * eval_every for k in range(len(records))],
          **{k: v.tolist() for k, v in curves.items()},
          "diverged": diverged.tolist()}

