"""Checkpointing: resuming is bit-identical to never stopping (state, RNG and
data order), a process killed with SIGKILL resumes, and a checkpoint of a
different config is refused."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from metaflow import checkpoint
from metaflow.trainer import BilevelTrainer
from tests.problems import ONE_DEVICE
from tests.test_trainer import Regression

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Resampled(Regression):
  """Learned LRs from a fresh theta0 per meta-step: the RNG state matters."""
  resample_init: bool = True


def make_trainer(**kwargs):
  settings = dict(num_inner_steps=2, meta_batch_size=3, num_eval_tasks=4,
                  outer_optimizer=optax.adam(1e-2), seed=3, mesh=ONE_DEVICE)
  settings.update(kwargs)
  return BilevelTrainer(Resampled(learn_init=False, lr="tensor"), **settings)


def assert_trees_identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def next_batch_after(workdir, trainer):
  """The meta-batch a run resumed from ``workdir`` would consume next."""
  batches = trainer.train_batches()
  checkpoint.Checkpointer(workdir, trainer.fingerprint()).restore(
      trainer.init_state(), batches)
  return next(batches)


def test_resume_is_bit_identical(tmp_path):
  n = 4
  straight = make_trainer().fit(2 * n, tmp_path / "straight",
                                checkpoint_every=n, console=False)
  first = make_trainer().fit(n, tmp_path / "resumed", checkpoint_every=n,
                             console=False)
  assert int(first.state.step) == n
  resumed = make_trainer().fit(2 * n, tmp_path / "resumed",
                               checkpoint_every=n, console=False)
  assert int(resumed.state.step) == 2 * n
  assert_trees_identical(resumed.state, straight.state)  # eta, opt state, rng
  # The resumed run did move on from the first half.
  assert not np.array_equal(resumed.state.rng, first.state.rng)
  # Data order: both runs stand at the same place of the same stream.
  trainer = make_trainer()
  a = next_batch_after(tmp_path / "straight", trainer)
  b = next_batch_after(tmp_path / "resumed", trainer)
  assert_trees_identical(a, b)
  fresh = next(trainer.train_batches())
  assert not np.array_equal(a["support"]["x"], fresh["support"]["x"])
  # And the resumed run's final evaluation equals the uninterrupted one's.
  assert resumed.final_eval == straight.final_eval


def test_incompatible_checkpoint_refused(tmp_path):
  make_trainer().fit(2, tmp_path, console=False)
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match="num_inner_steps: 2 in the checkpoint, now 3"):
    make_trainer(num_inner_steps=3).fit(4, tmp_path, console=False)
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match="seed"):
    make_trainer(seed=4).fit(4, tmp_path, console=False)
  # The same config resumes.
  assert int(make_trainer().fit(3, tmp_path, console=False).state.step) == 3


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(NotADirectoryError, match="not a directory"):
    make_trainer().fit(1, path, console=False)


def _train_cmd(workdir, meta_steps):
  return [sys.executable, "-m", "launch.train", "--task", "sinusoid_maml",
          f"--workdir={workdir}", f"--meta_steps={meta_steps}",
          "--config.checkpoint_every=100", "--config.meta_batch_size=4",
          "--config.num_eval_tasks=8", "--config.log_every=100"]


def _final_state(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  return step, restored["state"]


def test_sigkill_mid_run_then_resume(tmp_path):
  meta_steps = 1200
  killed, straight = tmp_path / "killed", tmp_path / "straight"
  proc = subprocess.Popen(_train_cmd(killed, meta_steps), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = killed / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
    if any(int(d) >= 200 for d in names if d.isdigit()):  # finalised steps
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
  step_at_kill = ocp.CheckpointManager(str(ckpt_dir)).latest_step()
  assert step_at_kill is not None and 0 < step_at_kill < meta_steps
  # Resume the killed run, and run the same config without interruption.
  for workdir in (killed, straight):
    done = subprocess.run(_train_cmd(workdir, meta_steps), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
  step_a, state_a = _final_state(killed)
  step_b, state_b = _final_state(straight)
  assert step_a == step_b == meta_steps
  assert_trees_identical(state_a, state_b)
