"""Segments and microbatches: the same meta-gradient as without them (float64),
and the memory they are for (compiled, shapes only).

Each case compiles one program holding the strategy without the option and
every variant with it (XLA's backend optimisation off, as in
test_exactness), so the matrix costs a few compiles.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaflow
from metaflow import memory, segments
from tests import problems as P

TOL = 1e-10


def _relative_errors(problem, num_steps, baseline, variants):
  """{variant: relative error of (value, grads) vs ``baseline``}."""
  inner_loss, outer_loss, optimizer, init_params = problem[:4]
  args = problem[4:]

  def everything(*args):
    return [metaflow.meta_value_and_grad(inner_loss, outer_loss, optimizer,
                                         num_steps, s, init_params)(*args)
            for s in (baseline,) + tuple(variants)]

  (ref_value, ref_grads), *ours = jax.jit(everything).lower(
      *args).compile(compiler_options=P.FAST_COMPILE)(*args)
  assert optax.tree.norm(ref_grads) > 1e-5, "degenerate case: zero gradient"
  return {v: max(abs(float(value - ref_value)) / abs(float(ref_value)),
                 P.tree_rel_error(grads, ref_grads))
          for v, (value, grads) in zip(variants, ours)}


@pytest.mark.parametrize("num_steps", [
    1, pytest.param(7, marks=pytest.mark.slow),
    pytest.param(16, marks=pytest.mark.slow)])
def test_segments_exact(num_steps, x64):
  """T in 1, 7, 16 x K in 1, 3, 4, 16 (and auto) x standard, mixflow: a
  last partial segment when K does not divide T; K >= T is one segment."""
  problem = P.make_problem("init", "adam", num_steps, "float64")
  for mode in ("standard", "mixflow"):
    variants = [f"{mode}+segments={k}" for k in (1, 3, 4, 16, "auto")]
    errors = _relative_errors(problem, num_steps, mode, variants)
    assert max(errors.values()) < TOL, errors


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mixflow", "standard"])
def test_nested_segments_exact(mode, x64):
  """T = 50 cut by two and three levels whose lengths divide neither T nor
  each other (ragged pieces at every level), alone and with +remat,
  +remat+saved_inner_grads and +microbatches=2 (about 15 s of compiling
  per mode)."""
  problem = P.make_problem("init", "adam", 50, "float64")
  variants = [f"{mode}+segments=12/5", f"{mode}+segments=20/7/3",
              f"{mode}+remat+segments=20/7/3",
              f"{mode}+remat+saved_inner_grads+segments=12/5",
              f"{mode}+segments=20/7/3+microbatches=2"]
  errors = _relative_errors(problem, 50, mode, variants)
  assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("kind", [P.KINDS[0], *(
    pytest.param(kind, marks=pytest.mark.slow) for kind in P.KINDS[1:])])
def test_microbatches_exact(kind, x64):
  """M in 1, 2, 4 (inner batch 4, outer batch 8) x standard, mixflow, for a
  learned initialisation, learned learning rates and loss weights."""
  problem = P.make_problem(kind, "adam", 3, "float64")
  for mode in ("standard", "mixflow"):
    variants = [f"{mode}+microbatches={m}" for m in (1, 2, 4)]
    errors = _relative_errors(problem, 3, mode, variants)
    assert max(errors.values()) < TOL, errors


def test_options_compose_exactly(x64):
  """Segments, microbatches and per-step remat with saved inner grads
  together, against the plain reference loop (learned learning rates, SGD
  with momentum)."""
  problem = P.make_problem("lr", "momentum", 5, "float64")
  inner_loss, outer_loss, optimizer, init_params = problem[:4]
  ref_value, ref_grads = jax.jit(lambda *a: P.reference_meta_value_and_grad(
      inner_loss, outer_loss, optimizer, 5, init_params, *a))(*problem[4:])
  for name in ("mixflow+remat+saved_inner_grads+segments=2+microbatches=2",
               "standard+remat+segments=auto+microbatches=4"):
    fn = metaflow.meta_value_and_grad(inner_loss, outer_loss, optimizer, 5,
                                      name, init_params)
    value, grads = jax.jit(fn)(*problem[4:])
    np.testing.assert_allclose(value, ref_value, rtol=TOL)
    assert P.tree_rel_error(grads, ref_grads) < TOL, name


@pytest.mark.parametrize("which", ["inner", "outer"])
def test_microbatches_must_divide_the_batch(which):
  problem = P.make_problem("init", "sgd", 2, "float32")
  inner_loss, outer_loss, optimizer, init_params, eta, theta0, inner, outer = (
      problem)
  if which == "inner":
    inner = jax.tree.map(lambda x: x[:, :3], inner)
  else:
    outer = jax.tree.map(lambda x: x[:6], outer)
  fn = metaflow.meta_value_and_grad(inner_loss, outer_loss, optimizer, 2,
                                    "mixflow+microbatches=4", init_params)
  with pytest.raises(ValueError, match=rf"microbatches=4: {which} batch leaf "
                     r"\['x'\] has leading axis [36], which 4 does not divide"):
    fn(eta, theta0, inner, outer)


def _mlp_problem(num_steps, batch, width):
  """A wide MLP under inner Adam (shapes only), learned initialisation."""
  theta = {"w1": jax.ShapeDtypeStruct((16, width), jnp.float32),
           "w2": jax.ShapeDtypeStruct((width, 1), jnp.float32)}
  def loss(theta, eta, b):
    del eta
    h = jnp.tanh(b["x"] @ theta["w1"])
    return jnp.mean((h @ theta["w2"])[:, 0] - b["y"]) ** 2
  inner = {"x": jax.ShapeDtypeStruct((num_steps, batch, 16), jnp.float32),
           "y": jax.ShapeDtypeStruct((num_steps, batch), jnp.float32)}
  outer = {"x": jax.ShapeDtypeStruct((batch, 16), jnp.float32),
           "y": jax.ShapeDtypeStruct((batch,), jnp.float32)}
  return loss, theta, inner, outer


def _temp(strategy, num_steps, batch, width):
  loss, theta, inner, outer = _mlp_problem(num_steps, batch, width)
  fn = metaflow.meta_value_and_grad(loss, loss, metaflow.optim.adam(1e-2),
                                    num_steps, strategy, lambda eta: eta)
  return memory.analyze(fn, theta, None, inner, outer)


def test_segments_lower_static_memory():
  """T = 36: auto is two levels, 12/4, storing 3 + 3 + 4 = 10 carries
  (`stored_carries`; the best one level, K = 6, stores 12) instead of 36,
  reported as the static part and seen in XLA's temp memory."""
  plain = _temp("mixflow", 36, 4, 256)
  seg = _temp("mixflow+segments=auto", 36, 4, 256)
  auto = metaflow.Strategy.parse("mixflow+segments=auto")
  assert auto.segment_length_for(36) == (12, 4)
  assert auto.stored_carries(36) == 10 < segments.stored_carries(
      36, segments.schedule(36, levels=1)) == 12
  assert seg.static_bytes * 36 == plain.static_bytes * 10
  assert seg.temp_bytes < 0.5 * plain.temp_bytes, (seg, plain)


@pytest.mark.slow
def test_nested_segments_memory_is_predicted():
  """T = 256, inner Adam on a wide MLP: a nested schedule's compiled total
  is its exact `stored_carries` x one carry + the dynamic part (total -
  static) of one level of the same family, within 10% (measured: 1-2%).

  The dynamic part depends on the innermost length Kn, not on the levels
  above it: the scan over a piece of Kn steps keeps each step's residuals,
  which for MixFlow-MG with inner Adam are the carry (theta, mu, nu) and
  as much again of the Adam update's intermediates (g_t and its
  normalisation); the stored carries count only the first. So plain
  mixflow's reference is one level of K = Kn, and its dynamic part falls by
  about one carry per step of Kn. With +remat each step keeps only its
  carry, and one level of K = 16 predicts schedules ending in 8 and 4."""
  carry = _temp("mixflow", 1, 4, 512).static_bytes
  compiled = functools.cache(lambda name: _temp(name, 256, 4, 512))
  cases = {"mixflow": [("8", "64/8"), ("4", "64/16/4")],
           "mixflow+remat": [("16", "64/8"), ("16", "64/16/4")]}
  for family, pairs in cases.items():
    for reference, nested in pairs:
      ref = compiled(f"{family}+segments={reference}")
      got = compiled(f"{family}+segments={nested}")
      stored = metaflow.Strategy.parse(
          f"{family}+segments={nested}").stored_carries(256)
      assert got.static_bytes == stored * carry
      predicted = stored * carry + ref.total_bytes - ref.static_bytes
      error = abs(predicted - got.total_bytes) / got.total_bytes
      assert error <= 0.10, (family, nested, predicted, got.total_bytes)
  # Four steps fewer in the innermost piece: about four carries fewer.
  fall = (compiled("mixflow+segments=8").dynamic_bytes
          - compiled("mixflow+segments=4").dynamic_bytes)
  assert abs(fall / (4 * carry) - 1) < 0.1, (fall, carry)


def test_microbatches_lower_dynamic_memory():
  """Batch 512, M = 8: the inner steps' and V's working sets fall."""
  plain = _temp("mixflow", 2, 512, 256)
  micro = _temp("mixflow+microbatches=8", 2, 512, 256)
  assert micro.static_bytes == plain.static_bytes
  assert micro.dynamic_bytes < 0.4 * plain.dynamic_bytes, (micro, plain)
