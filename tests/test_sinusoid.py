"""sinusoid_maml: episodes match the task's definition, and MAML meta-training
at least halves the held-out post-adaptation MSE (K=10, 5 inner SGD steps)."""

import math

import numpy as np
import optax
import pytest

from metaflow.task import create_task
from metaflow.trainer import BilevelTrainer
from tasks.sinusoid import SinusoidSampler
from tests import problems as P
from tests.problems import ONE_DEVICE


def test_episode_is_a_sinusoid():
  episode = SinusoidSampler(10, 20)(np.random.default_rng(0))
  assert episode["support"]["x"].shape == (10, 1)
  assert episode["query"]["y"].shape == (20, 1)
  x = np.concatenate([episode["support"]["x"], episode["query"]["x"]])[:, 0]
  y = np.concatenate([episode["support"]["y"], episode["query"]["y"]])[:, 0]
  assert np.all((-5 <= x) & (x <= 5))
  # One amplitude and phase fit all 30 points: y = a sin(x) + b cos(x).
  basis = np.stack([np.sin(x), np.cos(x)], 1)
  (a, b), *_ = np.linalg.lstsq(basis, y, rcond=None)
  np.testing.assert_allclose(basis @ [a, b], y, atol=1e-5)
  amplitude, phase = math.hypot(a, b), math.atan2(-b, a)
  assert 0.1 <= amplitude <= 5 and -1e-5 <= phase <= math.pi + 1e-5


@pytest.mark.slow
def test_every_exact_strategy_matches_standard(x64):
  """float64, with learned per-element learning rates next to the learned
  initialisation: every exact strategy's value and meta-gradient equal
  standard's, all compiled in one program."""
  task = create_task("sinusoid_maml", widths=(8,), learn_lr=True)
  errors = P.trainer_strategy_errors(lambda s: BilevelTrainer(
      task, strategy=s, num_inner_steps=2, meta_batch_size=1, mesh=ONE_DEVICE))
  for strategy, (value_error, grad_error) in errors.items():
    assert value_error < 1e-12, (strategy, value_error)
    assert grad_error < 1e-9, (strategy, grad_error)


@pytest.mark.slow
def test_maml_halves_post_adaptation_mse():
  trainer = BilevelTrainer(create_task("sinusoid_maml"), num_inner_steps=5,
                           meta_batch_size=25, num_eval_tasks=100,
                           outer_optimizer=optax.adam(3e-3), mesh=ONE_DEVICE)
  result = trainer.fit(600, log_every=600, console=False)
  for split in ("validation", "test"):
    before = trainer.evaluate(trainer.init_state().eta, split)["outer_loss"]
    after = trainer.evaluate(result.state.eta, split)["outer_loss"]
    assert after <= 0.5 * before, (split, before, after)


@pytest.mark.slow
def test_meta_sgd_learns_per_element_learning_rates():
  trainer = BilevelTrainer(create_task("sinusoid_maml", learn_lr=True),
                           num_inner_steps=5, meta_batch_size=10,
                           num_eval_tasks=20, outer_optimizer=optax.adam(3e-3),
                           mesh=ONE_DEVICE)
  eta0 = trainer.init_state().eta
  assert eta0.log_lr["out"]["kernel"].shape == (40, 1)
  result = trainer.fit(50, log_every=50, console=False)
  moved = (result.state.eta.log_lr["out"]["kernel"]
           - eta0.log_lr["out"]["kernel"])
  assert np.mean(np.abs(np.asarray(moved)) > 0) > 0.5  # (dead ReLUs stay)
  assert len(np.unique(np.round(np.asarray(moved), 6))) > 1  # per element
