"""A task defined in the user's own module, outside this repository, trains
through ``launch.train --task module:Class`` (its dataclass fields are
config keys) and resumes; ``--task_module`` imports a module that registers
its own tasks. (A changed setting on resume is refused for every task:
tests/test_bad_input.py.)"""

import os
import subprocess
import sys
import textwrap

import pytest

from launch import train
from launch.train import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_MODULE = textwrap.dedent('''
    """A user's task: MAML on a 2-feature linear regression."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from metaflow import data
    from metaflow.meta_params import MetaParams
    from metaflow.task import Task, register


    @dataclasses.dataclass(frozen=True)
    class Sample:
      noise: float

      def __call__(self, rng):
        w = rng.normal(size=(2, 1)).astype(np.float32) + 1.0
        def points(n):
          x = rng.normal(size=(n, 2)).astype(np.float32)
          y = x @ w + self.noise * rng.normal(size=(n, 1)).astype(np.float32)
          return {"x": x, "y": y}
        return {"support": points(5), "query": points(5)}


    @dataclasses.dataclass(frozen=True)
    class LineTask(Task):
      inner_lr: float = 0.1
      noise: float = 0.1

      def make_model(self, rngs):
        return nnx.Linear(2, 1, rngs=rngs)

      def meta_params(self):
        return MetaParams(learn_init=True, learning_rate=self.inner_lr)

      def inner_loss(self, model, meta, batch):
        return jnp.mean(jnp.square(model(batch["x"]) - batch["y"]))

      def dataset(self, split, seed):
        return data.episodes(Sample(self.noise), seed, split)


    @register("registered_line")
    @dataclasses.dataclass(frozen=True)
    class RegisteredLine(LineTask):
      pass
''')


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
  """``user_tasks_<id>`` in a temporary folder on the path (a fresh name per
  test: the registry is per process)."""
  name = f"user_tasks_{os.getpid()}_{len(os.listdir(tmp_path.parent))}"
  folder = tmp_path / "user_code"
  folder.mkdir()
  (folder / f"{name}.py").write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(folder))
  return name, folder


def _train(args, folder):
  env = dict(os.environ, PYTHONPATH=str(folder))
  return subprocess.run([sys.executable, "-m", "launch.train", *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.subprocess
@pytest.mark.slow
def test_user_task_trains_and_resumes(tmp_path, user_module):
  name, folder = user_module
  args = [f"--task={name}:LineTask", f"--workdir={tmp_path / 'run'}",
          "--config.task.noise=0.2", "--config.meta_batch_size=2",
          "--config.num_eval_tasks=4", "--inner_steps=2",
          "--config.checkpoint_every=5", "--config.log_every=5"]
  first = _train(args + ["--meta_steps=5"], folder)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "after 5 meta-steps" in first.stdout
  resumed = _train(args + ["--meta_steps=10"], folder)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "after 10 meta-steps" in resumed.stdout
  assert "Resumed from" in resumed.stderr


def test_user_task_config_and_errors(user_module):
  name, _ = user_module
  argv = train.prepare_argv(["train", f"--task={name}:LineTask",
                             "--config.task.inner_lr=0.5"])
  assert argv[1].endswith(f"task_fields.py:{name}:LineTask")
  config = train.load_config(argv[1].split("=", 1)[1])
  assert config.task.to_dict() == {"inner_lr": 0.1, "noise": 0.1}
  assert config.inner_steps == 5  # the shared defaults
  # A module that registers its own task, by name.
  train.prepare_argv(["train", f"--task_module={name}",
                      "--task=registered_line"])
  for argv, message in [
      ([f"--task={name}:Nope"], "module user_tasks_.* has no 'Nope'"),
      ([f"--task={name}:Sample"], "Sample is a class, not a metaflow.Task "
       "subclass"),
      (["--task=no_such_module_xyz:Task"], "cannot import module "
       "'no_such_module_xyz' \\(ModuleNotFoundError"),
      (["--task_module=no_such_module_xyz", "--task=sinusoid_maml"],
       "--task_module: cannot import module"),
      ([f"--task={name}:LineTask", "--config.task.widths=3"],
       "unknown config key 'task.widths' \\(valid keys of task: inner_lr, "
       "noise\\)"),
  ]:
    with pytest.raises(UsageError, match=message):
      train.prepare_argv(["train", *argv])


@pytest.mark.subprocess
def test_task_class_that_registers_itself_under_its_own_name(tmp_path,
                                                            user_module):
  """``--task module:Class`` for a class that carries
  ``@register("registered_line")``, as the README's snippet writes it: the
  run uses the name the class registered (it failed with 'Unknown task')."""
  name, folder = user_module
  done = _train([f"--task={name}:RegisteredLine", f"--workdir={tmp_path}",
                 "--config.meta_batch_size=2", "--config.num_eval_tasks=2",
                 "--inner_steps=1", "--meta_steps=2"], folder)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "after 2 meta-steps" in done.stdout
  assert "Task registered_line" in done.stderr
