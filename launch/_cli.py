"""Shared command-line plumbing of the launchers (`launch.local`,
`launch.tpu_pod`, `launch.slurm`).

A launcher's command line is ``python -m launch.NAME [own flags] --
[launch.train arguments]``: its own flags are parsed with absl (a fresh
``FlagValues`` per call, so nothing leaks between calls in one process);
everything after the first ``--`` is passed through untouched. Bad input is
reported as one line, ``error: ...`` on stderr, with exit status 2, as in
``launch.train``; a step that ran and failed as ``error: ...`` with status 1.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Iterable, Optional, Sequence

from absl import flags

#: The repository root (the directory that holds ``launch/``).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: ``launch.train`` flags that set up `jax.distributed`; the launchers add them.
DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id",
                     "distributed")


class UsageError(Exception):
  """Bad command-line input: reported as ``error: ...``, exit status 2."""


class CommandError(Exception):
  """A step that ran failed: reported as ``error: ...``, exit status 1."""


_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def start_backend(host_devices: int = 0,
                  extra_flags: Sequence[str] = ()) -> int:
  """Starts JAX's backend with ``host_devices`` CPU host devices (0: as
  configured) and ``extra_flags`` added to ``XLA_FLAGS`` (those not already
  set), and returns the device count. XLA reads its flags once, at backend
  start, so ``XLA_FLAGS`` is put back afterwards: subprocesses of the caller
  (tests, notebooks) must not inherit it; in a process where JAX has started
  already, this changes nothing.

  Raises:
    UsageError: JAX had already started with another number of devices.
  """
  import jax

  previous = os.environ.get("XLA_FLAGS")
  keep = [f for f in (previous or "").split()
          if not (host_devices and f.startswith(_DEVICES_FLAG))]
  keep += [f for f in extra_flags
           if not any(k.split("=")[0] == f.split("=")[0] for k in keep)]
  if host_devices:
    keep.append(f"{_DEVICES_FLAG}={host_devices}")
  os.environ["XLA_FLAGS"] = " ".join(keep)
  try:
    devices = jax.device_count()  # Starts the backend with the flags.
  finally:
    if previous is None:
      del os.environ["XLA_FLAGS"]
    else:
      os.environ["XLA_FLAGS"] = previous
  if host_devices and devices != host_devices:
    raise UsageError(f"--host_devices {host_devices}: JAX had already started "
                     f"with {devices} devices.")
  return devices


def one_line(text: str) -> str:
  """``text`` with every run of whitespace (newlines included) as one space."""
  return " ".join(str(text).split())


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits ``argv[1:]`` at the first ``--``.

  Returns:
    (the launcher's own arguments, the arguments after ``--``); the second is
    empty when there is no ``--``.
  """
  args = list(argv[1:])
  if "--" in args:
    i = args.index("--")
    return args[:i], args[i + 1:]
  return args, []


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str],
                doc: str) -> list[str]:
  """Parses the launcher's own flags into ``flag_values``.

  ``-h``/``--help`` prints ``doc`` and the flags and exits with status 0.

  Args:
    flag_values: a fresh ``FlagValues`` with the launcher's flags.
    argv: the full command line (``argv[0]`` is the program).
    doc: the launcher's module docstring.

  Returns:
    The arguments after ``--``.

  Raises:
    UsageError: unknown flag, malformed value, or an argument before ``--``
      that is not a flag.
  """
  own, passthrough = split_argv(argv)
  if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in own):
    print(doc.strip() + "\n\nflags:\n"
          + flag_values.get_help(include_special_flags=False).strip())
    sys.exit(0)
  try:
    rest = flag_values([argv[0] if argv else "launcher", *own])
  except flags.Error as e:
    raise UsageError(one_line(e)) from None
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments before --: {shlex.join(rest[1:])} "
                     "(the launch.train arguments go after --).")
  return passthrough


def flag_value(args: Sequence[str], name: str) -> Optional[str]:
  """The value of ``--name=V`` or ``--name V`` in ``args`` (the last one), or
  None."""
  value = None
  for i, arg in enumerate(args):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(args):
      value = args[i + 1]
  return value


def check_reserved(args: Sequence[str], names: Iterable[str],
                   launcher: str) -> None:
  """Refuses flags in ``args`` that the launcher sets itself.

  Raises:
    UsageError: ``--name``, ``--name=...`` or ``--noname`` is in ``args``.
  """
  for name in names:
    pattern = re.compile(rf"^--?(no)?{re.escape(name)}(=.*)?$")
    for arg in args:
      if pattern.match(arg):
        raise UsageError(f"{arg.split('=', 1)[0]} must not be given after --: "
                         f"{launcher} sets up jax.distributed itself.")


def require_train_flags(args: Sequence[str], names: Iterable[str]) -> None:
  """Checks that ``args`` (launch.train arguments) give each flag in ``names``.

  Raises:
    UsageError: one is missing or empty.
  """
  for name in names:
    if not flag_value(args, name):
      raise UsageError(f"the launch.train arguments after -- must include "
                       f"--{name}.")


#: The exact versions verified together (``pip install -c`` uses it).
CONSTRAINTS = os.path.join(REPO_ROOT, "constraints.txt")


def pinned_jax_version(constraints: str = CONSTRAINTS) -> str:
  """The ``jax==X`` version pinned in the constraints file.

  Raises:
    UsageError: the file is missing or pins no exact JAX version.
  """
  try:
    with open(constraints) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise UsageError(f"cannot read {constraints}: {one_line(str(e))}") from None
  for line in lines:
    match = re.fullmatch(r"\s*jax\s*==\s*([^\s;#]+)\s*(#.*)?", line)
    if match:
      return match.group(1)
  raise UsageError(f"{constraints} pins no exact jax version (jax==X).")


def shell_join(argv: Sequence[str],
               env: Optional[dict[str, str]] = None) -> str:
  """A shell command line: ``NAME=value ... argv``, every word quoted."""
  prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
  return " ".join(prefix + [shlex.quote(a) for a in argv])


def run_checked(command: Sequence[str], launcher: str,
                cwd: Optional[str] = None) -> None:
  """Runs ``command`` (echoed on stderr as ``launcher: command``).

  Raises:
    CommandError: it exited with a non-zero status.
  """
  print(f"{launcher}: {shell_join(command)}", file=sys.stderr, flush=True)
  status = subprocess.run(list(command), cwd=cwd, check=False).returncode
  if status != 0:
    raise CommandError(f"exit status {status} from: {shell_join(command)}")


def run_main(main: Callable[[Sequence[str]], int],
             argv: Optional[Sequence[str]] = None) -> None:
  """Runs ``main(argv)`` and exits with its status; `UsageError` is printed as
  ``error: ...`` (status 2), `CommandError` as ``error: ...`` (status 1)."""
  argv = list(sys.argv if argv is None else argv)
  try:
    status = main(argv)
  except UsageError as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)
  except CommandError as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(1)
  sys.exit(status)
