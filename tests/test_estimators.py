"""The approximate strategies: first_order against a stop-gradient reference,
implicit against a dense linear solve and against the exact unrolled
meta-gradient once the inner problem is solved; implicit's memory does not
grow with T; the refusals.

The quick tier (``-m "not slow"``) keeps first_order against its reference,
implicit against the dense solve on ridge regression, its memory and the
refusals; implicit on sinusoid with a proximal term (150 inner steps) and
implicit's meta-training are slow."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import metaflow
import tasks  # noqa: F401  (registers the built-in tasks)
from metaflow import BilevelTrainer, MetaParams, Strategy, optim
from tests import problems as P
from tests.test_trainer import Regression, reference_value_and_grad


def _flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0])


def _cosine(a, b) -> float:
  a, b = _flat(a), _flat(b)
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---------------------------------------------------------------- first_order
@pytest.mark.parametrize("kind,opt_name,num_steps", list(
    itertools.product(("init", "lr"), P.OPTIMIZERS, (1, 3))))
def test_first_order_matches_stop_gradient_reference(kind, opt_name, num_steps,
                                                     x64):
  (inner_loss, outer_loss, optimizer, init_params, eta, theta0, inner_batches,
   outer_batch) = P.make_problem(kind, opt_name, num_steps, "float64")
  args = (eta, theta0, inner_batches, outer_batch)
  value, grads = jax.jit(metaflow.meta_value_and_grad(
      inner_loss, outer_loss, optimizer, num_steps, "first_order",
      init_params))(*args)
  ref_value, ref_grads = P.reference_meta_value_and_grad(
      inner_loss, outer_loss, optimizer, num_steps, init_params, *args,
      first_order=True)
  _, exact = P.reference_meta_value_and_grad(
      inner_loss, outer_loss, optimizer, num_steps, init_params, *args)
  np.testing.assert_allclose(value, ref_value, rtol=1e-12)
  assert P.tree_rel_error(grads, ref_grads) < 1e-10
  if kind == "lr" and num_steps == 1:
    # Exact at T=1: g_0 = grad L(theta0) does not depend on the rates.
    assert P.tree_rel_error(grads, exact) < 1e-10
  else:
    # Not vacuous: the first-order gradient is not the exact one (least
    # different under one Adam step, whose update is nearly scale-invariant).
    assert P.tree_rel_error(grads, exact) > 1e-6


@pytest.mark.slow
def test_first_order_in_the_trainer(x64):
  """Learned initialisation and per-step learning rates together."""
  task = Regression(learn_init=True, lr="per_step")
  trainer = BilevelTrainer(task, strategy="first_order", num_inner_steps=3,
                           meta_batch_size=2, seed=1, mesh=P.ONE_DEVICE)
  eta = trainer.init_state().eta
  batch = next(trainer.train_batches())
  value, grads = trainer.meta_value_and_grad(eta, batch)
  ref_value, ref_grads = reference_value_and_grad(trainer, eta, batch,
                                                  first_order=True)
  np.testing.assert_allclose(value, ref_value, rtol=1e-12)
  assert P.tree_rel_error(grads, ref_grads) < 1e-10
  for kind in ("init", "log_lr"):
    assert np.linalg.norm(_flat(getattr(grads, kind))) > 1e-6


# ------------------------------------------------------------------- implicit
def _ridge(lam, num_steps, weights=False, seed=0):
  """Ridge regression: ``L = mean(w * (X theta - y)^2)/2 + lam/2 ||theta -
  init||^2`` (w = 2 sigmoid(eta["logits"]) with ``weights``, else 1), V the
  plain squared error on held-out data. Returns the engine's arguments and
  the closed-form inner solution theta*(eta)."""
  rng = np.random.default_rng(seed)
  n, d = 24, 6
  x, y = rng.standard_normal((n, d)), rng.standard_normal(n)
  xv, yv = rng.standard_normal((n, d)), rng.standard_normal(n)
  eta = {"init": {"w": jnp.asarray(rng.standard_normal(d))}}
  if weights:
    eta["logits"] = jnp.asarray(0.5 * rng.standard_normal(n))

  def w(eta):
    return 2 * jax.nn.sigmoid(eta["logits"]) if weights else jnp.ones(n)

  def inner_loss(theta, eta, b):
    fit = 0.5 * jnp.mean(w(eta) * (b["x"] @ theta["w"] - b["y"]) ** 2)
    return fit + 0.5 * lam * jnp.sum((theta["w"] - eta["init"]["w"]) ** 2)

  def outer_loss(theta, eta, b):
    del eta
    return 0.5 * jnp.mean((b["x"] @ theta["w"] - b["y"]) ** 2)

  def solution(eta):  # grad_theta L = 0, solved exactly
    h = (x.T * w(eta)) @ x / n + lam * jnp.eye(d)
    return {"w": jnp.linalg.solve(h, (x.T * w(eta)) @ y / n
                                  + lam * eta["init"]["w"])}

  inner = {"x": jnp.broadcast_to(x, (num_steps, n, d)),
           "y": jnp.broadcast_to(y, (num_steps, n))}
  return (inner_loss, outer_loss, eta, inner, {"x": xv, "y": yv}, solution)


@pytest.mark.parametrize("weights", [
    False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["init", "init+weights"])
def test_implicit_ridge_matches_dense_solve_and_unrolled(weights, x64):
  lam, num_steps = 0.5, 400
  inner_loss, outer_loss, eta, inner, outer, solution = _ridge(
      lam, num_steps, weights)
  sgd = optim.sgd(0.3)
  init = lambda eta: eta["init"]
  implicit = metaflow.meta_value_and_grad(
      inner_loss, outer_loss, sgd, num_steps, Strategy("implicit", cg_steps=6),
      init)
  mixflow = metaflow.meta_value_and_grad(inner_loss, outer_loss, sgd,
                                         num_steps, "mixflow", init)
  _, g_implicit = jax.jit(implicit)(eta, None, inner, outer)
  _, g_unrolled = jax.jit(mixflow)(eta, None, inner, outer)
  # The inner problem is solved and its Hessian positive definite.
  theta_T = metaflow.inner_loop(inner_loss, sgd, num_steps)(
      eta, eta["init"], inner).params
  last = jax.tree.map(lambda a: a[-1], inner)
  assert np.linalg.norm(_flat(jax.grad(inner_loss)(theta_T, eta, last))) < 1e-6
  flat, unravel = ravel_pytree(theta_T)
  hessian = jax.hessian(lambda t: inner_loss(unravel(t), eta, last))(flat)
  assert np.linalg.eigvalsh(hessian)[0] > 0.1
  # The exact implicit gradient: autodiff through the closed-form solution.
  dense = jax.grad(lambda eta: outer_loss(solution(eta), eta, outer))(eta)
  assert _cosine(g_implicit, dense) >= 0.999
  assert P.tree_rel_error(g_implicit, dense) <= 1e-3
  assert P.tree_rel_error(g_implicit, g_unrolled) <= 1e-2


def test_implicit_cg_damping_and_steps(x64):
  """cg_damping solves (H + d I) u = v; too few CG steps are inexact."""
  lam, num_steps = 0.5, 400
  inner_loss, outer_loss, eta, inner, outer, _ = _ridge(lam, num_steps)
  init = lambda eta: eta["init"]
  theta_T = metaflow.inner_loop(inner_loss, optim.sgd(0.3), num_steps)(
      eta, eta["init"], inner).params
  last = jax.tree.map(lambda a: a[-1], inner)
  v = jax.grad(outer_loss)(theta_T, eta, outer)
  flat, unravel = ravel_pytree(theta_T)
  hessian = jax.hessian(lambda t: inner_loss(unravel(t), eta, last))(flat)
  for damping in (0.0, 0.7):
    u = np.linalg.solve(hessian + damping * np.eye(flat.size), _flat(v))
    fn = metaflow.meta_value_and_grad(
        inner_loss, outer_loss, optim.sgd(0.3), num_steps,
        Strategy("implicit", cg_steps=6, cg_damping=damping), init)
    _, grads = jax.jit(fn)(eta, None, inner, outer)
    np.testing.assert_allclose(_flat(grads), lam * u, rtol=1e-8)
  one_step = metaflow.meta_value_and_grad(
      inner_loss, outer_loss, optim.sgd(0.3), num_steps,
      Strategy("implicit", cg_steps=1), init)
  _, grads = jax.jit(one_step)(eta, None, inner, outer)
  assert np.linalg.norm(_flat(grads) - lam * u) > 1e-3


@pytest.mark.slow
def test_implicit_sinusoid_with_proximal(x64):
  """sinusoid_maml with a strong proximal term: the inner loop converges,
  and implicit matches the dense solve and the exact unrolled gradient."""
  lam, num_steps = 20.0, 150
  task = metaflow.create_task("sinusoid_maml", widths=(20, 20), proximal=lam,
                              inner_lr=0.008)
  kwargs = dict(num_inner_steps=num_steps, meta_batch_size=1,
                mesh=P.ONE_DEVICE)
  implicit = BilevelTrainer(task, strategy=Strategy("implicit", cg_steps=60),
                            **kwargs)
  mixflow = BilevelTrainer(task, strategy="mixflow", **kwargs)
  eta = implicit.init_state().eta
  batch = next(implicit.train_batches())
  _, g_implicit = implicit.meta_value_and_grad(eta, batch)
  _, g_unrolled = mixflow.meta_value_and_grad(eta, batch)

  f = implicit.functional
  inner, outer = task.split_episode(jax.tree.map(lambda x: x[0], batch),
                                    num_steps)
  theta_T = metaflow.inner_loop(f.inner_loss, f.optimizer, num_steps,
                                "standard")(eta, eta.init, inner).params
  last = jax.tree.map(lambda a: a[-1], inner)
  assert np.linalg.norm(_flat(jax.grad(f.inner_loss)(theta_T, eta, last))
                        ) < 1e-6
  flat, unravel = ravel_pytree(theta_T)
  hessian = jax.hessian(lambda t: f.inner_loss(unravel(t), eta, last))(flat)
  assert np.linalg.eigvalsh(hessian)[0] > 0  # positive definite
  v = _flat(jax.grad(f.outer_loss)(theta_T, eta, outer))
  # iMAML: d theta*/d init = lam (H_L + lam I)^{-1} = lam H^{-1}.
  dense = lam * np.linalg.solve(hessian, v)
  assert _cosine(g_implicit.init, dense) >= 0.999
  assert np.linalg.norm(_flat(g_implicit.init) - dense) <= (
      1e-3 * np.linalg.norm(dense))
  assert P.tree_rel_error(g_implicit, g_unrolled) <= 1e-2


def _memory(strategy, num_steps):
  (inner_loss, outer_loss, optimizer, init_params, eta, theta0, inner_batches,
   outer_batch) = P.make_problem("init", "adam", num_steps, "float32")
  fn = metaflow.meta_value_and_grad(inner_loss, outer_loss, optimizer,
                                    num_steps, strategy, init_params)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        (eta, theta0, inner_batches, outer_batch))
  return metaflow.memory.analyze(fn, *shapes).temp_bytes


def test_implicit_memory_does_not_grow_with_T():
  implicit = {t: _memory("implicit", t) for t in (10, 1000)}
  mixflow_100 = _memory("mixflow", 100)
  assert implicit[1000] <= 1.1 * implicit[10], implicit
  assert implicit[1000] < mixflow_100, (implicit, mixflow_100)


@pytest.mark.slow
def test_implicit_meta_training_where_its_assumption_holds():
  """iMAML on sinusoid regression where the inner problem is nearly solved
  (proximal 20, T=20 SGD steps of 0.008: ||grad L(theta_T)|| ~ 0.1, implicit's
  cosine with the exact gradient 0.9996, README "Which meta-gradient"): 200
  meta-steps lower the held-out outer loss. Measured (seeds 0, 1, 2): 4.34 ->
  3.25, 3.43 -> 2.32, 4.69 -> 3.00."""
  from tasks.sinusoid import SinusoidMAML
  trainer = BilevelTrainer(
      SinusoidMAML(widths=(20, 20), inner_lr=0.008, proximal=20.0),
      strategy=Strategy("implicit", cg_steps=10), num_inner_steps=20,
      meta_batch_size=4, outer_optimizer=optax.adam(3e-3), seed=0,
      eval_split="test", num_eval_tasks=100, mesh=P.ONE_DEVICE)
  result = trainer.fit(200, log_every=100, console=False)
  before = result.initial_eval["outer_loss"]
  after = result.final_eval["outer_loss"]
  assert after < 0.85 * before, (before, after)


# ------------------------------------------------------------------- refusals
class _NoCompile(Exception):
  pass


class DecayInLOnly(Regression):
  """Its user meta-parameter (a weight decay) is read by L only."""

  def outer_loss(self, model, meta, batch):
    return jnp.mean(jnp.square(model(batch["x"]) - batch["y"]))


class DecayInV(Regression):
  """Its user meta-parameter also scales V."""

  def outer_loss(self, model, meta, batch):
    scale = jnp.exp(jax.tree.leaves(meta.user["log_wd"])[0])
    return scale * jnp.mean(jnp.square(model(batch["x"]) - batch["y"]))


@pytest.fixture
def no_compilation(monkeypatch):
  """Any jax.jit call fails the test: refusals happen before compiling."""
  def jit(*args, **kwargs):
    raise _NoCompile("jax.jit was called")
  monkeypatch.setattr(jax, "jit", jit)


@pytest.mark.parametrize("task,strategy,message", [
    (metaflow.create_task("sinusoid_maml", learn_lr=True, proximal=1.0),
     "implicit", "cannot learn learning rates: they enter only the inner "
     "optimiser Phi"),
    (metaflow.create_task("sinusoid_maml"), "implicit",
     r"needs MetaParams\(proximal=lam > 0\)"),
    (Regression(learn_init=True, loss_weights=True), "first_order",
     "cannot learn loss weights: they reach V only through the inner "
     "gradients"),
    (DecayInLOnly(learn_init=False, weight_decay=True), "first_order",
     "the outer loss V does not read them"),
    (metaflow.create_task("sinusoid_maml", proximal=1.0), "implicit+remat",
     "composes with nothing"),
], ids=["implicit-lr", "implicit-no-proximal", "first_order-loss-weights",
        "first_order-user-in-L", "implicit+remat"])
def test_refusals_before_compiling(task, strategy, message, no_compilation):
  with pytest.raises(ValueError, match=message) as info:
    BilevelTrainer(task, strategy=strategy, num_inner_steps=2,
                   meta_batch_size=1, mesh=P.ONE_DEVICE)
  assert "\n" not in str(info.value)


def test_user_meta_params_read_by_V_are_allowed_with_first_order():
  """The reads-V check is not a blanket refusal of user meta-parameters."""
  trainer = BilevelTrainer(DecayInV(learn_init=False, weight_decay=True),
                           strategy="first_order", num_inner_steps=2,
                           meta_batch_size=1, mesh=P.ONE_DEVICE)
  _, grads = trainer.meta_value_and_grad(trainer.init_state().eta,
                                         next(trainer.train_batches()))
  assert np.linalg.norm(_flat(grads.user)) > 0


def test_proximal_validation():
  with pytest.raises(ValueError, match="needs learn_init=True"):
    MetaParams(learning_rate=metaflow.LearnedLearningRates(), proximal=1.0)
  for bad in (-1.0, float("nan"), "1"):
    with pytest.raises(ValueError,
                       match="proximal must be a finite number >= 0"):
      MetaParams(learn_init=True, proximal=bad)
  spec = MetaParams(learn_init=True, proximal=2.0)
  theta, eta = {"a": jnp.ones(3)}, metaflow.Eta(init={"a": jnp.zeros(3)})
  assert float(spec.regularised(jnp.float32(1.0), theta, eta)) == 4.0

