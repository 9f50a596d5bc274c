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
as `launch.cluster.local` passes them), or when a cluster environment is
detected (see `cluster_detected`), so a laptop needs nothing. At the end the
held-out outer loss after T inner steps is printed at the initial and at the
final meta-parameters (by process 0).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

# Bad command-line input (one line, no traceback); the launchers' helper.
from launch._cli import UsageError, flag_value, help_text, one_line, wants_help
from launch._config import (  # noqa: F401  (launch.train's public names)
  RESUMABLE_KEYS,
  build,
  check_config,
  config_path,
  import_task_modules,
  load_config,
  no_workdir_on_refusal,
  prepare_argv,
  strategy_of,
  task_help,
)

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
                    "+remat+saved_inner_grads, +segments=K|K1/K2/...|auto, "
                    "+microbatches=M; implicit | first_order; or auto (the "
                    "fastest exact one within --config.memory_budget).")
flags.DEFINE_integer("inner_steps", None, "T (overrides config.inner_steps).")
flags.DEFINE_integer("meta_steps", None, "Total meta-steps (overrides "
                     "config.meta_steps).")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize(); "
                  "default: only when a cluster environment is detected.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, "
                    "for a multi-process run on explicit coordinates (with "
                    "--num_processes and --process_id; launch.cluster.local "
                    "sets them).")
flags.DEFINE_integer("num_processes", None, "Processes of the run (with "
                     "--coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. "
                     "num_processes - 1 (with --coordinator_address).")
#: This runner's own flags (for its --help; absl defines many more).
_FLAG_NAMES = ("task", "task_module", "workdir", "strategy", "inner_steps",
               "meta_steps", "config", "distributed", "coordinator_address",
               "num_processes", "process_id")
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


def _resolved_config():
  config = _CONFIG.value.unlock()
  for name in ("strategy", "inner_steps", "meta_steps"):
    value = getattr(flags.FLAGS, name)
    if value is not None:
      config[name] = value
  return config.lock()


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
  with no_workdir_on_refusal(flags.FLAGS.workdir):
    _train(task_name, config)


def _train(task_name: str, config) -> None:
  """Builds the trainer and runs it; `UsageError` for a refused start."""
  import jax

  from metaflow import checkpoint, sharding
  from metaflow.trainer import NonFiniteError

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
               (f" (online learners, lifetime {trainer.online.lifetime}"
                + (f" to {trainer.online.lifetime_max}, drawn per life"
                   if trainer.online.drawn else "") + ")"
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


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with its errors (a wrong type, an unknown flag, a
  config override that does not parse) as `UsageError`."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise UsageError(one_line(e)) from None


def print_help(argv: Sequence[str]) -> None:
  """The usage, the flags, the registered tasks and, with ``--task``, every
  ``--config`` key of its config with default and meaning.

  Raises:
    UsageError: an unknown ``--task`` or ``--task_module``.
  """
  import_task_modules(argv)
  print(help_text(flags.FLAGS, __doc__ or "", names=_FLAG_NAMES,
                  extra=lambda: task_help(flag_value(argv, "task"))))


class RunError(Exception):
  """The run cannot go on (no readable checkpoint, diverged): one line,
  exit status 1."""


def run(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point: bad input is reported as ``error: ...`` (exit status 2), a
  run that cannot go on likewise (exit status 1)."""
  argv = list(sys.argv if argv is None else argv)
  try:
    if wants_help(argv):
      print_help(argv)
      sys.exit(0)
    argv = prepare_argv(argv)
    app.run(main, argv=argv, flags_parser=_parse_flags)
  except UsageError as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)
  except RunError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  run()
