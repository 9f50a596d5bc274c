"""Run one multi-process JAX job on this machine: N processes of launch.train.

    python -m launch.cluster.local --num_processes 2 \\
        [--devices_per_process 4] [--port P] [--grace_period 5] \\
        [--module launch.train] [--dry_run] \\
        -- --task sinusoid_maml --workdir runs/sinusoid_2proc

Starts N child processes (p = 0 ... N-1), from the current directory and with
this Python,

    python -m <module> <arguments after --> \\
        --coordinator_address=localhost:PORT --num_processes=N --process_id=p

where PORT is a free local TCP port for JAX's coordinator (process 0 serves
it; found by binding port 0, unless ``--port`` is given). With
``--devices_per_process K`` each child runs on the CPU with K devices: its
environment gets
``JAX_PLATFORMS=cpu`` and ``--xla_force_host_platform_device_count=K`` in
``XLA_FLAGS`` (other XLA flags are kept, an existing device count is replaced);
without it the environment is passed unchanged (e.g. one machine with several
GPUs: set ``CUDA_VISIBLE_DEVICES`` yourself). ``--module`` is the module each
process runs (default launch.train); the tests use a small stand-in. All
processes share ``--workdir``, which is on this machine's filesystem.

Every child's stdout and stderr (merged) are streamed line by line to this
process's stdout, each line prefixed with ``[p] `` (children run with
``PYTHONUNBUFFERED=1``, so lines arrive as they are printed).

Exit status: 0 when every child exits with 0. As soon as one exits otherwise,
one line on stderr names it and how it ended, e.g.
``launch.cluster.local: process 1 (pid 1234) exited with status 3; stopping the
others.``; the others get SIGTERM, then SIGKILL after ``--grace_period``
seconds (a JAX process whose peer died can hang in a collective and ignore
SIGTERM); launch.cluster.local waits for them and exits with the failed
child's status (128 + N for a child killed by signal N). SIGTERM, SIGINT or
SIGHUP sent to launch.cluster.local ends all children the same way, and it
exits with 128 + N (a second such signal skips the grace period).

No orphans, no hang:

* Each child starts in its own session (``start_new_session``): a Ctrl-C in the
  terminal reaches only launch.cluster.local, which shuts the children down
  in order, and ending a child ends its process group (its own subprocesses
  included).
* On Linux each child also asks the kernel, between fork and exec
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through ctypes in ``preexec_fn``), to
  be killed with SIGKILL when launch.cluster.local dies, so even ``kill -9`` of
  launch.cluster.local leaves no child behind; a child whose parent already died
  before the call kills itself. (Only the direct children get this; on other
  systems the process groups are ended on every path except SIGKILL of
  launch.cluster.local.)

Bad input (N < 1, K < 1, a port outside 1-65535, nothing after ``--`` when the
module is launch.train, or ``--coordinator_address``/``--num_processes``/
``--process_id``/``--distributed`` after ``--``, which launch.cluster.local
sets) is one line, ``error: ...``, with exit status 2. ``--dry_run`` prints
the N command lines, each with its environment changes as ``NAME=value``
prefixes, and exits with status 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

from absl import flags

from launch import _cli

DEFAULT_MODULE = "launch.train"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_POLL_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_integer("num_processes", None, "N: number of processes.",
                       flag_values=fv)
  flags.DEFINE_integer("devices_per_process", None, "K: run each process on "
                       "the CPU with K devices (JAX_PLATFORMS=cpu, XLA_FLAGS="
                       f"{DEVICE_COUNT_FLAG}=K); default: environment "
                       "unchanged.", flag_values=fv)
  flags.DEFINE_integer("port", None, "Coordinator port on localhost; default: "
                       "a free port.", flag_values=fv)
  flags.DEFINE_float("grace_period", 5.0, "Seconds between SIGTERM and SIGKILL "
                     "when the processes are stopped.", flag_values=fv)
  flags.DEFINE_string("module", DEFAULT_MODULE, "The module each process runs "
                      "(default launch.train).", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print the commands and exit.",
                    flag_values=fv)
  return fv


def free_port() -> int:
  """A TCP port that is free on this machine now (bound to port 0, closed)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("", 0))
    return s.getsockname()[1]


def child_env_changes(devices_per_process: Optional[int],
                      environ: Optional[dict[str, str]] = None
                      ) -> dict[str, str]:
  """The variables set in every child's environment (empty without K)."""
  if devices_per_process is None:
    return {}
  environ = os.environ if environ is None else environ
  xla_flags = [f for f in environ.get("XLA_FLAGS", "").split()
               if f.split("=", 1)[0] != DEVICE_COUNT_FLAG]
  xla_flags.append(f"{DEVICE_COUNT_FLAG}={devices_per_process}")
  return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(xla_flags)}


def commands(module: str, args: Sequence[str], num_processes: int,
             port: int) -> list[list[str]]:
  """The argv of each of the N processes."""
  return [[sys.executable, "-m", module, *args,
           f"--coordinator_address=localhost:{port}",
           f"--num_processes={num_processes}", f"--process_id={p}"]
          for p in range(num_processes)]


def _pdeathsig_preexec():
  """A ``preexec_fn`` that sets PR_SET_PDEATHSIG=SIGKILL (Linux), or None.

  libc and prctl are looked up here, in the parent, so the child only makes
  the call (no imports or library loading between fork and exec).
  """
  if not sys.platform.startswith("linux"):
    return None
  import ctypes
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  parent = os.getpid()
  sigkill = int(signal.SIGKILL)

  def preexec():
    prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
    if os.getppid() != parent:  # The parent died before the call.
      os.kill(os.getpid(), sigkill)
  return preexec


def _describe(returncode: int) -> str:
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = f"signal {-returncode}"
    return f"was killed by signal {name}"
  return f"exited with status {returncode}"


def _exit_status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


class _Output:
  """Line-prefixed, locked, flushed writes to this process's stdout."""

  def __init__(self):
    self._lock = threading.Lock()
    self._out = sys.stdout.buffer
    self._broken = False

  def pump(self, index: int, pipe) -> None:
    prefix = f"[{index}] ".encode()
    for line in iter(pipe.readline, b""):
      if not line.endswith(b"\n"):
        line += b"\n"
      with self._lock:
        if self._broken:
          continue  # Keep draining, so the child never blocks on a full pipe.
        try:
          self._out.write(prefix + line)
          self._out.flush()
        except (BrokenPipeError, ValueError):
          self._broken = True
    pipe.close()


class _Group:
  """The N children: start, watch, stop."""

  def __init__(self, argvs: Sequence[Sequence[str]], env: dict[str, str],
               grace_period: float):
    self.grace_period = grace_period
    self.signals: list[int] = []
    self.procs: list[subprocess.Popen] = []
    self.threads: list[threading.Thread] = []
    self._argvs = argvs
    self._env = env

  def _on_signal(self, signum, frame):  # noqa: ARG002
    self.signals.append(signum)

  def start(self) -> None:
    preexec = _pdeathsig_preexec()
    # All children are forked before any reader thread exists (a preexec_fn
    # is only safe in a single-threaded parent).
    for argv in self._argvs:
      if self.signals:
        break
      self.procs.append(subprocess.Popen(
          argv, env=self._env, stdin=subprocess.DEVNULL,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          start_new_session=True, preexec_fn=preexec))
    output = _Output()
    for index, proc in enumerate(self.procs):
      thread = threading.Thread(target=output.pump, args=(index, proc.stdout),
                                daemon=True)
      thread.start()
      self.threads.append(thread)

  def _signal_groups(self, sig: int) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        try:
          os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
          pass

  def stop(self) -> None:
    """SIGTERM to every running child's process group, SIGKILL to those left
    after the grace period (at once on a further signal), then waits."""
    seen = len(self.signals)
    self._signal_groups(signal.SIGTERM)
    deadline = time.monotonic() + self.grace_period
    while (any(p.poll() is None for p in self.procs)
           and time.monotonic() < deadline and len(self.signals) == seen):
      time.sleep(_POLL_SECONDS)
    self._signal_groups(signal.SIGKILL)
    for proc in self.procs:
      proc.wait()

  def wait(self) -> int:
    """Waits for all children; returns launch.cluster.local's exit status."""
    status = 0
    try:
      while not self.signals:
        running = [p for p in self.procs if p.poll() is None]
        failed = next(((i, p) for i, p in enumerate(self.procs)
                       if p.returncode not in (None, 0)), None)
        if failed:
          index, proc = failed
          tail = "; stopping the others." if running else "."
          print(f"launch.cluster.local: process {index} (pid {proc.pid}) "
                f"{_describe(proc.returncode)}{tail}", file=sys.stderr,
                flush=True)
          status = _exit_status(proc.returncode)
          break
        if not running:
          break
        time.sleep(_POLL_SECONDS)
      if self.signals:
        sig = signal.Signals(self.signals[0])
        print(f"launch.cluster.local: received {sig.name}; stopping the "
              "processes.",
              file=sys.stderr, flush=True)
        status = 128 + sig.value
    finally:
      self.stop()
      for thread in self.threads:
        thread.join(timeout=2.0)
    return status


def main(argv: Sequence[str]) -> int:
  """``python -m launch.cluster.local``; returns the exit status.

  Raises:
    _cli.UsageError: bad input.
  """
  fv = _define_flags()
  args = _cli.parse_flags(fv, argv, __doc__)
  if fv.num_processes is None:
    raise _cli.UsageError("--num_processes is required.")
  if fv.num_processes < 1:
    raise _cli.UsageError(f"--num_processes must be at least 1, got "
                          f"{fv.num_processes}.")
  if fv.devices_per_process is not None and fv.devices_per_process < 1:
    raise _cli.UsageError(f"--devices_per_process must be at least 1, got "
                          f"{fv.devices_per_process}.")
  if fv.port is not None and not 1 <= fv.port <= 65535:
    raise _cli.UsageError(f"--port must be in 1-65535, got {fv.port}.")
  if fv.grace_period < 0:
    raise _cli.UsageError(f"--grace_period must be >= 0, got "
                          f"{fv.grace_period}.")
  if not fv.module:
    raise _cli.UsageError("--module must not be empty.")
  if fv.module == DEFAULT_MODULE and not args:
    raise _cli.UsageError("nothing after --: give the launch.train arguments, "
                          "e.g. -- --task sinusoid_maml --workdir runs/x.")
  _cli.check_reserved(args, _cli.DISTRIBUTED_FLAGS, "launch.cluster.local")

  port = fv.port if fv.port is not None else free_port()
  argvs = commands(fv.module, args, fv.num_processes, port)
  changes = child_env_changes(fv.devices_per_process)
  if fv.dry_run:
    for command in argvs:
      print(_cli.shell_join(command, changes))
    return 0

  # Unbuffered: the children's lines reach the console as they are printed.
  group = _Group(argvs, {**os.environ, **changes, "PYTHONUNBUFFERED": "1"},
                 fv.grace_period)
  for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, group._on_signal)  # pylint: disable=protected-access
  try:
    group.start()
  except OSError as e:
    group.stop()
    raise _cli.CommandError(f"cannot start {argvs[len(group.procs)][0]}: "
                            f"{e}") from None
  return group.wait()


def run(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point: exits with the job's status (2 and ``error: ...`` on bad
  input)."""
  _cli.run_main(main, argv)


if __name__ == "__main__":
  run()
