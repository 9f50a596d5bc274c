"""Sharding over devices (`metaflow.sharding`, 8 host devices in-process):
the mesh and the rules, batches laid out per device, meta-gradients on 8
devices equal to one device's in float64 for every layout, the bug class of
mixed episodes caught, per-device memory divided by fsdp, and checkpoints
that move between meshes.

The quick tier (``-m "not slow"``) keeps the mesh and rule checks, the
exactness of 8 distinct episodes on data=4 x fsdp=2 (float64, every kind of
meta-parameter), the language model's layout, fit and evaluate on a mesh;
the per-task, per-strategy language-model runs on meshes, the fsdp memory
split and the fsdp=8 language-model run that resumes on one device are
slow."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec

import metaflow
from metaflow import sharding
from metaflow.trainer import BilevelTrainer
from tasks.lm import model as lm_model
from tests import problems as P
from tests.test_trainer import Regression, reference_value_and_grad

# Every test here lays arrays over the 8 host devices of the test process.
pytestmark = pytest.mark.mesh

MESHES = {"fsdp=8": dict(data=1, fsdp=8),
          "data=2 x fsdp=4": dict(data=2, fsdp=4)}


def test_eight_devices():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"


# ------------------------------------------------------------------- mesh
@pytest.mark.parametrize("kwargs,shape", [
    ({}, (8, 1)), ({"fsdp": 8}, (1, 8)), ({"data": 2, "fsdp": -1}, (2, 4)),
    ({"data": -1, "fsdp": 2}, (4, 2)), ({"data": 4, "fsdp": 2}, (4, 2))])
def test_make_mesh(kwargs, shape):
  mesh = sharding.make_mesh(**kwargs)
  assert mesh.axis_names == ("data", "fsdp")
  assert (mesh.shape["data"], mesh.shape["fsdp"]) == shape
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  one = sharding.make_mesh(devices=jax.devices()[:1])
  assert one.size == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"data": 3}, "data=3 x fsdp=1 needs 3 devices, but there are 8"),
    ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
    ({"data": -1, "fsdp": 3}, "fsdp=3 does not divide the 8 devices"),
    ({"data": 0}, "mesh data must be an int >= 1 or -1"),
    ({"fsdp": 2.0}, "mesh fsdp must be an int"),
])
def test_make_mesh_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(**kwargs)


def test_mesh_must_have_the_two_axes():
  other = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
  with pytest.raises(TypeError, match="axes \\('data', 'fsdp'\\)"):
    BilevelTrainer(Regression(), meta_batch_size=8, mesh=other)


# ------------------------------------------------------------------ rules
def test_transformer_rules_split_the_width_axis():
  config = lm_model.preset("tiny")
  theta = nnx_params(config)
  specs = sharding.param_specs(theta, sharding.make_mesh(fsdp=8),
                               lm_model.PARTITION_RULES)
  flat = {sharding.path_name(p): s for p, s in
          jax.tree_util.tree_leaves_with_path(
              specs, is_leaf=lambda x: isinstance(x, PartitionSpec))}
  assert flat["embed/embedding"] == PartitionSpec(None, "fsdp")
  assert flat["blocks/attn/query/kernel"] == PartitionSpec(None, "fsdp", None)
  assert flat["blocks/attn/out/kernel"] == PartitionSpec(None, None, "fsdp")
  assert flat["blocks/mlp/down/kernel"] == PartitionSpec(None, None, "fsdp")
  assert flat["head/kernel"] == PartitionSpec("fsdp", None)
  # Every tensor kind has its rule: the table covers the whole model.
  assert all(s != PartitionSpec() for s in flat.values())


def nnx_params(config):
  from flax import nnx
  abstract = nnx.eval_shape(lambda: lm_model.Transformer(config, nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def test_rule_that_the_mesh_does_not_divide():
  theta = nnx_params(lm_model.preset("tiny"))  # width 64
  mesh = jax.make_mesh((1, 8), ("data", "fsdp"),
                       axis_types=(AxisType.Auto,) * 2)
  rules = ((r"^head/kernel$", PartitionSpec(None, ("data", "fsdp"))),)
  sharding.param_specs(theta, mesh, rules)  # 256 / 8: fine
  bad = {"w": jax.ShapeDtypeStruct((6, 64), jnp.float32)}
  with pytest.raises(ValueError, match=r"parameter w of shape \[6, 64\]: axis "
                     r"0 \(6\) is not divisible by the 8 devices"):
    sharding.param_specs(bad, mesh, ((r"w", PartitionSpec("fsdp")),))
  with pytest.raises(ValueError, match="more axes than the parameter has"):
    sharding.param_specs(bad, mesh,
                         ((r"w", PartitionSpec(None, None, "fsdp")),))


def test_default_spec():
  assert sharding.default_spec((4, 4), 8) == PartitionSpec()  # small
  assert sharding.default_spec((256, 512), 8) == PartitionSpec(None, "fsdp")
  assert sharding.default_spec((1024, 96), 8) == PartitionSpec("fsdp")
  assert sharding.default_spec((129, 255), 8) == PartitionSpec()  # indivisible
  assert sharding.default_spec((256, 512), 1) == PartitionSpec()


# ---------------------------------------------------------------- batches
def test_meta_batch_the_mesh_does_not_divide():
  with pytest.raises(ValueError, match=(
      r"^meta_batch_size 6 is not divisible by the 8 devices of the mesh "
      r"\(data=8 x fsdp=1\): every device computes on an equal share. Use a "
      r"multiple of 8 \(--config.meta_batch_size\) or fewer devices")):
    BilevelTrainer(Regression(), meta_batch_size=6)


def test_lm_batch_the_mesh_does_not_divide():
  task = metaflow.create_task("lm_maml", preset="nano", seq_len=16,
                              batch_size=4)
  with pytest.raises(ValueError, match=(
      r"the number of examples per batch .* 4 is not divisible by the 8 "
      r"devices .* multiple of 8 \(the built-in language-model tasks: "
      r"--config.task.batch_size\)")):
    BilevelTrainer(task, meta_batch_size=1, mesh=sharding.make_mesh(fsdp=8))


def test_process_share_of_one_process():
  assert sharding.process_share(sharding.make_mesh(), 16) == ((0, 16),)


@pytest.fixture(scope="module")
def episodic_trainers():
  """Regression with every kind of meta-parameter (init, per-tensor LRs, a
  loss-weight rater, a user weight decay), float64, 8 distinct episodes per
  meta-batch: on one device, and split over data=4 x fsdp=2."""
  with jax.enable_x64(True):
    task = Regression(lr="tensor", loss_weights=True, weight_decay=True)
    made = {name: BilevelTrainer(task, strategy="mixflow", num_inner_steps=2,
                                 meta_batch_size=8, num_eval_tasks=12,
                                 mesh=mesh, outer_optimizer=optax.adam(1e-2))
            for name, mesh in (("one", P.ONE_DEVICE),
                               ("split", sharding.make_mesh(data=4, fsdp=2)))}
    yield made


def test_episodes_are_laid_out_one_per_device(episodic_trainers):
  trainer = episodic_trainers["split"]
  batch = next(trainer.train_batches())
  x = trainer.layout.global_batch(batch)["support"]["x"]
  assert x.shape == batch["support"]["x"].shape
  for shard in x.addressable_shards:
    assert shard.data.shape[0] == 1  # one episode per device
    np.testing.assert_array_equal(shard.data,
                                  batch["support"]["x"][shard.index])


@pytest.mark.slow
def test_episodes_split_over_devices_are_exact(episodic_trainers, x64):
  """The meta-gradient of 8 different episodes, one per device, equals the
  Python-loop reference and the one-device trainer (float64)."""
  one, split = episodic_trainers["one"], episodic_trainers["split"]
  eta = one.init_state().eta
  batch = next(one.train_batches())
  value, grads = split.meta_value_and_grad(eta, batch)
  ref_value, ref_grads = reference_value_and_grad(one, eta, batch)
  np.testing.assert_allclose(value, ref_value, rtol=1e-12)
  assert P.tree_rel_error(grads, ref_grads) < 1e-10
  assert P.tree_rel_error(grads, one.meta_value_and_grad(eta, batch)[1]) < 1e-12
  # The episodes differ: mixing them would change the result (see below).
  per_episode = [reference_value_and_grad(
      one, eta, jax.tree.map(lambda x: x[b:b + 1].repeat(8, 0), batch))[1]
                 for b in (0, 1)]
  assert P.tree_rel_error(per_episode[0], per_episode[1]) > 0.1


@pytest.mark.slow
def test_fit_and_evaluate_on_the_mesh(episodic_trainers, x64):
  results = {name: t.fit(3, console=False)
             for name, t in episodic_trainers.items()}
  assert P.tree_rel_error(results["split"].state.eta,
                          results["one"].state.eta) < 1e-12
  for key, value in results["one"].final_eval.items():
    np.testing.assert_allclose(results["split"].final_eval[key], value,
                               rtol=1e-12)
  # Evaluation: 12 episodes in chunks of 8 (the last one partly padding).
  assert episodic_trainers["split"].eval_episodes(
      "validation", 12)["support"]["x"].shape[:2] == (2, 8)


@pytest.mark.parametrize("strategy", ["standard", "mixflow"])
def test_mixed_episodes_are_caught(strategy, x64):
  """The bug class this layout guards against, shown on purpose: inside
  ``shard_map`` the gradient of an input replicated over the mesh axis is
  summed over it, so a replicated initialisation shared by per-device
  episodes silently mixes their inner gradients. The comparison used for
  the trainer above (mean meta-gradient of distinct episodes against one
  device) fails for that program and passes once theta0 is made per-device
  (``jax.lax.pcast(..., to="varying")``)."""
  n, steps = 8, 2
  problems = [P.make_problem("init", "sgd", steps, jnp.float64, seed=s)
              for s in range(n)]
  inner_loss, outer_loss, optimizer, init_params, eta = problems[0][:5]
  inner = jax.tree.map(lambda *x: jnp.stack(x), *[p[6] for p in problems])
  outer = jax.tree.map(lambda *x: jnp.stack(x), *[p[7] for p in problems])

  def meta_gradient(init):
    return metaflow.meta_value_and_grad(inner_loss, outer_loss, optimizer,
                                        steps, strategy, init_params=init)

  reference = jax.tree.map(lambda g: jnp.mean(g, 0), jax.vmap(
      meta_gradient(init_params), in_axes=(None, None, 0, 0))(
          eta, None, inner, outer)[1])
  mesh = jax.make_mesh((n,), ("episodes",), axis_types=(AxisType.Auto,))

  def on_devices(per_device_theta0: bool):
    def body(eta, inner, outer):
      if per_device_theta0:
        eta = jax.lax.pcast(eta, "episodes", to="varying")
      local = jax.tree.map(lambda x: x[0], (inner, outer))
      _, grads = meta_gradient(init_params)(eta, None, *local)
      return jax.lax.pmean(grads, "episodes")
    return jax.jit(jax.shard_map(
        body, mesh=mesh, out_specs=PartitionSpec(),
        in_specs=(PartitionSpec(), PartitionSpec("episodes"),
                  PartitionSpec("episodes"))))(eta, inner, outer)

  assert P.tree_rel_error(on_devices(False), reference) > 1e-2  # mixed
  assert P.tree_rel_error(on_devices(True), reference) < 1e-12


# ------------------------------------------------------- language models
LM_SETTINGS = dict(preset="nano", seq_len=16, batch_size=8)


@pytest.fixture(scope="module")
def lm_reference():
  """One-device runs (float64), by (task, strategy): (eta, evaluation).

  Every exact strategy (segments and microbatches included) computes the
  same meta-gradient (test_lm_tasks: to 1e-9 in float64), so one run of
  ``standard`` is the reference of all of them: a mesh run of mixflow is
  held to a one-device run of standard, the strategy's exactness and the
  sharding's at once, and each task compiles one reference."""
  cache = {}

  def get(task, strategy):
    if metaflow.Strategy.parse(strategy).exact:
      strategy = "standard"
    if (task, strategy) not in cache:
      cache[task, strategy] = _lm_run(task, strategy, P.ONE_DEVICE)
    return cache[task, strategy]
  return get


def _lm_run(task, strategy, mesh, steps=2):
  with jax.enable_x64(True):
    trainer = BilevelTrainer(
        metaflow.create_task(task, **LM_SETTINGS), strategy=strategy,
        num_inner_steps=2, meta_batch_size=1, num_eval_tasks=2, mesh=mesh,
        outer_optimizer=optax.adam(3e-3))
    result = trainer.fit(steps, console=False)
    return result.state.eta, result.final_eval


# Sequences split 8 ways with parameters replicated (data=8) is the
# data=2 x fsdp=4 case's split of the batch without its parameter split;
# lm_maml mixflow on fsdp=8 is test_checkpoint_moves_between_meshes (its
# fsdp=8 run continued on one device equals a one-device run), the quick
# tier's language model on a mesh. Standard itself on a mesh: its compiled
# per-device memory, test_fsdp_divides_the_per_device_memory[standard].
@pytest.mark.slow
@pytest.mark.parametrize("task,strategy,mesh", [
    ("lm_maml", "mixflow", "data=2 x fsdp=4"),
    ("lm_learned_lr", "mixflow", "fsdp=8"),        # theta0 drawn in the step
    ("lm_loss_weighting", "mixflow", "data=2 x fsdp=4"),  # eta enters L
    ("lm_loss_weighting", "implicit", "data=2 x fsdp=4"),  # CG on shards
    # Chunks of sharded sequences, segments over fsdp-split carries.
    ("lm_loss_weighting", "mixflow+segments=1+microbatches=2",
     "data=2 x fsdp=4"),
])
def test_language_models_on_meshes_are_exact(task, strategy, mesh,
                                             lm_reference):
  eta, evaluation = _lm_run(task, strategy, sharding.make_mesh(**MESHES[mesh]))
  ref_eta, ref_evaluation = lm_reference(task, strategy)
  # CG (implicit) amplifies the rounding of the sharded reductions by up to
  # the condition number of H_tt + lambda_d I: 1.5e-9 measured on one CPU
  # (AMD EPYC), below 1e-9 on another.
  tolerance = 1e-8 if strategy == "implicit" else 1e-9
  assert P.tree_rel_error(eta, ref_eta) < tolerance
  np.testing.assert_allclose(evaluation["outer_loss"],
                             ref_evaluation["outer_loss"], rtol=1e-9)


def test_lm_sequences_and_parameters_are_split():
  """B sequences over all 8 devices; theta, the learned init and the outer
  Adam state over fsdp; the rest of eta replicated."""
  with jax.enable_x64(True):
    trainer = BilevelTrainer(
        metaflow.create_task("lm_maml", **LM_SETTINGS), num_inner_steps=2,
        meta_batch_size=1, mesh=sharding.make_mesh(data=2, fsdp=4))
    batch = trainer.layout.global_batch(next(trainer.train_batches()))
    assert batch["inner"].sharding.spec == PartitionSpec(
        None, None, ("data", "fsdp"))
    assert batch["inner"].addressable_shards[0].data.shape == (1, 2, 1, 17)
    state = trainer.init_state()
    kernel = state.eta.init["blocks"]["mlp"]["up"]["kernel"]  # [2, 32, 128]
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (2, 8, 128)
    adam = state.opt_state.inner_state[0]  # inside optax.apply_if_finite
    mu = adam.mu.init["blocks"]["mlp"]["up"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
    assert state.rng.sharding.is_fully_replicated
    assert state.opt_state.notfinite_count.sharding.is_fully_replicated


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["standard", "mixflow"])
def test_fsdp_divides_the_per_device_memory(strategy):
  """Compiled per-device memory of one meta-gradient (shapes only) on the
  fsdp=8 mesh against one device: the stored carries are split 8 ways and
  the working set at least 4 ways (the README's table does this for
  chinchilla_57m at L=2048)."""
  task = metaflow.create_task("lm_maml", preset="tiny", seq_len=256,
                              batch_size=8)
  reports = {name: BilevelTrainer(task, strategy=strategy, num_inner_steps=2,
                                  meta_batch_size=1, mesh=mesh
                                  ).compiled_memory()
             for name, mesh in (("one", P.ONE_DEVICE),
                                ("fsdp", sharding.make_mesh(fsdp=8)))}
  one, split = reports["one"], reports["fsdp"]
  assert split.static_bytes * 6 <= one.static_bytes
  assert split.temp_bytes * 4 <= one.temp_bytes


@pytest.mark.slow  # the quick tier's resume: test_resume, test_survival
def test_checkpoint_moves_between_meshes(tmp_path):
  """A run checkpointed on fsdp=8 resumes on one device (Orbax restores
  into the new shardings) and ends where a one-device run ends."""
  def trainer(mesh):
    return BilevelTrainer(metaflow.create_task("lm_maml", **LM_SETTINGS),
                          num_inner_steps=2, meta_batch_size=1,
                          num_eval_tasks=2, mesh=mesh,
                          outer_optimizer=optax.adam(3e-3))
  with jax.enable_x64(True):
    split = trainer(sharding.make_mesh(fsdp=8))
    split.fit(2, tmp_path / "moved", console=False)
    # One one-device trainer for both runs (`fit` keeps no state between
    # calls): its programs are traced and compiled once.
    one = trainer(P.ONE_DEVICE)
    moved = one.fit(4, tmp_path / "moved", console=False)
    straight = one.fit(4, console=False)
    # eta of one mesh is evaluated on another (placed in its layout).
    evaluation = split.evaluate(straight.state.eta)
  assert moved.state.eta.init["head"]["kernel"].sharding.mesh.size == 1
  assert P.tree_rel_error(moved.state.eta, straight.state.eta) < 1e-9
  np.testing.assert_array_equal(moved.state.rng, straight.state.rng)
  np.testing.assert_allclose(evaluation["outer_loss"],
                             straight.final_eval["outer_loss"], rtol=1e-9)
