"""launch.curate and launch.evaluate on a tiny lm_data_rater run: every
sequence of every file is scored in file order (as the rater scores it
directly), the kept text is the top fraction in original order (the
chunked selection equals sorting), a stopped run resumes to the same bytes
scoring only the rest, two processes' shards make up one process's output,
the evaluation writes curves that start from the same model, and bad
arguments are one line."""

import json
import os
import platform
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

# One xdist worker builds the module's `run` fixture (a launch.train run)
# once for all its tests, instead of each worker building its own.
pytestmark = pytest.mark.xdist_group("curation")


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
  in_memory = curate.score_files(trainer, eta, texts, 8)
  for path, n, scored in zip(texts, counts, in_memory):
    mine = [r for r in rows if r["path"] == path]
    assert [r["index"] for r in mine] == list(range(n))
    assert [r["offset"] for r in mine] == [i * width for i in range(n)]
    tokens = np.frombuffer(open(path, "rb").read()[:n * width],
                           np.uint8).reshape(n, width)
    direct = trainer.task.score_sequences(eta.loss_weights,
                                          jnp.asarray(tokens))
    scores = np.array([r["score"] for r in mine])
    np.testing.assert_allclose(scores, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(scored, scores)
    np.testing.assert_array_equal(curate.sequences(path, width), tokens)
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
    (["--num_processes", "2"], "--num_processes and --process_id go together"),
    (["--num_processes", "2", "--process_id", "2"],
     "--process_id must be in 0 .. 1"),
    (["--num_processes", "2", "--process_id", "0"],
     "names 1 file(s): each process scores whole files"),
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



def _curate(run, texts, out, *more):
  """curate.main on ``texts`` with batches of 4, the top half kept next to
  ``out`` (``out``'s folder/kept)."""
  return curate.main(["--workdir", str(run), "--data_path", ",".join(texts),
                      "--out", str(out), "--keep", "0.5", "--kept_out",
                      str(out.parent / "kept"), "--batch_size", "4", *more])


def _files(folder):
  return {p.name: p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


@pytest.mark.slow
@pytest.mark.subprocess  # the `run` fixture: a launch.train run
def test_an_interrupted_run_resumes_without_rescoring(run, texts, tmp_path,
                                                      capsys):
  whole, part = tmp_path / "whole" / "s.jsonl", tmp_path / "part" / "s.jsonl"
  assert _curate(run, texts, whole) == 0
  total = sum(os.path.getsize(p) // (SEQ_LEN + 1) for p in texts)
  assert f"scored {total} sequences" in capsys.readouterr().out
  assert _curate(run, texts, part, "--stop_after", "3") == 0
  assert "stopped by --stop_after after 12 sequences" in capsys.readouterr(
      ).out
  assert not (part.parent / "kept").exists()
  with open(part, "a") as f:  # a batch flushed after the last record
    f.write('{"path": "killed mid-')
  assert _curate(run, texts, part) == 0
  out = capsys.readouterr().out
  assert f"resumed at sequence 12 of {total}: scored {total - 12} " in out
  assert _files(part.parent) == _files(whole.parent)
  assert {"s.jsonl", "s.jsonl.npy", "s.jsonl.progress.json", *(
      os.path.basename(p) for p in texts)} == set(_files(whole.parent))
  np.testing.assert_array_equal(
      np.load(str(part) + ".npy"),
      np.array([json.loads(line)["score"] for line in open(part)],
               np.float32))
  # Finished: a rerun scores nothing; another command is refused.
  assert _curate(run, texts, part) == 0
  assert "already holds the scores of all" in capsys.readouterr().out
  assert _files(part.parent) == _files(whole.parent)
  assert _curate(run, texts, part, "--batch_size", "8") == 2
  err = capsys.readouterr().err
  assert "records another command (batch_size 4 there, 8 here)" in err
  assert err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.slow
@pytest.mark.subprocess  # the `run` fixture: a launch.train run
def test_shards_of_two_processes_together_equal_one_process(run, texts,
                                                            tmp_path):
  one, two = tmp_path / "one" / "s.jsonl", tmp_path / "two" / "s.jsonl"
  assert _curate(run, texts, one) == 0
  rows = []
  for p in range(2):
    assert _curate(run, texts, two, "--num_processes", "2", "--process_id",
                   str(p)) == 0
    rows += [json.loads(line) for line in
             open(curate.shard_path(str(two), p, 2))]
  sizes = [os.path.getsize(p) for p in texts]
  assert rows[0]["path"] == texts[int(np.argmax(sizes))]  # shard 0: largest
  single = [json.loads(line) for line in open(one)]
  order = {path: i for i, path in enumerate(texts)}
  assert sorted(rows, key=lambda r: (order[r["path"]], r["index"])) == single
  assert _files(two.parent / "kept") == _files(one.parent / "kept")


def test_shard_files_deal_whole_files_out_by_size():
  sizes = [5, 1, 9, 3, 4]
  shards = curate.shard_files(sizes, 2)
  assert sorted(i for s in shards for i in s) == list(range(len(sizes)))
  loads = [sum(sizes[i] for i in s) for s in shards]
  assert max(loads) - min(loads) <= max(sizes)
  # 9 -> 0, 5 -> 1, 4 -> 1, 3 -> 0 (a tie: the lower id), 1 -> 1.
  assert shards == [[2, 3], [0, 1, 4]]
  assert curate.shard_path("d/scores.jsonl", 1, 4) == (
      "d/scores-00001-of-00004.jsonl")
  assert curate.shard_path("scores", 0, 2) == "scores-00000-of-00002"


def test_malloc_arenas_are_capped_where_the_c_library_is_glibc():
  # launch.curate's peak memory grew with the corpus without the cap.
  assert curate.limit_malloc_arenas() == (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kept_chunks_equal_the_top_fraction_by_sorting(dtype):
  rng = np.random.default_rng(0)
  for n in (1, 2, 7, 500):
    # Many ties, NaN (lowest), -0 (= +0), infinities.
    scores = (rng.integers(-3, 4, n) / 2).astype(dtype)
    scores[rng.random(n) < 0.1] = np.nan
    scores[rng.random(n) < 0.1] = -0.0
    scores[rng.random(n) < 0.05] = np.inf
    scores[rng.random(n) < 0.05] = -np.inf
    for keep in (1e-3, 0.3, 0.5, 0.77, 1.0):
      k = max(1, round(keep * n))
      expected = np.sort(np.argsort(-scores, kind="stable")[:k])
      for chunk in (1, 3, 64, 1000):
        chunks = list(curate.kept_chunks(lambda a, b: scores[a:b], n, keep,
                                         chunk))
        assert len(chunks) == -(-n // chunk)
        got = np.concatenate([c + i * chunk for i, c in enumerate(chunks)])
        np.testing.assert_array_equal(got, expected)
      np.testing.assert_array_equal(curate.top_fraction(scores, keep),
                                    expected)
