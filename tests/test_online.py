"""Online (persistent) inner learners: P=1, N=T is the offline trainer, a
window's meta-gradient is the engine's from the carried (theta, s), learners
carry forward, age, stagger and are replaced, every strategy runs, the
population's memory is reported, bad settings are refused before
compiling, and learned rates started too low beat their initial ones. (Exact
resume after SIGKILL: test_resume.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import metaflow
from metaflow import online
from metaflow.memory import MemoryReport
from metaflow.trainer import BilevelTrainer
from tests import problems as P
from tests.problems import ONE_DEVICE
from tests.test_trainer import Net, Regression


@dataclasses.dataclass(frozen=True)
class Fresh(Regression):
  """Learned per-tensor learning rates of inner Adam (its state s is worth
  carrying), a fresh random model for every episode or learner."""
  learn_init: bool = False
  lr: str = "tensor"
  inner_opt: str = "adam"
  resample_init: bool = True


@dataclasses.dataclass(frozen=True)
class SameFresh(Fresh):
  """Every fresh model is the same one: offline and online trainers then
  start every episode / learner from the same initialisation."""

  def make_model(self, rngs):
    del rngs
    return Net(nnx.Rngs(0))


def make(task=Fresh(), **kwargs):
  settings = dict(num_inner_steps=2, num_eval_tasks=2, seed=1,
                  outer_optimizer=optax.adam(1e-2), mesh=ONE_DEVICE)
  settings.update(kwargs)
  return BilevelTrainer(task, **settings)


@pytest.mark.slow
def test_one_learner_living_one_window_is_the_offline_trainer(x64):
  """P=1, N=T: every window starts from a fresh learner, as every offline
  episode does; with the same fresh initialisations the two trainers take
  the same 20 meta-steps."""
  offline = make(SameFresh(), meta_batch_size=1).fit(
      20, log_every=20, console=False)
  one = make(SameFresh(), online=metaflow.Online(population=1, lifetime=2))
  result = one.fit(20, log_every=20, console=False)
  assert P.tree_rel_error(result.state.eta, offline.state.eta) < 1e-10
  assert P.tree_rel_error(result.state.opt_state,
                          offline.state.opt_state) < 1e-10
  assert int(result.state.learners.age[0]) == 0  # replaced after each window
  # eta did move: the comparison is not of two initial states.
  assert P.tree_rel_error(result.state.eta, one.init_state().eta) > 1e-3


@pytest.fixture(scope="module")
def population():
  """An online trainer (P=4, N=8, T=2) after its warm-up and three
  meta-steps, with the next meta-batch; float64."""
  with jax.enable_x64(True):
    trainer = make(online=metaflow.Online(population=4, lifetime=8))
    batches = trainer.train_batches()
    state = trainer.warm_up(trainer.init_state(), batches)
    warmed = jax.tree.map(np.asarray, state.learners)
    for _ in range(3):
      state, _ = trainer.step(state, next(batches))
    yield trainer, warmed, state, next(batches)


def test_learners_are_staggered_carried_forward_and_replaced(population):
  trainer, warmed, state, batch = population
  np.testing.assert_array_equal(warmed.age, [0, 2, 4, 6])
  # Three windows of T=2 later; the learner that reached N=8 is fresh.
  np.testing.assert_array_equal(state.learners.age, [6, 0, 2, 4])
  with jax.enable_x64(True):
    after, _ = trainer.step(jax.tree.map(jnp.copy, state), batch)
    f = trainer.functional
    loop = metaflow.inner_loop(f.inner_loss, f.optimizer, 2, "standard")
    for p in range(4):
      inner, _ = trainer.task.split_episode(
          jax.tree.map(lambda x: x[p], batch), 2)
      theta, s = jax.tree.map(lambda x: x[p], (state.learners.params,
                                               state.learners.opt_state))
      expected = loop(state.eta, theta, inner, s)  # the old eta: no lag
      got = jax.tree.map(lambda x: x[p], (after.learners.params,
                                          after.learners.opt_state))
      if p == 0:  # 6 + 2 = N: a fresh model and a fresh optimiser state
        assert int(after.learners.age[p]) == 0
        assert int(got[1][0].count) == 0
        assert P.tree_rel_error(got[0], expected.params) > 1e-2
      else:
        assert int(after.learners.age[p]) == int(state.learners.age[p]) + 2
        assert P.tree_rel_error(got, (expected.params,
                                      expected.opt_state)) < 1e-12


@pytest.mark.parametrize("strategy", [
    pytest.param("standard", marks=pytest.mark.slow),
    pytest.param("mixflow", marks=pytest.mark.slow),
    pytest.param("mixflow+segments=2/1", marks=pytest.mark.slow)])
def test_window_meta_gradient_is_the_engines(population, strategy):
  """The meta-gradient of a meta-step equals `meta_value_and_grad` called
  with each learner's carried (theta, s), averaged over the learners (with
  nested segments too: the carried state enters the first segment)."""
  trainer, _, state, batch = population
  with jax.enable_x64(True):
    trainer = trainer.with_strategy(strategy)
    value, grads = trainer.meta_value_and_grad(state.eta, batch,
                                               state.learners)
    f = trainer.functional
    engine = metaflow.meta_value_and_grad(f.inner_loss, f.outer_loss,
                                          f.optimizer, 2, strategy)
    values, per_learner = [], []
    for p in range(4):
      inner, outer = trainer.task.split_episode(
          jax.tree.map(lambda x: x[p], batch), 2)
      theta, s = jax.tree.map(lambda x: x[p], (state.learners.params,
                                               state.learners.opt_state))
      v, g = engine(state.eta, theta, inner, outer, s)
      values.append(v)
      per_learner.append(g)
    mean = jax.tree.map(lambda *g: sum(g) / 4, *per_learner)
  assert abs(float(value - sum(values) / 4)) <= 1e-10 * abs(float(value))
  assert P.tree_rel_error(grads, mean) < 1e-10
  # The carried state matters: from fresh learners the gradient differs.
  _, fresh = trainer.meta_value_and_grad(state.eta, batch)
  assert P.tree_rel_error(fresh, mean) > 1e-3


@pytest.mark.slow
def test_every_strategy_runs_online(x64):
  """Loss weights (which every estimator sees) from carried learners: the
  exact strategies equal standard; implicit and first_order give finite,
  non-zero meta-gradients."""
  task = Fresh(lr="fixed", loss_weights=True)
  settings = dict(online=metaflow.Online(population=2, lifetime=4))
  trainer = make(task, **settings)
  batches = trainer.train_batches()
  state = trainer.warm_up(trainer.init_state(), batches)
  errors = P.trainer_strategy_errors(
      lambda s: make(task, strategy=s, **settings), learners=state.learners)
  for strategy, (value_error, grad_error) in errors.items():
    assert value_error < 1e-12 and grad_error < 1e-9, strategy
  # implicit sees loss weights, first_order learning rates (not the other).
  for strategy, approximate_task in (("implicit", task),
                                     ("first_order", Fresh())):
    approximate = make(approximate_task, strategy=strategy, **settings)
    assert approximate.strategy.mode == strategy
    batches = approximate.train_batches()
    state, metrics = approximate.step(
        approximate.warm_up(approximate.init_state(), batches), next(batches))
    assert np.isfinite(float(metrics["outer_loss"]))
    assert 0 < float(metrics["meta_grad_norm"]) < np.inf, strategy


def test_diverged_learner_is_replaced():
  params = {"w": jnp.array([[1.0], [jnp.nan], [3.0]])}
  opt_state = {"count": jnp.array([5, 5, 5])}
  fresh = lambda: ({"w": jnp.zeros((3, 1))},
                   {"count": jnp.zeros(3, jnp.int32)})
  out = online.advance(params, opt_state, jnp.array([0, 0, 6]), 2, 8, fresh)
  np.testing.assert_array_equal(out.age, [2, 0, 0])  # NaN; lifetime
  np.testing.assert_array_equal(out.params["w"][:, 0], [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(out.opt_state["count"], [5, 0, 0])
  np.testing.assert_array_equal(
      metaflow.Online(3, 12).initial_ages(2), [0, 4, 8])
  np.testing.assert_array_equal(
      metaflow.Online(4, 10).initial_ages(5), [0, 0, 5, 5])
  np.testing.assert_array_equal(
      metaflow.Online(4, 10, 40).initial_ages(5, np.array([10, 40, 20, 40])),
      [0, 10, 10, 30])


def test_drawn_lifetimes_are_log_uniform_in_whole_windows():
  """W = floor(exp(u)), u uniform in [log 1, log 17): P(W <= k) =
  log(k + 1) / log 17 for lives of 1 to 16 windows of T=4."""
  spec = metaflow.Online(4000, 4, 64)
  lives = np.asarray(spec.draw_lifetimes(jax.random.key(0), 4))
  assert lives.min() == 4 and lives.max() == 64 and np.all(lives % 4 == 0)
  for k in (1, 3, 7):
    expected = np.log(k + 1) / np.log(17)
    assert abs(np.mean(lives <= 4 * k) - expected) < 0.03, k
  assert not metaflow.Online(4, 8).drawn
  assert metaflow.Online(4, 8, 8).drawn is False


def test_drawn_lifetimes_end_each_life_and_are_redrawn():
  params = {"w": jnp.array([[1.0], [2.0], [3.0]])}
  opt_state = {"count": jnp.array([5, 5, 5])}
  fresh = lambda: ({"w": jnp.zeros((3, 1))},
                   {"count": jnp.zeros(3, jnp.int32)})
  out = online.advance(params, opt_state, jnp.array([2, 4, 0]), 2,
                       jnp.array([4, 8, 6]), fresh,
                       lambda: jnp.array([10, 12, 14]))
  np.testing.assert_array_equal(out.age, [0, 6, 2])  # learner 0 reached 4
  np.testing.assert_array_equal(out.lifetime, [10, 8, 6])
  np.testing.assert_array_equal(out.params["w"][:, 0], [0.0, 2.0, 3.0])
  # In the trainer: staggered by their own lifetimes, each younger than it.
  trainer = make(online=metaflow.Online(population=3, lifetime=2,
                                        lifetime_max=8))
  state = trainer.init_state()
  lives = np.asarray(state.learners.lifetime)
  np.testing.assert_array_equal(
      np.asarray(trainer.warm_up(state, trainer.train_batches()
                                 ).learners.age),
      trainer.program.learning.initial_ages(2, lives))
  result = trainer.fit(6, log_every=6, console=False)
  ages, lives = (np.asarray(result.state.learners.age),
                 np.asarray(result.state.learners.lifetime))
  assert np.all(ages < lives) and np.all(np.isin(lives, [2, 4, 6, 8]))


def test_population_memory_is_reported_in_the_static_part():
  """Shapes only: the online step's report counts the P learners' (theta,
  s, age) as population bytes (held in the step's arguments), and its
  stored carries are those of an offline step with B = P episodes."""
  offline = make(meta_batch_size=4, shapes_only=True)
  on = make(online=metaflow.Online(population=4, lifetime=8),
            shapes_only=True)
  a, b = (t.compiled_memory(whole_step=True) for t in (offline, on))
  assert a.population_bytes is None
  theta = on.theta_init
  eta = on.layout.state_shapes.eta
  state = jax.eval_shape(
      lambda eta, theta: on.functional.optimizer(eta).init(theta), eta, theta)
  carry = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      (theta, state)))
  assert b.population_bytes == 4 * carry + 4 * 4  # and int32 ages
  assert b.static_bytes == a.static_bytes
  assert b.argument_bytes - a.argument_bytes >= b.population_bytes
  assert "population" in str(b) and isinstance(b, MemoryReport)


@pytest.mark.parametrize("settings, match", [
    (dict(population=-1), "Online.population must be an int >= 0"),
    (dict(population=2, lifetime=3), r"multiple of num_inner_steps \(T=2\)"),
    (dict(population=2, lifetime=1), "at least T"),
    (dict(population=2, lifetime=4, lifetime_max=2),
     r"lifetime_max \(2\) must be 0 \(every life is lifetime long\) or at "
     r"least lifetime \(4\)"),
    (dict(population=2, lifetime=2, lifetime_max=5),
     r"Online.lifetime_max \(N=5\) must be a multiple of num_inner_steps"),
    (dict(population=2, lifetime=4, meta_batch_size=3),
     r"meta_batch_size \(3\) must equal the online population \(2\)"),
    (dict(population=2, lifetime=4, task=Fresh(learn_init=True)),
     "cannot meta-learn an initialisation"),
    (dict(population=2, lifetime=4, task=Fresh(lr="per_step")),
     "per-step learned learning rates"),
])
def test_bad_online_settings_are_refused(settings, match):
  settings = dict(settings)
  kwargs = {k: settings.pop(k) for k in ("meta_batch_size", "task")
            if k in settings}
  with pytest.raises(ValueError, match=match):
    make(online=metaflow.Online(**settings), shapes_only=True, **kwargs)
  with pytest.raises(TypeError, match="metaflow.Online"):
    make(online={"population": 2}, shapes_only=True)


@pytest.mark.slow
@pytest.mark.mesh
def test_population_on_a_mesh_equals_one_device(x64):
  """lm_data_rater online, MixFlow-MG on a data=2 x fsdp=2 mesh (the
  learners' theta and s split over fsdp, the sequences over all four
  devices) against standard on one device, through the softmax over the
  batch and the sequence rater: the warm-up and three meta-steps give the
  same eta and learners (the strategy's exactness and the sharding's at
  once), and every part of the rater learns. (Whole learners split over
  the devices like episodes are the episodes' layout, test_sharding.)"""
  import tasks  # noqa: F401  (registers lm_data_rater)
  from metaflow import sharding
  from metaflow.task import create_task

  def run(strategy, device_mesh):
    trainer = BilevelTrainer(
        create_task("lm_data_rater", preset="nano", seq_len=16, batch_size=4),
        strategy=strategy, num_inner_steps=2, num_eval_tasks=2,
        online=metaflow.Online(population=2, lifetime=4), mesh=device_mesh)
    batches = trainer.train_batches()
    state = trainer.warm_up(trainer.init_state(), batches)
    for _ in range(3):
      state, _ = trainer.step(state, next(batches))
    return trainer, state

  _, single = run("standard", ONE_DEVICE)
  trainer, sharded = run("mixflow", sharding.make_mesh(
      data=2, fsdp=2, devices=jax.devices()[:4]))
  assert P.tree_rel_error(sharded.eta, single.eta) < 1e-9
  assert P.tree_rel_error(sharded.learners, single.learners) < 1e-9
  initial = trainer.init_state().eta
  for before, after in zip(jax.tree.leaves(initial),
                           jax.tree.leaves(sharded.eta)):
    assert float(jnp.max(jnp.abs(np.asarray(after) - np.asarray(before)))
                 ) > 0
  embedding = sharded.learners.params["embed"]["embedding"]  # [P, 256, 32]
  assert embedding.sharding.is_equivalent_to(
      trainer.state_shardings.learners.params["embed"]["embedding"], 3)
  assert embedding.sharding.shard_shape(embedding.shape) == (2, 256, 16)


@pytest.mark.slow
def test_learned_rates_beat_their_initial_ones():
  """lm_learned_lr online (2 learners living 40 inner steps, windows of T=4)
  from per-tensor rates of 3e-4, well below what the nano model trains best
  with: 40 meta-steps raise them (to about 1e-3), and a fresh model trained
  120 steps with the learned rates frozen ends below one trained with the
  initial rates. (From a well-chosen initial rate, the rates fall instead and
  lose over a long run: README, "Learned learning rates over a whole run".)"""
  import tasks  # noqa: F401  (registers lm_learned_lr)
  from metaflow.task import create_task

  task = create_task("lm_learned_lr", preset="nano", seq_len=32, batch_size=4,
                     inner_lr=3e-4, per_step=False, resample_init=True)
  trainer = BilevelTrainer(task, num_inner_steps=4, num_eval_tasks=4, seed=0,
                           outer_optimizer=optax.adam(3e-2), mesh=ONE_DEVICE,
                           online=metaflow.Online(population=2, lifetime=40))
  batches = trainer.train_batches()  # (fit would also compile evaluations)
  state = trainer.warm_up(trainer.init_state(), batches)
  for _ in range(40):
    state, _ = trainer.step(state, next(batches))
  eta = state.eta
  initial = trainer.init_state().eta
  rates = np.exp(np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(eta.log_lr)]))
  assert np.all(rates > 3e-4), rates
  learned = trainer.inner_curve(eta, 120, eval_every=120)
  baseline = trainer.inner_curve(initial, 120, eval_every=120)
  assert learned[0][1] == baseline[0][1]  # the same fresh model at step 0
  assert learned[-1][1] < baseline[-1][1] - 0.2, (learned, baseline)
