"""Bad input raises clear errors before anything is compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaflow

inner = lambda theta, eta, batch: jnp.mean((theta * eta - batch) ** 2)
outer = lambda theta, eta, batch: jnp.mean((theta - batch) ** 2)
SGD = optax.sgd(0.1)
ETA, THETA0 = jnp.ones(3), jnp.zeros(3)


def test_wrong_strategy_string():
  with pytest.raises(ValueError, match="Valid strategies: .*mixflow\\+remat"):
    metaflow.meta_value_and_grad(inner, outer, SGD, 2, strategy="mixfow")


@pytest.mark.parametrize("steps", [0, -3, 2.0, True, "2"])
def test_num_steps_not_an_int_from_one(steps):
  with pytest.raises(ValueError, match=f"num_steps \\(T\\) must be an int "
                     f">= 1, got {steps!r}"):
    metaflow.meta_value_and_grad(inner, outer, SGD, steps)


def test_numpy_integer_num_steps_is_accepted():
  fn = metaflow.meta_value_and_grad(inner, outer, SGD, np.int64(2))
  assert fn.num_steps == 2 and type(fn.num_steps) is int


@pytest.mark.parametrize("jit", [False, True])
def test_batch_leading_axis_mismatch_names_both_sizes(jit):
  fn = metaflow.meta_value_and_grad(inner, outer, SGD, 4)
  fn = jax.jit(fn) if jit else fn
  batches = {"x": jnp.ones((4, 3)), "y": jnp.ones((3, 3))}
  with pytest.raises(ValueError, match=r"\['y'\] has leading axis 3, but "
                     r"num_steps \(T\) is 4"):
    fn(ETA, THETA0, batches, jnp.ones(3))


def test_scalar_batch_leaf():
  fn = metaflow.meta_value_and_grad(inner, outer, SGD, 2)
  with pytest.raises(ValueError, match="leading axis none"):
    fn(ETA, THETA0, jnp.float32(1.0), jnp.ones(3))


def test_non_scalar_inner_loss():
  vector_loss = lambda theta, eta, batch: (theta * eta - batch) ** 2
  fn = metaflow.meta_value_and_grad(vector_loss, outer, SGD, 2)
  with pytest.raises(ValueError, match=r"inner_loss\(theta, eta, batch\) must "
                     r"return a float scalar, but it returned shape \(3,\)"):
    fn(ETA, THETA0, jnp.ones((2, 3)), jnp.ones(3))


def test_non_scalar_outer_loss():
  pair = lambda theta, eta, batch: (jnp.sum(theta), jnp.sum(batch))
  fn = metaflow.meta_value_and_grad(inner, pair, SGD, 2)
  with pytest.raises(ValueError, match="outer_loss.*returned a tuple pytree"):
    fn(ETA, THETA0, jnp.ones((2, 3)), jnp.ones(3))


def test_bad_optimizer():
  with pytest.raises(TypeError,
                     match="optax.GradientTransformation or a callable"):
    metaflow.meta_value_and_grad(inner, outer, 0.1, 2)
  fn = metaflow.meta_value_and_grad(inner, outer, lambda eta: 0.1, 2)
  with pytest.raises(TypeError, match=r"optimizer\(eta\) must return"):
    fn(ETA, THETA0, jnp.ones((2, 3)), jnp.ones(3))


def test_missing_theta0():
  fn = metaflow.meta_value_and_grad(inner, outer, SGD, 2)
  with pytest.raises(ValueError, match="theta0 is None but no init_params"):
    fn(ETA, None, jnp.ones((2, 3)), jnp.ones(3))


def test_pytree_learning_rate_structure_mismatch():
  opt = metaflow.optim.sgd({"a": 0.1, "b": 0.2})
  with pytest.raises(ValueError, match="structure of the parameters"):
    opt.update({"a": jnp.ones(2)}, opt.init({"a": jnp.ones(2)}))


def test_mixflow_refuses_eta_closed_over_by_the_loss():
  """eta must reach L as an argument; a closure fails loudly, never silently."""
  def objective(eta):
    closed = lambda theta, unused_eta, batch: jnp.sum(eta * theta ** 2 * batch)
    fn = metaflow.meta_value_and_grad(closed, outer, SGD, 2, "mixflow")
    return fn(jnp.zeros(()), THETA0 + 1.0, jnp.ones((2, 3)), jnp.ones(3))[0]
  with pytest.raises(Exception, match="closed-over value"):
    jax.grad(objective)(ETA)


def test_unknown_inner_optimizer_name():
  with pytest.raises(ValueError, match="Unknown inner optimiser 'rmsprop'"):
    metaflow.optim.create("rmsprop", 0.1)
