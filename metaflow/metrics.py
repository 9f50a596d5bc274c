"""Console lines and TensorBoard event files through clu, without TensorFlow.

Training code reports metrics through clu's `MetricWriter` interface
(``clu.metric_writers``): `LoggingWriter` prints console lines, `MultiWriter`
fans out to several writers, `AsyncWriter` moves the writing off the training
thread, and ``clu.periodic_actions.ReportProgress`` logs steps/s and the ETA.

The catch is that ``clu.metric_writers/__init__.py`` unconditionally imports
``clu.metric_writers.summary_writer``, which is TensorFlow's ``tf.summary``
writer, so ``import clu.metric_writers`` (and ``clu.periodic_actions``, which
imports it) fails without TensorFlow. This module keeps clu's writer stack and
replaces only that one TensorFlow-backed piece:

* If ``import tensorflow`` works, nothing is changed and clu's own writer is
  used.
* Otherwise, before clu is imported, a small module is registered as
  ``sys.modules["clu.metric_writers.summary_writer"]`` whose ``SummaryWriter``
  is a `MetricWriter` writing TensorBoard event files with tensorboardX.

Why tensorboardX: it is the lightest way to write event files. It needs only
numpy and protobuf (plus Pillow for images), whereas TensorFlow is a ~500 MB
dependency and torch's ``torch.utils.tensorboard`` writer would need torch.

Only tensorboardX's synchronous event-file writer (``EventsWriter``) and its
summary builders (``tensorboardX.summary``) are used, not
``tensorboardX.SummaryWriter``, for two reasons:

* ``tensorboardX.SummaryWriter.flush()`` does not drain its event queue: the
  events are written by a background thread, and right after ``flush()`` the
  file may still hold only its header. A `MetricWriter` must have written
  everything once ``flush()`` returns (tests and notebooks read the files
  right after). clu's `AsyncWriter` already takes the writing off the training
  thread, so a second queue buys nothing.
* Its file name is ``events.out.tfevents.<seconds>.<hostname>``, opened with
  ``"wb"``: two writers started in the same directory within the same second
  truncate each other's file. Files here get a ``.<pid>.<counter>`` suffix.

The module is imported for its side effect as well: after
``import metaflow.metrics``, ``from clu import metric_writers`` (and
``periodic_actions``) works without TensorFlow.

Public API:

* `create_writer`: the default writer of a run (console + TensorBoard, async,
  writing only on the main process).
* `report_progress`: a ``clu.periodic_actions.ReportProgress`` hook.
* `read_scalars`: the scalar series of the event files under a directory
  (pure Python; used by tests and notebooks to check what was written).
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import itertools
import os
import struct
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from absl import logging
import jax
import numpy as np
from tensorboardX import record_writer
from tensorboardX import summary as tbx_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import (event_pb2, summary_pb2, tensor_pb2,
                                tensor_shape_pb2, types_pb2)

if TYPE_CHECKING:
  from clu import periodic_actions

_SUMMARY_WRITER_MODULE = "clu.metric_writers.summary_writer"
# Set on the module this file registers, to recognise it later.
_SHIM_MARKER = "__metaflow_tensorboardx_shim__"
_INSTALL_LOCK = threading.RLock()
# Makes event file names unique within a process (see the module docstring).
_FILE_COUNTER = itertools.count()
# Default number of histogram buckets of TensorBoard / clu.
_DEFAULT_HISTOGRAM_BUCKETS = 30


def _tensorflow_importable() -> bool:
  """Whether ``import tensorflow`` works (cheap when it is not installed)."""
  if importlib.util.find_spec("tensorflow") is None:
    return False
  try:
    import tensorflow  # noqa: F401
  except Exception:  # noqa: BLE001  # Broken installs raise more errors.
    return False
  return True


def _install_tensorboardx_summary_writer() -> bool:
  """Makes ``clu.metric_writers`` importable without TensorFlow.

  Registers, before clu imports it, a stand-in for
  ``clu.metric_writers.summary_writer`` whose ``SummaryWriter`` writes event
  files with tensorboardX. The class is built lazily by the module's
  ``__getattr__`` (PEP 562): it subclasses
  ``clu.metric_writers.interface.MetricWriter``, which can only be imported
  while ``clu/metric_writers/__init__.py`` runs (it imports ``interface``
  before ``summary_writer``).

  Idempotent, and a no-op when TensorFlow works or when
  ``clu.metric_writers.summary_writer`` was already imported (clu's own).

  Returns:
    Whether the tensorboardX stand-in is the installed summary writer.
  """
  with _INSTALL_LOCK:
    existing = sys.modules.get(_SUMMARY_WRITER_MODULE)
    if existing is not None:
      return bool(getattr(existing, _SHIM_MARKER, False))
    if _tensorflow_importable():
      return False
    shim = types.ModuleType(
        _SUMMARY_WRITER_MODULE,
        "MetricWriter writing TensorBoard event files with tensorboardX "
        "(installed by metaflow.metrics in place of clu's TensorFlow writer).")
    shim.__spec__ = importlib.machinery.ModuleSpec(
        _SUMMARY_WRITER_MODULE, loader=None)
    shim.__file__ = __file__
    setattr(shim, _SHIM_MARKER, True)

    def __getattr__(name: str) -> Any:
      if name == "SummaryWriter":
        cls = _tensorboardx_summary_writer_class()
        setattr(shim, name, cls)
        return cls
      raise AttributeError(
          f"module {_SUMMARY_WRITER_MODULE!r} has no attribute {name!r}")

    shim.__getattr__ = __getattr__
    sys.modules[_SUMMARY_WRITER_MODULE] = shim
    return True


def _import_metric_writers() -> types.ModuleType:
  """``clu.metric_writers``, with the tensorboardX writer where TF is absent."""
  _install_tensorboardx_summary_writer()
  from clu import metric_writers
  # The import system binds a submodule as an attribute of its package only
  # when it loads it; the stand-in was loaded by hand.
  if not hasattr(metric_writers, "summary_writer"):
    metric_writers.summary_writer = sys.modules[_SUMMARY_WRITER_MODULE]
  return metric_writers


def _make_dirs(path: str) -> None:
  """Creates a directory if missing (tensorboardX's check for ``gs://``...)."""
  if "://" in path:
    record_writer.directory_check(path)
  else:
    os.makedirs(path, exist_ok=True)


# Names of the TensorProto dtypes (tensorboardX/proto/types.proto) per numpy
# dtype name, for `write_summaries`.
_TENSOR_DTYPES = {
    "float16": "DT_HALF",
    "float32": "DT_FLOAT",
    "float64": "DT_DOUBLE",
    "int8": "DT_INT8",
    "int16": "DT_INT16",
    "int32": "DT_INT32",
    "int64": "DT_INT64",
    "uint8": "DT_UINT8",
    "uint16": "DT_UINT16",
    "uint32": "DT_UINT32",
    "uint64": "DT_UINT64",
    "bool": "DT_BOOL",
}


def _tensor_proto(value: Any) -> Any:
  """A tensorboardX ``TensorProto`` holding ``value`` (any array-like)."""
  array = np.asarray(value)
  shape = tensor_shape_pb2.TensorShapeProto(
      dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape])
  if array.dtype.kind in "USO":
    strings = [x if isinstance(x, bytes) else str(x).encode("utf-8")
               for x in array.reshape(-1).tolist()]
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, tensor_shape=shape, string_val=strings)
  if array.dtype.name not in _TENSOR_DTYPES:  # e.g. bfloat16.
    array = array.astype(np.float32)
  little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
  return tensor_pb2.TensorProto(
      dtype=types_pb2.DataType.Value(_TENSOR_DTYPES[array.dtype.name]),
      tensor_shape=shape,
      tensor_content=np.ascontiguousarray(little_endian).tobytes())


def _hparam_value(value: Any) -> bool | int | float | str:
  """A hyper-parameter as a type TensorBoard's hparams plugin accepts."""
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    array = np.asarray(value)
    if array.size == 1 and array.dtype.kind in "biuf":
      return array.item()
  return str(value)


@functools.cache
def _tensorboardx_summary_writer_class() -> type:
  """Builds the tensorboardX `SummaryWriter` (a clu `MetricWriter`)."""
  from clu.internal import utils as clu_utils
  from clu.metric_writers import interface

  class SummaryWriter(interface.MetricWriter):
    """MetricWriter that writes TensorBoard event files with tensorboardX.

    Stands in for clu's TensorFlow ``SummaryWriter`` (same constructor). Each
    writer appends to its own file ``events.out.tfevents.*`` in ``logdir``;
    everything written is on disk once `flush` or `close` returns.
    Scalars are stored as ``simple_value`` (float32, like ``tf.summary``);
    tags are cleaned the tensorboardX way (characters other than
    ``[-/\\w.]`` become ``_``).
    """

    def __init__(self, logdir: str | os.PathLike):
      super().__init__()
      self._logdir = os.fspath(logdir)
      _make_dirs(self._logdir)
      suffix = f".{os.getpid()}.{next(_FILE_COUNTER)}"
      self._events = EventsWriter(
          os.path.join(self._logdir, "events"), filename_suffix=suffix)
      self._closed = False

    @property
    def logdir(self) -> str:
      """The directory of the event file."""
      return self._logdir

    def _write(self, step: int, summary: Any) -> None:
      self._events.write_event(event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=summary))

    def write_summaries(
        self,
        step: int,
        values: Mapping[str, interface.Array],
        metadata: Mapping[str, Any] | None = None):
      for key, value in values.items():
        md = None if metadata is None else metadata.get(key)
        summary_value = summary_pb2.Summary.Value(
            tag=key, tensor=_tensor_proto(value))
        if md is not None:
          serialized = md if isinstance(md, bytes) else md.SerializeToString()
          summary_value.metadata.CopyFrom(
              summary_pb2.SummaryMetadata.FromString(serialized))
        self._write(step, summary_pb2.Summary(value=[summary_value]))

    def write_scalars(self, step: int, scalars: Mapping[str, interface.Scalar]):
      for key, value in scalars.items():
        self._write(step, tbx_summary.scalar(key, np.asarray(value)))

    def write_images(self, step: int, images: Mapping[str, interface.Array]):
      for key, value in images.items():
        array = np.asarray(value)
        if array.dtype != np.uint8:
          array = np.clip(array.astype(np.float32), 0.0, 1.0)
        # [N, H, W, C] is written as one grid image, like tensorboardX does.
        dataformats = "HWC" if array.ndim == 3 else "NHWC"
        self._write(step,
                    tbx_summary.image(key, array, dataformats=dataformats))

    def write_videos(self, step: int, videos: Mapping[str, interface.Array]):
      logging.log_first_n(
          logging.WARNING, "SummaryWriter does not support writing videos.", 1)

    def write_audios(
        self, step: int, audios: Mapping[str, interface.Array], *,
        sample_rate: int):
      if importlib.util.find_spec("soundfile") is None:
        logging.log_first_n(
            logging.WARNING,
            "SummaryWriter needs the soundfile package to write audio; "
            "audio is not written.", 1)
        return
      for key, value in audios.items():
        array = np.clip(np.asarray(value, dtype=np.float32), -1.0, 1.0)
        for i, clip in enumerate(array):
          tag = key if len(array) == 1 else f"{key}/{i}"
          self._write(step, tbx_summary.audio(tag, clip, sample_rate))

    def write_texts(self, step: int, texts: Mapping[str, str]):
      for key, value in texts.items():
        summary = tbx_summary.text(key, str(value))
        # tensorboardX appends "/text_summary"; keep the tag as given, like TF.
        summary.value[0].tag = key
        self._write(step, summary)

    def write_histograms(
        self,
        step: int,
        arrays: Mapping[str, interface.Array],
        num_buckets: Mapping[str, int] | None = None):
      for key, value in arrays.items():
        array = np.asarray(value, dtype=np.float64).reshape(-1)
        array = array[np.isfinite(array)]
        if array.size == 0:
          logging.warning("Histogram %r at step %d has no finite values; "
                          "not written.", key, step)
          continue
        bins = (num_buckets or {}).get(key) or _DEFAULT_HISTOGRAM_BUCKETS
        self._write(step, tbx_summary.histogram(key, array, bins=bins))

    def write_hparams(self, hparams: Mapping[str, Any]):
      flat = {k: _hparam_value(v)
              for k, v in clu_utils.flatten_dict(hparams)}
      # Like tf's hparams_api.hparams(): only the session start info; the
      # hparams plugin infers the experiment (and metrics) from the runs.
      _, session_start_info, _ = tbx_summary.hparams(flat, {})
      self._write(0, session_start_info)

    def flush(self):
      if not self._closed:
        self._events.flush()

    def close(self):
      if not self._closed:
        self._events.flush()
        self._events.close()
        self._closed = True

  SummaryWriter.__module__ = _SUMMARY_WRITER_MODULE
  SummaryWriter.__qualname__ = "SummaryWriter"
  return SummaryWriter


# Importing this module makes `from clu import metric_writers` work.
metric_writers = _import_metric_writers()


def create_writer(
    logdir: str | os.PathLike | None,
    *,
    console: bool = True,
    asynchronous: bool = True,
    is_main_process: bool | None = None,
) -> metric_writers.MetricWriter:
  """The metric writer of a run: console lines and TensorBoard event files.

  Like ``clu.metric_writers.create_default_writer``, but only the main process
  writes (metrics are usually identical on all processes), and the console
  part can be switched off.

  Args:
    logdir: Directory of the TensorBoard event files, created if missing;
      None writes no event files.
    console: Whether to log one line per `write_scalars` call (clu's
      `LoggingWriter`, absl INFO: ``[step] loss=0.5, lr=0.001``).
    asynchronous: Whether writing happens in background threads (clu's
      `AsyncMultiWriter`); call ``flush()`` (or ``close()``) before reading
      the files.
    is_main_process: Whether this process writes. Defaults to
      ``jax.process_index() == 0``. Other processes get a writer that accepts
      every call and writes nothing (and creates no directory).

  Returns:
    A ``clu.metric_writers.MetricWriter``; close it at the end of the run.
  """
  if is_main_process is None:
    is_main_process = jax.process_index() == 0
  if not is_main_process:
    return metric_writers.MultiWriter([])
  writers = []
  if console:
    info = logging.converter.absl_to_standard(logging.INFO)
    if not logging.get_absl_logger().isEnabledFor(info):
      logging.log_first_n(
          logging.WARNING,
          "Console metric lines are absl INFO logs, which are hidden at the "
          "current verbosity; call absl.logging.set_verbosity('info') to "
          "see them (absl.app.run does so unless --verbosity is given).", 1)
    writers.append(metric_writers.LoggingWriter())
  if logdir is not None:
    logdir = os.fspath(logdir)
    _make_dirs(logdir)
    writers.append(metric_writers.SummaryWriter(logdir))
  if asynchronous:
    return metric_writers.AsyncMultiWriter(writers)
  return metric_writers.MultiWriter(writers)


def report_progress(
    num_train_steps: int | None,
    writer: metric_writers.MetricWriter | None,
    every_steps: int | None = None,
    every_secs: float | None = 60.0,
) -> periodic_actions.ReportProgress:
  """A ``clu.periodic_actions.ReportProgress`` hook.

  Call the hook after every training step, ``hook(step)``. When it triggers
  (every ``every_steps`` steps, after ``every_secs`` seconds, and at
  ``num_train_steps``) it logs a line ``Setting work unit notes: 12.3 steps/s,
  40.0% (400/1000), ETA: 1m`` (absl INFO) and writes the scalars
  ``steps_per_sec`` and ``uptime`` to ``writer``. The first call never
  triggers. ``hook.timed(name)`` measures the share of time spent in a part.

  Args:
    num_train_steps: Total number of training steps, for the percentage and
      ETA; None if unknown.
    writer: Where ``steps_per_sec`` and ``uptime`` go; None to only log.
    every_steps: Report every this many steps. The hook must then be called
      at every step (clu raises ValueError if a step is skipped).
    every_secs: Report when this many seconds passed since the last report.

  Returns:
    The hook.
  """
  from clu import periodic_actions  # noqa: F811  # After the shim install.
  return periodic_actions.ReportProgress(
      num_train_steps=num_train_steps,
      writer=writer,
      every_steps=every_steps,
      every_secs=every_secs)


def _read_records(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file (stops at a truncated last record).

  A record is: uint64 length, uint32 masked CRC of the length, the data,
  uint32 masked CRC of the data (little-endian). The length CRC is checked (a
  corrupt length would make the reader skip or swallow the rest of the file);
  the data CRC is not.
  """
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return  # End of file, or a record still being written.
      length_bytes, (length_crc,) = header[:8], struct.unpack("<I", header[8:])
      if record_writer.masked_crc32c(length_bytes) != length_crc:
        logging.warning("Corrupt record length in %s; the rest of the file "
                        "is ignored.", path)
        return
      (length,) = struct.unpack("<Q", length_bytes)
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        return
      yield data


def _tensor_scalar(tensor: Any) -> float | None:
  """The value of a one-element numeric TensorProto, else None."""
  if any(dim.size != 1 for dim in tensor.tensor_shape.dim):
    return None
  dtype_name = types_pb2.DataType.Name(tensor.dtype)
  numpy_dtypes = {v: k for k, v in _TENSOR_DTYPES.items()}
  if dtype_name not in numpy_dtypes:
    return None  # Strings, resources, ...
  dtype = np.dtype(numpy_dtypes[dtype_name]).newbyteorder("<")
  if tensor.tensor_content:
    values = np.frombuffer(tensor.tensor_content, dtype=dtype)
  elif dtype_name == "DT_HALF":  # half_val holds the float16 bit patterns.
    values = np.asarray(tensor.half_val, dtype=np.uint16).view(np.float16)
  else:
    field = {"DT_FLOAT": "float_val", "DT_DOUBLE": "double_val",
             "DT_INT64": "int64_val", "DT_UINT32": "uint32_val",
             "DT_UINT64": "uint64_val", "DT_BOOL": "bool_val"}.get(
                 dtype_name, "int_val")
    values = np.asarray(getattr(tensor, field))
  if values.size != 1:
    return None
  return float(values.reshape(())[()])


def _event_files(logdir: str) -> list[str]:
  """The TensorBoard event files under ``logdir``, recursively, sorted."""
  paths = []
  for dirpath, _, filenames in os.walk(logdir):
    paths.extend(os.path.join(dirpath, name) for name in filenames
                 if name.startswith("events.out.tfevents."))
  return sorted(paths)


def read_scalars(
    logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """The scalar series in the TensorBoard event files under ``logdir``.

  Reads every ``events.out.tfevents.*`` file under ``logdir`` (recursively;
  series of the same tag in several files or subdirectories are merged). Both
  encodings of scalars are read: ``simple_value`` (tensorboardX, TF1) and
  one-element numeric tensors (TF2 ``tf.summary.scalar``, `write_summaries`)
  of tags whose summary metadata names no plugin or the ``scalars`` plugin.
  Images, histograms, texts and hyper-parameters are skipped.

  Values are as stored: ``simple_value`` is a float32, so 0.1 reads back as
  ``float(np.float32(0.1))``.

  Args:
    logdir: A local directory.

  Returns:
    ``{tag: [(step, value), ...]}``, each list sorted by step (ties in the
    order of the sorted file names, then in write order).

  Raises:
    FileNotFoundError: if ``logdir`` is not a directory.
  """
  logdir = os.fspath(logdir)
  if not os.path.isdir(logdir):
    raise FileNotFoundError(f"No such log directory: {logdir!r}")
  series: dict[str, list[tuple[int, float]]] = {}
  for path in _event_files(logdir):
    # Summary metadata is written once per tag and file (the first time).
    plugin_of_tag: dict[str, str] = {}
    for record in _read_records(path):
      event = event_pb2.Event.FromString(record)
      if event.WhichOneof("what") != "summary":
        continue
      for value in event.summary.value:
        if value.HasField("metadata"):
          plugin_of_tag[value.tag] = value.metadata.plugin_data.plugin_name
        kind = value.WhichOneof("value")
        if kind == "simple_value":
          number = float(value.simple_value)
        elif (kind == "tensor" and
              plugin_of_tag.get(value.tag, "") in ("", "scalars")):
          number = _tensor_scalar(value.tensor)
          if number is None:
            continue
        else:
          continue
        series.setdefault(value.tag, []).append((int(event.step), number))
  # A stable sort on the step keeps ties in file-name and write order.
  return {tag: sorted(points, key=lambda point: point[0])
          for tag, points in sorted(series.items())}
