"""The benchmark entry point runs, prints its table and writes JSON."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments.estimators import study as study_estimators
from launch import benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_small_benchmark(tmp_path, capsys):
  out = tmp_path / "bench"
  assert benchmark.main(["--steps", "2", "--depths", "1,2", "--width", "16",
                         "--batch", "8", "--repeats", "2",
                         "--inner_optimizer", "adam",
                         "--strategies",
                         "mixflow,mixflow+remat,implicit,first_order",
                         "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "std/this" in printed and "mixflow+remat" in printed
  result = json.loads((out / "benchmark.json").read_text())
  rows = result["rows"]
  # standard is always measured: ratios are relative to it.
  assert {r["strategy"] for r in rows} == {"standard", "mixflow",
                                           "mixflow+remat", "implicit",
                                           "first_order"}
  assert len(rows) == 5 * 2
  # implicit stores theta_T only, not T copies of (theta, mu, nu).
  static = {(r["strategy"], r["M"]): r["static_bytes"] for r in rows}
  assert static["implicit", 1] < static["mixflow", 1]
  for r in rows:
    assert r["temp_bytes"] > 0 and r["step_s_median"] > 0
    assert r["compile_s"] > 0 and r["memory_ratio_vs_standard"] > 0
    assert r["inner_optimizer"] == "adam"
  assert (out / "benchmark.png").stat().st_size > 0


def _one_error_line(capsys) -> str:
  """The captured stderr: one ``error: ...`` line (returned)."""
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


@pytest.mark.parametrize("argv,message", [
    (["--strategies", "mixflow+saved_inner_grads"], "Contradictory"),
    (["--steps", "0"], "positive integers"),
    (["--depths", "a"], "comma-separated integers"),
    (["--inner_optimizer", "rmsprop"], "should be one of"),
    (["--width", "0"], "--width=0: 0 is not a positive integer"),
])
def test_bad_arguments(argv, message, capsys):
  assert benchmark.main(argv) == 2
  assert message in _one_error_line(capsys)


def test_out_is_a_file(tmp_path, capsys):
  path = tmp_path / "file"
  path.write_text("x")
  assert benchmark.main(["--out", str(path)]) == 2
  assert "not a folder" in _one_error_line(capsys)


@pytest.mark.slow
@pytest.mark.mesh
def test_small_lm_benchmark_on_a_mesh(tmp_path, capsys):
  """One small run: the timed table against standard, and with --mesh the
  per-device memory next to one device's (8 host devices here)."""
  from launch import benchmark_lm
  xla_flags = os.environ.get("XLA_FLAGS")
  out = tmp_path / "bench"
  assert benchmark_lm.main(["--tasks", "lm_maml", "--preset", "nano",
                            "--steps", "2", "--batch", "8", "--seq_len", "32",
                            "--repeats", "1", "--strategies", "mixflow",
                            "--mesh", "data=2,fsdp=4", "--host_devices", "8",
                            "--out", str(out)]) == 0
  # Later tests' commands on this worker must not inherit 8 devices.
  assert os.environ.get("XLA_FLAGS") == xla_flags
  printed = capsys.readouterr().out
  assert "std/this" in printed
  assert "mesh data=2 x fsdp=4 (8 devices, 1 process)" in printed
  assert "one device: temp" in printed
  rows = json.loads((out / "benchmark_lm.json").read_text())["rows"]
  assert [r["strategy"] for r in rows] == ["standard", "mixflow"]
  for r in rows:
    assert r["task"] == "lm_maml" and (r["T"], r["B"], r["L"]) == (2, 8, 32)
    assert r["temp_bytes"] > r["static_bytes"] > 0 and r["step_s_median"] > 0
    assert r["one_device"]["temp_bytes"] > r["temp_bytes"]
    assert r["static_ratio_one_device"] == pytest.approx(4.0, rel=1e-3)
    assert r["temp_ratio_one_device"] > 2
  assert rows[1]["memory_ratio_vs_standard"] > 1
  assert (out / "benchmark_lm.png").stat().st_size > 0


@pytest.mark.slow
def test_lm_benchmark_compares_attentions(tmp_path, capsys):
  """--attention dense,blockwise: one row per attention and strategy, in one
  run (shapes only), blockwise in tiles of --attention_block."""
  from launch import benchmark_lm
  out = tmp_path / "bench"
  assert benchmark_lm.main(["--preset", "nano", "--steps", "1", "--batch",
                            "1", "--seq_len", "40", "--attention",
                            "dense,blockwise", "--attention_block", "16",
                            "--strategies", "mixflow", "--repeats", "0",
                            "--out", str(out)]) == 0
  assert "blockwise" in capsys.readouterr().out
  rows = json.loads((out / "benchmark_lm.json").read_text())["rows"]
  assert [(r["attention"], r["strategy"]) for r in rows] == [
      ("dense", "standard"), ("dense", "mixflow"), ("blockwise", "standard"),
      ("blockwise", "mixflow")]
  assert all(r["attention_block"] == 16 and r["temp_bytes"] > 0
             for r in rows)


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "sinusoid_maml"], "unknown task(s) sinusoid_maml"),
    (["--preset", "huge"], "--preset=huge: value should be one of"),
    (["--repeats", "-1"], "--repeats=-1: -1 is not a non-negative integer"),
    (["--mesh", "data=2,model=4"], "mesh axes are data and fsdp"),
    (["--mesh", "2x4"], "expected data=D,fsdp=F"),
    (["--sweep", "paper"], "Unknown command line flag 'sweep'"),
    (["--attention", "flash"], "unknown attention(s) flash"),
])
def test_lm_benchmark_bad_arguments(argv, message, capsys):
  from launch import benchmark_lm
  assert benchmark_lm.main(argv) == 2
  assert message in _one_error_line(capsys)


@pytest.mark.slow
def test_small_estimator_study(tmp_path, capsys):
  out = tmp_path / "study"
  assert study_estimators.main([
      "--tasks", "sinusoid_maml", "--steps", "2", "--solve_steps", "20",
      "--solve_cg_steps", "5", "--meta_steps", "2", "--budget_s", "0",
      "--repeats", "1", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "cos exact" in printed and "after 2 steps" in printed
  result = json.loads((out / "study_estimators.json").read_text())["rows"]
  (table,) = result["accuracy"]
  assert {(r["estimator"], r["T"]) for r in table["rows"]} == {
      (e, 2) for e in study_estimators.ESTIMATORS}
  for r in table["rows"]:
    assert -1 <= r["vs_exact"]["cosine"] <= 1 + 1e-9 and r["temp_bytes"] > 0
    if r["estimator"] == "mixflow":
      assert r["vs_exact"]["rel_error"] == 0
  assert [r["estimator"] for r in result["training"]] == list(
      study_estimators.ESTIMATORS)
  assert (out / "study_estimators.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "lm_maml"], "unknown task(s) lm_maml"),
    (["--cg_steps", "0"], "--cg_steps=0: 0 is not a positive integer"),
    (["--steps", "0"], "positive integers"),
])
def test_study_bad_arguments(argv, message, capsys):
  assert study_estimators.main(argv) == 2
  assert message in _one_error_line(capsys)


@pytest.mark.slow
@pytest.mark.subprocess
def test_quick_sweep_measures_a_point_and_resumes(tmp_path, capsys):
  """--sweep quick: the paper sweep's code path at one nano point; a rerun
  skips what the file holds. (Stored carries growing with T:
  test_memory's test_static_bytes_are_T_carries.)"""
  from experiments.paper_sweep import sweep
  # A command of its own: it compiles with the sweep's fast-compile flag.
  subprocess.run([sys.executable, "-m", "experiments.paper_sweep", "--sweep",
                  "quick", "--out", str(tmp_path)], check=True,
                 capture_output=True, cwd=ROOT)
  path = tmp_path / "sweep_quick.jsonl"
  rows = sweep.read_rows(str(path))
  assert [(r["T"], r["L"]) for r in rows] == [
      (p["T"], p["L"]) for p in sweep.QUICK_POINTS]
  for r in rows:
    cols = r["columns"]
    assert list(cols) == list(sweep.COLUMNS)
    assert cols["additions"]["strategy"] == sweep.additions_strategy(r["T"],
                                                                     r["B"])
    for c in cols.values():
      assert c["static_bytes"] + c["dynamic_bytes"] == c["temp_bytes"]
      assert c["total_bytes"] >= c["temp_bytes"] > c["static_bytes"] > 0
    assert r["ratios"]["standard/mixflow_best"] == (
        cols["standard"]["temp_bytes"] / cols["mixflow_best"]["temp_bytes"])
    # The paper's effect, already at the smallest size.
    assert cols["standard"]["temp_bytes"] > cols["mixflow"]["temp_bytes"]
    assert (cols["standard_remat"]["temp_bytes"]
            > cols["mixflow_best"]["temp_bytes"])
    # The floor is below what a strategy taking the batch whole needs.
    for name in ("standard", "mixflow"):
      assert cols[name]["dynamic_bytes"] >= r["floor"]["hvp"]
    for name in ("standard_remat", "mixflow_best"):
      assert cols[name]["dynamic_bytes"] >= r["floor"]["hvp_remat_blocks"]
    assert r["floor"]["hvp_remat_blocks"] < r["floor"]["hvp"]
  assert (tmp_path / "sweep_quick.png").stat().st_size > 0
  capsys.readouterr()
  assert sweep.main(["--sweep", "quick", "--out", str(tmp_path)]) == 0
  assert capsys.readouterr().out.count("skipped") == 1
  assert len(path.read_text().splitlines()) == 1


def test_sweep_grid():
  """The paper grid swept one axis at a time around the base point."""
  from experiments.paper_sweep import sweep
  points = sweep.paper_points(["lm_maml"])
  assert sweep.PAPER_PRESETS[0] == "chinchilla_57m"
  assert sweep.PAPER_PRESETS[-1] == "chinchilla_306m"
  assert len(points) == len(set(map(str, points))) == (
      len(sweep.PAPER_PRESETS) + 2 + 2 + 2)
  assert {**sweep.PAPER_BASE, "task": "lm_maml"} in points
  for p in points:
    assert sum(p[a] != sweep.PAPER_BASE[a] for a in sweep.PAPER_AXES) <= 1
  # Segments only where they store fewer carries than T.
  assert sweep.additions_strategy(4, 4) == (
      "mixflow+remat+saved_inner_grads+microbatches=4")
  assert sweep.additions_strategy(16, 2) == (
      "mixflow+remat+saved_inner_grads+segments=auto+microbatches=2")
