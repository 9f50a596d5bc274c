"""Every strategy's meta-gradient equals a plain reference (Python loop of
jax.grad).

The full matrix (6 strategies x 3 optimisers x 3 meta-parameter kinds x
T in {1, 2, 4} x {float32, float64}) compiles all strategies of one case and the
reference in ONE jitted function (with XLA's backend optimisation off, which
changes rounding, not maths) to keep the suite fast; `test_separately_compiled`
checks that compiling each strategy alone, with default options, agrees too.

The quick tier (``-m "not slow"``) runs 9 of the matrix's 27 cases, a Latin
square: every kind with every optimiser once, and every T with every kind and
with every optimiser (each case: every exact strategy, float64 and float32);
the other 18 are slow.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import metaflow
from tests import problems as P

F64_TOL, F32_TOL = 1e-10, 1e-5
# Hardest float32 case: loss weights under ONE Adam step. Adam's first update
# g/sqrt(g^2 + eps_root) is nearly scale-invariant, so the meta-gradient is an
# O(eps_root)-sized difference of O(1) terms: the reference computed eagerly and
# jitted disagrees with itself by ~1e-4 there, while in float64 every strategy
# agrees with it to ~1e-15 (the maths is exact; the rest is float32 rounding).


def _errors(kind, opt_name, num_steps, dtype):
  """Relative errors of (value, grads) of every strategy vs the reference."""
  (inner_loss, outer_loss, optimizer, init_params, eta, theta0, inner_batches,
   outer_batch) = P.make_problem(kind, opt_name, num_steps, dtype)
  strategies = metaflow.exact_strategies()

  def everything(eta, theta0, inner_batches, outer_batch):
    ref = P.reference_meta_value_and_grad(
        inner_loss, outer_loss, optimizer, num_steps, init_params, eta, theta0,
        inner_batches, outer_batch)
    ours = [metaflow.meta_value_and_grad(inner_loss, outer_loss, optimizer,
                                         num_steps, s, init_params)(
                                             eta, theta0, inner_batches,
                                             outer_batch)
            for s in strategies]
    return ref, ours

  args = (eta, theta0, inner_batches, outer_batch)
  (ref_value, ref_grads), ours = jax.jit(everything).lower(*args).compile(
      compiler_options=P.FAST_COMPILE)(*args)
  # Not a vacuous comparison. (Smallest case: loss weights under one Adam
  # step, whose first update g/|g| is scale-invariant: ~1e-4, set by eps.)
  assert jnp.linalg.norm(jnp.concatenate(
      [jnp.ravel(g) for g in jax.tree.leaves(ref_grads)])) > 1e-5, (
          "degenerate test case: the reference meta-gradient is ~0")
  errors = {}
  for s, (value, grads) in zip(strategies, ours):
    chex.assert_trees_all_equal_structs(grads, ref_grads)
    for g in jax.tree.leaves(grads):
      assert g.dtype == jnp.dtype(dtype)
    errors[s.name] = (abs(float(value - ref_value)) / abs(float(ref_value)),
                      P.tree_rel_error(grads, ref_grads))
  return errors


def _matrix():
  """Every kind x optimiser at T = 1 (one step: no carry between steps) and
  T = 4 (carries through the scan), and the Latin square (T's index =
  kind's index + optimiser's index, mod 3) at T = 2; those off the square
  marked slow (21 cases, 9 in the quick tier)."""
  cases = []
  for (k, kind), (o, opt_name), (t, num_steps) in itertools.product(
      enumerate(P.KINDS), enumerate(P.OPTIMIZERS), enumerate((1, 2, 4))):
    on_square = t == (k + o) % 3
    if num_steps == 2 and not on_square:
      continue  # T = 2 is T = 4's code path: the square's three suffice
    cases.append(pytest.param(kind, opt_name, num_steps, marks=(
        () if on_square else pytest.mark.slow)))
  return cases


@pytest.mark.parametrize("kind,opt_name,num_steps", _matrix())
def test_all_strategies_match_reference(kind, opt_name, num_steps):
  with jax.enable_x64(True):
    errors64 = _errors(kind, opt_name, num_steps, "float64")
  errors32 = _errors(kind, opt_name, num_steps, "float32")
  for name in errors64:
    assert max(errors64[name]) < F64_TOL, (name, errors64[name])
    assert max(errors32[name]) < F32_TOL, (name, errors32[name])


@pytest.mark.parametrize("strategy", metaflow.exact_strategy_names())
def test_separately_compiled(strategy, x64):
  """Each strategy jitted on its own with default XLA options (float64)."""
  args = P.make_problem("loss_weights", "adam", 2, "float64")
  inner_loss, outer_loss, optimizer, init_params = args[:4]
  ref_value, ref_grads = jax.jit(
      lambda *a: P.reference_meta_value_and_grad(
          inner_loss, outer_loss, optimizer, 2, init_params, *a))(*args[4:])
  fn = metaflow.meta_value_and_grad(inner_loss, outer_loss, optimizer, 2,
                                    strategy, init_params)
  value, grads = jax.jit(fn)(*args[4:])
  np.testing.assert_allclose(value, ref_value, rtol=1e-12)
  assert P.tree_rel_error(grads, ref_grads) < F64_TOL


def test_mixflow_vjp_matches_reverse_over_reverse(x64):
  """The custom rule's VJP, cotangent of the loss value included."""
  inner_loss, _, _, _, eta, theta0, batches, _ = P.make_problem(
      "loss_weights", "sgd", 1, "float64")
  batch = jax.tree.map(lambda x: x[0], batches)
  rng = np.random.default_rng(1)
  c = jnp.asarray(rng.standard_normal())
  v = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), theta0)
  def pullback(value_and_grad):
    out, vjp = jax.vjp(value_and_grad, theta0, eta, batch)
    return out, vjp((c, v))
  (out_m, (th_m, eta_m, _)) = pullback(
      metaflow.mixflow_value_and_grad(inner_loss))
  (out_s, (th_s, eta_s, _)) = pullback(jax.value_and_grad(inner_loss))
  chex.assert_trees_all_close(out_m, out_s, rtol=1e-14)
  chex.assert_trees_all_close(th_m, th_s, rtol=1e-12, atol=1e-14)
  chex.assert_trees_all_close(eta_m, eta_s, rtol=1e-12, atol=1e-14)


class _MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(P.IN, P.HIDDEN, rngs=rngs)
    self.l2 = nnx.Linear(P.HIDDEN, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))[:, 0]


@pytest.mark.parametrize("strategy", ["standard", "mixflow", "mixflow+remat"])
def test_nnx_state_meta_params(strategy, x64):
  """theta and eta as nnx.State: a MAML initialisation of an NNX module."""
  graphdef, state = nnx.split(_MLP(nnx.Rngs(0)), nnx.Param)
  state = jax.tree.map(lambda x: x.astype(jnp.float64), state)
  _, _, _, _, _, _, batches, outer = P.make_problem("init", "sgd", 3, "float64")

  def loss(theta, eta, batch):
    del eta
    model = nnx.merge(graphdef, theta)
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

  opt = metaflow.optim.adam(0.05)
  init = lambda eta: eta
  value, grads = jax.jit(metaflow.meta_value_and_grad(
      loss, loss, opt, 3, strategy, init_params=init))(state, None, batches,
                                                       outer)
  ref_value, ref_grads = P.reference_meta_value_and_grad(
      loss, loss, opt, 3, init, state, None, batches, outer)
  assert isinstance(grads, nnx.State)
  np.testing.assert_allclose(value, ref_value, rtol=1e-12)
  assert P.tree_rel_error(grads, ref_grads) < F64_TOL


@pytest.mark.parametrize("strategy",
                         ["standard", "mixflow+remat+saved_inner_grads"])
def test_vmap_over_meta_batch(strategy):
  """A meta-batch of tasks sharing eta: vmap equals a loop over tasks."""
  num_tasks, num_steps = 3, 2
  problems = [P.make_problem("loss_weights", "momentum", num_steps, "float32",
                             seed=i) for i in range(num_tasks)]
  inner_loss, outer_loss, optimizer, _, eta = problems[0][:5]
  stack = lambda i: jax.tree.map(lambda *xs: jnp.stack(xs),
                                 *[p[i] for p in problems])
  theta0s, inner_batches, outer_batches = stack(5), stack(6), stack(7)
  fn = metaflow.meta_value_and_grad(inner_loss, outer_loss, optimizer,
                                    num_steps, strategy)
  values, grads = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, 0)))(
      eta, theta0s, inner_batches, outer_batches)
  assert values.shape == (num_tasks,)
  for i in range(num_tasks):
    value_i, grads_i = fn(eta, *(jax.tree.map(lambda x: x[i], t) for t in
                                 (theta0s, inner_batches, outer_batches)))
    np.testing.assert_allclose(values[i], value_i, rtol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda g: g[i], grads), grads_i,
                                rtol=1e-4, atol=1e-7)


def test_aux_variant_returns_inner_trace(x64):
  inner_loss, outer_loss, optimizer, init, eta, theta0, batches, outer = (
      P.make_problem("init", "adam", 4, "float64"))
  plain = metaflow.meta_value_and_grad(inner_loss, outer_loss, optimizer, 4,
                                       "mixflow", init)
  with_aux = metaflow.meta_value_and_grad_with_aux(
      inner_loss, outer_loss, optimizer, 4, "mixflow", init)
  (value, aux), grads = jax.jit(with_aux)(eta, None, batches, outer)
  value_plain, grads_plain = plain(eta, None, batches, outer)
  assert isinstance(aux, metaflow.MetaAux)
  assert aux.inner_losses.shape == (4,)
  np.testing.assert_allclose(aux.outer_loss, value)
  np.testing.assert_allclose(value, value_plain, rtol=1e-13)
  chex.assert_trees_all_close(grads, grads_plain, rtol=1e-12)
  # The trace is L(theta_t, eta, x_t) before each step, from the forward loop.
  result = metaflow.inner_loop(inner_loss, optimizer, 4)(eta, eta, batches)
  np.testing.assert_allclose(aux.inner_losses, result.inner_losses, rtol=1e-13)
  expected0 = inner_loss(eta, eta, jax.tree.map(lambda x: x[0], batches))
  np.testing.assert_allclose(aux.inner_losses[0], expected0, rtol=1e-13)
  # Adaptation lowers the inner loss on this problem.
  assert aux.inner_losses[-1] < aux.inner_losses[0]


@pytest.mark.parametrize("strategy", metaflow.exact_strategy_names())
def test_inner_adam_is_finite_where_optax_default_is_not(strategy):
  """An inner gradient that is exactly zero (theta0 at the first target): the
  derivative of sqrt(nu) at nu = 0 is infinite unless Adam's eps_root > 0."""
  inner_loss = lambda theta, eta, x: jnp.sum(eta * (theta - x) ** 2)
  outer_loss = lambda theta, eta, x: jnp.sum((theta - x) ** 2)
  eta, theta0 = jnp.array([1.0, 2.0, 3.0]), jnp.zeros(3)
  inner_batches = jnp.stack([jnp.zeros(3), jnp.ones(3)])  # g_0 = 0 exactly
  def grads_with(opt):
    fn = metaflow.meta_value_and_grad(inner_loss, outer_loss, opt, 2, strategy)
    return fn(eta, theta0, inner_batches, 2.0 * jnp.ones(3))[1]
  safe = grads_with(metaflow.optim.adam(0.1))
  assert bool(jnp.all(jnp.isfinite(safe))) and bool(jnp.any(safe != 0))
  unsafe = grads_with(optax.adam(0.1))  # optax's default eps_root = 0.0
  assert not bool(jnp.all(jnp.isfinite(unsafe)))


@pytest.mark.parametrize("strategy",
                         ["standard", "mixflow+remat+saved_inner_grads"])
def test_program_size_does_not_grow_with_T(strategy):
  """The inner loop is one scan: the traced program is the same for any T."""
  def program_size(num_steps):
    inner_loss, outer_loss, optimizer, init, eta, theta0, batches, outer = (
        P.make_problem("lr", "adam", num_steps, "float32"))
    fn = metaflow.meta_value_and_grad(inner_loss, outer_loss, optimizer,
                                      num_steps, strategy, init)
    return _count_equations(jax.make_jaxpr(fn)(eta, theta0, batches, outer))
  assert program_size(2) == program_size(16)


def _count_equations(jaxpr) -> int:
  """Equations of a (closed) jaxpr, those of nested jaxprs (scan bodies)
  included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = len(jaxpr.eqns)
  for eqn in jaxpr.eqns:
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          total += _count_equations(sub)
  return total


def test_losses_that_close_over_traced_values(x64):
  """L and V may close over arrays of a jitted function around the
  meta-gradient (a model's non-trainable state, an integer counter, a value
  computed from eta that ``jax.grad`` of the jitted function then
  differentiates): every strategy hoists them across its custom rules and
  gives the reference meta-gradient, the path through the closed-over
  function of eta included. (A closure over a value under differentiation
  itself is refused: tests/test_errors.py.)"""
  rng = np.random.default_rng(0)
  d, n, steps = 3, 4, 3
  theta0 = jnp.asarray(rng.standard_normal(d))
  inner = {"x": jnp.asarray(rng.standard_normal((steps, n, d))),
           "y": jnp.asarray(rng.standard_normal((steps, n)))}
  outer = {"x": jnp.asarray(rng.standard_normal((n, d))),
           "y": jnp.asarray(rng.standard_normal(n))}
  eta = {"a": jnp.asarray(rng.standard_normal(d))}
  scale, count = jnp.asarray(rng.standard_normal(d)), jnp.asarray([2])

  def losses(eta_outer, scale, count):
    shift = jnp.tanh(eta_outer["a"])  # a function of eta, closed over

    def inner_loss(theta, eta, b):
      r = b["x"] @ (theta * scale + shift) - b["y"]
      return jnp.mean(r ** 2) * count[0] + 0.1 * jnp.sum(eta["a"] * theta)

    def outer_loss(theta, eta, b):
      return jnp.mean((b["x"] @ theta - b["y"]) ** 2) + jnp.sum(scale * theta)

    return inner_loss, outer_loss

  def meta(strategy):
    def objective(eta, scale, count):  # jitted: its arguments are tracers
      inner_loss, outer_loss = losses(eta, scale, count)
      return metaflow.meta_value_and_grad(
          inner_loss, outer_loss, metaflow.optim.sgd(0.1), steps,
          strategy).objective(eta, theta0, inner, outer)[0]
    return jax.value_and_grad(jax.jit(objective))(eta, scale, count)

  def reference(eta):
    inner_loss, outer_loss = losses(eta, scale, count)
    return P.reference_meta_value_and_grad(
        inner_loss, outer_loss, metaflow.optim.sgd(0.1), steps, None, eta,
        theta0, inner, outer)[0]

  ref_value, ref_grads = jax.value_and_grad(reference)(eta)
  for strategy in ("standard", "mixflow", "mixflow+remat+saved_inner_grads",
                   "mixflow+segments=2+microbatches=2"):
    value, grads = meta(strategy)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    assert P.tree_rel_error(grads, ref_grads) < F64_TOL, strategy


def test_implicit_through_a_closed_over_function_of_eta(x64):
  """The implicit rule gives a hoisted closed-over value its implicit
  cotangent: eta reaching L through a closure inside a jitted function gets
  the meta-gradient it gets as an explicit argument."""
  rng = np.random.default_rng(1)
  d, n, steps, lam = 3, 6, 4, 2.0
  inner = {"x": jnp.asarray(rng.standard_normal((steps, n, d))),
           "y": jnp.asarray(rng.standard_normal((steps, n)))}
  outer = {"x": jnp.asarray(rng.standard_normal((n, d))),
           "y": jnp.asarray(rng.standard_normal(n))}
  eta = {"a": jnp.asarray(rng.standard_normal(d))}

  def fit(theta, b, center):
    return (jnp.mean((b["x"] @ theta - b["y"]) ** 2)
            + 0.5 * lam * jnp.sum((theta - center) ** 2))

  def outer_loss(theta, eta, b):
    return jnp.mean((b["x"] @ theta - b["y"]) ** 2)

  def meta(closed):
    def objective(eta):
      if closed:
        center = jnp.tanh(eta["a"])
        inner_loss = lambda theta, eta, b: fit(theta, b, center)
      else:
        inner_loss = lambda theta, eta, b: fit(theta, b, jnp.tanh(eta["a"]))
      return metaflow.meta_value_and_grad(
          inner_loss, outer_loss, metaflow.optim.sgd(0.1), steps,
          metaflow.Implicit(cg_steps=10)).objective(
              eta, jnp.zeros(d), inner, outer)[0]
    return jax.value_and_grad(jax.jit(objective))(eta)

  (v_closed, g_closed), (v_explicit, g_explicit) = meta(True), meta(False)
  np.testing.assert_allclose(v_closed, v_explicit, rtol=1e-12)
  assert P.tree_rel_error(g_closed, g_explicit) < F64_TOL
  assert float(jnp.linalg.norm(g_explicit["a"])) > 1e-3
