"""strategy="auto": the fastest candidate within a memory budget, its
meta-gradient equal to that strategy's, the one-line error when nothing fits,
the choice recorded in the checkpoint; `metaflow.planner`'s parsing."""

import numpy as np
import pytest

import metaflow
import tasks  # noqa: F401  (registers the built-in tasks)
from metaflow import Strategy, checkpoint, planner
from tests import problems as P

T = 16  # long enough for segments to be a candidate


def _trainer(strategy, **kwargs):
  return metaflow.BilevelTrainer(
      metaflow.create_task("sinusoid_maml", num_shots=4),
      strategy=strategy, num_inner_steps=T, meta_batch_size=2,
      mesh=P.ONE_DEVICE, **kwargs)


@pytest.mark.slow
def test_auto(tmp_path):
  """One test (the candidates' compiles are shared; split, each pytest-xdist
  worker would compile them again):

  * a budget nothing meets: every candidate is compiled and listed, the
    error is one line naming the smallest figure;
  * a budget between two candidates' figures: the first candidate (in the
    order of speed) at or below it is chosen, its meta-gradient is that
    strategy's, and the checkpoint records it.
  """
  with pytest.raises(planner.NothingFitsError) as e:
    _trainer("auto", memory_budget="1KiB")
  table = e.value.rows
  shapes = _trainer("mixflow", shapes_only=True)
  divisor = metaflow.compiled.batch_divisor(shapes.program, shapes.layout)
  assert [r.strategy for r in table] == list(planner.candidates(T, divisor))
  assert not any(r.fits for r in table)
  segmented = [r for r in table if r.strategy.segment_length is not None]
  assert segmented and all(
      r.memory.static_bytes < table[0].memory.static_bytes for r in segmented)
  smallest = min(table, key=lambda r: r.memory.total_bytes)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("no exact strategy fits the memory budget of "
                            "1.00 KiB per device: the smallest of "
                            f"{len(table)} candidates is "
                            f"{smallest.strategy.name} at ")
  assert "lower T (now 16)" in message and "--config.mesh.fsdp" in message

  totals = [r.memory.total_bytes for r in table]
  pick = next(i for i in range(1, len(totals)) if totals[i] < min(totals[:i]))
  auto = _trainer("auto", memory_budget=totals[pick])
  assert auto.strategy == table[pick].strategy != metaflow.Strategy()
  assert [r.strategy for r in auto.auto_table] == [
      r.strategy for r in table[:pick + 1]]
  assert [r.fits for r in auto.auto_table] == [False] * pick + [True]
  explicit = _trainer(table[pick].strategy)
  eta = explicit.init_state().eta
  batch = next(explicit.train_batches())
  value, grads = auto.meta_value_and_grad(eta, batch)
  ref_value, ref_grads = explicit.meta_value_and_grad(eta, batch)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  assert P.tree_rel_error(grads, ref_grads) < 1e-5
  auto.fit(1, tmp_path, log_every=1, console=False)
  saved = checkpoint.Checkpointer(tmp_path, {}).info()
  assert saved == {"strategy": table[pick].strategy.name}


@pytest.mark.parametrize("kwargs,match", [
    ({"strategy": "auto"}, "strategy='auto' needs a memory_budget"),
    ({"strategy": "mixflow", "memory_budget": "1GiB"},
     "memory_budget applies to strategy='auto' only"),
    ({"strategy": "auto", "memory_budget": "lots"},
     "memory_budget 'lots' is not a size"),
    ({"strategy": "auto", "memory_budget": 0}, "must be > 0 bytes"),
])
def test_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _trainer(**kwargs)


def test_candidates_order_segment_schedules_by_recomputation():
  """Fastest first: without segments, then one level (K near sqrt T), the
  least-memory 2- and 3-level schedules and the least-memory one of all,
  each with its micro-batches before the next; each level stores fewer
  carries than the one before; at most `MAX_SCHEDULES` schedules."""
  assert planner.segment_schedules(5) == ()  # nothing stores fewer than T
  assert planner.segment_schedules(16) == ((4,),)  # 2 levels: 8 too
  assert planner.segment_schedules(256) == ((16,), (64, 8), (64, 16, 4))
  long = planner.segment_schedules(16384)
  assert long == ((128,), (783, 29), (1848, 168, 14),
                  metaflow.segments.schedule(16384))
  assert len(long) == planner.MAX_SCHEDULES
  stored = [metaflow.segments.stored_carries(16384, s) for s in long]
  assert stored == [256, 77, 46, 27]
  names = [s.name for s in planner.candidates(256, 4)]
  best = "mixflow+remat+saved_inner_grads"
  assert names == [
      "mixflow", best, "mixflow+microbatches=2", "mixflow+microbatches=4",
      *(f"{best}+segments={k}{m}" for k in ("16", "64/8", "64/16/4")
        for m in ("", "+microbatches=2", "+microbatches=4"))]
  factors = [s.recompute_factor(256) for s in planner.candidates(256, 1)]
  assert factors == [1, 1, 2, 3, 4]
  assert planner.recomputation(Strategy.parse(names[-3]), 256) == (
      "segments=64/16/4: 4 stored levels, 16 stored carries of T=256, "
      "recompute factor 4")
  assert planner.recomputation(Strategy.parse(best), 256) == ""


def test_parse_bytes():
  assert planner.parse_bytes("16GiB") == 16 * 2**30
  assert planner.parse_bytes("80GB") == 80 * 10**9
  assert planner.parse_bytes(" 1.5 mib ") == int(1.5 * 2**20)
  assert planner.parse_bytes(4096) == 4096


def test_shapes_only_trainer_refuses_to_train():
  trainer = _trainer("mixflow", shapes_only=True)
  assert trainer.compiled_memory(whole_step=True).total_bytes > 0
  with pytest.raises(RuntimeError, match="shapes_only=True"):
    trainer.init_state()
