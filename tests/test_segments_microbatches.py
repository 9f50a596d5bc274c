"""Segments and microbatches: the same meta-gradient as without them (float64),
and the memory they are for (compiled, shapes only).

Each case compiles one program holding the strategy without the option and
every variant with it (XLA's backend optimisation off, as in
test_exactness), so the matrix costs a few compiles.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaflow
from metaflow import memory
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
    1, 7, pytest.param(16, marks=pytest.mark.slow)])
def test_segments_exact(num_steps, x64):
  """T in 1, 7, 16 x K in 1, 3, 4, 16 (and auto) x standard, mixflow: a
  last partial segment when K does not divide T; K >= T is one segment."""
  problem = P.make_problem("init", "adam", num_steps, "float64")
  for mode in ("standard", "mixflow"):
    variants = [f"{mode}+segments={k}" for k in (1, 3, 4, 16, "auto")]
    errors = _relative_errors(problem, num_steps, mode, variants)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("kind", P.KINDS)
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
  """T = 36, K = 6: 12 stored carries instead of 36 (`stored_carries`),
  reported as the static part and seen in XLA's temp memory."""
  plain = _temp("mixflow", 36, 4, 256)
  seg = _temp("mixflow+segments=auto", 36, 4, 256)
  assert metaflow.Strategy.parse("mixflow+segments=auto").stored_carries(
      36) == 12
  assert seg.static_bytes * 3 == plain.static_bytes
  assert seg.temp_bytes < 0.5 * plain.temp_bytes, (seg, plain)


def test_microbatches_lower_dynamic_memory():
  """Batch 512, M = 8: the inner steps' and V's working sets fall."""
  plain = _temp("mixflow", 2, 512, 256)
  micro = _temp("mixflow+microbatches=8", 2, 512, 256)
  assert micro.static_bytes == plain.static_bytes
  assert micro.dynamic_bytes < 0.4 * plain.dynamic_bytes, (micro, plain)
