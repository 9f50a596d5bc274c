"""Long runs that survive (in process): non-finite meta-steps are skipped
inside the jitted step, too many in a row stop the run with a checkpoint,
an unreadable newest checkpoint is moved aside for the one before it, and
SIGTERM / SIGINT end the run after the step in flight with a checkpoint."""

import contextlib
import dataclasses
import os
import signal

import grain
import jax
import numpy as np
import optax
import pytest

from metaflow import checkpoint, data
from metaflow.trainer import BilevelTrainer, NonFiniteError
from tests.problems import ONE_DEVICE
from tests.test_resume import assert_trees_identical
from tests.test_trainer import Regression, sample_regression

META_BATCH = 2


@dataclasses.dataclass(frozen=True)
class PoisonedSample:
  """Episode ``i``; NaN targets in the train episodes of the chosen
  meta-steps (1-based)."""
  seed: int
  split: str
  poisoned_steps: tuple = ()

  def __call__(self, index):
    episode = data.Seeded(sample_regression, self.seed,
                          data.check_split(self.split))(index)
    step = int(index) // META_BATCH + 1
    if self.split == "train" and step in self.poisoned_steps:
      episode["query"]["y"] = np.full_like(episode["query"]["y"], np.nan)
    return episode


@dataclasses.dataclass(frozen=True)
class Poisoned(Regression):
  """MAML regression (theta0 = eta's init: the RNG plays no part) with the
  train episodes of ``poisoned_steps`` poisoned (`PoisonedSample`)."""
  poisoned_steps: tuple = ()

  def dataset(self, split, seed):
    return grain.MapDataset.range(data.NUM_EPISODES).map(
        PoisonedSample(seed, split, self.poisoned_steps))


def make_trainer(**task_kwargs):
  return BilevelTrainer(Poisoned(**task_kwargs), num_inner_steps=2,
                        meta_batch_size=META_BATCH, num_eval_tasks=4,
                        outer_optimizer=optax.adam(1e-2), seed=3,
                        mesh=ONE_DEVICE)


@pytest.fixture(scope="module")
def clean():
  """One trainer of the unpoisoned task for the whole module: its jitted
  programs are compiled once (`fit` keeps no state between calls)."""
  return make_trainer()


@pytest.fixture(scope="module")
def straight(clean):
  """The final state of an uninterrupted 6-step run."""
  return clean.fit(6, console=False).state


def test_non_finite_steps_are_skipped_and_counted(tmp_path, clean):
  poisoned = (2, 5, 6)
  result = make_trainer(poisoned_steps=poisoned).fit(
      8, tmp_path, log_every=4, console=False)
  state = result.state
  assert int(state.step) == 8
  assert int(state.opt_state.total_notfinite) == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.eta))
  # The logged counter, and averages over the applied steps only.
  rows = [r for r in result.history if "train/skipped_steps" in r]
  assert [(r["step"], r["train/skipped_steps"]) for r in rows] == [
      (4, 1.0), (8, 3.0)]
  assert all(np.isfinite(r["train/outer_loss"]) for r in rows)
  # Reference: the same steps without the poisoned meta-batches' updates.
  reference = clean.init_state()
  for step, batch in zip(range(1, 9), clean.train_batches()):
    if step not in poisoned:
      reference, _ = clean.step(reference, batch)
  assert_trees_identical(state.eta, reference.eta)
  assert_trees_identical(state.opt_state.inner_state,
                         reference.opt_state.inner_state)


@pytest.mark.slow
def test_consecutive_skips_stop_the_run_with_a_finite_checkpoint(tmp_path,
                                                                 clean):
  trainer = make_trainer(poisoned_steps=tuple(range(3, 40)))
  with pytest.raises(NonFiniteError, match=r"4 consecutive meta-steps .* "
                     r"max_skipped_steps=4\); stopped at step 7"):
    trainer.fit(30, tmp_path, max_skipped_steps=4, console=False)
  after_two = clean.fit(2, console=False).state
  batches = trainer.train_batches()
  saved = checkpoint.Checkpointer(tmp_path, trainer.fingerprint()).restore(
      trainer.init_state(), batches)
  assert int(saved.step) == 7
  assert_trees_identical(saved.eta, after_two.eta)
  assert int(saved.opt_state.notfinite_count) == 5
  # The data position moved on with the skipped steps.
  fresh = trainer.train_batches()
  for _ in range(7):
    next(fresh)
  assert_trees_identical(next(batches), next(fresh))


def _truncate_an_array_file(step_dir):
  """Cuts the largest file of the state item in half."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state")
           for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_unreadable_newest_checkpoint_is_moved_aside(tmp_path, caplog, clean,
                                                    straight):
  clean.fit(4, tmp_path, checkpoint_every=2, console=False)
  ckpts = tmp_path / "checkpoints"
  _truncate_an_array_file(ckpts / "4")
  result = clean.fit(6, tmp_path, checkpoint_every=2, console=False)
  assert ("Checkpoint 4 in" in caplog.text
          and "cannot be restored" in caplog.text)
  assert (tmp_path / "checkpoints.unreadable" / "4" / "state").is_dir()
  assert_trees_identical(result.state, straight)
  assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [2, 4, 6]


def test_no_readable_checkpoint_is_one_error_and_moves_nothing(tmp_path,
                                                               clean):
  clean.fit(4, tmp_path, checkpoint_every=2, console=False)
  ckpts = tmp_path / "checkpoints"
  _truncate_an_array_file(ckpts / "4")
  _truncate_an_array_file(ckpts / "2")
  with pytest.raises(checkpoint.UnreadableCheckpointError,
                     match=r"step 4: .*; step 2: "):
    clean.fit(6, tmp_path, console=False)
  assert not (tmp_path / "checkpoints.unreadable").exists()
  assert {"2", "4"} <= set(os.listdir(ckpts))


@contextlib.contextmanager
def signalling_at(trainer, step, signum):
  """``trainer`` whose meta-step ``step`` (1-based, counted from the first
  call) sends ``signum`` to this process before it is dispatched."""
  calls = []
  step_fn = trainer.step

  def step_and_signal(state, batch):
    calls.append(1)
    if len(calls) == step:
      os.kill(os.getpid(), signum)
    return step_fn(state, batch)

  trainer.step = step_and_signal
  try:
    yield trainer
  finally:
    del trainer.step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_the_step_with_a_checkpoint(tmp_path, signum,
                                                       clean, straight):
  """The signal arrives as meta-step 3 starts: step 3 finishes, is
  checkpointed, and the resumed run equals one never stopped."""
  before = signal.getsignal(signum)
  with signalling_at(clean, 3, signum) as trainer:
    result = trainer.fit(6, tmp_path, console=False)
  assert result.preempted == signal.Signals(signum).name
  assert int(result.state.step) == 3 and result.final_eval == {}
  assert checkpoint.Checkpointer(tmp_path, {}).latest_step() == 3
  assert signal.getsignal(signum) is before  # the handler is gone
  resumed = clean.fit(6, tmp_path, console=False)
  assert resumed.preempted is None
  assert_trees_identical(resumed.state, straight)
