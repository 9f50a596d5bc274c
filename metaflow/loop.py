"""`fit`: the meta-training loop, beside checkpointing, preemption and
metrics.

The loop asks a `metaflow.BilevelTrainer` for its jitted meta-step,
batches, evaluation and fingerprint, and owns what happens between steps:

* resuming: the latest checkpoint that can be read (`metaflow.checkpoint`;
  one from another configuration is refused), else a fresh state whose
  online population is staggered first (`metaflow.online.warm_up`);
* metrics: each step's device scalars, averaged over a logging interval in
  one jitted program (`TrainMetrics`), written through clu
  (`metaflow.metrics`: console and TensorBoard event files);
* survival: SIGTERM/SIGINT (`metaflow.preemption`) end the run after the
  step in flight with a checkpoint; a meta-step that is not finite was
  skipped inside the jitted step, and after ``max_skipped_steps`` in a row
  (the one non-finite watch, one step behind so the host never waits for
  the device) the run stops with a checkpoint and `NonFiniteError`.

One meta-step is in flight at a time: with several processes on XLA:CPU,
every computation on global arrays is launched on every local device, and
ten queued meta-steps followed by some twenty eager ops on their metrics
hung a 2-process x 2-device run on 2 loaded cores (gdb: one device's half
of a meta-step's all-reduce blocked on a semaphore in XLA's CPU executable
launch while later launches waited for that step's outputs). With one step
ahead the host still prepares the next batch while the device computes.
"""

# No `from __future__ import annotations`: clu reads TrainMetrics annotations.

import functools
import os
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from absl import logging
from clu import metrics as clu_metrics
from flax import struct

from metaflow import checkpoint as checkpoint_lib
from metaflow import metrics as metrics_lib
from metaflow import preemption as preemption_lib
from metaflow._checks import check_int
from metaflow.train_state import TrainState

if TYPE_CHECKING:
  from metaflow.trainer import BilevelTrainer


class FitResult(NamedTuple):
  """Result of `fit`.

  Attributes:
    state: the final `TrainState`.
    initial_eval: evaluation at the initial eta (same held-out episodes).
    final_eval: evaluation at the final eta ({} when preempted).
    history: logged rows ``{"step": int, name: float, ...}``, training
      averages and evaluations, in order (of this process's run only).
    preempted: the name of the signal that stopped the run early (after a
      checkpoint), or None.
  """
  state: TrainState
  initial_eval: dict
  final_eval: dict
  history: list
  preempted: Optional[str] = None


class NonFiniteError(RuntimeError):
  """Too many consecutive meta-steps had a non-finite outer loss or
  meta-gradient (`fit`'s ``max_skipped_steps``)."""


@struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Meta-training metrics, averaged over the applied meta-steps of a logging
  interval (the model output ``mask`` leaves the skipped, non-finite ones
  out)."""
  # clu's idiom: a metric's class is the field's annotation.
  outer_loss: clu_metrics.Average.from_output("outer_loss")  # pyright: ignore[reportInvalidTypeForm]
  inner_loss_first: clu_metrics.Average.from_output("inner_loss_first")  # pyright: ignore[reportInvalidTypeForm]
  inner_loss_last: clu_metrics.Average.from_output("inner_loss_last")  # pyright: ignore[reportInvalidTypeForm]
  meta_grad_norm: clu_metrics.Average.from_output("meta_grad_norm")  # pyright: ignore[reportInvalidTypeForm]


def summarise(rows: list) -> dict:
  """The means over a logging interval of its meta-steps' metrics (a list
  of dicts of scalars -> dict of scalars), through clu's `TrainMetrics`;
  jit it (one program, see the module docstring)."""
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *rows)
  means = TrainMetrics.single_from_model_output(**stacked).compute()
  return {**means, "skipped_steps": rows[-1]["skipped_steps"]}


@functools.lru_cache(maxsize=None)
def _jit_summarise(replicated: jax.sharding.Sharding):
  return jax.jit(summarise, out_shardings=replicated)


def check_fit_settings(**settings: int) -> None:
  """`fit`'s counts: ints >= 0 (>= 1 for intervals that divide)."""
  for name, low in (("num_meta_steps", 0), ("log_every", 1),
                    ("eval_every", 0), ("checkpoint_every", 0),
                    ("keep_checkpoints", 1), ("max_skipped_steps", 1)):
    check_int(name, settings[name], low)


def fit(trainer: "BilevelTrainer", num_meta_steps: int,
        workdir: Optional[str | os.PathLike] = None, *, log_every: int = 50,
        eval_every: int = 0, checkpoint_every: int = 0,
        keep_checkpoints: int = 3, max_skipped_steps: int = 10,
        run_config: Optional[Mapping[str, Any]] = None,
        console: bool = True) -> FitResult:
  """Meta-trains ``trainer`` until ``num_meta_steps`` meta-steps are done.

  With a ``workdir``: resumes from its latest checkpoint that restores
  (refusing one whose fingerprint differs: another task setting, T, B,
  meta-parameters, estimator class or outer optimiser, one line naming it;
  one that cannot be read is moved aside), checkpoints every
  ``checkpoint_every`` steps and at the end, and writes TensorBoard event
  files and console lines there. SIGTERM or SIGINT ends the run after the
  meta-step in flight with a checkpoint (``FitResult.preempted``, no final
  evaluation); after ``max_skipped_steps`` consecutive non-finite
  meta-steps it stops with a checkpoint of the last finite state and
  `NonFiniteError`.

  Args:
    trainer: the `metaflow.BilevelTrainer` (its step, batches, evaluation
      and fingerprint).
    num_meta_steps: total meta-steps (including those already done).
    workdir: run directory, or None for no files.
    log_every: steps between metric rows (averages over the interval).
    eval_every: steps between evaluations (0: only at the start and end).
    checkpoint_every: steps between checkpoints (0: only at the end).
    keep_checkpoints: the most recent checkpoints kept.
    max_skipped_steps: consecutive non-finite meta-steps that stop the run.
    run_config: extra settings that a resumed run must share (e.g. the
      launch config), stored in the checkpoint.
    console: also print metric rows (through absl logging).
  """
  check_fit_settings(num_meta_steps=num_meta_steps, log_every=log_every,
                     eval_every=eval_every, checkpoint_every=checkpoint_every,
                     keep_checkpoints=keep_checkpoints,
                     max_skipped_steps=max_skipped_steps)
  state = trainer.init_state()
  eta_initial = state.eta
  batches = trainer.train_batches()
  checkpointer, restored = None, None
  if workdir is not None:
    workdir = checkpoint_lib.check_workdir(workdir)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, trainer.fingerprint(run_config), max_to_keep=keep_checkpoints,
        info={"strategy": trainer.strategy.name})
    restored = checkpointer.restore(state, batches)
    if restored is not None:
      state = restored
      logging.info("Resumed from %s at step %d (strategy %s, now %s).",
                   checkpointer.directory, int(state.step),
                   checkpointer.info(int(state.step)).get("strategy"),
                   trainer.strategy.name)
  if restored is None:  # a fresh online population is staggered first
    state = trainer.warm_up(state, batches)
  writer = metrics_lib.create_writer(workdir, console=console)
  progress = metrics_lib.report_progress(num_meta_steps, writer)
  summary = _jit_summarise(trainer.layout.replicated)
  history = []

  def write(step, row):
    writer.write_scalars(step, row)
    history.append({"step": step, **row})

  def save():
    if checkpointer:
      checkpointer.save(int(state.step), state, batches)

  start = int(state.step)
  initial_eval = trainer.evaluate(eta_initial)
  if start == 0:
    write(0, {f"eval/{k}": v for k, v in initial_eval.items()})
  collected, last = [], None

  def write_train(step):
    write(step, {f"train/{k}": float(v)
                 for k, v in summary(collected).items()})
    collected.clear()

  try:
    with preemption_lib.Preemption() as preemption:
      for step in range(start + 1, num_meta_steps + 1):
        state, step_metrics = trainer.step(state, next(batches))
        if last is not None:
          # At most this step in flight (module docstring); the host waits
          # for the previous one, so the device never waits for the host.
          jax.block_until_ready(last)
          skips = int(last["consecutive_skips"])
          if skips >= max_skipped_steps:
            save()  # the state after this step: no update was non-finite
            raise NonFiniteError(
                f"{skips} consecutive meta-steps had a non-finite outer "
                f"loss or meta-gradient (the last at step {step - 1}; "
                f"max_skipped_steps={max_skipped_steps}); stopped at step "
                f"{step} with a checkpoint of the last finite state"
                + (f" in {checkpointer.directory}" if checkpointer else "")
                + ". Look for the data or the learning rate that diverges.")
        last = step_metrics
        collected.append(step_metrics)
        progress(step)
        if step % log_every == 0 or step == num_meta_steps:
          write_train(step)
        if preemption.reached(step):
          save()
          if collected:
            write_train(step)
          logging.warning(
              "%s: stopped after meta-step %d of %d%s; run the same "
              "command to resume.", preemption.signal_name, step,
              num_meta_steps,
              f", checkpoint in {checkpointer.directory}"
              if checkpointer else " (no workdir: nothing saved)")
          return FitResult(state, initial_eval, {}, history,
                           preemption.signal_name)
        if eval_every and step % eval_every == 0 and step != num_meta_steps:
          write(step, {f"eval/{k}": v
                       for k, v in trainer.evaluate(state.eta).items()})
        if checkpointer and checkpoint_every and step % checkpoint_every == 0:
          save()
    final_eval = trainer.evaluate(state.eta)
    if num_meta_steps > start:
      write(num_meta_steps, {f"eval/{k}": v for k, v in final_eval.items()})
    save()
  finally:
    writer.flush()
    writer.close()
    if checkpointer:
      checkpointer.close()
  return FitResult(state, initial_eval, final_eval, history)
