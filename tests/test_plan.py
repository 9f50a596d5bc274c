"""launch.plan: the table's verdicts and the largest T agree with the figures
XLA compiles for them (shapes only, one device), and bad input is one line."""

import json
import math
import os

import jax
import optax
import pytest

from launch import _config, plan
from metaflow import sharding
from metaflow.task import create_task
from metaflow.trainer import BilevelTrainer

# sinusoid_maml compiles in seconds. At T=8 with 5 + 5 examples (no
# microbatches divide 5) the candidates are mixflow, +remat+saved_inner_grads
# and +remat+saved_inner_grads+segments=4 (one level; two levels store no
# fewer than its 6 carries); 100 kB per device lies between the first two and
# the last (about 111 and 98 kB), so the choice is not the first candidate.
BUDGET = 100_000
MAX_STEPS = 16
TASK = ["--config.task.num_shots=5", "--config.task.num_query=5"]
ARGS = ["--task", "sinusoid_maml", *TASK, "--config.mesh.data=1",
        "--config.inner_steps=8", "--config.meta_batch_size=1",
        f"--budget={BUDGET}", f"--max_steps={MAX_STEPS}"]


def _total_bytes(strategy: str, num_inner_steps: int) -> int:
  """The whole meta-step's compiled bytes of the test's config at T, built
  here as launch.train would (one device, shapes only)."""
  config = _config.load_config(_config.config_path("sinusoid_maml"))
  task = {**config.task.to_dict(), "num_shots": 5, "num_query": 5}
  trainer = BilevelTrainer(
      create_task("sinusoid_maml", **task),
      strategy=strategy, num_inner_steps=num_inner_steps, meta_batch_size=1,
      outer_optimizer=optax.adam(config.outer_lr), seed=config.seed,
      mesh=sharding.make_mesh(devices=jax.devices()[:1]), shapes_only=True)
  return trainer.compiled_memory(whole_step=True).total_bytes


@pytest.mark.slow
def test_plan_verdicts_agree_with_compiled_figures(tmp_path, capsys):
  assert plan.main([*ARGS, "--search=full", f"--out={tmp_path}"]) == 0
  printed = capsys.readouterr().out
  with open(os.path.join(tmp_path, "plan.json")) as f:
    result = json.load(f)
  assert result["budget_bytes"] == BUDGET
  assert result["config"]["mesh"] == {"data": 1, "fsdp": 1, "devices": 1}
  assert result["config"]["num_inner_steps"] == 8
  rows = result["candidates"]
  assert len(rows) >= 2 and result["compile_seconds"] > 0
  for row in rows:
    assert row["fits"] == (row["total_bytes"] <= BUDGET), row
    assert row["strategy"] in printed
  fitting = [r["strategy"] for r in rows if r["fits"]]
  assert result["choice"] == (fitting[0] if fitting else None)
  leanest = min(rows, key=lambda r: r["total_bytes"])
  assert result["probe_strategy"] == leanest["strategy"]
  # Not an LM task: only T is searched.
  assert result["largest"]["seq_len"] is None
  assert result["largest"]["preset"] is None

  largest = result["largest"]["num_inner_steps"]
  assert largest["strategy"] == result["probe_strategy"]
  assert largest["value"] is not None, largest
  steps = largest["value"]
  assert 8 <= steps <= MAX_STEPS and not largest["capped"]
  assert largest["total_bytes"] <= BUDGET
  assert f"largest num_inner_steps: {steps}" in printed
  # T fits and, below the limit, T + 1 does not: compiled again here.
  assert _total_bytes(largest["strategy"], steps) == largest["total_bytes"]
  if steps < MAX_STEPS:
    assert largest["next_value"] == steps + 1
    assert _total_bytes(largest["strategy"], steps + 1) > BUDGET


@pytest.mark.parametrize("args, message", [
    (["--budget", "lots"], "is not a size"),
    (["--config.task.nope=1"], "unknown config key 'task.nope'"),
    (["--searches", "depth"], "unknown --searches depth"),
    (["--max_steps", "0"], "--max_steps must be >= 1"),
    (["--search", "huge"], "--search"),
    (["--task", "nope", "--help"], "unknown task 'nope'"),
])
def test_bad_input_is_one_line(args, message, capsys, tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    plan.main(["--task", "sinusoid_maml", f"--out={tmp_path}", *args])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err
  assert err.count("\n") == 1
  assert not os.listdir(tmp_path)


def _search(total, coords, budget, max_probes=12):
  calls = []

  def measure(k):
    calls.append(k)
    return total(coords[k])

  return plan.largest_fitting(measure, coords, budget, total(coords[0]),
                              max_probes), calls


@pytest.mark.parametrize("total", [
    lambda t: 1000 + 37 * t,                      # affine in T
    lambda t: 1000 + 37 * t + 3 * t * t,          # curved
    lambda t: 1000 + 37000 * math.sqrt(t) + t,    # segments: ~ sqrt(T)
    lambda t: 1000 * (1 + (t > 50)),              # a step
])
def test_search_finds_the_largest_that_fits(total):
  coords = range(4, 4097)
  for budget in (1500, 40_000, 10**6, 10**9):
    truth = max((k for k in range(len(coords)) if total(coords[k]) <= budget),
                default=None)
    found, calls = _search(total, coords, budget)
    assert found.best == truth and not found.capped, (budget, calls)
    assert len(calls) == len(set(calls)) and 0 not in calls
    if truth is not None and truth < len(coords) - 1:
      assert found.next_above() == truth + 1  # known not to fit


def test_search_affine_needs_three_compiles_and_marks_caps():
  found, calls = _search(lambda t: 1000 + 37 * t, range(4, 4097), 38_000)
  assert found.best == 996 and len(calls) == 3  # T = 1000, and 1001 not
  found, calls = _search(lambda t: 1000 + t * t, range(4, 4097), 10**6,
                         max_probes=2)
  assert found.capped and len(calls) == 2
  assert found.totals[found.best] <= 10**6  # a lower bound that fits


def test_search_unbuildable_value_counts_as_not_fitting():
  def measure(k):
    if k >= 10:
      raise ValueError("too long")
    return 100 + k

  found = plan.largest_fitting(measure, range(20), 10**6, 100)
  assert found.best == 9 and found.errors[found.next_above()] == "too long"


def test_default_search_is_the_bounded_one():
  fv, _ = plan._parse(["--task", "sinusoid_maml"])
  assert fv.search == "quick" and plan.SEARCH_MODES["quick"] == (2, True)
  assert fv.max_probes == 2 and fv.max_steps == 4096
  fv, _ = plan._parse(["--task", "sinusoid_maml", "--search=full"])
  assert fv.max_probes == plan.SEARCH_MODES["full"][0] == 8
  fv, _ = plan._parse(["--task", "sinusoid_maml", "--max_probes=5"])
  assert fv.search == "quick" and fv.max_probes == 5


@pytest.mark.slow
def test_plan_prints_progress_as_it_compiles(tmp_path, capsys):
  assert plan.main([*ARGS, f"--out={tmp_path}"]) == 0  # --search quick
  captured = capsys.readouterr()
  with open(os.path.join(tmp_path, "plan.json")) as f:
    result = json.load(f)
  assert result["search"] == {
      "mode": "quick", "max_probes": 2, "top_first": True,
      "max_steps": MAX_STEPS, "searches": ["num_inner_steps"]}
  lines = captured.err.splitlines()
  assert all(line.startswith("launch.plan: ") for line in lines), lines
  rows = result["candidates"]
  assert lines[0] == (f"launch.plan: compiling the {len(rows)} candidates "
                      "of --strategy auto at T=8, fastest first")
  compiles = [line for line in lines if line.startswith("launch.plan: [")]
  assert len(compiles) == result["compiles"] == len(rows) + len(
      result["largest"]["num_inner_steps"]["probes"]) - 1
  for i, row in enumerate(rows):
    fits = "fits" if row["fits"] else "does not fit"
    assert compiles[i].startswith(
        f"launch.plan: [{i + 1}] candidate {i + 1}/{len(rows)} "
        f"{row['strategy']}: "), compiles[i]
    assert f", {fits}, " in compiles[i] and compiles[i].endswith(" s")
  probe = result["probe_strategy"]
  assert (f"launch.plan: search num_inner_steps: 8 to {MAX_STEPS} with "
          f"{probe}, at most 2 compiles (--search quick, the limit first)"
          in lines)
  # The limit is compiled first; the search's result is on stdout.
  assert compiles[len(rows)].startswith(
      f"launch.plan: [{len(rows) + 1}] num_inner_steps={MAX_STEPS}: ")
  # The choice is segmented: the verdict states its schedule and cost.
  assert [r["recompute_factor"] for r in rows] == [1, 1, 2]
  assert result["choice"] == rows[2]["strategy"] == (
      "mixflow+remat+saved_inner_grads+segments=4")
  assert (f"chooses {result['choice']} (" in captured.out
          and "segments=4: 2 stored levels, 6 stored carries of T=8, "
          "recompute factor 2)." in captured.out)
  largest = result["largest"]["num_inner_steps"]
  assert len(largest["probes"]) - 1 <= 2
  assert f"largest num_inner_steps: {largest['value']}" in captured.out
  assert largest["value"] is not None and largest["total_bytes"] <= BUDGET


def test_search_top_first_compiles_the_limit_first():
  coords = range(4, 4097)

  def search(budget, max_probes):
    calls = []

    def measure(k):
      calls.append(k)
      return 1000 + 37 * coords[k]

    found = plan.largest_fitting(measure, coords, budget, 1000 + 37 * 4,
                                 max_probes, top_first=True)
    return found, calls

  found, calls = search(10**6, 2)  # the limit fits: one compile
  assert calls == [len(coords) - 1] and found.best == len(coords) - 1
  assert not found.capped
  found, calls = search(38_000, 2)  # interpolated from the base and limit
  assert calls[0] == len(coords) - 1 and len(calls) == 2
  assert coords[found.best] == 1000 and found.capped
  found, calls = search(38_000, 8)
  assert found.best == 996 and not found.capped and len(calls) == 3


def test_help_lists_the_tasks_and_a_tasks_config_keys(capsys):
  with pytest.raises(SystemExit) as exit_info:
    plan.main(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert "--search" in out and "registered tasks" in out
  assert "sinusoid_maml" in out
  with pytest.raises(SystemExit) as exit_info:
    plan.main(["--task", "sinusoid_maml", "--help"])
  assert exit_info.value.code == 0
  assert "--config.task.num_shots=" in capsys.readouterr().out


def test_an_output_folder_that_cannot_be_written_is_refused_first(tmp_path,
                                                                  capsys):
  (tmp_path / "file").write_text("not a folder")
  with pytest.raises(SystemExit) as exit_info:
    plan.main(["--task", "sinusoid_maml", f"--out={tmp_path / 'file' / 'x'}"])
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.err.startswith("error: --out ")
  assert "is not a folder." in captured.err and captured.err.count("\n") == 1
  assert "compil" not in captured.out + captured.err  # refused before


def test_the_output_folder_check_leaves_nothing_behind(tmp_path):
  out = tmp_path / "a" / "b"
  assert plan.main([*ARGS, f"--out={out}", "--searches="]) == 0
  assert sorted(os.listdir(out)) == ["plan.json"]
