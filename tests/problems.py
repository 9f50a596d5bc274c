"""Small bilevel problems shared by the tests, and the plain reference
meta-gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metaflow
from metaflow import data, optim, sharding

IN, HIDDEN, BATCH = 3, 5, 4

#: A mesh of one device: the tests of single-device behaviour run on it
#: (the test processes have 8 host devices, see conftest.py).
ONE_DEVICE = sharding.make_mesh(devices=jax.devices()[:1])
#: XLA options for programs that are checked for values, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}
KINDS = ("init", "lr", "loss_weights")
OPTIMIZERS = optim.NAMES


def mlp(theta, x):
  """x: [B, IN] -> [B]."""
  h = jnp.tanh(x @ theta["w1"] + theta["b1"])
  return (h @ theta["w2"])[:, 0]


def make_problem(kind: str, opt_name: str, num_steps: int, dtype,
                 seed: int = 0):
  """A regression problem with meta-parameters of one kind.

  Returns (inner_loss, outer_loss, optimizer, init_params, eta, theta0,
  inner_batches, outer_batch). ``kind`` is ``"init"`` (MAML: eta is theta0),
  ``"lr"`` (per-element log learning rates inside the optimiser) or
  ``"loss_weights"`` (per-example weights ``2 sigmoid(x_i . eta["w"] +
  eta["b"])`` inside L: a rater of each example, so L stays a mean over
  the batch of a per-example function, as micro-batching needs).
  """
  rng = np.random.default_rng(seed)
  arr = lambda *shape, scale=1.0: jnp.asarray(
      scale * rng.standard_normal(shape), dtype=dtype)
  theta0 = {"w1": arr(IN, HIDDEN, scale=0.7), "b1": arr(HIDDEN, scale=0.1),
            "w2": arr(HIDDEN, 1, scale=0.7)}
  inner_batches = {"x": arr(num_steps, BATCH, IN), "y": arr(num_steps, BATCH)}
  outer_batch = {"x": arr(2 * BATCH, IN), "y": arr(2 * BATCH)}
  base_lr = 0.1 if opt_name != "adam" else 0.05

  def sq_err(theta, batch):
    return (mlp(theta, batch["x"]) - batch["y"]) ** 2

  def outer_loss(theta, eta, batch):
    del eta
    return jnp.mean(sq_err(theta, batch))

  init_params = None
  if kind == "init":
    eta = theta0
    init_params = lambda eta: eta
    inner_loss = lambda theta, eta, batch: jnp.mean(sq_err(theta, batch))
    optimizer = optim.create(opt_name, base_lr)
  elif kind == "lr":
    eta = jax.tree.map(
        lambda p: jnp.log(base_lr) + arr(*p.shape, scale=0.2), theta0)
    inner_loss = lambda theta, eta, batch: jnp.mean(sq_err(theta, batch))
    optimizer = lambda eta: optim.create(opt_name, jax.tree.map(jnp.exp, eta))
  elif kind == "loss_weights":
    eta = {"w": arr(IN), "b": arr()}
    def inner_loss(theta, eta, batch):
      weights = 2.0 * jax.nn.sigmoid(batch["x"] @ eta["w"] + eta["b"])
      return jnp.mean(weights * sq_err(theta, batch))
    optimizer = optim.create(opt_name, base_lr)
  else:
    raise ValueError(kind)
  return (inner_loss, outer_loss, optimizer, init_params, eta, theta0,
          inner_batches, outer_batch)


def reference_meta_value_and_grad(inner_loss, outer_loss, optimizer, num_steps,
                                  init_params, eta, theta0, inner_batches,
                                  outer_batch, first_order=False):
  """A Python loop of jax.grad steps, differentiated by jax.grad (with
  ``first_order``, each inner gradient wrapped in jax.lax.stop_gradient)."""
  def objective(eta):
    theta = init_params(eta) if init_params is not None else theta0
    opt = optimizer(eta) if not isinstance(
        optimizer, optax.GradientTransformation) else optimizer
    s = opt.init(theta)
    for t in range(num_steps):
      batch = jax.tree.map(lambda x: x[t], inner_batches)
      g = jax.grad(inner_loss)(theta, eta, batch)
      if first_order:
        g = jax.lax.stop_gradient(g)
      updates, s = opt.update(g, s, theta)
      theta = optax.apply_updates(theta, updates)
    return outer_loss(theta, eta, outer_batch)
  return jax.value_and_grad(objective)(eta)


def tree_rel_error(a, b) -> float:
  """||a - b|| / ||b|| over all leaves (norm-wise relative error; integer
  and bool leaves, such as optimiser counters, as float64)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  la, lb = ([np.asarray(x, np.float64) for x in leaves] for leaves in (la, lb))
  num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(la, lb))
  den = sum(float(np.sum(y ** 2)) for y in lb)
  return float(np.sqrt(num / den))


def trainer_strategy_errors(make_trainer, scale: float = 0.05,
                            learners=None, strategies=None):
  """Relative errors of every exact strategy's (value, meta-gradient)
  against ``standard``'s, on one meta-train episode and all compiled in one
  program.

  ``make_trainer``: strategy -> `BilevelTrainer` (one task, the strategy
  the only difference). eta is perturbed by ``scale`` times a normal draw,
  so that nothing is at a special point (a rater's score layer starts at
  zero, which zeroes the gradient of its other layers). Also checks that
  the comparison is not vacuous: the meta-gradient is not ~0 and every
  meta-parameter gets some. Returns ``{strategy name: (value error,
  gradient error)}``, one entry for each exact strategy but standard.
  ``learners``: an online trainer's population, whose windows (one per
  learner, a meta-batch of P episodes) are compared instead.
  ``strategies``: the exact strategies compared (default: all), standard
  first.
  """
  trainers = [make_trainer(s)
              for s in (strategies or metaflow.exact_strategies())]
  first = trainers[0]
  assert first.strategy.name == "standard"
  leaves, tree = jax.tree.flatten(first.init_state().eta)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  eta = jax.tree.unflatten(tree, [
      x + scale * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)])
  episodes = 1 if learners is None else first.meta_batch_size
  batch = data.take(first.task.episodes("train", 0, first.num_inner_steps),
                    episodes)

  def everything(eta, batch, model, learners):
    return [metaflow.step.value_and_grad(t.program, t.layout, eta, batch,
                                         model, learners) for t in trainers]

  args = (eta, batch, first.model, learners)
  results = jax.jit(everything).lower(*args).compile(
      compiler_options=FAST_COMPILE)(*args)
  (ref_value, _), ref_grads = results[0]
  assert np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(
      ref_grads))) > 1e-6, "degenerate case: the meta-gradient is ~0"
  for leaf in jax.tree.leaves(ref_grads):
    assert float(jnp.max(jnp.abs(leaf))) > 0, (
        "a meta-parameter gets no gradient")
  errors = {t.strategy.name: (abs(float(v - ref_value)) / abs(float(ref_value)),
                              tree_rel_error(g, ref_grads))
            for t, ((v, _), g) in zip(trainers[1:], results[1:])}
  expected = (metaflow.exact_strategy_names() if strategies is None
              else strategies)
  assert set(errors) == set(expected) - {"standard"}
  return errors
