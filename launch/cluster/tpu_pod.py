"""Run launch.train on every worker of a Cloud TPU VM pod slice.

    python -m launch.cluster.tpu_pod --tpu NAME --zone ZONE \\
        [--project PROJECT] \\
        [--remote_dir '~/metaflow'] [--python python3] [--setup|--nosetup] \\
        [--dry_run] -- --task lm_maml --workdir /mnt/shared/runs/lm_maml

One copy of ``launch.train`` runs on every worker (host) of the slice, through

    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE [--project=P] \\
        --worker=all --command \\
        "cd REMOTE_DIR && .venv/bin/python -m launch.train ARGS --distributed"

``--distributed`` is added to the train arguments: on TPU VMs
``jax.distributed.initialize()`` finds the coordinator, the number of
processes and each worker's id itself (from the TPU VM metadata).

With ``--setup`` (the default) the project is first installed on every worker:

1. ``git archive --format=tar.gz -o ARCHIVE HEAD`` packs the repository's
   committed files (uncommitted changes are NOT copied; a warning says so)
   into a local temporary file;
2. ``gcloud compute tpus tpu-vm scp ARCHIVE NAME:metaflow-src.tar.gz
   --worker=all`` copies it to every worker's home directory;
3. ``gcloud compute tpus tpu-vm ssh NAME --worker=all --command "..."`` unpacks
   it into REMOTE_DIR (over what is there), creates ``REMOTE_DIR/.venv`` with
   ``--python`` and runs ``.venv/bin/pip install -c constraints.txt -e .
   "jax[tpu]==V"``, V being the JAX version pinned in constraints.txt.

``--nosetup`` skips these steps (the code and ``.venv`` are already there).
Every argument is quoted with shlex (a REMOTE_DIR starting with ``~/`` stays
relative to the remote home directory). ``--dry_run`` prints the commands, one
per line, in order, and runs nothing (the archive's temporary directory is
shown as ``metaflow-tpu-XXXXXXXX``; a real run creates a fresh one and removes
it at the end). Otherwise each command runs in turn; the first that fails
stops the launcher with one line, ``error: ...``, and exit status 1. Bad input
(a missing ``--tpu``/``--zone``, no ``--task``/``--workdir`` after ``--``, a
relative ``--workdir``, flags after ``--`` that set up jax.distributed, no
``gcloud`` or ``git`` on PATH) is one line with exit status 2.

What a user must set up:

* The TPU VM slice must exist (``gcloud compute tpus tpu-vm create NAME
  --zone ZONE --accelerator-type v5litepod-16 --version ...``) and its image
  must have a Python 3.11+ with ``venv`` (pass ``--python python3.11`` when
  ``python3`` is older; the project requires 3.11+).
* ``gcloud`` must be installed and authenticated (``gcloud auth login``), with
  the project set (``gcloud config set project P``) or given as ``--project``;
  the first ``ssh`` to the slice creates and propagates an SSH key.
* ``--workdir`` must be an absolute path on storage that every worker sees
  and that is mounted at the same path on all of them, e.g. a Cloud Storage
  bucket mounted with gcsfuse (``gcsfuse --implicit-dirs BUCKET /mnt/runs`` on
  every worker) or a Filestore NFS share. A relative path would be on each
  worker's own disk, so it is refused. Checkpoints, TensorBoard event files
  and resuming work as with ``launch.train`` on one machine.
* Logs: ``gcloud ... --worker=all`` streams every worker's stdout and stderr
  to this terminal, interleaved; the final summary is printed by process 0
  only. Keep the command running (e.g. in ``tmux``); metrics are in
  ``--workdir`` (``tensorboard --logdir WORKDIR``). To read one worker only,
  run the printed ssh command with ``--worker=0`` instead of ``--worker=all``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

from absl import flags

from launch import _cli

#: Name of the archive, locally (in a temporary directory) and in every
#: worker's home directory.
ARCHIVE_NAME = REMOTE_ARCHIVE = "metaflow-src.tar.gz"


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("tpu", None, "Name of the TPU VM (pod slice).",
                      flag_values=fv)
  flags.DEFINE_string("zone", None, "Its zone, e.g. us-central2-b.",
                      flag_values=fv)
  flags.DEFINE_string("project", None, "Google Cloud project; default: "
                      "gcloud's configured project.", flag_values=fv)
  flags.DEFINE_string("remote_dir", "~/metaflow", "Directory of the project "
                      "on every worker.", flag_values=fv)
  flags.DEFINE_string("python", "python3", "Python (3.11+) on the workers "
                      "that creates REMOTE_DIR/.venv.", flag_values=fv)
  flags.DEFINE_bool("setup", True, "Copy the committed project to every "
                    "worker and install it before running.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print the commands and run nothing.",
                    flag_values=fv)
  return fv


def remote_path(path: str) -> str:
  """``path`` quoted for the remote shell; a leading ``~`` or ``~/`` stays
  unquoted so that the remote shell expands it."""
  if path == "~":
    return "~"
  if path.startswith("~/"):
    rest = path[2:]
    return "~/" + shlex.quote(rest) if rest else "~/"
  return shlex.quote(path)


def _gcloud(verb: str, tpu: str, zone: str, project: Optional[str],
            positional: Sequence[str], *extra: str) -> list[str]:
  command = ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional,
             f"--zone={zone}"]
  if project:
    command.append(f"--project={project}")
  return command + ["--worker=all", *extra]


def setup_commands(tpu: str, zone: str, project: Optional[str],
                   remote_dir: str, python: str, archive: str,
                   jax_version: str) -> list[list[str]]:
  """The three set-up commands: git archive, scp to all workers, unpack and
  install on all workers (the first runs in the repository root)."""
  remote = remote_path(remote_dir)
  install = " && ".join([
      f"mkdir -p {remote}",
      f"tar -xzf ~/{REMOTE_ARCHIVE} -C {remote}",
      f"rm -f ~/{REMOTE_ARCHIVE}",
      f"cd {remote}",
      f"{shlex.quote(python)} -m venv .venv",
      ".venv/bin/pip install -c constraints.txt -e . "
      f"{shlex.quote(f'jax[tpu]=={jax_version}')}",
  ])
  return [
      ["git", "archive", "--format=tar.gz", "-o", archive, "HEAD"],
      _gcloud("scp", tpu, zone, project,
              [archive, f"{tpu}:{REMOTE_ARCHIVE}"]),
      _gcloud("ssh", tpu, zone, project, [tpu], "--command", install),
  ]


def train_command(tpu: str, zone: str, project: Optional[str],
                  remote_dir: str, train_args: Sequence[str]) -> list[str]:
  """The command that runs launch.train (with --distributed) on all workers."""
  remote = (f"cd {remote_path(remote_dir)} && .venv/bin/python -m launch.train "
            + shlex.join([*train_args, "--distributed"]))
  return _gcloud("ssh", tpu, zone, project, [tpu], "--command", remote)


def _check_args(fv: flags.FlagValues, train_args: Sequence[str]) -> None:
  for name in ("tpu", "zone"):
    if not getattr(fv, name):
      raise _cli.UsageError(f"--{name} is required.")
  if not fv.remote_dir:
    raise _cli.UsageError("--remote_dir must not be empty.")
  _cli.check_reserved(train_args, _cli.DISTRIBUTED_FLAGS,
                      "launch.cluster.tpu_pod")
  _cli.require_train_flags(train_args, ("task", "workdir"))
  workdir = _cli.flag_value(train_args, "workdir")
  if not os.path.isabs(workdir):
    raise _cli.UsageError(
        f"--workdir must be an absolute path on storage every worker sees "
        f"(e.g. a gcsfuse or NFS mount), got {workdir!r}.")


def main(argv: Sequence[str]) -> int:
  """``python -m launch.cluster.tpu_pod``; returns the exit status.

  Raises:
    _cli.UsageError: bad input.
    _cli.CommandError: a command failed.
  """
  fv = _define_flags()
  train_args = _cli.parse_flags(fv, argv, __doc__)
  _check_args(fv, train_args)
  run_cmd = train_command(fv.tpu, fv.zone, fv.project, fv.remote_dir,
                          train_args)
  jax_version = _cli.pinned_jax_version() if fv.setup else ""

  if fv.dry_run:
    commands = []
    if fv.setup:
      archive = os.path.join(tempfile.gettempdir(), "metaflow-tpu-XXXXXXXX",
                             ARCHIVE_NAME)
      commands += setup_commands(fv.tpu, fv.zone, fv.project, fv.remote_dir,
                                 fv.python, archive, jax_version)
    for command in commands + [run_cmd]:
      print(_cli.shell_join(command))
    return 0

  needed = ["gcloud"] + (["git"] if fv.setup else [])
  for program in needed:
    if shutil.which(program) is None:
      raise _cli.UsageError(f"{program} is not on PATH.")
  try:
    if fv.setup:
      if not os.path.exists(os.path.join(_cli.REPO_ROOT, ".git")):
        raise _cli.UsageError(f"{_cli.REPO_ROOT} is not a git checkout "
                              "(--setup packs its committed files).")
      dirty = subprocess.run(
          ["git", "status", "--porcelain", "--untracked-files=no"],
          cwd=_cli.REPO_ROOT, capture_output=True, text=True, check=False)
      if dirty.stdout.strip():
        print("launch.cluster.tpu_pod: warning: uncommitted changes are not "
              "copied (git archive HEAD packs committed files only).",
              file=sys.stderr, flush=True)
      tmpdir = tempfile.mkdtemp(prefix="metaflow-tpu-")
      try:
        archive = os.path.join(tmpdir, ARCHIVE_NAME)
        for command in setup_commands(fv.tpu, fv.zone, fv.project,
                                      fv.remote_dir, fv.python, archive,
                                      jax_version):
          _cli.run_checked(command, "launch.cluster.tpu_pod",
                           cwd=_cli.REPO_ROOT)
      finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    _cli.run_checked(run_cmd, "launch.cluster.tpu_pod")
  except KeyboardInterrupt:
    print("launch.cluster.tpu_pod: interrupted.", file=sys.stderr)
    return 130
  return 0


def run(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point: ``error: ...`` with status 2 on bad input, 1 when a command
  fails."""
  _cli.run_main(main, argv)


if __name__ == "__main__":
  run()
