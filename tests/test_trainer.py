"""BilevelTrainer and MetaParams: exact meta-gradients for every meta-parameter
kind and strategy (float64, against a Python-loop reference), training
behaviour, evaluation, and clear errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import metaflow
from metaflow import data, optim
from metaflow.meta_params import (
  LearnedLearningRates,
  LossWeights,
  Meta,
  MetaParams,
)
from metaflow.task import Functional, Task
from metaflow.trainer import BilevelTrainer
from tests import problems as P

IN, HIDDEN, SHOTS = 3, 4, 6


class Net(nnx.Module):
  """[N, IN] -> [N, 1]: a small tanh MLP in the default float dtype."""

  def __init__(self, rngs: nnx.Rngs, width: int = HIDDEN):
    dtype = jnp.zeros(()).dtype  # float64 under jax.enable_x64
    self.l1 = nnx.Linear(IN, width, param_dtype=dtype, rngs=rngs)
    self.l2 = nnx.Linear(width, 1, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


class Rater(nnx.Module):
  """Loss-weight rater: features [..., IN] -> scores [..., 1]."""

  def __init__(self, rngs: nnx.Rngs):
    dtype = jnp.zeros(()).dtype
    self.l = nnx.Linear(IN, 1, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.l(x)


def sample_regression(rng: np.random.Generator) -> dict:
  w = rng.normal(size=(IN, 1))
  def points(n):
    x = rng.normal(size=(n, IN))
    return {"x": x, "y": np.tanh(x @ w) + 0.1 * rng.normal(size=(n, 1))}
  return {"support": points(SHOTS), "query": points(SHOTS)}


@dataclasses.dataclass(frozen=True)
class Regression(Task):
  """Few-shot regression whose MetaParams turns on any subset of the kinds."""
  learn_init: bool = True
  lr: str = "fixed"            # fixed | scalar | tensor | element | per_step
  loss_weights: bool = False
  weight_decay: bool = False   # a user meta-parameter: per-tensor log decay
  inner_opt: str = "sgd"

  def make_model(self, rngs):
    return Net(rngs)

  def inner_loss(self, model, meta: Meta, batch):
    x = jnp.asarray(batch["x"], jnp.zeros(()).dtype)
    errors = jnp.square(model(x) - batch["y"])[:, 0]
    loss = meta.weighted_mean(errors, x)
    if "log_wd" in meta.user:
      theta = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      loss += sum(jnp.exp(w) * jnp.sum(jnp.square(p)) for w, p in zip(
          jax.tree.leaves(meta.user["log_wd"]), jax.tree.leaves(theta)))
    return loss

  def meta_params(self):
    lr = 0.1 if self.lr == "fixed" else LearnedLearningRates(
        0.1, granularity="element" if self.lr == "per_step" else self.lr,
        per_step=self.lr == "per_step")
    user = {}
    if self.weight_decay:
      user["log_wd"] = lambda key: {"l1": jnp.full((), -3.0),
                                    "l2": jnp.full((), -4.0)}
    return MetaParams(
        learn_init=self.learn_init, learning_rate=lr,
        loss_weights=LossWeights(Rater) if self.loss_weights else None,
        user=user)

  def inner_optimizer(self, learning_rate):
    return optim.create(self.inner_opt, learning_rate)

  def dataset(self, split, seed):
    return data.episodes(sample_regression, seed, split)


def reference_value_and_grad(trainer: BilevelTrainer, eta, batch,
                             first_order=False):
  """Mean over episodes of the Python-loop reference (tests/problems.py)."""
  f = trainer.functional
  values, grads = [], []
  for b in range(trainer.meta_batch_size):
    episode = jax.tree.map(lambda x: x[b], batch)
    inner, outer = trainer.task.split_episode(episode, trainer.num_inner_steps)
    v, g = P.reference_meta_value_and_grad(
        f.inner_loss, f.outer_loss, f.optimizer, trainer.num_inner_steps,
        lambda eta: trainer.spec.theta0(eta, trainer.theta_init), eta, None,
        inner, outer, first_order=first_order)
    values.append(v)
    grads.append(g)
  return (np.mean(values),
          jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), 0), *grads))


def _check_exact(task, strategy, num_steps=3):
  trainer = BilevelTrainer(task, strategy=strategy, num_inner_steps=num_steps,
                           meta_batch_size=2, seed=1, mesh=P.ONE_DEVICE)
  eta = trainer.init_state().eta
  batch = next(trainer.train_batches())
  value, grads = trainer.meta_value_and_grad(eta, batch)
  ref_value, ref_grads = reference_value_and_grad(trainer, eta, batch)
  assert jax.tree.leaves(grads)[0].dtype == jnp.float64
  np.testing.assert_allclose(value, ref_value, rtol=1e-12)
  err = P.tree_rel_error(grads, ref_grads)
  assert err < 1e-10, (strategy, err)
  # Every requested kind got a non-trivial meta-gradient.
  for kind in trainer.spec.kinds:
    assert P.tree_rel_error(jax.tree.map(jnp.zeros_like, getattr(grads, kind)),
                            getattr(grads, kind)) > 0


@pytest.mark.parametrize("strategy", [
    pytest.param(name, marks=pytest.mark.slow) if name.startswith(
        "standard") or name == "mixflow"
    else name for name in metaflow.exact_strategy_names()])
def test_all_kinds_exact_every_strategy(strategy, x64):
  task = Regression(learn_init=True, lr="per_step", loss_weights=True,
                    weight_decay=True)
  _check_exact(task, strategy)


@pytest.mark.parametrize("kwargs", [
    dict(learn_init=True),
    dict(learn_init=False, lr="scalar"),
    dict(learn_init=False, lr="tensor", inner_opt="adam"),
    dict(learn_init=False, lr="element", inner_opt="momentum"),
    dict(learn_init=False, loss_weights=True),
    dict(learn_init=False, weight_decay=True),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_each_kind_exact_mixflow(kwargs, x64):
  _check_exact(Regression(**kwargs), "mixflow")


def test_meta_params_shapes():
  theta = {"a": jnp.ones((2, 3)), "b": jnp.ones((3,))}
  key = jax.random.PRNGKey(0)
  for granularity, per_step, shape_a in [("scalar", False, None),
                                         ("tensor", False, ()),
                                         ("element", False, (2, 3)),
                                         ("tensor", True, (4,)),
                                         ("element", True, (4, 2, 3))]:
    spec = MetaParams(learning_rate=LearnedLearningRates(
        0.5, granularity, per_step))
    eta = spec.init(key, theta, num_steps=4)
    assert spec.kinds == ("log_lr",)
    if shape_a is None:
      assert eta.log_lr.shape == ((4,) if per_step else ())
    else:
      assert eta.log_lr["a"].shape == shape_a
    np.testing.assert_allclose(
        np.exp(jax.tree.leaves(eta.log_lr)[0]).ravel()[0], 0.5, rtol=1e-6)


def test_per_step_learning_rates_are_used_per_step():
  """Step t of the inner loop uses lr[t]: SGD on L = theta (gradient 1)."""
  spec = MetaParams(learning_rate=LearnedLearningRates(
      1.0, "scalar", per_step=True))
  eta = metaflow.Eta(log_lr=jnp.log(jnp.array([1.0, 10.0, 100.0])))
  opt = spec.inner_optimizer(eta, optim.sgd)
  theta = jnp.zeros(())
  s = opt.init(theta)
  trace = []
  for _ in range(4):
    u, s = opt.update(jnp.ones(()), s)
    theta = theta + u
    trace.append(float(theta))
  # The last rate repeats past T steps.
  np.testing.assert_allclose(trace, [-1.0, -11.0, -111.0, -211.0], rtol=1e-6)


def test_loss_weights_in_range_and_unweighted_outer():
  spec = MetaParams(loss_weights=LossWeights(Rater, max_weight=2.0))
  eta = spec.init(jax.random.PRNGKey(0), {"w": jnp.ones(())}, 1)
  eta = eta._replace(loss_weights=jax.tree.map(
      lambda p: 100.0 * jnp.ones_like(p), eta.loss_weights))
  x = jnp.array(np.random.default_rng(0).normal(size=(7, IN)), jnp.float32)
  w = spec.view(eta).loss_weights(x)
  assert w.shape == (7,)
  assert np.all((np.asarray(w) >= 0) & (np.asarray(w) <= 2.0))
  losses = jnp.arange(7.0)
  np.testing.assert_allclose(spec.view(eta).weighted_mean(losses, x),
                             jnp.mean(w * losses), rtol=1e-6)
  np.testing.assert_allclose(spec.view(eta).unweighted().weighted_mean(
      losses, x), 3.0)
  with pytest.raises(ValueError, match="pass features"):
    spec.view(eta).weighted_mean(losses)


def test_training_improves_held_out_outer_loss():
  trainer = BilevelTrainer(Regression(lr="tensor"), num_inner_steps=3,
                           meta_batch_size=4, num_eval_tasks=32,
                           mesh=P.ONE_DEVICE,
                           outer_optimizer=optax.adam(1e-2))
  result = trainer.fit(150, log_every=50, console=False)
  assert (result.final_eval["outer_loss"]
          < 0.8 * result.initial_eval["outer_loss"])
  assert int(result.state.step) == 150
  logged = [row["train/outer_loss"] for row in result.history
            if "train/outer_loss" in row]
  assert len(logged) == 3 and logged[-1] < logged[0]


def test_resample_init_uses_rng():
  """resample_init draws a fresh theta0 per meta-step from the state's RNG."""
  @dataclasses.dataclass(frozen=True)
  class Resampled(Regression):
    resample_init: bool = True

  trainer = BilevelTrainer(Resampled(learn_init=False, lr="tensor"),
                           meta_batch_size=2, num_inner_steps=2,
                           mesh=P.ONE_DEVICE)
  state = trainer.init_state()
  k1, k2 = jax.random.split(state.rng)
  t1 = metaflow.step.theta_base(trainer.program, k2, trainer.theta_init)
  assert P.tree_rel_error(t1, trainer.theta_init) > 0.1
  batch = next(trainer.train_batches())
  s1, _ = trainer.step(trainer.init_state(), batch)
  assert not np.array_equal(s1.rng, trainer.init_state().rng)


def test_functional_keeps_non_param_state_constant():
  """BatchNorm's running statistics are constants of the inner loop."""
  class WithBN(nnx.Module):
    def __init__(self, rngs):
      self.l = nnx.Linear(IN, 2, rngs=rngs)
      self.bn = nnx.BatchNorm(2, use_running_average=False, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.l(x))

  @dataclasses.dataclass(frozen=True)
  class BNTask(Regression):
    def make_model(self, rngs):
      return WithBN(rngs)

  functional, theta = Functional.of(BNTask(), WithBN(nnx.Rngs(0)))
  assert set(theta) == {"l", "bn"} and set(theta["bn"]) == {"scale", "bias"}
  x = jnp.ones((5, IN))
  model = functional.model(theta)
  model(x)  # updates the running mean of this throw-away module only
  np.testing.assert_array_equal(functional.rest["bn"]["mean"], 0.0)
  np.testing.assert_array_equal(
      nnx.to_pure_dict(nnx.state(functional.model(theta), nnx.BatchStat))
      ["bn"]["mean"], 0.0)


class Normalised(nnx.Module):
  """A linear model behind BatchNorm in inference mode: its output depends
  on the running statistics, state that is not theta."""

  def __init__(self, rngs):
    dtype = jnp.zeros(()).dtype
    self.bn = nnx.BatchNorm(IN, use_running_average=True, param_dtype=dtype,
                            rngs=rngs)
    self.l = nnx.Linear(IN, 1, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.l(self.bn(x))


@dataclasses.dataclass(frozen=True)
class NormalisedTask(Regression):
  def make_model(self, rngs):
    return Normalised(rngs)


def test_non_trainable_state_is_an_argument():
  """The model's state that is not theta (BatchNorm's statistics) is an
  argument of the jitted meta-gradient, not a constant compiled into it:
  other statistics give another meta-gradient from the same program."""
  trainer = BilevelTrainer(NormalisedTask(lr="tensor"), num_inner_steps=2,
                           meta_batch_size=2, mesh=P.ONE_DEVICE)
  rest = trainer.model.rest
  assert set(rest["bn"]) == {"mean", "var"}
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(rest))
  eta = trainer.init_state().eta
  batch = trainer.layout.global_batch(next(trainer.train_batches()))
  fn = jax.jit(functools.partial(metaflow.step.value_and_grad,
                                 trainer.program, trainer.layout))
  shifted = trainer.model._replace(rest=jax.tree.map(
      lambda x: x + 0.5, rest))
  lowered = fn.lower(eta, batch, trainer.model, None)
  assert len(jax.tree.leaves(lowered.args_info)) == len(jax.tree.leaves(
      (eta, batch, trainer.model)))
  compiled = lowered.compile()
  (a, _), grads_a = compiled(eta, batch, trainer.model, None)
  (b, _), grads_b = compiled(eta, batch, shifted, None)
  assert float(a) != float(b)
  assert P.tree_rel_error(grads_a, grads_b) > 1e-3
  # The facade passes the model's own statistics.
  np.testing.assert_allclose(trainer.meta_value_and_grad(
      eta, next(trainer.train_batches()))[0], a, rtol=1e-6)


@pytest.mark.slow
def test_every_estimator_with_non_trainable_state(x64):
  """The rules of every estimator take the model's non-trainable state
  (an argument of the jitted step, closed over by L): the exact ones agree,
  the approximate ones give a finite, non-zero meta-gradient."""
  kwargs = dict(num_inner_steps=2, meta_batch_size=2, mesh=P.ONE_DEVICE)
  errors = P.trainer_strategy_errors(lambda s: BilevelTrainer(
      NormalisedTask(lr="tensor", loss_weights=True), strategy=s, **kwargs))
  assert max(max(e) for e in errors.values()) < 1e-10, errors
  for strategy, task in (("implicit", NormalisedTask(learn_init=False,
                                                     loss_weights=True)),
                         ("first_order", NormalisedTask(learn_init=True))):
    trainer = BilevelTrainer(task, strategy=strategy, **kwargs)
    _, grads = trainer.meta_value_and_grad(trainer.init_state().eta,
                                           next(trainer.train_batches()))
    norm = float(optax.tree.norm(grads))
    assert np.isfinite(norm) and norm > 0, strategy


def test_errors():
  with pytest.raises(TypeError, match="metaflow.Task"):
    BilevelTrainer(object())
  with pytest.raises(ValueError, match="meta_batch_size"):
    BilevelTrainer(Regression(), meta_batch_size=0)
  with pytest.raises(ValueError, match="Unknown strategy"):
    BilevelTrainer(Regression(), strategy="reverse")
  with pytest.raises(ValueError, match="Unknown split"):
    BilevelTrainer(Regression(), eval_split="dev")
  with pytest.raises(ValueError, match="learns nothing"):
    MetaParams()
  with pytest.raises(ValueError, match="positive float"):
    MetaParams(learn_init=True, learning_rate=-1.0)
  with pytest.raises(ValueError, match="granularity"):
    LearnedLearningRates(granularity="row")
  with pytest.raises(TypeError, match="tuple of top-level parameter names"):
    LearnedLearningRates(stacked="blocks")
  with pytest.raises(ValueError, match=r"names \['blocks'\], which are not "
                     r"top-level keys of the parameters \['l1', 'l2'\]"):
    LearnedLearningRates(stacked=("blocks",)).init_log_lr(
        {"l1": jnp.zeros(2), "l2": jnp.zeros(3)}, num_steps=1)
  trainer = BilevelTrainer(Regression(), meta_batch_size=1, mesh=P.ONE_DEVICE)
  with pytest.raises(ValueError, match="num_meta_steps"):
    trainer.fit(-1)


def test_task_without_data_is_refused():
  @dataclasses.dataclass(frozen=True)
  class NoData(Task):
    def make_model(self, rngs):
      return Net(rngs)

    def inner_loss(self, model, meta, batch):
      return jnp.mean(model(batch["x"]))

    def meta_params(self):
      return MetaParams(learn_init=True)

  with pytest.raises(TypeError, match=r"must implement dataset\(split, seed\) "
                     r"or episodes\(split, seed, num_inner_steps\)"):
    BilevelTrainer(NoData())


def test_unsupported_strategy_rejected_before_compiling():
  @dataclasses.dataclass(frozen=True)
  class StandardOnly(Regression):
    supported_strategies = ("standard", "standard+remat")
    unsupported_reason = "its loss uses a custom-VJP op without a JVP rule"

  BilevelTrainer(StandardOnly(), strategy="standard", mesh=P.ONE_DEVICE)
  with pytest.raises(ValueError, match="does not support strategy 'mixflow'.*"
                     "custom-VJP"):
    BilevelTrainer(StandardOnly(), strategy="mixflow")


@dataclasses.dataclass(frozen=True)
class Unsplit(Regression):
  """Episodes without the default split_episode's keys."""

  def dataset(self, split, seed):
    return data.episodes(_train_test_episode, seed, split)


def _train_test_episode(rng):
  episode = sample_regression(rng)
  return {"train": episode["support"], "test": episode["query"]}


def _fewer_points(index, episode):
  """Episode 3 has one support point fewer than the others."""
  if index != 3:
    return episode
  return {**episode, "support": jax.tree.map(lambda x: x[:-1],
                                             episode["support"])}


@dataclasses.dataclass(frozen=True)
class Ragged(Regression):
  """Episodes of different shapes (episode 3's support set is smaller)."""

  def dataset(self, split, seed):
    return data.episodes(sample_regression, seed, split).map_with_index(
        _fewer_points)


def test_episodes_the_task_cannot_split_or_stack():
  """An episode without support/query, and episodes of different shapes,
  are one line naming the key and the episode, pointing to Task.dataset
  and Task.split_episode."""
  with pytest.raises(ValueError) as e:
    BilevelTrainer(Unsplit(), mesh=P.ONE_DEVICE)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("Task 'Unsplit': an episode has no 'support' "
                            "and no 'query' (its keys are ['test', 'train'])")
  assert "Task.split_episode" in message and "Task.dataset" in message
  assert message.endswith("(Episode 0 of split 'train'.)")

  # Within a meta-batch: episodes 2 and 3 are stacked.
  batches = BilevelTrainer(Ragged(), meta_batch_size=2,
                           mesh=P.ONE_DEVICE).train_batches()
  next(batches)
  with pytest.raises(ValueError) as e:
    next(batches)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(
      "Episodes of different shapes: episode 3 has ['support']['x'] of shape "
      f"({SHOTS - 1}, {IN}) but episode 2 has ({SHOTS}, {IN}).")
  assert "Task.dataset" in message and "Task.split_episode" in message

  # A whole meta-batch unlike the first episode, which the run is laid out
  # for (meta-batches of one episode: episode 3 is meta-batch 3).
  trainer = BilevelTrainer(Ragged(), meta_batch_size=1, mesh=P.ONE_DEVICE)
  state, batches = trainer.init_state(), trainer.train_batches()
  for _ in range(3):
    state, _ = trainer.step(state, next(batches))
  with pytest.raises(ValueError) as e:
    trainer.step(state, next(batches))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(
      "Episodes of different shapes: a meta-batch has ['support']['x'] of "
      f"shape (1, {SHOTS - 1}, {IN}), but the run was laid out for (1, "
      f"{SHOTS}, {IN}) from episode 0 of split 'train'.")


@pytest.mark.slow
def test_with_strategy_compiles_each_strategy_once(x64):
  """A trainer with another estimator is a new value: each strategy's
  meta-gradient is compiled once (switching back compiles nothing), and
  equals that of a trainer built with the strategy."""
  kwargs = dict(num_inner_steps=2, meta_batch_size=2, mesh=P.ONE_DEVICE)
  task = Regression(lr="tensor", loss_weights=True)
  base = BilevelTrainer(task, strategy="standard", **kwargs)
  eta = base.init_state().eta
  batch = next(base.train_batches())
  lowered = []

  def listen(event, duration, **kw):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append(event)

  def lowerings(trainer):
    before = len(lowered)
    result = trainer.meta_value_and_grad(eta, batch)
    return len(lowered) - before, result

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    counts = {"standard": lowerings(base)[0]}
    switched = {name: base.with_strategy(name)
                for name in ("mixflow", "mixflow+remat+saved_inner_grads")}
    results = {}
    for name, trainer in switched.items():
      counts[name], results[name] = lowerings(trainer)
    again = {name: lowerings(t)[0] for name, t in
             [("standard", base), *switched.items()]}
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert counts == {"standard": 1, "mixflow": 1,
                    "mixflow+remat+saved_inner_grads": 1}
  assert set(again.values()) == {0}
  assert base.strategy.name == "standard"  # the original is untouched
  for name, trainer in switched.items():
    assert trainer.strategy.name == name
    assert trainer.layout is base.layout and trainer.model is base.model
    built = BilevelTrainer(task, strategy=name, **kwargs)
    value, grads = built.meta_value_and_grad(eta, batch)
    assert float(results[name][0]) == float(value)
    assert P.tree_rel_error(results[name][1], grads) < 1e-12
  with pytest.raises(ValueError, match="first_order' cannot learn loss"):
    base.with_strategy("first_order")
