"""The benchmark entry point runs, prints its table and writes JSON."""

import json

import pytest

from launch import benchmark


def test_small_benchmark(tmp_path, capsys):
  out = tmp_path / "bench"
  assert benchmark.main(["--steps", "2", "--depths", "1,2", "--width", "16",
                         "--batch", "8", "--repeats", "2",
                         "--inner_optimizer", "adam",
                         "--strategies", "mixflow,mixflow+remat",
                         "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "std/this" in printed and "mixflow+remat" in printed
  result = json.loads((out / "benchmark.json").read_text())
  rows = result["rows"]
  # standard is always measured: ratios are relative to it.
  assert {r["strategy"] for r in rows} == {"standard", "mixflow",
                                           "mixflow+remat"}
  assert len(rows) == 3 * 2
  for r in rows:
    assert r["temp_bytes"] > 0 and r["step_s_median"] > 0
    assert r["compile_s"] > 0 and r["memory_ratio_vs_standard"] > 0
    assert r["inner_optimizer"] == "adam"
  assert (out / "benchmark.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["--strategies", "mixflow+saved_inner_grads"], "Contradictory"),
    (["--steps", "0"], "positive integers"),
    (["--depths", "a"], "comma-separated integers"),
    (["--inner_optimizer", "rmsprop"], "invalid choice"),
])
def test_bad_arguments(argv, message, capsys):
  with pytest.raises(SystemExit):
    benchmark.parse_args(argv)
  assert message in capsys.readouterr().err


def test_out_is_a_file(tmp_path, capsys):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--out", str(path)])
  assert "not a folder" in capsys.readouterr().err
