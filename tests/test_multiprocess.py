"""Several processes on this machine (`launch.cluster.local`: jax.distributed
over localhost, gloo collectives on CPU): 2 processes x 2 devices meta-train
exactly like 1 process on 1 device with the same global meta-batch; their
checkpoint resumes in 1 process; a killed process ends the run at once; a
preemption notice to one process stops both at one step."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import problems as P

# One worker runs these one after another (each starts 2 JAX processes).
# The quick tier (-m "not slow") keeps 2 processes equal to 1 and their
# checkpoint resumed in 1 process (one 2-process run for both); the
# 2-process language model, the 2-process fallback past an unreadable
# checkpoint, a killed process and SIGTERM to one process are slow (one
# process's fallback and SIGTERM: test_survival; launch.cluster.local
# ending the others when a child fails or is killed: test_launchers).
pytestmark = [pytest.mark.xdist_group("multiprocess"), pytest.mark.mesh,
              pytest.mark.subprocess]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--task", "sinusoid_maml", "--config.x64=True",
         "--config.meta_batch_size=8", "--config.num_eval_tasks=8",
         "--config.task.widths=(16,)", "--config.log_every=10",
         "--config.checkpoint_every=10", "--meta_steps=20"]
LOCAL = [sys.executable, "-m", "launch.cluster.local", "--num_processes", "2",
         "--devices_per_process", "2", "--"]


def run(argv, timeout=300) -> subprocess.CompletedProcess:
  """Runs ``argv`` to the end. Past ``timeout`` seconds the test fails with
  the output, which ends with every JAX process's Python stacks: each is sent
  SIGABRT, and Python's faulthandler (PYTHONFAULTHANDLER) dumps all threads
  before the process dies, so a hang shows where each process waited."""
  proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    # launch.cluster.local's children, or the launch.train process itself.
    jax_processes = (_children(proc.pid) if "launch.cluster.local" in argv
                     else [proc.pid])
    for pid in jax_processes:
      os.kill(pid, signal.SIGABRT)
    try:
      stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      stdout, stderr = proc.communicate()
    pytest.fail(f"{' '.join(argv)} did not end within {timeout} s; its "
                f"output:\n{stdout[-40000:]}\n{stderr[-6000:]}")
  return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def checkpointed_state(workdir, step) -> dict:
  """The `TrainState` (as a dict of numpy arrays) of checkpoint ``step``,
  whatever mesh and processes wrote it."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with jax.enable_x64(True):  # float64 stays float64
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        tree)
    return jax.tree.map(np.asarray, checkpointer.restore(path, target))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """20 meta-steps of 2 processes x 2 devices, checkpoints at 10 and 20."""
  workdir = tmp_path_factory.mktemp("two_processes")
  done = run([*LOCAL, *TRAIN, f"--workdir={workdir}"])
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
  return workdir, done.stdout


def test_two_processes_equal_one(two_processes, tmp_path):
  workdir, output = two_processes
  assert "mesh data=4 x fsdp=1 (4 devices, 2 processes)" in output
  lines = output.splitlines()
  assert any(line.startswith("[1] ") for line in lines)
  # Metrics and the summary come from process 0 only.
  assert [line[:4] for line in lines if "held-out outer loss" in line] == [
      "[0] "]
  done = run([sys.executable, "-m", "launch.train", *TRAIN,
              f"--workdir={tmp_path}"])
  assert done.returncode == 0, done.stderr[-3000:]
  two, one = checkpointed_state(workdir, 20), checkpointed_state(tmp_path, 20)
  assert one["eta"]["init"]["out"]["kernel"].dtype == np.float64
  assert P.tree_rel_error(two["eta"], one["eta"]) < 1e-9
  assert P.tree_rel_error(two["opt_state"], one["opt_state"]) < 1e-9
  np.testing.assert_array_equal(two["rng"], one["rng"])


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(two_processes,
                                                       tmp_path):
  workdir, _ = two_processes
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "20")
  done = run([sys.executable, "-m", "launch.train", *TRAIN,
              f"--workdir={resumed}"])
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Resumed from" in done.stderr and "at step 10" in done.stderr
  assert "mesh data=1 x fsdp=1 (1 device, 1 process)" in done.stderr
  a, b = checkpointed_state(resumed, 20), checkpointed_state(workdir, 20)
  assert P.tree_rel_error(a["eta"], b["eta"]) < 1e-9
  np.testing.assert_array_equal(a["rng"], b["rng"])


@pytest.mark.slow
def test_two_processes_fall_back_past_an_unreadable_checkpoint(
    two_processes, tmp_path):
  """The newest checkpoint of the 2-process run truncated: relaunched with 2
  processes, both agree to move it aside and resume from the one before,
  and reach the same final state."""
  workdir, _ = two_processes
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  files = [os.path.join(d, f) for d, _, fs in
           os.walk(copy / "checkpoints" / "20" / "state") for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  done = run([*LOCAL, *TRAIN, f"--workdir={copy}"])
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
  assert "Checkpoint 20 in" in done.stdout and "cannot be restored" in (
      done.stdout)
  assert (copy / "checkpoints.unreadable" / "20").is_dir()
  a, b = checkpointed_state(copy, 20), checkpointed_state(workdir, 20)
  assert P.tree_rel_error(a["eta"], b["eta"]) < 1e-12
  np.testing.assert_array_equal(a["rng"], b["rng"])


def _children(pid):
  path = f"/proc/{pid}/task/{pid}/children"
  with open(path) as f:
    return [int(p) for p in f.read().split()]


def _process_id(pid):
  with open(f"/proc/{pid}/cmdline", "rb") as f:
    argv = f.read().decode().split("\0")
  return next(int(a.split("=")[1]) for a in argv
              if a.startswith("--process_id="))


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _start_endless_run(workdir):
  """launch.cluster.local with 2 processes on a run without end (and without
  periodic checkpoints), once both are training: (launcher, {process id:
  pid})."""
  launcher = subprocess.Popen(
      [*LOCAL, *TRAIN, f"--workdir={workdir}", "--meta_steps=1000000",
       "--config.checkpoint_every=0", "--config.log_every=100"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and not (workdir / "checkpoints").exists():
      time.sleep(0.1)  # Created by both processes once they are training.
    if launcher.poll() is not None:
      pytest.fail(f"the run ended: {launcher.communicate()}")
    time.sleep(2)
    children = {_process_id(pid): pid for pid in _children(launcher.pid)}
    assert sorted(children) == [0, 1]
  except BaseException:
    launcher.kill()
    raise
  return launcher, children


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"),
                    reason="reads the process tree from /proc (Linux)")
def test_killed_process_ends_the_run(tmp_path):
  """SIGKILL of process 1 mid-training: launch.cluster.local names it, ends
  process 0 (stuck in a collective) and exits non-zero within 60 seconds."""
  launcher, children = _start_endless_run(tmp_path)
  try:
    os.kill(children[1], signal.SIGKILL)
    killed_at = time.time()
    _, stderr = launcher.communicate(timeout=60)
    assert time.time() - killed_at < 60
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode != 0
  assert (f"process 1 (pid {children[1]}) was killed by signal SIGKILL"
          in stderr)
  time.sleep(0.5)
  assert not any(_alive(pid) for pid in children.values())


@pytest.mark.slow
def test_language_model_split_over_processes(tmp_path):
  """lm_maml with its sequences and parameters split over 2 processes x 2
  devices (data=2 x fsdp=2: each process reads only its 2 of the 4
  sequences of every batch) equals 1 process on 1 device."""
  args = ["--task", "lm_maml", "--config.x64=True",
          "--config.task.preset=nano", "--config.task.seq_len=16",
          "--config.task.batch_size=4", "--inner_steps=2", "--meta_steps=4",
          "--config.num_eval_tasks=2", "--config.checkpoint_every=0"]
  two = run([*LOCAL, *args, "--config.mesh.data=2", "--config.mesh.fsdp=2",
             f"--workdir={tmp_path / 'two'}"])
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-2000:]
  assert "mesh data=2 x fsdp=2 (4 devices, 2 processes)" in two.stdout
  one = run([sys.executable, "-m", "launch.train", *args,
             f"--workdir={tmp_path / 'one'}"])
  assert one.returncode == 0, one.stderr[-3000:]
  a = checkpointed_state(tmp_path / "two", 4)
  b = checkpointed_state(tmp_path / "one", 4)
  assert P.tree_rel_error(a["eta"], b["eta"]) < 1e-9


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"),
                    reason="reads the process tree from /proc (Linux)")
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
  """A preemption notice (SIGTERM) to process 1 only: through JAX's
  preemption sync both processes stop after the same meta-step, write one
  checkpoint there together and exit with status 0."""
  launcher, children = _start_endless_run(tmp_path)
  try:
    os.kill(children[1], signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=120)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode == 0, stdout[-3000:] + stderr[-3000:]
  steps = ocp.CheckpointManager(str(tmp_path / "checkpoints")).all_steps()
  assert len(steps) == 1 and steps[0] > 0, steps
  assert (f"[0] sinusoid_maml: stopped by SIGTERM after meta-step {steps[0]} "
          "of 1000000" in stdout), stdout[-3000:]
  state = checkpointed_state(tmp_path, steps[0])
  assert int(state["step"]) == steps[0]
