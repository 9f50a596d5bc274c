"""Submit launch.train as a Slurm batch job: one JAX process per GPU.

    python -m launch.cluster.slurm --nodes 2 --gpus_per_node 4 \\
        [--cpus_per_task 8] \\
        [--partition gpu] [--account A] [--time 24:00:00] \\
        [--job_name metaflow] [--venv .venv] [--output slurm-%j.out] \\
        [--script metaflow.sbatch] [--dry_run] \\
        -- --task lm_maml --workdir /shared/runs/lm_maml

Writes a batch script (``--script``, default ``<job_name>.sbatch`` in the
current directory) with ``#SBATCH --nodes=N``, ``--ntasks-per-node=G``,
``--gpus-per-node=G``, ``--cpus-per-task=C`` and the ``--partition``,
``--account``, ``--time`` and ``--output`` lines (an empty value leaves a line
out), whose body ``cd``s to this repository's root and runs

    srun --kill-on-bad-exit=1 --cpus-per-task=C <venv>/bin/python \\
        -m launch.train <args> --distributed

then submits it with ``sbatch PATH`` (from the current directory, so a relative
``--output`` is relative to it). ``--dry_run`` writes nothing and submits
nothing: it prints the script, then the exact ``sbatch`` command.
``--kill-on-bad-exit=1`` ends the whole step as soon as one task fails, so
the others do not hang in a collective. ``--cpus-per-task`` is repeated on
the srun line because srun no longer inherits it from sbatch (Slurm 22.05+);
the tasks' count and the GPUs are inherited from the allocation.

How each process finds the others and its GPU (JAX 0.10.2,
``jax/_src/clusters/slurm_cluster.py``, ``cluster.py``, ``distributed.py``):
``--distributed`` makes launch.train call ``jax.distributed.initialize()``
without arguments. Inside an ``srun`` task SLURM_JOB_ID, SLURM_STEP_NODELIST,
SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID are all set, so JAX's Slurm
cluster is detected (unless Open MPI's OMPI_MCA_orte_hnp_uri is set, which
JAX checks first), and it derives

* coordinator address: the first host name of SLURM_STEP_NODELIST
  (``node[003-006]`` -> ``node003``), port ``61440 + SLURM_JOB_ID % 4096``
  (``JAX_COORDINATOR_PORT`` overrides the port, ``JAX_COORDINATOR_ADDRESS``
  the whole address); process 0 runs there (SLURM_PROCID 0 is on the first
  node);
* number of processes: SLURM_NTASKS (= N x G);
* process id: SLURM_PROCID;
* local devices: ``local_device_ids = [SLURM_LOCALID]`` (unless
  ``JAX_LOCAL_DEVICE_IDS`` is set; never on Cloud TPU VMs), which sets
  ``jax_cuda_visible_devices`` to SLURM_LOCALID: each process opens only the
  GPU with index SLURM_LOCALID (0 ... G-1) among the GPUs it can see.

So JAX itself gives each task its own GPU, provided every task sees all G GPUs
of its node, in the same order. That is what ``--gpus-per-node=G`` with
srun's default (no per-task GPU binding) gives: the step's tasks on a node
share its G GPUs (CUDA_VISIBLE_DEVICES lists all of them). The script
therefore does NOT use ``--gpus-per-task=1`` or ``--gpu-bind``, nor set
CUDA_VISIBLE_DEVICES: with a task that sees only its own GPU (as device 0),
JAX would still ask for device SLURM_LOCALID, which does not exist for
SLURM_LOCALID >= 1. On a cluster that binds GPUs to tasks by default, add
``export JAX_LOCAL_DEVICE_IDS=0`` to the script (JAX then uses the one GPU each
task sees).

What a user must set up:

* This repository on a filesystem shared by the login and compute nodes (the
  job ``cd``s to it), and a virtual environment there (``--venv``, relative to
  the repository root) with the CUDA build of JAX, the version pinned in
  constraints.txt::

      python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e . \
          "jax[cuda12]==0.10.2"

  (``jax[cuda13]`` for CUDA 13 drivers; ``cuda12-local``/``cuda13-local``
  to use a CUDA installed on the nodes instead of pip's).
* ``--workdir`` on the shared filesystem (a relative one is relative to the
  repository root); all processes write checkpoints and event files there.
* ``--partition``/``--account``/``--time`` as your site requires, and
  ``--cpus_per_task`` at most the node's cores divided by G.

Logs: every task's stdout and stderr go to ``--output`` (``%j`` = job id);
``squeue --me`` shows the job, ``scancel JOBID`` stops it. The final summary
is printed by process 0 only.

Bad input (N, G or C below 1, a malformed ``--time``, whitespace in a
``#SBATCH`` value, no ``--task``/``--workdir`` after ``--``, flags after ``--``
that set up jax.distributed) and, without ``--dry_run``, no ``sbatch`` on PATH
or no ``<venv>/bin/python`` are one line, ``error: ...``, exit status 2; a
failing ``sbatch`` is ``error: ...`` with exit status 1.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from typing import Optional, Sequence

from absl import flags

from launch import _cli

_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE|unlimited|"
                   r"infinite")


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_integer("nodes", None, "N: number of nodes.", flag_values=fv)
  flags.DEFINE_integer("gpus_per_node", None, "G: GPUs per node (one process "
                       "per GPU).", flag_values=fv)
  flags.DEFINE_integer("cpus_per_task", 8, "CPU cores per process.",
                       flag_values=fv)
  flags.DEFINE_string("partition", None, "Slurm partition.", flag_values=fv)
  flags.DEFINE_string("account", None, "Slurm account.", flag_values=fv)
  flags.DEFINE_string("time", "24:00:00", "Time limit (empty: the "
                      "partition's default).", flag_values=fv)
  flags.DEFINE_string("job_name", "metaflow", "Job name.", flag_values=fv)
  flags.DEFINE_string("venv", ".venv", "Virtual environment (relative to the "
                      "repository root, or absolute).", flag_values=fv)
  flags.DEFINE_string("output", "slurm-%j.out", "Log file of all tasks "
                      "(empty: Slurm's default).", flag_values=fv)
  flags.DEFINE_string("script", None, "Path of the batch script to write; "
                      "default: <job_name>.sbatch.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print the script and the sbatch "
                    "command; write and submit nothing.", flag_values=fv)
  return fv


def batch_script(nodes: int, gpus_per_node: int, cpus_per_task: int,
                 train_args: Sequence[str], *, job_name: str = "metaflow",
                 partition: Optional[str] = None,
                 account: Optional[str] = None,
                 time: Optional[str] = "24:00:00", venv: str = ".venv",
                 output: Optional[str] = "slurm-%j.out",
                 repo_root: str = _cli.REPO_ROOT) -> str:
  """The text of the batch script."""
  options = [f"--job-name={job_name}", f"--nodes={nodes}",
             f"--ntasks-per-node={gpus_per_node}",
             f"--gpus-per-node={gpus_per_node}",
             f"--cpus-per-task={cpus_per_task}"]
  for name, value in (("partition", partition), ("account", account),
                      ("time", time), ("output", output)):
    if value:
      options.append(f"--{name}={value}")
  python = os.path.join(venv, "bin", "python")
  srun = ["srun", "--kill-on-bad-exit=1", f"--cpus-per-task={cpus_per_task}",
          python, "-m", "launch.train",
          *train_args, "--distributed"]
  return "\n".join(
      ["#!/bin/bash"]
      + [f"#SBATCH {option}" for option in options]
      + ["",
         "# Written by python -m launch.cluster.slurm. One task per GPU; JAX's",
         "# jax.distributed.initialize() takes the coordinator (first node),",
         "# the process count and id from srun's SLURM_* variables and uses",
         "# the GPU numbered SLURM_LOCALID (every task sees the node's GPUs).",
         "set -euo pipefail",
         f"cd {shlex.quote(repo_root)}",
         shlex.join(srun),
         ""])


def _check_args(fv: flags.FlagValues, train_args: Sequence[str]) -> None:
  for name in ("nodes", "gpus_per_node"):
    if getattr(fv, name) is None:
      raise _cli.UsageError(f"--{name} is required.")
  for name in ("nodes", "gpus_per_node", "cpus_per_task"):
    if getattr(fv, name) < 1:
      raise _cli.UsageError(f"--{name} must be at least 1, got "
                            f"{getattr(fv, name)}.")
  if fv.time and not _TIME.fullmatch(fv.time):
    raise _cli.UsageError(f"--time {fv.time!r} is not a Slurm time limit "
                          "(minutes, HH:MM:SS, D-HH:MM:SS, ...).")
  for name in ("job_name", "partition", "account", "output"):
    value = getattr(fv, name)
    if value and re.search(r"\s", value):
      raise _cli.UsageError(f"--{name} must not contain whitespace, got "
                            f"{value!r}.")
  if not fv.job_name:
    raise _cli.UsageError("--job_name must not be empty.")
  if not fv.venv:
    raise _cli.UsageError("--venv must not be empty.")
  if fv.script == "":
    raise _cli.UsageError("--script must not be empty.")
  _cli.check_reserved(train_args, _cli.DISTRIBUTED_FLAGS,
                      "launch.cluster.slurm")
  _cli.require_train_flags(train_args, ("task", "workdir"))


def main(argv: Sequence[str]) -> int:
  """``python -m launch.cluster.slurm``; returns the exit status.

  Raises:
    _cli.UsageError: bad input.
    _cli.CommandError: sbatch failed.
  """
  fv = _define_flags()
  train_args = _cli.parse_flags(fv, argv, __doc__)
  _check_args(fv, train_args)
  script = batch_script(
      fv.nodes, fv.gpus_per_node, fv.cpus_per_task, train_args,
      job_name=fv.job_name, partition=fv.partition, account=fv.account,
      time=fv.time, venv=fv.venv, output=fv.output)
  path = fv.script or f"{fv.job_name}.sbatch"
  sbatch = ["sbatch", path]
  if fv.dry_run:
    print(script)
    print(_cli.shell_join(sbatch))
    return 0

  if shutil.which("sbatch") is None:
    raise _cli.UsageError("sbatch is not on PATH (run this on a Slurm login "
                          "node, or use --dry_run).")
  python = os.path.join(_cli.REPO_ROOT, fv.venv, "bin", "python")
  if not os.path.isfile(python):
    raise _cli.UsageError(f"{python} does not exist: create the virtual "
                          "environment first (see python -m "
                          "launch.cluster.slurm --help).")
  try:
    with open(path, "w") as f:
      f.write(script)
  except OSError as e:
    raise _cli.UsageError(f"cannot write {path}: {e.strerror}.") from None
  print(f"launch.cluster.slurm: wrote {path}", file=sys.stderr, flush=True)
  _cli.run_checked(sbatch, "launch.cluster.slurm")
  return 0


def run(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point: ``error: ...`` with status 2 on bad input, 1 when sbatch
  fails."""
  _cli.run_main(main, argv)


if __name__ == "__main__":
  run()
