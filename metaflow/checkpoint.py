"""Orbax checkpoints of meta-training: state, data position and config.

One checkpoint (a step directory under ``workdir/checkpoints``) holds three
items written atomically together by an ``orbax.checkpoint.CheckpointManager``:

* ``state``: the `TrainState` pytree (meta-parameters eta, outer optimiser
  state, step, RNG key), global (possibly sharded) arrays;
* ``data``: the Grain iterator state (the index of the next meta-batch), as
  JSON;
* ``config``: the JSON fingerprint of everything that determines the run;
* ``info``: what the run used that a resumed run may change (the exact
  strategy, e.g. the one ``strategy="auto"`` chose), JSON, not compared.

Resuming restores the first three, so continuing from a checkpoint is
bit-identical to a run that never stopped. A checkpoint whose fingerprint
differs from the current run's is refused (`IncompatibleCheckpointError`)
instead of mixing two runs. Orbax finalises a step directory only after all
items are written, so a process killed mid-save leaves the previous checkpoint
as the latest. A finalised checkpoint that later cannot be read (a truncated or
deleted array file, broken metadata: a disk or a copy gone wrong) is moved aside
to ``checkpoints.unreadable/`` with a warning and the one before it is restored
(`Checkpointer.restore`); the last ``max_to_keep`` are kept for this.

With several processes (``jax.distributed``) every process calls `save` and
`restore` together: Orbax writes each array's shards from the processes that
hold them and restores them into the shardings of the template state, so a
checkpoint written by P processes on one mesh resumes in any other number
of processes and devices. The data position is the same in every process
(`metaflow.data.meta_batches`: the state of an iterator over global
meta-batch indices), so one copy is stored (Grain's own checkpoint handler
would write one file per process, which a different process count could not
read) and every process restores it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from metaflow._checks import PyTree


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a run with a different config."""


class UnreadableCheckpointError(RuntimeError):
  """The workdir holds checkpoints and none of them can be restored."""


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0][:200] if text else type(error).__name__


def _all_processes_ok(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (all of them call it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _json_default(value: Any) -> str:
  """Functions and classes by qualified name (their repr holds an address
  that differs between processes); other objects by repr."""
  if callable(value) and hasattr(value, "__qualname__"):
    return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
  return repr(value)


def _normalise(config: Mapping[str, Any]) -> dict:
  """The config as JSON would restore it (tuples -> lists, keys -> str)."""
  return json.loads(json.dumps(config, sort_keys=True, default=_json_default))


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any],
                prefix: str = "") -> list[str]:
  """Human-readable differences between two nested config dicts."""
  diffs = []
  for key in sorted(set(saved) | set(current)):
    name = f"{prefix}{key}"
    if key not in saved:
      diffs.append(f"{name}: not in the checkpoint, now {current[key]!r}")
    elif key not in current:
      diffs.append(f"{name}: {saved[key]!r} in the checkpoint, absent now")
    elif isinstance(saved[key], dict) and isinstance(current[key], dict):
      diffs.extend(config_diff(saved[key], current[key], name + "."))
    elif saved[key] != current[key]:
      diffs.append(f"{name}: {saved[key]!r} in the checkpoint, now "
                   f"{current[key]!r}")
  return diffs


def check_workdir(workdir: str | os.PathLike) -> str:
  """``workdir`` as a string; creates it; a clear error if it is a file."""
  workdir = os.fspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"workdir {workdir!r} exists and is not a "
                             "directory.")
  os.makedirs(workdir, exist_ok=True)
  return workdir


class Checkpointer:
  """Saves and restores meta-training under ``workdir/checkpoints``.

  Args:
    workdir: the run directory (created if missing).
    config: the run's fingerprint (JSON-serialisable nested dict).
    max_to_keep: number of most recent checkpoints kept.
    info: JSON-serialisable facts saved with each checkpoint and not
      compared on restore (`info`).
  """

  def __init__(self, workdir: str | os.PathLike, config: Mapping[str, Any],
               max_to_keep: int = 3, info: Optional[Mapping[str, Any]] = None):
    self.directory = os.path.join(os.path.abspath(check_workdir(workdir)),
                                  "checkpoints")
    self.config = _normalise(config)
    self._info = _normalise(info or {})
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    """The step of the latest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree,
           data_iterator: grain.DatasetIterator) -> None:
    """Writes checkpoint ``step`` (no-op if it already exists)."""
    if step in self._manager.all_steps():
      return
    # With several processes Orbax's barriers are computations on every
    # device; start them with nothing else in flight.
    jax.block_until_ready(state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_iterator.get_state()),
        config=ocp.args.JsonSave(self.config),
        info=ocp.args.JsonSave(self._info)))
    self._manager.wait_until_finished()

  def restore(self, state: PyTree, data_iterator: grain.DatasetIterator
              ) -> Optional[PyTree]:
    """Restores the latest checkpoint that can be read into
    ``data_iterator`` and returns the state (shaped and sharded like the
    template ``state``: arrays or ``jax.ShapeDtypeStruct`` leaves, sharded),
    or None if there is none.

    A checkpoint that cannot be restored (a truncated or missing array file,
    unreadable metadata) is skipped with a warning for the one before it;
    once one restores, the unreadable newer ones are moved aside to
    ``checkpoints.unreadable/`` (never deleted), so that the run continues
    from the restored step and later saves take their place. With several
    processes they agree: a checkpoint is unreadable if any process failed.

    Raises:
      IncompatibleCheckpointError: the checkpoint's config differs.
      UnreadableCheckpointError: there are checkpoints and none restores
        (nothing is moved).
    """
    failed = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        saved = self._manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]
      except Exception as e:  # noqa: BLE001 (any failure to read it)
        saved, error = None, e
      if saved is not None:
        self._check_config(step, saved)
        try:
          restored = self._manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(state),
              data=ocp.args.JsonRestore()))
          error = None
        except Exception as e:  # noqa: BLE001
          error = e
      if _all_processes_ok(error is None):
        for bad in failed:
          self._move_aside(bad[0])
        data_iterator.set_state(restored["data"])
        return restored["state"]
      reason = (f"{type(error).__name__}: {_first_line(error)}" if error
                else "unreadable on another process")
      logging.warning("Checkpoint %d in %s cannot be restored (%s); trying "
                      "the one before it.", step, self.directory, reason)
      failed.append((step, reason))
    if failed:
      raise UnreadableCheckpointError(
          f"no checkpoint in {self.directory} can be restored: "
          + "; ".join(f"step {step}: {reason}" for step, reason in failed)
          + ". Nothing was moved; use another --workdir to start afresh.")
    return None

  def _check_config(self, step: int, saved: Mapping[str, Any]) -> None:
    diffs = config_diff(saved, self.config)
    if diffs:
      raise IncompatibleCheckpointError(
          f"The checkpoint at {self.directory} (step {step}) was written "
          f"by a run with a different config: {'; '.join(diffs)}. Use "
          "another --workdir, or the same config to resume.")

  def restore_step(self, step: int, state: PyTree) -> PyTree:
    """The state of checkpoint ``step``, shaped and sharded like the
    template ``state``, after checking its config (for reading a run's
    result: no data iterator, no fallback to an earlier step).

    Raises:
      IncompatibleCheckpointError: the checkpoint's config differs.
    """
    saved = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
    self._check_config(step, saved)
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state)))["state"]

  def _move_aside(self, step: int) -> None:
    """Moves step directory ``step`` to ``checkpoints.unreadable/`` (by
    process 0; every process waits for it)."""
    if jax.process_index() == 0:
      source = os.path.join(self.directory, str(step))
      target = os.path.join(self.directory + ".unreadable", str(step))
      suffix = 0
      while os.path.exists(target + (f".{suffix}" if suffix else "")):
        suffix += 1
      target += f".{suffix}" if suffix else ""
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(source, target)
      logging.warning("Moved the unreadable checkpoint %d to %s.", step,
                      target)
    _sync_processes(f"metaflow_move_aside_{step}")
    self._manager.reload()

  def info(self, step: Optional[int] = None) -> dict:
    """The ``info`` saved with checkpoint ``step`` (default: the latest);
    {} for a checkpoint written without one."""
    step = self.latest_step() if step is None else step
    if step is None:
      return {}
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          info=ocp.args.JsonRestore()))["info"]
    except (KeyError, FileNotFoundError, ValueError):
      return {}

  def close(self) -> None:
    self._manager.close()


def _checkpoints(workdir: str | os.PathLike) -> str:
  """``workdir/checkpoints``; FileNotFoundError (one line) if absent."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{str(workdir)!r} has no checkpoints/ (is it a "
                            "launch.train --workdir?).")
  return directory


def saved_run(workdir: str | os.PathLike, step: Optional[int] = None
              ) -> tuple[int, dict]:
  """``(step, fingerprint)`` of a run's checkpoint (the latest by default):
  the config recorded with it, as JSON values.

  Raises:
    FileNotFoundError: no checkpoints in ``workdir``.
    ValueError: no checkpoint of that ``step``.
  """
  directory = _checkpoints(workdir)
  manager = ocp.CheckpointManager(directory)
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory} holds no checkpoint.")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"no checkpoint of step {step} in {directory} (there "
                       f"are {sorted(steps)}).")
    config = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
  finally:
    manager.close()
  return step, config


def saved_state(workdir: str | os.PathLike, step: int) -> dict:
  """The `TrainState` of checkpoint ``step`` as nested dicts of numpy
  arrays (NamedTuples by field name), without the run that wrote it: shapes
  and dtypes from the checkpoint's own metadata, restored on one device
  (float64 stays float64)."""
  path = os.path.join(_checkpoints(workdir), str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with jax.enable_x64(True):
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        tree)
    restored = checkpointer.restore(path, target)
  checkpointer.close()
  return jax.tree.map(np.asarray, restored)
