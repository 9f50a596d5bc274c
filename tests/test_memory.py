"""Compiled memory (XLA's buffer assignment) of the strategies on the
weight-tied toy."""

import functools

import jax
import jax.numpy as jnp
import pytest

import metaflow
from tasks.weight_tied import WeightTiedProblem

DEPTHS, STEPS = (1, 4, 16), (2, 4, 8)


@functools.lru_cache(maxsize=None)
def _report(strategy: str, depth: int, num_steps: int) -> metaflow.MemoryReport:
  problem = WeightTiedProblem(depth=depth, num_steps=num_steps)
  eta, inner_batches, outer_batch = problem.example()
  fn = metaflow.meta_value_and_grad(
      problem.inner_loss, problem.outer_loss, problem.optimizer, num_steps,
      strategy, init_params=problem.init_params)
  return metaflow.memory.analyze(fn, eta, None, inner_batches, outer_batch)


@pytest.mark.parametrize("num_steps", STEPS)
def test_mixflow_below_standard_and_ratio_grows_with_depth(num_steps):
  ratios = []
  for depth in DEPTHS:
    standard = _report("standard", depth, num_steps).temp_bytes
    mixflow = _report("mixflow", depth, num_steps).temp_bytes
    assert mixflow < standard, (depth, num_steps, mixflow, standard)
    ratios.append(standard / mixflow)
  assert all(a < b for a, b in zip(ratios, ratios[1:])), ratios


def test_mixflow_dynamic_memory_does_not_grow_with_T():
  """MixFlow-MG keeps one step's working set; standard keeps all T steps'."""
  depth = 16
  mix = [_report("mixflow", depth, t).dynamic_bytes for t in STEPS]
  std = [_report("standard", depth, t).dynamic_bytes for t in STEPS]
  assert max(mix) - min(mix) <= 0.05 * min(mix), mix
  assert std[-1] > 2 * std[0], std


def test_static_bytes_are_T_carries():
  problem = WeightTiedProblem(depth=1, num_steps=4)
  eta, _, _ = problem.example()
  n_params = problem.width ** 2 + 2 * problem.width
  # carry = theta + momentum trace (same size); float32.
  expected = 4 * 2 * n_params * 4
  assert _report("mixflow", 1, 4).static_bytes == expected
  assert 0 < _report("mixflow", 1, 4).dynamic_bytes


def test_remat_over_inner_steps_holds():
  """jax.checkpoint around the scanned step is not undone by XLA."""
  for num_steps in STEPS:
    assert (_report("standard+remat", 16, num_steps).temp_bytes
            < 0.5 * _report("standard", 16, num_steps).temp_bytes)


def test_saved_inner_grads_avoid_recomputing_g():
  """Under remat, keeping g_t spares the backward pass its recomputation."""
  saved = _report("mixflow+remat+saved_inner_grads", 16, 4).temp_bytes
  assert saved < _report("mixflow+remat", 16, 4).temp_bytes
  assert saved < 1.1 * _report("mixflow", 16, 4).temp_bytes


def test_report_of_plain_function():
  report = metaflow.memory.analyze(lambda x: jnp.sin(x) @ x.T,
                                   jax.ShapeDtypeStruct((64, 32), jnp.float32))
  assert report.argument_bytes == 64 * 32 * 4
  assert report.output_bytes == 64 * 64 * 4
  assert report.static_bytes is None and report.dynamic_bytes is None
  assert report.total_bytes >= report.argument_bytes + report.output_bytes
  assert "temp" in str(report) and set(report.as_dict()) >= {
      "temp_bytes", "static_bytes", "dynamic_bytes"}
