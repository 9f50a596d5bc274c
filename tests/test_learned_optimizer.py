"""The learned update rule (`metaflow.LearnedOptimizer`): exact where it
starts (Adam), a working optax optimizer outside the framework, exact
meta-gradients with respect to its weights for every exact strategy (float64
against the plain reference), composed with the other kinds in the trainer,
handed back from a run's workdir, and one-line errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import metaflow
from metaflow import (
  LearnedLearningRates,
  LearnedOptimizer,
  Meta,
  MetaParams,
  data,
  optim,
)
from metaflow.task import Task
from metaflow.trainer import BilevelTrainer
from tests import problems as P

IN, HIDDEN = 3, 6


def _regression(seed: int = 0, n: int = 64, dtype=None):
  """A tanh MLP and a regression batch: ``(theta, loss)``."""
  rng = np.random.default_rng(seed)
  dtype = dtype or jnp.result_type(float)
  x = jnp.asarray(rng.normal(size=(n, IN)), dtype)
  y = jnp.tanh(x @ jnp.asarray(rng.normal(size=IN), dtype))
  theta = {"w1": jnp.asarray(0.5 * rng.normal(size=(IN, HIDDEN)), dtype),
           "b1": jnp.zeros(HIDDEN, dtype),
           "w2": jnp.asarray(0.5 * rng.normal(size=HIDDEN), dtype)}

  def loss(theta):
    return jnp.mean((jnp.tanh(x @ theta["w1"] + theta["b1"]) @ theta["w2"]
                     - y) ** 2)
  return theta, loss


def _trajectory(opt, theta, loss, steps):
  def step(carry, _):
    theta, s = carry
    updates, s = opt.update(jax.grad(loss)(theta), s, theta)
    theta = optax.apply_updates(theta, updates)
    return (theta, s), theta
  return jax.lax.scan(step, (theta, opt.init(theta)), None, length=steps)


def test_magnitude_rule_starts_as_adam(x64):
  theta, loss = _regression()
  spec = LearnedOptimizer(output="magnitude")
  learned = metaflow.learned_optimizer(spec.init(jax.random.key(0)), 1e-2,
                                       spec)
  (_, state), ours = jax.jit(
      lambda: _trajectory(learned, theta, loss, 50))()
  _, adam = jax.jit(lambda: _trajectory(
      optim.adam(1e-2, b1=0.9, b2=0.999), theta, loss, 50))()
  assert isinstance(state[0], metaflow.LearnedOptimizerState)
  assert int(state[0].count) == 50
  for t in range(50):
    step_t = lambda tree: jax.tree.map(lambda a: a[t], tree)  # noqa: E731
    assert P.tree_rel_error(step_t(ours), step_t(adam)) < 1e-10, t
  assert float(loss(step_t(ours))) < 0.2 * float(loss(theta))


def test_normalized_rule_starts_as_adam_rms_normalised_per_tensor(x64):
  theta, loss = _regression()
  spec = LearnedOptimizer()
  learned = metaflow.learned_optimizer(spec.init(jax.random.key(0)), 0.1,
                                       spec)
  g = jax.grad(loss)(theta)
  updates, _ = learned.update(g, learned.init(theta), theta)
  adam, _ = optim.adam(1.0).update(g, optim.adam(1.0).init(theta), theta)
  for u, a in zip(jax.tree.leaves(updates), jax.tree.leaves(adam)):
    expected = 0.1 * a / jnp.sqrt(jnp.mean(a ** 2))  # adam(1.0) gives -a
    np.testing.assert_allclose(u, expected, rtol=1e-10)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(u ** 2)), 0.1, rtol=1e-10)


@pytest.mark.parametrize("output", ["normalized", "magnitude"])
def test_plain_optax_loop_trains_a_model(output):
  """Outside the framework: jit, vmap over seeds, any pytree."""
  spec = LearnedOptimizer(output=output)
  opt = metaflow.learned_optimizer(spec.init(jax.random.key(1)), 1e-2, spec)

  def train(seed):
    theta, loss = _regression(0)
    theta = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(
            jax.random.fold_in(jax.random.key(seed), p.size), p.shape),
        theta)
    (final, _), _ = _trajectory(opt, theta, loss, 300)
    return loss(theta), loss(final)

  before, after = jax.jit(jax.vmap(train))(jnp.arange(3))
  assert np.all(np.isfinite(after))
  assert np.all(after < 0.2 * before), (before, after)


# ------------------------------------------------ meta-gradients, exactness
def _perturbed(weights, scale=0.3):
  """Weights away from the start (whose zero output layer would give the
  hidden layers a zero meta-gradient)."""
  leaves, tree = jax.tree.flatten(weights)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  return jax.tree.unflatten(tree, [
      x + scale * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)])


@pytest.mark.slow
@pytest.mark.parametrize("output", ["normalized", "magnitude"])
def test_meta_gradient_every_exact_strategy_float64(output, x64):
  num_steps = 3
  (inner_loss, outer_loss, _, _, _, theta0, inner_batches,
   outer_batch) = P.make_problem("init", "adam", num_steps, jnp.float64)
  spec = LearnedOptimizer(output=output, hidden=(4, 4))
  eta = _perturbed(spec.init(jax.random.key(0)))

  def optimizer(eta):
    return metaflow.learned_optimizer(eta, 0.05, spec)

  # Every exact strategy for the default output; the magnitude output
  # differs from it only after the network (exp(o_1) for the RMS): standard
  # and mixflow, both with every memory option.
  strategies = metaflow.exact_strategies() if output == "normalized" else [
      metaflow.Strategy.parse(name) for name in (
          "standard", "mixflow",
          "mixflow+remat+saved_inner_grads+segments=2+microbatches=2")]

  def everything(eta, theta0, inner_batches, outer_batch):
    ref = P.reference_meta_value_and_grad(
        inner_loss, outer_loss, optimizer, num_steps, None, eta, theta0,
        inner_batches, outer_batch)
    ours = [metaflow.meta_value_and_grad(inner_loss, outer_loss, optimizer,
                                         num_steps, s)(
                                             eta, theta0, inner_batches,
                                             outer_batch)
            for s in strategies]
    return ref, ours

  args = (eta, theta0, inner_batches, outer_batch)
  (ref_value, ref_grads), ours = jax.jit(everything).lower(*args).compile(
      compiler_options=P.FAST_COMPILE)(*args)
  for leaf in jax.tree.leaves(ref_grads):  # every weight is meta-learned
    assert float(jnp.max(jnp.abs(leaf))) > 1e-8
  for s, (value, grads) in zip(strategies, ours):
    assert abs(float(value - ref_value)) < 1e-12 * abs(float(ref_value))
    assert P.tree_rel_error(grads, ref_grads) < 1e-10, s.name


# ------------------------------------------------------------- the trainer
class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    dtype = jnp.zeros(()).dtype
    self.l1 = nnx.Linear(IN, HIDDEN, param_dtype=dtype, rngs=rngs)
    self.l2 = nnx.Linear(HIDDEN, 1, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def _sample(rng: np.random.Generator) -> dict:
  w = rng.normal(size=(IN, 1))

  def points(n):
    x = rng.normal(size=(n, IN))
    return {"x": x, "y": np.tanh(x @ w)}
  return {"support": points(8), "query": points(8)}


@dataclasses.dataclass(frozen=True)
class LearnedRule(Task):
  """Few-shot regression meta-learning the update rule (and, with
  ``compose``, the initialisation and a scalar learning rate)."""
  compose: bool = False
  output: str = "normalized"

  def make_model(self, rngs):
    return Net(rngs)

  def inner_loss(self, model, meta: Meta, batch):
    x = jnp.asarray(batch["x"], jnp.zeros(()).dtype)
    return jnp.mean(jnp.square(model(x) - batch["y"]))

  def meta_params(self):
    rule = LearnedOptimizer(hidden=(4, 4), output=self.output)  # type: ignore
    if not self.compose:
      return MetaParams(learning_rate=0.05, optimizer=rule)
    return MetaParams(learn_init=True, optimizer=rule,
                      learning_rate=LearnedLearningRates(0.05, "scalar"))

  def inner_optimizer(self, learning_rate):
    raise AssertionError("a learned rule replaces the task's optimiser")

  def dataset(self, split, seed):
    return data.episodes(_sample, seed, split)


def _trainer(task, strategy="mixflow", mesh=P.ONE_DEVICE, episodes=2):
  return BilevelTrainer(task, strategy=strategy, num_inner_steps=3,
                        meta_batch_size=episodes, seed=0, mesh=mesh)


@pytest.mark.slow
def test_composed_kinds_exact_in_the_trainer(x64):
  task = LearnedRule(compose=True)
  trainer = _trainer(task)
  assert trainer.spec.kinds == ("init", "log_lr", "optimizer")
  errors = P.trainer_strategy_errors(
      lambda s: _trainer(task, s),
      strategies=("standard",
                  "mixflow+remat+saved_inner_grads+segments=2+microbatches=2"))
  for name, (value_error, grad_error) in errors.items():
    assert value_error < 1e-12 and grad_error < 1e-10, (name, errors)


@pytest.mark.slow
def test_on_a_mesh_equals_one_device(x64):
  """The rule's state (momenta and second moment shaped like theta) takes
  theta's shardings; the meta-gradient is the one device's."""
  task = LearnedRule()
  one = _trainer(task, episodes=4)
  mesh = _trainer(task, mesh=metaflow.sharding.make_mesh(
      2, 2, devices=jax.devices()[:4]), episodes=4)
  eta = _perturbed(one.init_state().eta, 0.1)
  batch = next(one.train_batches())
  v1, g1 = one.meta_value_and_grad(eta, batch)
  v2, g2 = mesh.meta_value_and_grad(eta, next(mesh.train_batches()))
  np.testing.assert_allclose(v2, v1, rtol=1e-12)
  assert P.tree_rel_error(g2, g1) < 1e-10


@pytest.mark.slow
def test_handed_back_from_the_workdir(tmp_path, x64):
  """``load_learned_optimizer`` rebuilds the run's rule with its learned
  scalar rate: the same updates as the rule built from the trained eta."""
  trainer = _trainer(LearnedRule(compose=True))
  result = trainer.fit(4, tmp_path, checkpoint_every=2, log_every=4,
                       console=False)
  eta = result.state.eta
  loaded = metaflow.load_learned_optimizer(tmp_path)
  direct = metaflow.learned_optimizer(eta.optimizer, jnp.exp(eta.log_lr),
                                      trainer.spec.optimizer)
  theta, loss = _regression()
  g = jax.grad(loss)(theta)
  a, _ = loaded.update(g, loaded.init(theta), theta)
  b, _ = direct.update(g, direct.init(theta), theta)
  assert P.tree_rel_error(a, b) < 1e-14
  assert P.tree_rel_error(eta.optimizer, trainer.init_state().eta.optimizer
                          ) > 1e-6  # meta-training moved the rule


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden=()), "hidden must be one or more positive widths"),
    (dict(output="sign"), "output must be 'normalized' or 'magnitude'"),
    (dict(momenta=(0.9, 1.0)), "momenta must be one or more decay rates"),
    (dict(start_momentum=0.7), "start_momentum 0.7 must be one of momenta"),
    (dict(activation="swish"), "activation must be one of"),
    (dict(time_scales=(0.0,)), "time_scales must be positive"),
])
def test_bad_spec_is_one_line(kwargs, message):
  with pytest.raises(ValueError, match=message) as e:
    LearnedOptimizer(**kwargs)
  assert "\n" not in str(e.value)


def test_bad_use_is_one_line(tmp_path):
  spec = LearnedOptimizer()
  weights = spec.init(jax.random.key(0))
  for other in (LearnedOptimizer(hidden=(8,)), LearnedOptimizer(hidden=(8, 8))):
    with pytest.raises(ValueError, match="do not have the structure") as e:
      metaflow.learned_optimizer(weights, 1e-3, other)
    assert "\n" not in str(e.value)
  opt = metaflow.learned_optimizer(weights)
  theta = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="reads the parameters"):
    opt.update(theta, opt.init(theta))
  with pytest.raises(ValueError, match="cannot learn an update rule"):
    _trainer(LearnedRule(), "implicit")
  with pytest.raises(FileNotFoundError, match="has no checkpoints"):
    metaflow.load_learned_optimizer(tmp_path)


# --------------------------------------------------- mlp_learned_optimizer
@pytest.mark.slow
def test_mlp_task_meta_trains_online_with_drawn_lifetimes():
  """The task's episodes (T inner digit batches, a held-out outer batch;
  the test part for test episodes), and a few online meta-steps whose
  learners live drawn lifetimes: finite, and the rule moves."""
  from tasks.learned_optimizer import digit_parts  # registers the task
  task = metaflow.create_task("mlp_learned_optimizer", widths=(8,),
                              batch_size=16, rule_hidden=(4,),
                              family_size=2, family_widths=(4, 8))
  episode = task.episodes("train", 0, 3)[0]
  inner, outer = task.split_episode(episode, 3)
  assert inner["x"].shape == (3, 16, 64) and outer["y"].shape == (16,)
  assert inner["x"].max() <= 1.0 and set(np.unique(inner["y"])) <= set(
      range(10))
  test_outer = task.episodes("test", 0, 3)[0]["outer"]["x"]
  train_parts = {row.tobytes() for row in digit_parts()[0][0]}
  assert not any(row.tobytes() in train_parts for row in test_outer)
  trainer = BilevelTrainer(
      task, num_inner_steps=3, num_eval_tasks=2, seed=0, mesh=P.ONE_DEVICE,
      online=metaflow.Online(population=2, lifetime=3, lifetime_max=12),
      outer_optimizer=optax.chain(optax.clip_by_global_norm(1.0),
                                  optax.adam(1e-2)))
  result = trainer.fit(4, log_every=4, console=False)
  assert np.isfinite(result.final_eval["outer_loss"])
  assert P.tree_rel_error(result.state.eta.optimizer,
                          trainer.init_state().eta.optimizer) > 1e-4
  with pytest.raises(ValueError, match="batch_size must be at most 250"):
    metaflow.create_task("mlp_learned_optimizer", batch_size=251)


def test_family_members_train_exactly_as_alone(x64):
  """A learner of a family is G classifiers of drawn architectures; the
  rule trains each exactly as it would train it alone (L sums the
  members' losses, the rule works per tensor)."""
  from tasks.learned_optimizer import Classifier, digit_parts
  task = metaflow.create_task(
      "mlp_learned_optimizer", widths=(8,), family_size=3,
      family_depths=(1, 2), family_widths=(4, 12), family_seed=1)
  architectures = task.architectures
  assert architectures[0] == ((8,), "relu") and len(architectures) == 3
  for widths, activation in architectures[1:]:
    assert 1 <= len(widths) <= 2 and all(4 <= w <= 12 for w in widths)
    assert activation in task.family_activations
  assert architectures == task.architectures   # drawn once per seed
  spec = task.rule
  weights = jax.tree.map(  # a rule that is not Adam (output layer on)
      lambda w: w + 0.3 * jax.random.normal(jax.random.key(2), w.shape,
                                            w.dtype),
      spec.init(jax.random.key(1)))
  rule = metaflow.learned_optimizer(weights, 1e-2, spec)
  (x, y), _, _ = digit_parts()

  batches = {"x": x[:192].reshape(6, 32, 64), "y": y[:192].reshape(6, 32)}

  def train(model):   # 6 steps of the rule, a plain optax loop
    graphdef, theta = nnx.split(model, nnx.Param)

    def step(carry, batch):
      theta, state = carry
      grads = jax.grad(lambda t: task.inner_loss(
          nnx.merge(graphdef, t), None, batch))(theta)
      updates, state = rule.update(grads, state, theta)
      return (optax.apply_updates(theta, updates), state), None
    return jax.lax.scan(step, (theta, rule.init(theta)), batches)[0][0]

  family = task.make_model(nnx.Rngs(0))
  start = nnx.state(family, nnx.Param)
  trained = train(family)
  for g, (widths, activation) in enumerate(architectures):
    alone = Classifier(widths, activation, nnx.Rngs(5))
    nnx.update(alone, start["members"][g])
    assert P.tree_rel_error(train(alone), trained["members"][g]) < 1e-12
    assert P.tree_rel_error(trained["members"][g], start["members"][g]) > 1e-2
  with pytest.raises(ValueError, match=r"family_widths must be \(min, max\)"):
    metaflow.create_task("mlp_learned_optimizer", family_widths=(8, 4))
  with pytest.raises(ValueError, match="family_activations must be some of"):
    metaflow.create_task("mlp_learned_optimizer", family_activations=("x",))


def test_optax_curves_train_fresh_models_and_flag_divergence():
  """`optax_curves`: one fresh model per seed, the curves start equal for
  equal seeds whatever the optimizer, Adam lowers the training loss, and a
  rate that blows up is reported as diverged."""
  import tasks.learned_optimizer  # noqa: F401  (registers the task)
  from metaflow.evaluation import optax_curves
  task = metaflow.create_task("mlp_learned_optimizer", widths=(8,),
                              batch_size=16)
  good = optax_curves(task, optax.adam(5e-2), 20, seeds=[0, 1],
                      eval_every=10, num_eval_batches=2)
  bad = optax_curves(task, optax.sgd(1e4), 20, seeds=[0, 1], eval_every=10,
                     num_eval_batches=2)
  assert good["step"] == [0, 10, 20]
  assert np.shape(good["train_loss"]) == (2, 3)
  assert np.shape(good["test_accuracy"]) == (2, 3)
  assert good["train_loss"][0][0] != good["train_loss"][1][0]  # two models
  np.testing.assert_allclose(np.array(bad["train_loss"])[:, 0],
                             np.array(good["train_loss"])[:, 0], rtol=1e-6)
  assert all(np.array(good["train_loss"])[:, -1]
             < 0.9 * np.array(good["train_loss"])[:, 0])
  assert good["diverged"] == [False, False] and bad["diverged"] == [True, True]
  with pytest.raises(ValueError, match="must be a multiple of eval_every"):
    optax_curves(task, optax.adam(1e-2), 15, seeds=[0], eval_every=10)


@pytest.mark.slow
@pytest.mark.subprocess  # a launch.train run
def test_evaluate_compares_the_handed_back_rule_with_adam(tmp_path):
  """``launch.evaluate`` on a learned-rule run (meta-trained on a family of
  two MLPs): fresh single models of a changed architecture (``--set``)
  trained by the loaded rule and by Adam, over seeds; one line for a bad
  ``--set``."""
  import json
  import subprocess
  import sys

  from launch import _cli, evaluate
  run = tmp_path / "run"
  done = subprocess.run([
      sys.executable, "-m", "launch.train", "--task=mlp_learned_optimizer",
      f"--workdir={run}", "--meta_steps=2", "--inner_steps=2",
      "--config.task.widths=(8,)", "--config.task.batch_size=16",
      "--config.task.family_size=2", "--config.task.family_widths=(4,8)",
      "--config.task.family_depths=(1,1)",
      "--config.task.rule_hidden=(4,)", "--config.online.population=2",
      "--config.online.lifetime=4", "--config.online.lifetime_max=8",
      "--config.num_eval_tasks=2", "--config.eval_every=0"],
      cwd=_cli.REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  out = tmp_path / "eval"
  assert evaluate.main(["--workdir", str(run), "--inner_steps", "6",
                        "--eval_every", "3", "--seeds", "2", "--adam",
                        "1e-3,1e-2", "--set", "widths=(8,4)", "--set",
                        "family_size=1", "--baseline",
                        "--eval_batches", "2", "--out", str(out)]) == 0
  result = json.load(open(out / "evaluate.json"))
  assert result["settings"]["widths"] == [8, 4]
  assert result["settings"]["family_size"] == 1
  assert set(result["optimizers"]) == {"learned", "initial", "adam(0.001)",
                                       "adam(0.01)"}
  for name, curves in result["optimizers"].items():
    assert curves["step"] == [0, 3, 6] and len(curves["train_loss"]) == 2
    assert np.isfinite(curves["mean"]["train_loss"]).all(), name
  assert (out / "evaluate.png").stat().st_size > 0
  with pytest.raises(_cli.UsageError, match="--set takes KEY=VALUE"):
    evaluate._main(["--workdir", str(run), "--inner_steps", "6", "--set",
                    "widths"])
