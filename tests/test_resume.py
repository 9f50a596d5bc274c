"""Checkpointing: resuming is bit-identical to never stopping (state, RNG and
data order), a process killed with SIGKILL resumes, and a checkpoint of a
different config is refused.

The quick tier (-m "not slow") keeps the in-process checks; the runs of
``launch.train`` killed (SIGKILL, SIGTERM) at several moments and resumed
are slow."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import ClassVar

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import tasks  # noqa: F401  (registers the built-in tasks)
from metaflow import checkpoint
from metaflow.meta_params import LearnedLearningRates
from metaflow.task import create_task
from metaflow.trainer import BilevelTrainer
from tests.problems import ONE_DEVICE
from tests.test_trainer import Regression

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Resampled(Regression):
  """Learned LRs from a fresh theta0 per meta-step: the RNG state matters."""
  resample_init: bool = True


def make_trainer(task=None, **kwargs):
  settings = dict(num_inner_steps=2, meta_batch_size=3, num_eval_tasks=4,
                  outer_optimizer=optax.adam(1e-2), seed=3, mesh=ONE_DEVICE)
  settings.update(kwargs)
  return BilevelTrainer(task or Resampled(learn_init=False, lr="tensor"),
                        **settings)


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


@dataclasses.dataclass(frozen=True)
class InitialRate(Resampled):
  """Its MetaParams reads a class attribute: a spec that changes while the
  task's settings (its fields) do not."""
  initial_lr: ClassVar[float] = 0.1

  def meta_params(self):
    return dataclasses.replace(super().meta_params(), learning_rate=(
        LearnedLearningRates(self.initial_lr, "tensor")))


@pytest.mark.slow
def test_python_resume_refuses_every_changed_setting(tmp_path, monkeypatch):
  """From Python as from the command line: a checkpoint written with other
  task settings, T, meta-batch size, meta-parameters, estimator class or
  outer optimiser (the same state structure, another behaviour) is refused,
  one line naming what changed. An exact strategy may be switched."""
  task = InitialRate(learn_init=False, lr="tensor")
  make_trainer(task).fit(1, tmp_path, console=False)
  cases = [
      (dict(outer_optimizer=optax.adam(0.5)),
       r"outer_optimizer: \[.*\] in the checkpoint, now \["),
      (dict(outer_optimizer=optax.chain(optax.clip_by_global_norm(1e-3),
                                        optax.adam(1e-2))),
       "outer_optimizer: "),
      (dict(task=InitialRate(learn_init=False, lr="tensor", inner_opt="adam")),
       "task_config.inner_opt: 'sgd' in the checkpoint, now 'adam'"),
      (dict(num_inner_steps=3), "num_inner_steps: 2 in the checkpoint, now 3"),
      (dict(meta_batch_size=2), "meta_batch_size: 3 in the checkpoint, now 2"),
      (dict(strategy="first_order"),
       "estimator: 'exact' in the checkpoint, now 'first_order'"),
  ]
  for kwargs, match in cases:
    with pytest.raises(checkpoint.IncompatibleCheckpointError,
                       match=match) as e:
      make_trainer(**{"task": task, **kwargs}).fit(2, tmp_path, console=False)
    assert "\n" not in str(e.value)
  with monkeypatch.context() as m:
    m.setattr(InitialRate, "initial_lr", 0.2)
    with pytest.raises(checkpoint.IncompatibleCheckpointError,
                       match=r"^The checkpoint .* different config: "
                       r"meta_params\.learning_rate\.init: 0\.1 in the "
                       r"checkpoint, now 0\.2\. Use"):
      make_trainer(task).fit(2, tmp_path, console=False)
  resumed = make_trainer(task, strategy="mixflow+remat").fit(
      2, tmp_path, console=False)
  assert int(resumed.state.step) == 2


def test_checkpoint_with_a_dict_eta_is_refused(tmp_path):
  """A checkpoint written before eta was typed (`metaflow.Eta`), by
  sinusoid_maml at these settings (tests/data/checkpoint_dict_eta), is
  refused with the one-line message naming the state's layout."""
  shutil.copytree(os.path.join(REPO, "tests", "data", "checkpoint_dict_eta"),
                  tmp_path / "run")
  trainer = BilevelTrainer(
      create_task("sinusoid_maml", num_shots=2, widths=(4,)),
      num_inner_steps=1, meta_batch_size=1, num_eval_tasks=1,
      outer_optimizer=optax.adam(1e-2), mesh=ONE_DEVICE)
  with pytest.raises(checkpoint.IncompatibleCheckpointError) as e:
    trainer.fit(2, tmp_path / "run", console=False)
  message = str(e.value)
  assert "\n" not in message and message.startswith("The checkpoint at ")
  assert ("state..eta['init']['out']['kernel']: 'float32[4, 1]' in the "
          "checkpoint, absent now") in message
  assert ("state..eta.init['out']['kernel']: not in the checkpoint, now "
          "'float32[4, 1]'") in message


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(NotADirectoryError, match="not a directory"):
    make_trainer().fit(1, path, console=False)


META_STEPS, EVERY = 1000, 50


def _train_cmd(workdir, meta_steps=META_STEPS):
  return [sys.executable, "-m", "launch.train", "--task", "sinusoid_maml",
          f"--workdir={workdir}", f"--meta_steps={meta_steps}",
          f"--config.checkpoint_every={EVERY}", "--config.meta_batch_size=4",
          "--config.num_eval_tasks=8", "--config.log_every=100"]


def _final(workdir):
  """The latest checkpoint's step, state and data position."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  return step, restored["state"], restored["data"]


def _steps(ckpt_dir):
  """(finalised steps, whether a save is being written)."""
  names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
  return ({int(d) for d in names if d.isdigit()},
          any("tmp" in d for d in names))


def _interrupt(workdir, signum, during_write, rng, cmd=None):
  """Launches the run in ``workdir`` (``cmd``, default `_train_cmd`) and
  sends ``signum`` once it has finalised a checkpoint beyond those it
  started with, either while it writes the next one or at a random moment
  after; returns the process (finished), its stdout and stderr, and the
  last finalised step it was seen to reach."""
  ckpt_dir = workdir / "checkpoints"
  known = _steps(ckpt_dir)[0]
  proc = subprocess.Popen(cmd or _train_cmd(workdir), cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  seen = None
  while time.time() < deadline and proc.poll() is None:
    done, writing = _steps(ckpt_dir)
    new = done - known
    if new and seen is None:
      seen = max(new)
      wait_until = time.time() + rng.uniform(0, 0.4)
    if seen is not None and (writing if during_write
                             else time.time() >= wait_until):
      break
    time.sleep(0.005)
  assert proc.poll() is None, "the run ended before it was interrupted"
  seen = max(_steps(ckpt_dir)[0])
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=240)
  return proc, out, err, seen


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  done = subprocess.run(_train_cmd(workdir), cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return _final(workdir)


def _finish_and_compare(workdir, straight_run):
  done = subprocess.run(_train_cmd(workdir), cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  step, state, position = _final(workdir)
  assert step == straight_run[0] == META_STEPS
  assert_trees_identical(state, straight_run[1])
  assert position == straight_run[2]


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_at_three_moments_then_resume(tmp_path, straight_run):
  """SIGKILL while a checkpoint is written (twice) and between checkpoints
  (once); each relaunch resumes from the last finalised one."""
  rng = np.random.default_rng(0)
  for i in range(3):
    before = _steps(tmp_path / "checkpoints")[0]
    proc, *_ = _interrupt(tmp_path, signal.SIGKILL, i % 2 == 0, rng)
    assert proc.returncode == -signal.SIGKILL
    after = _steps(tmp_path / "checkpoints")[0]
    assert max(after) > max(before, default=0)
    assert max(after) < META_STEPS
  _finish_and_compare(tmp_path, straight_run)


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_at_three_moments_loses_no_step(tmp_path, straight_run):
  """SIGTERM (a preemption notice) while a checkpoint is written and between
  checkpoints: the run finishes its step, checkpoints it, says so and exits
  with status 0; the relaunch goes on from exactly there."""
  rng = np.random.default_rng(1)
  for i in range(3):
    proc, out, err, seen = _interrupt(tmp_path, signal.SIGTERM, i % 2 == 0,
                                      rng)
    assert proc.returncode == 0, err[-2000:]
    step = ocp.CheckpointManager(str(tmp_path / "checkpoints")).latest_step()
    assert f"stopped by SIGTERM after meta-step {step} of {META_STEPS}" in out
    assert seen <= step < META_STEPS
  _finish_and_compare(tmp_path, straight_run)


#: Online runs: learned learning rates for inner Adam (P=2 persistent
#: learners living N=4 inner steps, windows of T=2), and a learned update rule
#: (mlp_learned_optimizer, small, a family of two MLPs per learner) whose
#: learners' lifetimes are drawn.
ONLINE_RUNS = {
    "learned_rates": ["--task", "tests.test_online:Fresh",
                      "--config.online.lifetime=4"],
    "learned_rule": ["--task", "mlp_learned_optimizer",
                     "--config.task.widths=(8,)", "--config.task.batch_size=16",
                     "--config.task.family_size=2",
                     "--config.task.family_widths=(4,8)",
                     "--config.task.family_depths=(1,1)",
                     "--config.task.rule_hidden=(4,)",
                     "--config.online.lifetime=2",
                     "--config.online.lifetime_max=8",
                     "--config.eval_every=0"],
}


#: Meta-steps of each online run.
ONLINE_STEPS = {"learned_rates": 400, "learned_rule": 120}


def _online_cmd(workdir, run="learned_rates"):
  return [sys.executable, "-m", "launch.train", *ONLINE_RUNS[run],
          f"--workdir={workdir}", f"--meta_steps={ONLINE_STEPS[run]}",
          "--inner_steps=2",
          "--config.online.population=2", "--config.checkpoint_every=20",
          "--config.num_eval_tasks=4", "--config.log_every=200"]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("run", list(ONLINE_RUNS))
def test_online_run_resumes_exactly_after_sigkill(tmp_path, run):
  """Killed mid-run and relaunched, an online run ends with the same eta,
  outer optimiser state and every learner's (theta, s, age and drawn
  lifetime), array by array, as a run never stopped."""
  straight = tmp_path / "straight"
  done = subprocess.run(_online_cmd(straight, run), cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  killed = tmp_path / "killed"
  proc, *_ = _interrupt(killed, signal.SIGKILL, False,
                        np.random.default_rng(2), _online_cmd(killed, run))
  assert proc.returncode == -signal.SIGKILL
  assert 0 < max(_steps(killed / "checkpoints")[0]) < ONLINE_STEPS[run]
  done = subprocess.run(_online_cmd(killed, run), cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  (step, state, position), expected = _final(killed), _final(straight)
  assert step == expected[0] == ONLINE_STEPS[run]
  assert position == expected[2]
  assert set(state) == {"step", "eta", "opt_state", "rng", "learners"}
  assert_trees_identical(state, expected[1])
  if run == "learned_rule":
    ages, lives = (np.asarray(state["learners"][k])
                   for k in ("age", "lifetime"))
    assert np.all(ages < lives) and set(lives) <= {2, 4, 6, 8}
    return
  ages = np.asarray(state["learners"]["age"])
  assert ages.shape == (2,) and set(ages) <= {0, 2}
