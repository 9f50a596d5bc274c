"""launch.curate and launch.evaluate on a tiny lm_data_rater run: every
sequence of every file is scored in file order (as the rater scores it
directly), the kept text is the top fraction in original order, the
evaluation writes curves that start from the same model, and bad arguments
are one line."""

import json
import os
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

import metaflow
from launch import curate, evaluate
from tests.test_resume import REPO

SEQ_LEN = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 6-meta-step online lm_data_rater run (P=2, N=8, T=2) of
  ``python -m launch.train`` (one device: compiles faster than the 8 host
  devices of the test processes)."""
  workdir = tmp_path_factory.mktemp("rater_run")
  done = subprocess.run([
      sys.executable, "-m", "launch.train", "--task=lm_data_rater",
      f"--workdir={workdir}", "--meta_steps=6", "--config.task.preset=nano",
      f"--config.task.seq_len={SEQ_LEN}", "--config.task.batch_size=4",
      "--config.online.lifetime=8", "--config.num_eval_tasks=2",
      "--config.outer_lr=0.05"], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return workdir


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
  folder = tmp_path_factory.mktemp("texts")
  rng = np.random.default_rng(0)
  clean = open(os.path.join(os.path.dirname(__file__), "..", "README.md"),
               "rb").read()[:2000]
  (folder / "clean.txt").write_bytes(clean)
  (folder / "noise.bin").write_bytes(bytes(rng.integers(0, 256, 700,
                                                        dtype=np.uint8)))
  return [str(folder / "clean.txt"), str(folder / "noise.bin")]


@pytest.mark.slow
@pytest.mark.subprocess  # the `run` fixture: a launch.train run
def test_every_sequence_is_scored_in_file_order_and_the_best_kept(
    run, texts, tmp_path, capsys):
  out, kept = tmp_path / "scores.jsonl", tmp_path / "kept"
  assert curate.main(["--workdir", str(run), "--data_path", ",".join(texts),
                      "--out", str(out), "--keep", "0.5", "--kept_out",
                      str(kept), "--batch_size", "8"]) == 0
  rows = [json.loads(line) for line in open(out)]
  width = SEQ_LEN + 1
  counts = [os.path.getsize(p) // width for p in texts]
  assert [r["path"] for r in rows] == [p for p, n in zip(texts, counts)
                                       for _ in range(n)]
  trainer, _, eta = evaluate.rebuild(str(run))
  for path, n in zip(texts, counts):
    mine = [r for r in rows if r["path"] == path]
    assert [r["index"] for r in mine] == list(range(n))
    assert [r["offset"] for r in mine] == [i * width for i in range(n)]
    tokens = np.frombuffer(open(path, "rb").read()[:n * width],
                           np.uint8).reshape(n, width)
    direct = trainer.task.score_sequences(eta.loss_weights,
                                          jnp.asarray(tokens))
    scores = np.array([r["score"] for r in mine])
    np.testing.assert_allclose(scores, direct, rtol=1e-5, atol=1e-6)
    assert np.ptp(scores) > 0  # the rater was trained: scores differ
    best = sorted(np.argsort(-scores, kind="stable")[:round(n / 2)])
    written = open(kept / os.path.basename(path), "rb").read()
    assert written == tokens[best].tobytes()
  assert "kept" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.subprocess  # the `run` fixture: a launch.train run
def test_evaluation_curves_start_from_one_model(run, tmp_path):
  out = tmp_path / "eval"
  assert evaluate.main(["--workdir", str(run), "--inner_steps", "8",
                        "--eval_every", "4", "--baseline", "--out",
                        str(out)]) == 0
  result = json.load(open(out / "evaluate.json"))
  assert set(result["curves"]) == {"learned", "initial"}
  for curve in result["curves"].values():
    assert [step for step, _ in curve] == [0, 4, 8]
    assert all(np.isfinite(loss) for _, loss in curve)
  assert result["curves"]["learned"][0] == result["curves"]["initial"][0]
  assert result["step"] == 6 and result["best_constant"] is None
  assert (out / "evaluate.png").stat().st_size > 0


def test_learning_rate_grid():
  trainer = types.SimpleNamespace(task=types.SimpleNamespace(
      inner_lr=1e-3, name="t"))
  eta = metaflow.Eta(log_lr={"w": jnp.zeros((2, 1)), "b": jnp.zeros(())})
  grid = evaluate.lr_grid(trainer, eta, 7)
  rates = [float(jnp.exp(g.log_lr["w"][0, 0])) for g in grid.values()]
  np.testing.assert_allclose(rates, 1e-3 * 2.0 ** np.arange(-3, 4),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="needs learned learning rates"):
    evaluate.lr_grid(trainer, metaflow.Eta(loss_weights={}), 7)


@pytest.mark.slow
@pytest.mark.subprocess  # the `run` fixture: a launch.train run
@pytest.mark.parametrize("argv, message", [
    (["--keep", "0.5"], "--keep and --kept_out go together"),
    (["--keep", "0", "--kept_out", "K"], "--keep must be in (0, 1]"),
    (["--batch_size", "0"], "--batch_size=0: 0 is not a positive integer"),
    (["--data_path", "/no/file.txt"], "does not exist"),
])
def test_bad_curate_arguments(run, texts, argv, message, tmp_path, capsys):
  args = ["--workdir", str(run), "--data_path", texts[0], "--out",
          str(tmp_path / "s.jsonl")]
  code = curate.main(args + argv)
  err = capsys.readouterr().err
  assert code == 2 and message in err, err
  assert err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.slow
@pytest.mark.subprocess  # the `run` fixture: a launch.train run
def test_bad_evaluate_arguments(run, tmp_path, capsys):
  assert evaluate.main(["--workdir", str(tmp_path), "--inner_steps",
                        "4"]) == 2
  assert "has no checkpoints/" in capsys.readouterr().err
  assert evaluate.main(["--workdir", str(run), "--inner_steps", "3"]) == 2
  assert "multiples of T=2" in capsys.readouterr().err
  short = tmp_path / "short.txt"
  short.write_bytes(b"abc")
  assert curate.main(["--workdir", str(run), "--data_path", str(short),
                      "--out", str(tmp_path / "s.jsonl")]) == 2
  assert "fewer than one sequence" in capsys.readouterr().err

