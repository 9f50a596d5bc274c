"""The language-model tasks: the exact strategies' meta-gradients equal
standard's (float64, tiny preset), meta-training lowers the held-out outer
loss, MixFlow-MG needs several times less compiled memory than standard on
lm_loss_weighting, and bad input is one clear message.

The quick tier (``-m "not slow"``) checks the tasks' meta-parameters here
and MixFlow-MG against standard on lm_loss_weighting (eta inside L, the most
involved of the three) in test_attention (with blockwise attention against
dense); the strategies with dense attention (float64 and float32),
meta-training, the memory ratio and resuming are slow (resuming and memory
in general: test_resume, test_memory)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaflow
from metaflow import data
from metaflow.task import create_task
from metaflow.trainer import BilevelTrainer
from tasks.lm import tasks as lm_tasks
from tests import problems as P
from tests.test_resume import assert_trees_identical, next_batch_after


def _trainer(name, strategy="mixflow", num_steps=2, meta_batch_size=1,
             **settings):
  task = create_task(name, **{"preset": "tiny", "seq_len": 32,
                              "batch_size": 2, **settings})
  return BilevelTrainer(task, strategy=strategy, num_inner_steps=num_steps,
                        meta_batch_size=meta_batch_size, num_eval_tasks=4,
                        mesh=P.ONE_DEVICE)


def _strategy_errors(name, strategies=None, **settings):
  """Exact strategies (default: all) against standard
  (`problems.trainer_strategy_errors`, default float dtype)."""
  return P.trainer_strategy_errors(lambda s: _trainer(name, s, **settings),
                                   strategies=strategies)


def _assert_float64_exact(errors):
  for strategy, (value_error, grad_error) in errors.items():
    assert value_error < 1e-12, (strategy, value_error)
    assert grad_error < 1e-9, (strategy, grad_error)


#: The paper's best exact strategy: forward-over-reverse, remat, saved inner
#: gradients (every option of `metaflow.estimators.Exact` but segments and
#: micro-batches, which test_segments_microbatches checks).
BEST = "mixflow+remat+saved_inner_grads"


@pytest.mark.slow
@pytest.mark.parametrize("name, strategies", [
    ("lm_loss_weighting", None),   # eta inside L: every exact strategy
    ("lm_learned_lr", ("standard", BEST)),
    ("lm_maml", ("standard", BEST)),
])
def test_strategies_match_standard_float64(name, strategies, x64):
  """float64, one program per task. Every exact strategy on
  lm_loss_weighting (the most involved: eta inside L, the weights a
  softmax over the batch); on the other two, MixFlow-MG with the paper's
  memory options (each strategy's code is the same on every task; what
  differs is where eta enters, which these cover; plain MixFlow-MG on a
  mesh against standard on one device, on each task, is test_sharding's
  test_language_models_on_meshes_are_exact). The quick tier's
  check is test_attention's test_transformer_meta_gradient_unchanged
  (MixFlow-MG with blockwise attention against standard with dense)."""
  errors = _strategy_errors(name, strategies)
  assert set(errors) == ({s.name for s in metaflow.exact_strategies()}
                         - {"standard"} if strategies is None
                         else set(strategies) - {"standard"})
  _assert_float64_exact(errors)


@pytest.mark.slow
def test_mixflow_matches_standard_float32():
  """float32, lm_loss_weighting (measured: every exact strategy within
  3.1e-7 relative on each of the three tasks; float64 above checks them
  all, here the two that differ most in the order of operations)."""
  errors = _strategy_errors("lm_loss_weighting", ("standard", BEST))
  for strategy, (value_error, grad_error) in errors.items():
    assert value_error < 1e-6, (strategy, value_error)
    assert grad_error < 1e-5, (strategy, grad_error)


def test_learned_rates_are_per_layer_tensor():
  trainer = _trainer("lm_learned_lr", per_step=True, num_steps=3)
  log_lr = trainer.init_state().eta.log_lr
  depth = trainer.task.model_config.depth
  assert log_lr["blocks"]["attn"]["query"]["kernel"].shape == (3, depth, 1, 1)
  assert log_lr["head"]["kernel"].shape == (3,)
  np.testing.assert_allclose(np.exp(log_lr["head"]["kernel"]),
                             trainer.task.inner_lr, rtol=1e-6)


def test_each_layer_has_its_own_rate():
  """A zero rate for block 0 only: block 0 stays put, block 1 moves."""
  trainer = _trainer("lm_learned_lr")
  eta = trainer.init_state().eta
  eta = eta._replace(log_lr={**eta.log_lr, "blocks": jax.tree.map(
      lambda x: x.at[0].set(-jnp.inf), eta.log_lr["blocks"])})
  episode = data.take(trainer.task.episodes("train", 0, 2), 1)
  f = trainer.functional
  adapt = metaflow.inner_loop(f.inner_loss, f.optimizer,
                              trainer.num_inner_steps, "standard")
  theta_T = adapt(eta, trainer.theta_init, episode["inner"][0]).params
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)).max(axis=tuple(
      range(1, a.ndim))), theta_T["blocks"], trainer.theta_init["blocks"])
  for leaf in jax.tree.leaves(moved):  # [depth]: largest change per block
    assert leaf[0] == 0 and leaf[1] > 0, leaf


def test_context_windows():
  tokens = jnp.arange(1, 7)[None]  # [1, L+1 = 6]
  windows = lm_tasks.context_windows(tokens, 3)
  assert windows.shape == (1, 5, 3)
  # Position i predicts tokens[i+1]; its window is tokens[i+1], tokens[i], ...
  np.testing.assert_array_equal(windows[0, 0], [2, 1, 0])
  np.testing.assert_array_equal(windows[0, 4], [6, 5, 4])


def test_initial_loss_weights_are_one():
  trainer = _trainer("lm_loss_weighting")
  eta = trainer.init_state().eta
  tokens = jnp.asarray(
      data.take(trainer.task.episodes("train", 0, 2), 1)["outer"][0])
  weights = trainer.spec.view(eta).loss_weights(
      lm_tasks.context_windows(tokens, trainer.task.context))
  assert weights.shape == (2, 32)
  np.testing.assert_allclose(weights, 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("name, outer_lr, steps", [
    ("lm_learned_lr", 3e-2, 40), ("lm_maml", 1e-3, 40),
    ("lm_loss_weighting", 3e-3, 40)])
def test_meta_training_lowers_held_out_outer_loss(name, outer_lr, steps):
  task = create_task(name, preset="nano", seq_len=64, batch_size=4)
  trainer = BilevelTrainer(task, num_inner_steps=4, meta_batch_size=1,
                           num_eval_tasks=8, mesh=P.ONE_DEVICE,
                           outer_optimizer=optax.adam(outer_lr))
  result = trainer.fit(steps, log_every=steps, console=False)
  before = result.initial_eval["outer_loss"]
  after = result.final_eval["outer_loss"]
  assert after < before, (before, after)


@pytest.mark.slow
def test_mixflow_memory_on_loss_weighting():
  """The acceptance setting: tiny preset, T=4, sequences of 512, B=4."""
  reports = {s: _trainer("lm_loss_weighting", s, num_steps=4, seq_len=512,
                         batch_size=4).compiled_memory()
             for s in ("standard", "mixflow")}
  ratio = reports["standard"].temp_bytes / reports["mixflow"].temp_bytes
  assert ratio >= 3, (ratio, reports)


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
  """Stop after 2 meta-steps and resume: the same state (eta, outer Adam,
  RNG of the resampled theta0) and text position as 4 steps straight."""
  def trainer():
    return BilevelTrainer(
        create_task("lm_learned_lr", preset="nano", seq_len=32, batch_size=2),
        num_inner_steps=2, meta_batch_size=2, num_eval_tasks=2,
        outer_optimizer=optax.adam(1e-2), mesh=P.ONE_DEVICE)
  straight = trainer().fit(4, tmp_path / "straight", checkpoint_every=2,
                           console=False)
  trainer().fit(2, tmp_path / "resumed", checkpoint_every=2, console=False)
  resumed = trainer().fit(4, tmp_path / "resumed", checkpoint_every=2,
                          console=False)
  assert_trees_identical(resumed.state, straight.state)
  t = trainer()
  assert_trees_identical(next_batch_after(tmp_path / "straight", t),
                         next_batch_after(tmp_path / "resumed", t))
