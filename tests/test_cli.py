"""One command-line convention for every runner: ``--help`` prints the usage
and the flags (status 0); an unknown flag, a value of the wrong type, a
missing required flag or a stray argument is one ``error: ...`` line on
stderr, status 2, without a traceback. Each case is one command, refused
before JAX compiles anything."""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

#: module -> (its flags, a value of the wrong type for one of them).
RUNNERS = {
    "launch.benchmark": (
        ("strategies", "steps", "depths", "width", "batch", "inner_optimizer",
         "repeats", "out"), "--repeats=abc"),
    "launch.benchmark_lm": (
        ("tasks", "strategies", "proximal", "preset", "steps", "batch",
         "seq_len", "compute_dtype", "remat_blocks", "attention",
         "attention_block", "data_path", "repeats", "out", "mesh",
         "host_devices"), "--repeats=abc"),
    "launch.curate": (
        ("workdir", "data_path", "out", "keep", "kept_out", "batch_size",
         "step"), "--batch_size=abc"),
    "launch.evaluate": (
        ("workdir", "inner_steps", "baseline", "lr_grid", "lr_grid_points",
         "eval_every", "eval_batches", "split", "step", "out"),
        "--inner_steps=abc"),
    "experiments.paper_sweep": (("sweep", "out", "repeats"), "--repeats=abc"),
    "experiments.data_rater": (
        ("out", "tiny", "meta_steps", "train_steps", "keep", "shakespeare",
         "seed", "pools", "refilter"), "--meta_steps=abc"),
    "experiments.estimators": (
        ("tasks", "steps", "cg_steps", "solve_steps", "solve_cg_steps",
         "train_steps", "meta_steps", "budget_s", "repeats", "out"),
        "--budget_s=abc"),
    "experiments.long_context": (
        ("sweep", "preset", "lengths", "length_strategies", "dense_max",
         "horizons",
         "horizon_seq_len",
         "repeats", "out"),
        "--repeats=abc"),
}

#: module -> (a command line missing a required flag, the flag).
REQUIRED = {
    "launch.curate": (["--data_path=a.txt", "--out=s.jsonl"], "workdir"),
    "launch.evaluate": (["--workdir=runs/x"], "inner_steps"),
    "experiments.paper_sweep": (["--out=out"], "sweep"),
}


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _assert_one_error_line(done: subprocess.CompletedProcess,
                           message: str) -> None:
  assert done.returncode == 2, (done.stdout, done.stderr)
  assert "Traceback" not in done.stderr, done.stderr
  assert done.stderr.startswith("error: "), done.stderr
  assert done.stderr.count("\n") == 1, done.stderr
  assert message in done.stderr, done.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize("module", RUNNERS)
def test_help_prints_the_usage_and_every_flag(module):
  done = _run(module, "--help")
  assert done.returncode == 0, done.stderr
  assert "Traceback" not in done.stderr, done.stderr
  assert f"python -m {module}" in done.stdout
  assert "\nflags:\n" in done.stdout
  for name in RUNNERS[module][0]:
    assert (f"  --{name}: " in done.stdout
            or f"  --[no]{name}: " in done.stdout), (name, done.stdout)


@pytest.mark.subprocess
@pytest.mark.parametrize("module", RUNNERS)
def test_unknown_flag(module):
  _assert_one_error_line(_run(module, "--no_such_flag=1"),
                         "Unknown command line flag 'no_such_flag'")


@pytest.mark.subprocess
@pytest.mark.parametrize("module", RUNNERS)
def test_wrong_type(module):
  wrong = RUNNERS[module][1]
  _assert_one_error_line(_run(module, wrong), f"flag {wrong}: ")


@pytest.mark.subprocess
@pytest.mark.parametrize("module", REQUIRED)
def test_missing_required_flag(module):
  args, name = REQUIRED[module]
  _assert_one_error_line(_run(module, *args), f"--{name} is required.")


@pytest.mark.subprocess
def test_stray_argument():
  _assert_one_error_line(_run("launch.benchmark", "--repeats=2", "extra"),
                         "unexpected arguments: extra")


@pytest.mark.parametrize("argv, message", [
    (["--keep=0.75,1.5"], "--keep must be numbers in (0, 1), got 0.75,1.5."),
    (["--keep=abc"], "--keep must be numbers in (0, 1), got abc."),
    (["--pools=code,poetry"], "unknown pools ['poetry']; known: code, prose, "
     "structured."),
    (["--shakespeare=/no/such.txt"], "'/no/such.txt' does not exist."),
])
def test_data_rater_study_refuses_bad_values(argv, message, tmp_path, capsys):
  """Checked before the pool is written or anything compiles."""
  from experiments.data_rater import study
  assert study.main([f"--out={tmp_path}", *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err
  assert not list(tmp_path.iterdir())


@pytest.mark.subprocess
def test_a_mesh_larger_than_the_devices_is_refused_before_compiling():
  _assert_one_error_line(_run("launch.benchmark_lm", "--mesh=data=3"),
                         "--mesh: mesh data=3 x fsdp=1 needs 3 devices")


@pytest.mark.subprocess
@pytest.mark.parametrize("module, args", [
    ("launch.evaluate", ["--workdir=runs/x", "--inner_steps=3"]),
    ("launch.curate", ["--workdir=runs/x", f"--data_path={__file__}"]),
])
def test_an_output_that_cannot_be_written_is_refused_first(module, args,
                                                           tmp_path):
  """Before the run is read or anything is computed; nothing is created."""
  (tmp_path / "file").write_text("not a folder")
  out = tmp_path / "file" / "out"
  if module == "launch.curate":
    out = out / "scores.jsonl"
  _assert_one_error_line(_run(module, *args, f"--out={out}"),
                         "' is not a folder.")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
