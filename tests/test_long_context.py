"""experiments.long_context at a tiny size: the length sweep compares dense
and blockwise attention per strategy, the horizon sweep one level against
nested segments, and each writes its JSON and plot."""

import json

import pytest

from experiments.long_context import study


@pytest.mark.slow
def test_small_sweeps(tmp_path, capsys):
  out = tmp_path / "lc"
  assert study.main(["--sweep", "length,horizon", "--preset", "nano",
                     "--lengths", "32",
                     "--length_strategies", "mixflow", "--horizons", "64",
                     "--horizon_seq_len", "16", "--out", str(out)]) == 0
  capsys.readouterr()
  length = json.loads((out / "long_context_length.json").read_text())["rows"]
  assert [(r["L"], r["attention"], r["strategy"]) for r in length] == [
      (32, "dense", "mixflow"), (32, "blockwise", "mixflow")]
  for r in length:
    assert r["temp_bytes"] > r["static_bytes"] > 0
  horizon = json.loads((out / "long_context_horizon.json").read_text())["rows"]
  one, nested = horizon
  assert (one["schedule"], one["stored_carries"], one["recompute_factor"]) == (
      "8", 16, 2)
  assert nested["levels"] >= 2 and nested["strategy"].endswith("auto")
  assert nested["stored_carries"] < one["stored_carries"]
  assert nested["recompute_factor"] == 1 + nested["levels"]
  # The nested schedule's fewer carries are seen in XLA's static count.
  assert nested["static_bytes"] < one["static_bytes"]
  for name in ("length", "horizon"):
    assert (out / f"long_context_{name}.png").stat().st_size > 0


def test_slope_of_a_power_law():
  lengths = [1024, 2048, 4096]
  assert study.slope(lengths, [n ** 2 for n in lengths]) == pytest.approx(2)
  assert study.slope(lengths, [3 * n for n in lengths]) == pytest.approx(1)


@pytest.mark.parametrize("argv,message", [
    (["--sweep", "depth"], "unknown sweep(s) depth"),
    (["--lengths", "0"], "positive integers"),
    (["--dense_max", "0"], "--dense_max=0"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
  assert study.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err
  assert err.count("\n") == 1
