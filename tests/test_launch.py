"""`python -m launch.train`: one command-line run per built-in task, with
TensorBoard event files of the outer loss; every ``--strategy`` reaches the
trainer (in process); the language-model tasks, Grain workers and the auto
strategy from the command line (bad input: `tests/test_bad_input.py`)."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaflow
from launch import train
from metaflow import metrics
from tests import problems as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT_IN = ("sinusoid_maml", "fewshot_classification")
SMALL = ["--config.meta_batch_size=2", "--config.num_eval_tasks=2",
         "--config.log_every=1", "--meta_steps=2", "--inner_steps=2"]
# A smaller model for the command-line runs (compile time dominates them).
TINY_MODEL = {"sinusoid_maml": ["--config.task.widths=(8,)"],
              "fewshot_classification": ["--config.task.channels=4",
                                         "--config.task.num_blocks=1"]}


def run_train(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "launch.train", *args],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def test_built_in_tasks_are_registered():
  train.prepare_argv(["train", "--task", "sinusoid_maml"])
  assert set(BUILT_IN) <= set(metaflow.registered_tasks())


# One command per task, each with a strategy other than the default (implicit
# needs iMAML's proximal term). That every exact strategy computes the same
# meta-gradient on each task: test_sinusoid.py and test_fewshot.py
# (test_every_exact_strategy_matches_standard, in process).
COMMAND_LINE_RUNS = [
    ("sinusoid_maml", "implicit", ["--config.task.proximal=1.0"]),
    ("fewshot_classification", "mixflow+remat+saved_inner_grads", [])]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("task,strategy,extra", COMMAND_LINE_RUNS)
def test_each_task_from_the_command_line(task, strategy, extra, tmp_path):
  done = run_train("--task", task, f"--workdir={tmp_path}",
                   f"--strategy={strategy}", *SMALL, *TINY_MODEL[task], *extra)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"strategy {strategy}," in done.stderr
  assert "held-out outer loss after T=2 inner steps" in done.stdout
  scalars = metrics.read_scalars(tmp_path)
  assert [step for step, _ in scalars["train/outer_loss"]] == [1, 2]
  assert [step for step, _ in scalars["eval/outer_loss"]] == [0, 2]
  assert all(np.isfinite(v) for _, v in scalars["train/outer_loss"])


@pytest.mark.parametrize("task", BUILT_IN)
def test_every_strategy_reaches_the_trainer(task):
  """``--strategy NAME`` for every name: the trainer that launch.train
  builds from the task's config runs that strategy (shapes only: nothing is
  compiled here)."""
  train.prepare_argv(["train", "--task", task])  # registers the tasks
  config = train.load_config(train.config_path(task))
  names = [*metaflow.exact_strategy_names(), "implicit", "first_order"]
  config.task.proximal = 1.0  # implicit with a learned initialisation
  for name in names:
    config.strategy = name
    trainer = train.build(task, config, mesh=P.ONE_DEVICE, shapes_only=True)
    assert trainer.strategy == metaflow.Strategy.parse(name), name
    assert trainer.num_inner_steps == config.inner_steps


def test_outer_clip_and_drawn_lifetimes_reach_the_trainer():
  """``--config.outer_clip=c``: the outer optimiser sees the meta-gradient
  clipped to global norm c (SGD at rate 1 shows it: the update is minus
  the clipped gradient); ``--config.online.lifetime_max``: the trainer's
  learners draw their lifetimes."""
  train.prepare_argv(["train", "--task", "sinusoid_maml"])
  config = train.load_config(train.config_path("sinusoid_maml"))
  config.outer_optimizer, config.outer_lr, config.outer_clip = "sgd", 1.0, 0.5
  trainer = train.build("sinusoid_maml", config, mesh=P.ONE_DEVICE,
                        shapes_only=True)
  grads = {"a": jnp.full((4,), 10.0)}
  outer = trainer.program.outer_optimizer
  updates, _ = outer.update(grads, outer.init(grads), grads)
  np.testing.assert_allclose(optax.tree.norm(updates), 0.5, rtol=1e-6)
  config = train.load_config(train.config_path("lm_learned_lr"))
  config.inner_steps, config.online.population = 2, 3
  config.online.lifetime, config.online.lifetime_max = 2, 8
  online = train.build("lm_learned_lr", config, mesh=P.ONE_DEVICE,
                       shapes_only=True)
  assert online.program.learning == metaflow.Online(3, 2, 8)
  assert online.program.learning.drawn


#: The LM tasks no other test trains from the command line (lm_maml:
#: test_multiprocess; lm_data_rater: test_curation).
LM_TASKS = ("lm_learned_lr", "lm_loss_weighting", "lm_learned_optimizer")
#: Online tasks: short lives (the warm-up staggers the learners over one).
LM_ONLINE = {"lm_learned_optimizer": ["--config.online.lifetime=2",
                                      "--config.online.lifetime_max=8"]}
LM_SMALL = ["--config.task.preset=nano", "--config.task.seq_len=32",
            "--config.task.batch_size=2", "--config.num_eval_tasks=2",
            "--config.log_every=1", "--meta_steps=2", "--inner_steps=2"]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("task", LM_TASKS)
def test_language_model_tasks(task, tmp_path):
  """Each LM task meta-trains from the command line on a text file given by
  path (one not valid UTF-8: used as bytes, with a warning)."""
  text = ("To be, or not to be, that is the question. " * 40).encode()
  path = tmp_path / "latin1.txt"
  path.write_bytes(text + "caf\xe9\n".encode("latin-1") + text)
  done = run_train("--task", task, f"--workdir={tmp_path / 'run'}",
                   f"--config.task.data_path={path}", *LM_SMALL,
                   *LM_ONLINE.get(task, ()))
  assert done.returncode == 0, done.stderr[-3000:]
  assert "is not valid UTF-8 (first invalid byte at offset" in done.stderr
  assert "held-out outer loss after T=2 inner steps" in done.stdout
  scalars = metrics.read_scalars(tmp_path / "run")
  assert all(np.isfinite(v) for _, v in scalars["train/outer_loss"])


def test_cluster_detection():
  assert not train.cluster_detected({})
  assert not train.cluster_detected({"SLURM_NTASKS": "1"})
  assert train.cluster_detected({"SLURM_NTASKS": "4"})
  assert train.cluster_detected({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert train.cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"})
  assert train.cluster_detected({"TPU_WORKER_HOSTNAMES": "h0,h1"})
  assert not train.cluster_detected({"TPU_WORKER_HOSTNAMES": "localhost"})


@pytest.mark.slow
@pytest.mark.subprocess
def test_grain_worker_processes_from_command_line(tmp_path):
  """Grain workers (which need absl flags parsed) under launch.train: resumed
  with workers, the run matches one without workers (same episodes); resuming
  with another number of workers is refused (Grain's state differs)."""
  args = ["--task", "sinusoid_maml", *SMALL]
  workers = "--config.num_workers=2"
  first = run_train(*args, f"--workdir={tmp_path / 'a'}", workers)
  assert first.returncode == 0, first.stderr[-3000:]
  resumed = run_train(*args, f"--workdir={tmp_path / 'a'}", workers,
                      "--meta_steps=4")
  straight = run_train(*args, f"--workdir={tmp_path / 'b'}", "--meta_steps=4")
  assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr
  summary = lambda out: out.strip().splitlines()[0]
  assert "after 4 meta-steps" in summary(resumed.stdout)
  assert summary(resumed.stdout) == summary(straight.stdout)
  refused = run_train(*args, f"--workdir={tmp_path / 'a'}", "--meta_steps=6")
  assert refused.returncode != 0
  assert "run.num_workers: 2 in the checkpoint, now 0" in refused.stderr


def test_estimator_in_the_fingerprint():
  """Exact strategies may be switched on resume; the approximations not."""
  import ml_collections
  config = ml_collections.ConfigDict({"strategy": "implicit", "cg_steps": 7,
                                      "cg_damping": 0.5, "memory_budget": ""})
  strategy = train.strategy_of(config)
  assert (strategy.mode, strategy.cg_steps, strategy.cg_damping) == (
      "implicit", 7, 0.5)
  assert strategy.fingerprint == "implicit(cg_steps=7, cg_damping=0.5)"
  assert {s.fingerprint for s in metaflow.exact_strategies()} == {"exact"}
  assert metaflow.Strategy("first_order").fingerprint == "first_order"
  config.strategy = "mixflow"
  with pytest.raises(ValueError, match="apply to mode 'implicit' only"):
    train.strategy_of(config)
  config.cg_steps, config.cg_damping = 20, 0.0
  config.memory_budget = "1GiB"
  with pytest.raises(ValueError, match="applies to --strategy auto only"):
    train.strategy_of(config)
  config.strategy = "auto"
  assert train.strategy_of(config) == "auto"


@pytest.mark.slow
@pytest.mark.subprocess
def test_auto_strategy_from_the_command_line(tmp_path):
  """--strategy auto: the candidate table is logged, the chosen strategy
  runs and is named; too small a budget is one line."""
  args = ["--task", "sinusoid_maml", *SMALL, *TINY_MODEL["sinusoid_maml"],
          "--strategy=auto"]
  done = run_train(*args, f"--workdir={tmp_path / 'a'}",
                   "--config.memory_budget=1GiB")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "strategy auto, candidates per device:" in done.stderr
  assert "chosen: mixflow" in done.stderr and "strategy mixflow," in done.stderr
  refused = run_train(*args, f"--workdir={tmp_path / 'b'}",
                      "--config.memory_budget=1KiB")
  assert refused.returncode == 2
  errors = [line for line in refused.stderr.splitlines()
            if line.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith(
      "error: no exact strategy fits the memory budget of 1.00 KiB"), (
          refused.stderr[-3000:])


# ------------------------------------------------------------------- help
@pytest.mark.subprocess
def test_help_without_a_task_lists_the_tasks():
  out = run_train("--help", timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "python -m launch.train --task" in out.stdout  # the usage
  assert "--workdir" in out.stdout and "--config" in out.stdout
  train.prepare_argv(["train", "--task", "sinusoid_maml"])  # registers
  listed = [line.split()[0] for line in out.stdout.splitlines()
            if line.startswith("  ") and line.split()
            and line.split()[0] in metaflow.registered_tasks()]
  assert sorted(listed) == sorted(metaflow.registered_tasks())


def test_task_help_lists_every_config_key_with_its_default(capsys):
  with pytest.raises(SystemExit) as exit_:
    train.run(["launch.train", "--task", "lm_data_rater", "--helpfull"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  assert "  --config.task.temperature=1.0\n" in out
  assert "  --config.online.population=4\n" in out
  # The explanation under a key: its config file's comment or field doc.
  lines = out.splitlines()
  below = lines[lines.index("  --config.online.population=4") + 1]
  assert "learners" in below, below
  config = train.load_config(train.config_path("lm_data_rater"))

  def leaves(node, prefix=""):
    for key, value in node.items():
      if hasattr(value, "items"):
        yield from leaves(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}"
  for key in leaves(config):
    assert f"  --config.{key}=" in out, key


@pytest.mark.subprocess
def test_help_for_an_unknown_task_is_one_line():
  out = run_train("--task", "nope", "--help", timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().startswith("error: unknown task 'nope'")
  assert len(out.stderr.strip().splitlines()) == 1
