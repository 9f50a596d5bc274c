"""Shared command-line plumbing of the runners and launchers.

Every command (`launch.benchmark`, `launch.benchmark_lm`, `launch.curate`,
`launch.evaluate`, `launch.plan`, the cluster launchers `launch.cluster.*`
and the experiments' ``python -m experiments.NAME``) parses its flags with
absl, into a fresh ``FlagValues`` per call (`parse_flags`: nothing leaks
between calls in one process). One convention for all of them: ``--help``
prints the module docstring (the usage) and the flags and exits with status
0; bad input (an unknown flag, a malformed or out-of-range value, a missing
required flag, a stray argument) is reported as one line, ``error: ...`` on
stderr, with exit status 2, as in ``launch.train``; a step that ran and
failed as ``error: ...`` with status 1 (`call_main`, `run_main`).

A launcher's command line is ``python -m launch.cluster.NAME [own flags] --
[launch.train arguments]``: everything after the first ``--`` is passed
through untouched.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from typing import Any, Callable, Iterable, Optional, Sequence

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


#: The arguments that ask for help.
HELP_FLAGS = ("-h", "-help", "--help", "--helpfull", "--helpshort")


def wants_help(argv: Sequence[str]) -> bool:
  """Whether ``argv`` (``argv[0]`` is the program) asks for help before a
  ``--``, if any."""
  return any(arg in HELP_FLAGS for arg in split_argv(argv)[0])


def help_text(flag_values: flags.FlagValues, doc: str,
              extra: Optional[Callable[[], str]] = None,
              required: Iterable[str] = (),
              names: Optional[Iterable[str]] = None) -> str:
  """A command's ``--help``: ``doc``, its flags (by name, each with its help,
  default or whether it is ``required``, and allowed range) and ``extra()``
  (if given). ``names``: only these flags (default: all of
  ``flag_values``)."""
  required = set(required)
  lines = [doc.strip(), "", "flags:"]
  for name in sorted(flag_values if names is None else names):
    flag = flag_values[name]
    if flag.name != name:  # A short name.
      continue
    # An enum's values (``<a|b|c>``) may break between values.
    text = f"--{'[no]' * flag.boolean}{name}: {flag.help.replace('|', ' | ')}"
    notes = (["required"] if name in required else
             [f"default: {flag.default_as_str}"] * (flag.default is not None))
    notes += [flag.parser.syntactic_help] * bool(flag.parser.syntactic_help)
    lines += textwrap.wrap(text, 79, initial_indent="  ",
                           subsequent_indent="      ")
    if notes:
      lines += textwrap.wrap(f"({'; '.join(notes)})", 79,
                             initial_indent="      ",
                             subsequent_indent="       ")
  if extra is not None:
    lines += ["", extra().strip()]
  return "\n".join(lines)


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str],
                doc: str, *, passthrough: bool = True,
                required: Iterable[str] = (),
                outputs: Iterable[str] = (),
                help_extra: Optional[Callable[[], str]] = None) -> list[str]:
  """Parses a command's own flags into ``flag_values``.

  ``-h``/``--help`` (before any ``--``) prints `help_text` and exits with
  status 0.

  Args:
    flag_values: a fresh ``FlagValues`` with the command's flags.
    argv: the full command line (``argv[0]`` is the program).
    doc: the command's module docstring (its usage).
    passthrough: the arguments after the first ``--`` are the command's to
      pass on (a launcher's ``launch.train`` arguments); without it, every
      argument must be one of the command's flags.
    required: flags that must be given a value (not None, not empty).
    outputs: flags naming an output folder (`check_output_folder`, when
      given a value).
    help_extra: returns text appended to ``--help`` (called for it only).

  Returns:
    The arguments after ``--`` (none without ``passthrough``).

  Raises:
    UsageError: unknown flag, malformed or out-of-range value, missing
      required flag, an output folder that cannot be written, or an
      argument that is not a flag (before ``--`` with ``passthrough``).
  """
  if wants_help(argv):
    print(help_text(flag_values, doc, help_extra, required))
    sys.exit(0)
  own, after = split_argv(argv) if passthrough else (list(argv[1:]), [])
  try:
    rest = flag_values([argv[0] if argv else "command", *own])
  except flags.Error as e:
    raise UsageError(one_line(e)) from None
  if len(rest) > 1:
    if passthrough:
      raise UsageError(f"unexpected arguments before --: "
                       f"{shlex.join(rest[1:])} (the launch.train arguments "
                       "go after --).")
    raise UsageError(f"unexpected arguments: {shlex.join(rest[1:])} (every "
                     "setting is a --flag; --help lists them).")
  for name in required:
    if flag_values[name].value in (None, ""):
      raise UsageError(f"--{name} is required.")
  for name in outputs:
    if flag_values[name].value:
      check_output_folder(flag_values[name].value, name)
  return after


class _TextParser(flags.ArgumentParser):
  """An absl parser of ``parse(text)``; a value that is not text (a default
  given as the parsed value) is kept as it is."""

  def __init__(self, parse: Callable[[str], Any], syntax: str):
    self._parse_text, self._syntax = parse, syntax

  def parse(self, argument):
    return self._parse_text(argument) if isinstance(argument, str) else argument

  def flag_type(self) -> str:
    return self._syntax


class _TextSerializer(flags.ArgumentSerializer):
  """The command-line text of a parsed value (how ``--help`` shows it)."""

  def __init__(self, serialize: Callable[[Any], str]):
    self._serialize = serialize

  def serialize(self, value) -> str:
    return self._serialize(value)


def _comma_join(value) -> str:
  if isinstance(value, dict):
    return ",".join(f"{k}={v}" for k, v in value.items())
  return ",".join(getattr(v, "name", str(v)) for v in value)


def define_parsed(name: str, default, parse: Callable[[str], Any],
                  help_string: str, flag_values: flags.FlagValues, *,
                  syntax: str = "text",
                  serialize: Callable[[Any], str] = _comma_join) -> None:
  """Defines a flag whose text ``parse`` converts: a ``ValueError`` from it
  is a bad value, reported as absl reports one (``flag --NAME=V: ...``).

  Args:
    name: the flag's name.
    default: its default, as text (parsed) or as the parsed value.
    parse: text -> value; ValueError on a bad value.
    help_string: the flag's help.
    flag_values: the command's ``FlagValues``.
    syntax: the kind of value, for ``--help``.
    serialize: value -> text (for ``--help``'s default; default: the items
      of a list or dict comma-separated).
  """
  flags.DEFINE(_TextParser(parse, syntax), name, default, help_string,
               flag_values=flag_values, serializer=_TextSerializer(serialize))


def positive_ints(text: str) -> list[int]:
  """``"1,4,16"`` -> ``[1, 4, 16]``; ValueError unless every item is an
  integer >= 1 (and there is one)."""
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"expected comma-separated integers, got {text!r}."
                     ) from None
  if not values or min(values) < 1:
    raise ValueError(f"expected positive integers, got {text!r}.")
  return values


def names_in(known: Sequence[str], what: str) -> Callable[[str], list[str]]:
  """A parser of comma-separated names, each one of ``known``; ValueError
  (naming them ``what``) for an unknown one or none."""

  def parse(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
      raise ValueError(f"unknown {what} {', '.join(unknown) or '(none)'}; "
                       f"expected some of {', '.join(known)}.")
    return names

  return parse


def check_output_folder(path: str, flag: str) -> None:
  """Checks, before anything runs, that ``path`` is a folder that can be
  written or can be created; leaves nothing behind (a folder it had to create
  to find out is removed).

  Raises:
    UsageError: it cannot hold the output (``flag`` names the flag).
  """
  folder = os.path.abspath(path)
  first_missing = None
  while not os.path.exists(folder):
    first_missing, folder = folder, os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise UsageError(f"--{flag} {path!r}: {folder!r} is not a folder.")
  probe = None
  try:
    if first_missing is not None:
      os.makedirs(path)
    probe = tempfile.mkdtemp(dir=path)
  except OSError as e:
    raise UsageError(f"--{flag} {path!r} cannot be written: "
                     f"{one_line(e.strerror or e)}.") from None
  finally:
    for made in (first_missing, probe):
      if made is not None and os.path.exists(made):
        shutil.rmtree(made, ignore_errors=True)
        break


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


def call_main(main: Callable[[Sequence[str]], int],
              argv: Optional[Sequence[str]] = None) -> int:
  """``main(argv)``'s exit status (``argv`` without the program name;
  default ``sys.argv[1:]``); `UsageError` is printed as ``error: ...`` on
  stderr (status 2), `CommandError` likewise (status 1)."""
  try:
    return main(list(sys.argv[1:] if argv is None else argv))
  except UsageError as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2
  except CommandError as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 1


def run_main(main: Callable[[Sequence[str]], int],
             argv: Optional[Sequence[str]] = None) -> None:
  """Exits with `call_main`'s status of ``main(argv)`` (default
  ``sys.argv``)."""
  sys.exit(call_main(main, sys.argv if argv is None else argv))
