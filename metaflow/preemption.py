"""Stopping a run cleanly when its machine is about to be taken away.

A preemptible TPU VM, Slurm (``scancel``, the end of a time limit) and
Kubernetes send SIGTERM some seconds before they kill a job; a user at a
terminal or in a notebook sends SIGINT (Ctrl-C, "interrupt"). `Preemption`
turns either signal into a request that `BilevelTrainer.fit` honours at the
next meta-step boundary: it finishes the step in flight, writes a checkpoint
and returns (`FitResult.preempted` names the signal), so relaunching the
same command resumes bit-exactly and loses no completed step. A second
signal of the same kind acts as it did before (Ctrl-C twice interrupts at
once).

With several processes (``jax.distributed``) every process must stop after
the same step, because the checkpoint is written by all of them together,
while a signal reaches each process at another moment (or only one of
them). The processes agree through JAX's preemption sync service, which
``jax.distributed.initialize`` starts: it catches SIGTERM itself, tells the
other processes, and `jax.experimental.multihost_utils.
reached_preemption_sync_point(step)` (what Orbax's
``CheckpointManager.reached_preemption`` calls) is true on every process at
the same step. So with several processes only SIGTERM is handled (through
JAX; SIGINT keeps its default: a terminal's Ctrl-C reaches every process at
once and interrupts them all), and nothing is installed here.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Optional

import jax

#: The signals a single-process run stops on.
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """Context manager: while it is active, SIGTERM and SIGINT ask the loop to
  stop at the next step boundary instead of ending the process.

  Use::

      with Preemption() as preemption:
        for step in ...:
          ...one step...
          if preemption.reached(step):
            ...checkpoint, then stop...

  Outside the main thread (where Python cannot install handlers) a single
  process is not stopped by signals; several processes still agree through
  JAX's service.
  """

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._previous: dict[int, Any] = {}
    self._multiprocess = False

  def __enter__(self) -> "Preemption":
    self._multiprocess = jax.process_count() > 1
    if (not self._multiprocess
        and threading.current_thread() is threading.main_thread()):
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      if signal.getsignal(signum) == self._handle:
        signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal_name is None:
      self.signal_name = signal.Signals(signum).name
    # The next one of this kind acts as before (e.g. Ctrl-C interrupts).
    signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))

  def reached(self, step: int) -> bool:
    """Whether the loop should stop after ``step`` (called after every step,
    with the same steps on every process)."""
    if not self._multiprocess:
      return self.signal_name is not None
    from jax.experimental import multihost_utils
    try:
      reached = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is disabled
      return False
    if reached:
      self.signal_name = "SIGTERM"
    return reached
