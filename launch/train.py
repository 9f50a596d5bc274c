"""Meta-train a registered task.

    python -m launch.train --task sinusoid_maml --workdir runs/sinusoid \\
        [--strategy mixflow+remat] [--inner_steps 5] [--meta_steps 3000] \\
        [--config launch/configs/sinusoid_maml.py] [--config.task.num_shots=5]

The config is an ml_collections file (``get_config()``); by default
``launch/configs/<task>.py`` (or ``default.py`` for a task without one), and any
key can be overridden with ``--config.key=value``. ``--strategy``,
``--inner_steps`` and ``--meta_steps`` are shortcuts for ``config.strategy``,
``config.inner_steps`` and ``config.meta_steps``.

``--task`` is a registered name or ``package.module:ClassName``, a `Task`
subclass in any importable module (its config: ``configs/task_fields.py``,
the shared defaults plus the dataclass's fields as ``config.task``);
``--task_module`` imports modules that register tasks themselves.

A ``--workdir`` that holds checkpoints is resumed from the latest one that
can be read (``--meta_steps`` is the total); a checkpoint written with a
different config is refused. TensorBoard event files are written to the
workdir. SIGTERM or SIGINT stops the run after the meta-step in flight with a
checkpoint and exit status 0 (relaunch the same command to resume); a run
that cannot go on (no readable checkpoint; ``config.max_skipped_steps``
non-finite meta-steps in a row) ends with one ``error:`` line and status 1;
bad input with one ``error:`` line and status 2, before anything compiles.

The run uses every device of every process, on the mesh
``--config.mesh.data=N --config.mesh.fsdp=M`` (default: all devices on
``data``; see `metaflow.sharding`); ``--config.x64=True`` runs in float64.

``jax.distributed.initialize()`` is called only with ``--distributed``, on
explicit coordinates (``--coordinator_address --num_processes --process_id``,
as `launch.local` passes them), or when a cluster environment is detected (see
`cluster_detected`), so a laptop needs nothing. At the end the held-out outer
loss after T inner steps is printed at the initial and at the final
meta-parameters (by process 0).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Mapping, Optional, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

# Bad command-line input (one line, no traceback); the launchers' helper.
from launch._cli import UsageError, flag_value

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: Config keys that may change when a run is resumed: they change how long it
#: runs, how often it reports, and how (on which devices) the same
#: meta-gradient is computed, not the trajectory of the meta-parameters.
#: (``strategy`` only among the exact strategies: the trainer's fingerprint
#: records the estimator, `metaflow.Strategy.fingerprint`, so a switch to or
#: from implicit or first_order is refused.)
#: (``num_workers`` is not one of them:
#: Grain's iterator state has another form with worker processes.)
RESUMABLE_KEYS = ("meta_steps", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints", "max_skipped_steps", "strategy",
                  "memory_budget", "mesh")

#: Outer optimisers by name (``config.outer_optimizer``).
OUTER_OPTIMIZERS = ("adam", "sgd")

flags.DEFINE_string("task", None, "Registered task name, e.g. sinusoid_maml, "
                    "or package.module:ClassName (a Task subclass defined "
                    "outside this repository).")
flags.DEFINE_string("task_module", None, "Comma-separated modules to import "
                    "before --task is looked up (modules that register "
                    "their own tasks with metaflow.task.register).")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard "
                    "event files. Resumed if it holds checkpoints.")
flags.DEFINE_string("strategy", None, "Gradient strategy (overrides "
                    "config.strategy): standard | mixflow, +remat, "
                    "+remat+saved_inner_grads, +segments=K|auto, "
                    "+microbatches=M; implicit | first_order; or auto (the "
                    "fastest exact one within --config.memory_budget).")
flags.DEFINE_integer("inner_steps", None, "T (overrides config.inner_steps).")
flags.DEFINE_integer("meta_steps", None, "Total meta-steps (overrides "
                     "config.meta_steps).")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize(); "
                  "default: only when a cluster environment is detected.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, "
                    "for a multi-process run on explicit coordinates (with "
                    "--num_processes and --process_id; launch.local sets "
                    "them).")
flags.DEFINE_integer("num_processes", None, "Processes of the run (with "
                     "--coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. "
                     "num_processes - 1 (with --coordinator_address).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file (default: "
    "launch/configs/<task>.py).", lock_config=True)


def cluster_detected(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether the environment looks like one process of a multi-process job
  (a JAX coordinator address, Slurm or Open MPI with several tasks, or a
  multi-host TPU slice)."""
  def count(name):
    try:
      return int(environ.get(name, "1"))
    except ValueError:
      return 1
  return bool(environ.get("JAX_COORDINATOR_ADDRESS")
              or count("SLURM_NTASKS") > 1
              or count("OMPI_COMM_WORLD_SIZE") > 1
              or "," in environ.get("TPU_WORKER_HOSTNAMES", ""))


def config_path(task: str) -> str:
  """The default config of ``task``: ``launch/configs/<task>.py``, or for a
  task without one ``task_fields.py:<task>`` (the shared defaults and the
  task's own fields)."""
  path = os.path.join(CONFIG_DIR, f"{task}.py")
  if os.path.exists(path):
    return path
  return os.path.join(CONFIG_DIR, "task_fields.py") + f":{task}"


def _load_config(path: str):
  """``get_config()`` of a config file, or ``get_config(arg)`` for
  ``file:arg`` (as ml_collections' ``--config`` reads it)."""
  path, *arg = path.split(":", 1)
  spec = importlib.util.spec_from_file_location("_metaflow_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*arg)


def prepare_argv(argv: Sequence[str]) -> list[str]:
  """Checks ``--task`` and the ``--config.*`` keys and adds the task's default
  ``--config`` file, so that absl parses the rest.

  Raises:
    UsageError: missing or unknown task, missing config file, unknown key.
  """
  import tasks  # noqa: F401  (registers the built-in tasks)
  from metaflow.task import import_module, import_task, registered_tasks

  argv = list(argv)
  task = flag_value(argv, "task")
  try:
    for module in (flag_value(argv, "task_module") or "").split(","):
      if module.strip():
        import_module(module.strip(), "--task_module")
    if not task:
      raise UsageError("--task is required; registered tasks: "
                       f"{', '.join(registered_tasks())} (or "
                       "package.module:ClassName).")
    import_task(task)
  except ValueError as e:
    raise UsageError(str(e)) from None
  path = flag_value(argv, "config")
  if path is None:
    path = config_path(task)
    argv.insert(1, f"--config={path}")
  if not os.path.isfile(path.split(":", 1)[0]):
    raise UsageError(f"config file {path!r} does not exist.")
  config = _load_config(path)
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    node = config
    for i, part in enumerate(key.split(".")):
      if not hasattr(node, "keys") or part not in node:
        parent = ".".join(key.split(".")[:i]) or "config"
        valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
        raise UsageError(f"unknown config key {key!r} (valid keys of {parent}: "
                         f"{valid}).")
      node = node[part]
  return argv


def _outer_optimizer(name: str, learning_rate: float):
  """The optax optimiser ``name`` (one of `OUTER_OPTIMIZERS`, checked by
  `check_config`)."""
  import optax
  return getattr(optax, name)(learning_rate)


def _resolved_config():
  config = _CONFIG.value.unlock()
  for name in ("strategy", "inner_steps", "meta_steps"):
    value = getattr(flags.FLAGS, name)
    if value is not None:
      config[name] = value
  return config.lock()


#: Top-level settings checked by `check_config`: key -> (kind, low).
#: ``int``: an int >= low; ``float``: a finite number > low (``>=`` for
#: ``"float>="``); ``axis``: -1 (the rest) or an int >= 1.
_SETTINGS = {
    "inner_steps": ("int", 1), "meta_steps": ("int", 0),
    "meta_batch_size": ("int", 1), "num_eval_tasks": ("int", 1),
    "log_every": ("int", 1), "eval_every": ("int", 0),
    "checkpoint_every": ("int", 0), "keep_checkpoints": ("int", 1),
    "max_skipped_steps": ("int", 1), "num_workers": ("int", 0),
    "seed": ("int", 0), "cg_steps": ("int", 1),
    "outer_lr": ("float", 0.0), "cg_damping": ("float>=", 0.0),
    "mesh.data": ("axis", None), "mesh.fsdp": ("axis", None),
    "online.population": ("int", 0), "online.lifetime": ("int", 0),
}


def check_config(config) -> None:
  """Checks the run's own settings (the task checks ``config.task``) before
  anything is built, one line per problem.

  Raises:
    ValueError: a count or size out of range, a learning rate or damping
      that is not a positive (non-negative) finite number, an unknown outer
      optimiser or split.
  """
  from metaflow._checks import check_axis_size, check_int, check_number
  from metaflow.data import SPLITS
  for key, (kind, low) in _SETTINGS.items():
    value = config
    for part in key.split("."):
      value = value[part]
    name = f"config.{key}"
    if kind == "int":
      check_int(name, value, low)
    elif kind == "axis":
      check_axis_size(name, value)
    else:
      check_number(name, value, low, strict=kind == "float")
  if config.outer_optimizer not in OUTER_OPTIMIZERS:
    raise ValueError(f"config.outer_optimizer must be one of "
                     f"{', '.join(OUTER_OPTIMIZERS)}, got "
                     f"{config.outer_optimizer!r}.")
  if config.eval_split not in SPLITS:
    raise ValueError(f"config.eval_split must be one of {', '.join(SPLITS)}, "
                     f"got {config.eval_split!r}.")


def strategy_of(config):
  """``config.strategy`` with ``config.cg_steps`` and ``config.cg_damping``
  (which apply to ``implicit`` only; non-default values with another
  strategy are refused); ``"auto"`` as it is (the trainer resolves it)."""
  from metaflow.estimators import Strategy
  if config.strategy.strip().lower() == "auto":
    return "auto"
  if config.memory_budget:
    raise ValueError("memory_budget applies to --strategy auto only (got "
                     f"strategy {config.strategy!r}).")
  return Strategy.parse(config.strategy, cg_steps=config.cg_steps,
                        cg_damping=config.cg_damping)


def build(task_name: str, config, *, mesh=None, shapes_only: bool = False):
  """The task and `BilevelTrainer` of a config; ValueError etc. on bad input.

  ``mesh``: instead of the config's (``launch.plan`` plans on a part of the
  devices); ``shapes_only``: a trainer for compiled memory only."""
  from metaflow import sharding
  from metaflow.online import Online
  from metaflow.task import create_task, import_task
  from metaflow.trainer import BilevelTrainer

  check_config(config)
  if mesh is None:
    mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
  task = create_task(import_task(task_name), **config.task.to_dict())
  online = Online(config.online.population, config.online.lifetime)
  return BilevelTrainer(
      task, strategy=strategy_of(config), num_inner_steps=config.inner_steps,
      meta_batch_size=None if online.enabled else config.meta_batch_size,
      online=online,
      outer_optimizer=_outer_optimizer(config.outer_optimizer, config.outer_lr),
      seed=config.seed, eval_split=config.eval_split,
      num_eval_tasks=config.num_eval_tasks, num_workers=config.num_workers,
      mesh=mesh, memory_budget=config.memory_budget or None,
      shapes_only=shapes_only)


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> None:
  """Starts `jax.distributed` when the flags or the environment ask for it:
  on explicit coordinates (``--coordinator_address``, ``--num_processes``,
  ``--process_id``, all three), with ``--distributed`` (JAX's own cluster
  detection: Slurm, TPU pods, MPI), or when `cluster_detected`."""
  import jax

  explicit = {"coordinator_address": flags.FLAGS.coordinator_address,
              "num_processes": flags.FLAGS.num_processes,
              "process_id": flags.FLAGS.process_id}
  given = [k for k, v in explicit.items() if v is not None]
  if given and len(given) != len(explicit):
    missing = sorted(set(explicit) - set(given))
    raise UsageError(
        f"{' and '.join('--' + g for g in given)} need(s) "
        f"{' and '.join('--' + m for m in missing)} as well (all three set "
        "one process of a multi-process run).")
  if given:
    n, p = explicit["num_processes"], explicit["process_id"]
    if n < 1 or not 0 <= p < n:
      raise UsageError(f"--process_id must be in 0 .. {n - 1} for "
                       f"--num_processes={n}, got {p}.")
    jax.distributed.initialize(**explicit)
  elif flags.FLAGS.distributed or (flags.FLAGS.distributed is None
                                   and cluster_detected(environ)):
    jax.distributed.initialize()


def _only_our_info_logs(record) -> bool:
  """absl handler filter: INFO lines from metaflow, tasks, launch and clu (the
  metric rows and progress); warnings and errors from everyone. Orbax and
  JAX log every checkpoint and backend detail at INFO."""
  return record.levelno >= logging.converter.STANDARD_WARNING or any(
      f"{os.sep}{name}{os.sep}" in record.pathname
      for name in ("metaflow", "tasks", "launch", "clu"))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(argv[1:])} (every "
                     "setting is a --flag or --config.KEY=VALUE).")
  logging.get_absl_handler().addFilter(_only_our_info_logs)
  import jax

  from metaflow import checkpoint, sharding
  from metaflow.trainer import NonFiniteError

  task_name = flags.FLAGS.task
  config = _resolved_config()
  if not flags.FLAGS.workdir:
    raise UsageError("--workdir is required.")
  try:  # the run's own settings: before any process waits for another
    check_config(config)
  except ValueError as e:
    raise UsageError(str(e)) from None
  initialize_distributed()
  # Before anything is built: parameters and meta-parameters in float64.
  jax.config.update("jax_enable_x64", bool(config.x64))
  try:
    checkpoint.check_workdir(flags.FLAGS.workdir)
    trainer = build(task_name, config)
  except (ValueError, TypeError, OSError, ImportError) as e:
    raise UsageError(str(e)) from None
  run_config = {k: v for k, v in config.to_dict().items()
                if k not in RESUMABLE_KEYS}
  logging.info("Task %s, strategy %s, T=%d, meta-batch %d%s, %d meta-steps, "
               "mesh %s.", trainer.task.name, trainer.strategy.name,
               trainer.num_inner_steps, trainer.meta_batch_size,
               (f" (online learners, lifetime {trainer.online.lifetime})"
                if trainer.online.enabled else ""),
               config.meta_steps, sharding.describe(trainer.mesh))
  try:
    result = trainer.fit(
        config.meta_steps, flags.FLAGS.workdir, log_every=config.log_every,
        eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints,
        max_skipped_steps=config.max_skipped_steps, run_config=run_config)
  except checkpoint.IncompatibleCheckpointError as e:
    raise UsageError(str(e)) from None
  except (checkpoint.UnreadableCheckpointError, NonFiniteError) as e:
    raise RunError(str(e)) from None
  if result.preempted:
    if jax.process_index() == 0:
      checkpoints = os.path.join(os.path.abspath(flags.FLAGS.workdir),
                                 "checkpoints")
      print(f"{task_name}: stopped by {result.preempted} after meta-step "
            f"{int(result.state.step)} of {config.meta_steps}, checkpoint in "
            f"{checkpoints}"
            "; run the same command to resume.")
    return
  if jax.process_index() == 0:
    before, after = result.initial_eval, result.final_eval
    print(f"{task_name}: held-out outer loss after T={trainer.num_inner_steps} "
          f"inner steps ({config.num_eval_tasks} {config.eval_split} tasks): "
          f"{before['outer_loss']:.4f} at the initial meta-parameters -> "
          f"{after['outer_loss']:.4f} after {int(result.state.step)} "
          "meta-steps")
    for key in sorted(set(after) - {"outer_loss"}):
      print(f"  {key}: {before[key]:.4f} -> {after[key]:.4f}")


class RunError(Exception):
  """The run cannot go on (no readable checkpoint, diverged): one line,
  exit status 1."""


def run(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point: bad input is reported as ``error: ...`` (exit status 2), a
  run that cannot go on likewise (exit status 1)."""
  argv = list(sys.argv if argv is None else argv)
  try:
    argv = prepare_argv(argv)
    app.run(main, argv=argv)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except RunError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  run()
