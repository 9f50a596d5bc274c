"""Console lines and TensorBoard event files through clu, without TensorFlow.

Training code reports metrics through clu's `MetricWriter` interface:
`LoggingWriter` prints console lines, `AsyncMultiWriter` fans out to several
writers off the training thread, ``clu.periodic_actions.ReportProgress`` logs
steps/s and the ETA. One piece of clu needs TensorFlow:
``clu/metric_writers/__init__.py`` imports ``summary_writer``, which is
``tf.summary``, so ``import clu.metric_writers`` fails without it. Where
``import tensorflow`` fails, this module registers, before clu is imported, a
stand-in ``sys.modules["clu.metric_writers.summary_writer"]`` whose
``SummaryWriter`` writes event files with tensorboardX (numpy and protobuf
only). After ``import metaflow.metrics``, ``from clu import metric_writers``
works; with TensorFlow installed nothing is replaced.

The stand-in writes what the trainer writes, scalars (``write_scalars``, as
float32 ``simple_value``, like ``tf.summary``), and refuses the rest of the
interface (images, videos, audio, texts, histograms, raw summaries,
hyper-parameters) with a `NotImplementedError` that says so. It uses
tensorboardX's synchronous ``EventsWriter``, not ``tensorboardX.SummaryWriter``:
that one's ``flush()`` leaves events in a background queue, and it names files
by second and host, so two writers started in one directory in the same
second truncate each other (here a ``.<pid>.<counter>`` suffix is added).

Public API: `create_writer`, `report_progress`, `read_scalars`.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import itertools
import logging as std_logging
import os
import sys
import time
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import logging
from tensorboardX import record_writer
from tensorboardX import summary as tbx_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2

if TYPE_CHECKING:
  from clu import periodic_actions
  from clu.metric_writers.interface import MetricWriter

_SUMMARY_WRITER_MODULE = "clu.metric_writers.summary_writer"
# Makes event file names unique within a process (see the module docstring).
_FILE_COUNTER = itertools.count()


def _install_tensorboardx_summary_writer() -> bool:
  """Registers the stand-in ``clu.metric_writers.summary_writer``; returns
  whether it is the installed one (not with TensorFlow, or when clu's own was
  imported first). Idempotent. Its ``SummaryWriter`` is built on first access
  (PEP 562): it subclasses ``clu.metric_writers.interface.MetricWriter``,
  importable only once ``clu/metric_writers/__init__.py`` runs."""
  existing = sys.modules.get(_SUMMARY_WRITER_MODULE)
  if existing is not None:  # Ours (its __file__ is this file) or clu's.
    return getattr(existing, "__file__", None) == __file__
  if importlib.util.find_spec("tensorflow") is not None:
    try:
      import tensorflow  # noqa: F401  # pyright: ignore
      return False  # clu's own writer works.
    except Exception:  # noqa: BLE001  # Broken installs raise any error.
      pass
  shim = types.ModuleType(
      _SUMMARY_WRITER_MODULE, "clu's SummaryWriter, with tensorboardX "
      "instead of TensorFlow (installed by metaflow.metrics).")
  shim.__spec__ = importlib.machinery.ModuleSpec(
      _SUMMARY_WRITER_MODULE, loader=None)
  shim.__file__ = __file__

  def __getattr__(name: str) -> Any:
    if name != "SummaryWriter":
      raise AttributeError(
          f"module {_SUMMARY_WRITER_MODULE!r} has no attribute {name!r}")
    setattr(shim, name, _summary_writer_class())
    return getattr(shim, name)

  setattr(shim, "__getattr__", __getattr__)
  sys.modules[_SUMMARY_WRITER_MODULE] = shim
  return True


def _import_metric_writers() -> types.ModuleType:
  """``clu.metric_writers``, with the tensorboardX writer where TF is absent."""
  _install_tensorboardx_summary_writer()
  from clu import metric_writers
  # The import system binds a submodule to its package only when it loads it.
  if not hasattr(metric_writers, "summary_writer"):
    setattr(metric_writers, "summary_writer",
            sys.modules[_SUMMARY_WRITER_MODULE])
  return metric_writers


def _refuse(kind: str):
  def write(self, *args, **kwargs):
    del self, args, kwargs
    raise NotImplementedError(
        f"metaflow's TensorFlow-free SummaryWriter writes scalars only, not "
        f"{kind}; install tensorflow to write them with clu's own writer.")
  return write


@functools.cache
def _summary_writer_class() -> type:
  """The tensorboardX `SummaryWriter` (a clu `MetricWriter`)."""
  from clu.metric_writers import interface

  class SummaryWriter(interface.MetricWriter):
    """Appends scalars to its own event file in ``logdir``; all of them are on
    disk once `flush` or `close` returns. Tags are cleaned the tensorboardX
    way (characters other than ``[-/\\w.]`` become ``_``)."""

    def __init__(self, logdir: str | os.PathLike):
      super().__init__()
      self._logdir = os.fspath(logdir)
      if "://" in self._logdir:  # gs://, s3://: tensorboardX's own check.
        record_writer.directory_check(self._logdir)
      else:
        os.makedirs(self._logdir, exist_ok=True)
      self._events = EventsWriter(
          os.path.join(self._logdir, "events"),
          filename_suffix=f".{os.getpid()}.{next(_FILE_COUNTER)}")
      self._closed = False

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
      for key, value in scalars.items():
        self._events.write_event(event_pb2.Event(  # pyright: ignore  # protobuf
            wall_time=time.time(), step=int(step),
            summary=tbx_summary.scalar(key, np.asarray(value))))

    write_summaries = _refuse("raw summaries")
    write_images = _refuse("images")
    write_videos = _refuse("videos")
    write_audios = _refuse("audio")
    write_texts = _refuse("texts")
    write_histograms = _refuse("histograms")
    write_hparams = _refuse("hyper-parameters")

    def flush(self):
      if not self._closed:
        self._events.flush()

    def close(self):
      if not self._closed:
        self._events.close()
        self._closed = True

  SummaryWriter.__module__ = _SUMMARY_WRITER_MODULE
  return SummaryWriter


# Importing this module makes `from clu import metric_writers` work.
metric_writers = _import_metric_writers()


def create_writer(
    logdir: str | os.PathLike | None,
    *,
    console: bool = True,
    asynchronous: bool = True,
    is_main_process: bool | None = None,
) -> MetricWriter:
  """The ``MetricWriter`` of a run (close it at the end): console lines and
  TensorBoard event files, like clu's ``create_default_writer``.

  Args:
    logdir: Directory of the event files, created if missing; None: none.
    console: Whether to log one absl INFO line per `write_scalars` call
      (clu's `LoggingWriter`: ``[step] loss=0.5, lr=0.001``).
    asynchronous: Whether writing happens in background threads (clu's
      `AsyncMultiWriter`); ``flush()`` or ``close()`` before reading files.
    is_main_process: Whether this process writes (default: process 0).
      Others get a writer that accepts every call and writes nothing.
  """
  if is_main_process is None:
    is_main_process = jax.process_index() == 0
  if not is_main_process:
    return metric_writers.MultiWriter([])
  writers = []
  if console:
    if not logging.get_absl_logger().isEnabledFor(std_logging.INFO):
      logging.log_first_n(
          logging.WARNING,
          "Console metric lines are absl INFO logs, hidden at the current "
          "verbosity; absl.logging.set_verbosity('info') shows them.", 1)
    writers.append(metric_writers.LoggingWriter())
  if logdir is not None:
    writers.append(metric_writers.SummaryWriter(os.fspath(logdir)))
  if asynchronous:
    return metric_writers.AsyncMultiWriter(writers)
  return metric_writers.MultiWriter(writers)


def report_progress(
    num_train_steps: int | None,
    writer: MetricWriter | None,
    every_steps: int | None = None,
    every_secs: float | None = 60.0,
) -> periodic_actions.ReportProgress:
  """clu's ``ReportProgress`` hook: call ``hook(step)`` after every step.

  When it triggers (every ``every_steps`` steps, which must then all be
  reported, after ``every_secs`` seconds, and at ``num_train_steps``; never on
  the first call) it logs ``12.3 steps/s, 40.0% (400/1000), ETA: 1m`` and
  writes the scalars ``steps_per_sec`` and ``uptime`` to ``writer`` (a
  `MetricWriter`, or None to only log).
  """
  from clu import periodic_actions  # noqa: F811  # After the stand-in.
  return periodic_actions.ReportProgress(
      num_train_steps=num_train_steps, writer=writer,
      every_steps=every_steps, every_secs=every_secs)


def read_scalars(
    logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """The scalar series of the event files under ``logdir`` (recursively).

  Reads with the ``tensorboard`` package's event file loader (TensorFlow-free,
  every event, a record still being written ends the file; ``pip install
  tensorboard``, in the dev extra). Scalars are ``simple_value`` (float32:
  0.1 reads back as ``float(np.float32(0.1))``) or, as TF2 writes them,
  one-element tensors of tags whose metadata names the ``scalars`` plugin.

  Returns:
    ``{tag: [(step, value), ...]}``, each sorted by step (ties in the order
    of the sorted file names, then written). FileNotFoundError if ``logdir``
    is not a directory.
  """
  try:
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util
  except ImportError as e:
    raise ImportError("metaflow.metrics.read_scalars reads event files "
                      "with the tensorboard package: pip install "
                      "tensorboard.") from e
  logdir = os.fspath(logdir)
  if not os.path.isdir(logdir):
    raise FileNotFoundError(f"No such log directory: {logdir!r}")
  paths = sorted(os.path.join(d, name) for d, _, names in os.walk(logdir)
                 for name in names if name.startswith("events.out.tfevents."))
  series: dict[str, list[tuple[int, float]]] = {}
  for path in paths:
    scalar_tags = set()  # TF2 writes a tag's metadata with its first value.
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "scalars":
          scalar_tags.add(value.tag)
        if value.HasField("simple_value"):
          number = value.simple_value
        elif value.HasField("tensor") and value.tag in scalar_tags:
          array = tensor_util.make_ndarray(value.tensor)
          if array.size != 1:
            continue
          number = array.item()
        else:
          continue
        series.setdefault(value.tag, []).append((event.step, float(number)))
  return {tag: sorted(points, key=lambda point: point[0])
          for tag, points in sorted(series.items())}
