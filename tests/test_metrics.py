"""Tests of metaflow.metrics: clu writers with tensorboardX event files."""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaflow import metrics

# isort: split
# Importable without TensorFlow once metaflow.metrics is imported.
from clu import asynclib, metric_writers, periodic_actions

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HAS_TF = importlib.util.find_spec("tensorflow") is not None


def _f32(x: float) -> float:
  """``x`` as stored in a ``simple_value`` (float32)."""
  return float(np.float32(x))


def _event_files(logdir) -> list[str]:
  return [os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs
          if f.startswith("events.out.tfevents.")]


@pytest.fixture
def absl_info(caplog):
  """Captures absl INFO logs (also from the async writer's thread)."""
  caplog.set_level(std_logging.INFO, logger="absl")
  return caplog


@pytest.mark.parametrize("asynchronous", [True, False])
def test_scalars_round_trip_exactly(tmp_path, asynchronous):
  writer = metrics.create_writer(tmp_path / "run", console=False,
                                 asynchronous=asynchronous,
                                 is_main_process=True)
  # Out of order on purpose: read_scalars sorts by step.
  writer.write_scalars(10, {"outer_loss": 0.125, "lr": jnp.float32(3e-4)})
  writer.write_scalars(0, {"outer_loss": 1.5, "lr": np.float64(1e-3)})
  writer.write_scalars(5, {"outer_loss": np.array(0.75, np.float32)})
  writer.flush()  # Everything must be on disk now, without close().

  scalars = metrics.read_scalars(tmp_path)
  assert scalars == {
      "outer_loss": [(0, 1.5), (5, 0.75), (10, 0.125)],
      "lr": [(0, _f32(1e-3)), (10, _f32(3e-4))],
  }
  writer.write_scalars(11, {"outer_loss": 2.0})
  writer.close()
  assert metrics.read_scalars(tmp_path)["outer_loss"][-1] == (11, 2.0)
  assert len(_event_files(tmp_path)) == 1


def test_float32_storage_and_tag_cleaning(tmp_path):
  writer = metrics.create_writer(tmp_path, console=False, asynchronous=False,
                                 is_main_process=True)
  writer.write_scalars(1, {"outer loss": 0.1})
  writer.close()
  # simple_value is a float32; tensorboardX replaces illegal tag characters.
  assert metrics.read_scalars(tmp_path) == {"outer_loss": [(1, _f32(0.1))]}
  assert _f32(0.1) != 0.1


def test_two_writers_in_one_directory_keep_both_files(tmp_path):
  # tensorboardX.SummaryWriter would give both the same file name (seconds +
  # hostname) and the second would truncate the first.
  first = metrics.create_writer(tmp_path, console=False, asynchronous=False,
                                is_main_process=True)
  second = metrics.create_writer(tmp_path, console=False, asynchronous=False,
                                 is_main_process=True)
  first.write_scalars(1, {"a": 1.0})
  second.write_scalars(2, {"b": 2.0})
  first.write_scalars(3, {"a": 3.0})
  first.close()
  second.close()
  assert len(_event_files(tmp_path)) == 2
  assert metrics.read_scalars(tmp_path) == {"a": [(1, 1.0), (3, 3.0)],
                                            "b": [(2, 2.0)]}


@pytest.mark.parametrize("asynchronous", [True, False])
def test_console_lines(absl_info, asynchronous):
  writer = metrics.create_writer(None, asynchronous=asynchronous,
                                 is_main_process=True)
  writer.write_scalars(3, {"outer_loss": 0.5, "step_size": 2})
  writer.flush()
  lines = [r.getMessage() for r in absl_info.records]
  assert "[3] outer_loss=0.5, step_size=2" in lines
  writer.close()


def test_console_off_logs_nothing(absl_info, tmp_path):
  writer = metrics.create_writer(tmp_path, console=False, asynchronous=False,
                                 is_main_process=True)
  writer.write_scalars(3, {"outer_loss": 0.5})
  writer.close()
  assert not [r for r in absl_info.records if "outer_loss" in r.getMessage()]
  assert metrics.read_scalars(tmp_path) == {"outer_loss": [(3, 0.5)]}


def test_create_writer_without_logdir(tmp_path, monkeypatch, absl_info):
  monkeypatch.chdir(tmp_path)
  writer = metrics.create_writer(None, is_main_process=True)
  assert isinstance(writer, metric_writers.MetricWriter)
  writer.write_scalars(0, {"x": 1.0})
  writer.write_texts(0, {"note": "hi"})
  writer.write_hparams({"lr": 0.1})
  writer.close()
  assert os.listdir(tmp_path) == []
  assert "[0] x=1" in [r.getMessage() for r in absl_info.records]


def test_create_writer_makes_missing_logdir(tmp_path):
  logdir = tmp_path / "a" / "b" / "c"
  writer = metrics.create_writer(str(logdir), console=False,
                                 is_main_process=True)
  assert logdir.is_dir()
  writer.close()
  assert len(_event_files(logdir)) == 1


@pytest.mark.parametrize("explicit", [True, False])
def test_non_main_process_writes_nothing(tmp_path, monkeypatch, absl_info,
                                         explicit):
  logdir = tmp_path / "run"
  if explicit:
    writer = metrics.create_writer(logdir, is_main_process=False)
  else:
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = metrics.create_writer(logdir)
  writer.write_scalars(7, {"outer_loss": 1.0})
  writer.write_histograms(7, {"w": np.arange(4.0)})
  writer.write_hparams({"lr": 0.1})
  writer.flush()
  writer.close()
  assert not logdir.exists()
  assert not [r for r in absl_info.records if "outer_loss" in r.getMessage()]


def test_default_is_main_process_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  writer = metrics.create_writer(tmp_path, console=False)
  writer.write_scalars(1, {"outer_loss": 4.0})
  writer.close()
  assert metrics.read_scalars(tmp_path) == {"outer_loss": [(1, 4.0)]}


@pytest.mark.skipif(_HAS_TF, reason="clu's own TF writer is used with TF.")
@pytest.mark.parametrize("asynchronous", [True, False])
def test_kinds_other_than_scalars_are_refused(tmp_path, asynchronous):
  writer = metrics.create_writer(tmp_path, console=False,
                                 asynchronous=asynchronous,
                                 is_main_process=True)
  writer.write_scalars(1, {"outer_loss": 0.5})
  writes = [lambda: writer.write_images(1, {"grid": np.zeros((4, 4, 1))}),
            lambda: writer.write_texts(1, {"note": "hello"}),
            lambda: writer.write_histograms(1, {"w": np.zeros(3)}),
            lambda: writer.write_hparams({"lr": 0.5}),
            lambda: writer.write_summaries(1, {"x": np.zeros(2)})]
  for kind, write in zip(["images", "texts", "histograms", "hyper-parameters",
                          "raw summaries"], writes):
    # clu's AsyncWriter raises a background error at the next call.
    with pytest.raises(Exception, match=f"scalars only, not {kind}; install "
                       "tensorflow") as error:
      write()
      writer.flush()
    assert error.type is (asynclib.AsyncError if asynchronous
                          else NotImplementedError)
  writer.close()
  assert metrics.read_scalars(tmp_path) == {"outer_loss": [(1, 0.5)]}


def test_read_scalars_tensor_scalars_subdirs_and_truncation(tmp_path):
  from tensorboard.compat.proto import summary_pb2
  from tensorboard.util import tensor_util
  from tensorboardX.event_file_writer import EventsWriter
  from tensorboardX.proto import event_pb2
  from tensorboardX.proto import summary_pb2 as tbx_summary_pb2

  def tensor_value(tag, array, plugin=None):
    value = summary_pb2.Summary.Value(
        tag=tag, tensor=tensor_util.make_tensor_proto(array))
    if plugin:
      value.metadata.plugin_data.plugin_name = plugin
    return tbx_summary_pb2.Summary.Value.FromString(value.SerializeToString())

  # TF2 style: tensors, metadata only on the first write of a tag.
  os.makedirs(tmp_path / "eval")
  events = EventsWriter(str(tmp_path / "eval" / "events"))
  for step, value in [(2, tensor_value("acc", np.float32(0.25), "scalars")),
                      (2, tensor_value("msg", np.array(b"x"), "text")),
                      (1, tensor_value("acc", np.float64(0.5))),
                      (3, tensor_value("acc", np.int64(7))),
                      (4, tensor_value("vec", np.ones(3, np.float32)))]:
    events.write_event(event_pb2.Event(
        step=step, summary=tbx_summary_pb2.Summary(value=[value])))
  events.close()
  train_writer = metrics.create_writer(tmp_path / "train", console=False,
                                       asynchronous=False, is_main_process=True)
  train_writer.write_scalars(5, {"acc": 1.0})
  train_writer.close()

  # A record cut short (as while a writer is writing it) ends the file.
  (train_file,) = _event_files(tmp_path / "train")
  with open(train_file, "ab") as f:
    f.write(b"\x40\x00\x00")

  assert metrics.read_scalars(tmp_path) == {
      "acc": [(1, 0.5), (2, 0.25), (3, 7.0), (5, 1.0)]}
  assert metrics.read_scalars(tmp_path / "eval") == {
      "acc": [(1, 0.5), (2, 0.25), (3, 7.0)]}


def test_read_scalars_missing_or_empty_dir(tmp_path):
  with pytest.raises(FileNotFoundError):
    metrics.read_scalars(tmp_path / "missing")
  assert metrics.read_scalars(tmp_path) == {}


def test_report_progress_writes_steps_per_sec(tmp_path, absl_info):
  writer = metrics.create_writer(tmp_path, console=False, asynchronous=False,
                                 is_main_process=True)
  hook = metrics.report_progress(num_train_steps=4, writer=writer,
                                 every_steps=2, every_secs=None)
  assert isinstance(hook, periodic_actions.ReportProgress)
  times = {1: 10.0, 2: 11.0, 3: 11.5, 4: 12.5}
  triggered = [hook(step, t=t) for step, t in times.items()]
  writer.close()
  assert triggered == [False, True, False, True]
  scalars = metrics.read_scalars(tmp_path)
  # (2 - 1) / (11 - 10) and (4 - 2) / (12.5 - 11).
  assert scalars["steps_per_sec"] == [(2, 1.0), (4, _f32(2 / 1.5))]
  assert [step for step, _ in scalars["uptime"]] == [2, 4]
  assert all(uptime >= 0 for _, uptime in scalars["uptime"])
  notes = [r.getMessage() for r in absl_info.records
           if "Setting work unit notes" in r.getMessage()]
  assert len(notes) == 2
  assert "1.0 steps/s, 50.0% (2/4)" in notes[0]
  assert "1.3 steps/s, 100.0% (4/4)" in notes[1]


def test_report_progress_with_async_writer_and_real_clock(tmp_path):
  writer = metrics.create_writer(tmp_path, console=True, is_main_process=True)
  hook = metrics.report_progress(None, writer, every_steps=1, every_secs=None)
  for step in range(1, 5):
    with hook.timed("train"):
      pass
    hook(step)
  writer.close()
  steps = [step for step, _ in metrics.read_scalars(tmp_path)["steps_per_sec"]]
  assert steps == [2, 3, 4]


@pytest.mark.skipif(_HAS_TF, reason="clu's own TF writer is used with TF.")
def test_shim_install_is_idempotent():
  shim = sys.modules[metrics._SUMMARY_WRITER_MODULE]
  writer_class = metric_writers.SummaryWriter
  assert metrics._install_tensorboardx_summary_writer() is True
  assert metrics._install_tensorboardx_summary_writer() is True
  assert sys.modules[metrics._SUMMARY_WRITER_MODULE] is shim
  assert metrics._import_metric_writers() is metric_writers
  assert shim.SummaryWriter is writer_class
  assert metric_writers.summary_writer is shim
  assert issubclass(writer_class, metric_writers.MetricWriter)
  assert writer_class.__name__ == "SummaryWriter"
  with pytest.raises(AttributeError):
    shim.no_such_name  # noqa: B018  # pylint: disable=pointless-statement


@pytest.mark.subprocess
@pytest.mark.skipif(_HAS_TF, reason="clu's own TF writer is used with TF.")
def test_shim_after_failed_clu_import_in_fresh_process(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      try:
        import clu.metric_writers
      except ImportError as e:
        assert "tensorflow" in str(e), e
      else:
        raise SystemExit("clu.metric_writers imported without TensorFlow")
      from metaflow import metrics
      assert metrics._install_tensorboardx_summary_writer()
      assert metrics._install_tensorboardx_summary_writer()
      from clu import metric_writers, periodic_actions
      assert metric_writers.SummaryWriter.__module__ == (
          "clu.metric_writers.summary_writer")
      w = metric_writers.create_default_writer({str(tmp_path)!r},
                                               asynchronous=False)
      w.write_scalars(3, {{"outer_loss": 0.5}})
      w.close()
      print(metrics.read_scalars({str(tmp_path)!r}))
      """)
  result = subprocess.run(
      [sys.executable, "-c", script], cwd=_REPO_ROOT, capture_output=True,
      text=True, timeout=60,
      env={**os.environ, "PYTHONPATH": _REPO_ROOT, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "{'outer_loss': [(3, 0.5)]}"
