"""Bad input to ``launch.train`` costs seconds, not a compile and a
traceback: each malformed invocation of the table exits with status 2 and
one ``error: ...`` line naming the setting (a value of the wrong type and a
config file that does not load included), and leaves no workdir behind. The
invocations run in process, through `launch.train.run` (the entry point of
``python -m launch.train``); a resumed run with a changed setting is refused
and leaves the checkpoints byte-identical."""

import hashlib
import os
import sys
import time

import numpy as np
import pytest
from absl import flags

from launch import train

SINUSOID = ["--task=sinusoid_maml"]
FEWSHOT = ["--task=fewshot_classification"]
LM = ["--task=lm_maml", "--config.task.preset=nano",
      "--config.task.seq_len=32"]
LM_RATER = ["--task=lm_data_rater", "--config.task.preset=nano"]


def _file(d, name, content: bytes):
  path = d / name
  path.write_bytes(content)
  return str(path)


def _npz(d, name, **arrays):
  path = d / name
  np.savez(path, **arrays)
  return str(path)


def _images(n, classes=10):
  rng = np.random.default_rng(0)
  return {"images": rng.integers(0, 255, (n, 8, 8), np.uint8),
          "labels": np.arange(n) % classes}


def _non_finite(d):
  arrays = _images(40)
  images = arrays["images"].astype(np.float32)
  images[3, 2, 2] = np.nan
  return _npz(d, "nan.npz", images=images, labels=arrays["labels"])


# A config file that does not start from launch/configs/default.py.
BARE_CONFIG = (b"import ml_collections\n"
               b"def get_config(): return ml_collections.ConfigDict()\n")

# (id, arguments given the test folder d, the error line contains)
CASES = [
    # The command line itself.
    ("no-task", lambda d: [], "error: --task is required"),
    ("unknown-task", lambda d: ["--task=nope"],
     "error: unknown task 'nope'; registered tasks: "),
    ("no-workdir", lambda d: SINUSOID, "error: --workdir is required."),
    ("workdir-is-file", lambda d: SINUSOID + [f"--workdir={d / 'file'}"],
     "is not a directory"),
    ("missing-config-file", lambda d: SINUSOID + [f"--config={d / 'no.py'}"],
     "error: config file"),
    ("unknown-key", lambda d: SINUSOID + ["--config.no_such_key=1"],
     "error: unknown config key 'no_such_key' (valid keys of config: "),
    ("unknown-task-key", lambda d: SINUSOID + ["--config.task.nope=1"],
     "error: unknown config key 'task.nope' (valid keys of task: "),
    ("wrong-type", lambda d: SINUSOID + ["--config.meta_steps=many"],
     "error: flag --config.meta_steps=many: invalid literal for int()"),
    ("wrong-type-shortcut", lambda d: SINUSOID + ["--meta_steps=abc"],
     "error: flag --meta_steps=abc: invalid literal for int()"),
    ("unknown-flag", lambda d: SINUSOID + ["--no_such_flag=3"],
     "error: Unknown command line flag 'no_such_flag'"),
    # The config file.
    ("config-missing", lambda d: SINUSOID + [f"--config={d / 'none.py'}"],
     "none.py' does not exist."),
    ("config-syntax-error", lambda d: SINUSOID + [
        f"--config={_file(d, 'syntax.py', b'def get_config(:')}"],
     "syntax.py' line 1: syntax error: "),
    ("config-without-get-config", lambda d: SINUSOID + [
        f"--config={_file(d, 'nothing.py', b'x = 1')}"],
     "nothing.py' defines no get_config()"),
    ("config-get-config-raises", lambda d: SINUSOID + [
        f"--config={_file(d, 'raises.py', b'def get_config(): 1 / 0')}"],
     "get_config() failed: ZeroDivisionError: division by zero"),
    ("config-is-a-folder", lambda d: SINUSOID + [f"--config={d}"],
     "' is not a file."),
    ("config-lacks-the-defaults", lambda d: SINUSOID + [
        f"--config={_file(d, 'bare.py', BARE_CONFIG)}"],
     "error: the config lacks cg_damping, cg_steps, "),
    ("config-not-a-config-dict", lambda d: SINUSOID + [
        f"--config={_file(d, 'three.py', b'def get_config(): return 3')}"],
     "get_config() must return an ml_collections.ConfigDict, got int."),
    ("positional", lambda d: SINUSOID + ["extra"],
     "error: unexpected arguments: extra"),
    ("unknown-task-module", lambda d: SINUSOID + ["--task_module=no_mod_xyz"],
     "error: --task_module: cannot import module 'no_mod_xyz'"),
    ("unimportable-task", lambda d: ["--task=no_mod_xyz:Task"],
     "error: task 'no_mod_xyz:Task': cannot import module 'no_mod_xyz'"),
    # Strategies.
    ("unknown-strategy", lambda d: SINUSOID + ["--strategy=reverse"],
     "error: Unknown strategy 'reverse'"),
    ("zero-segments", lambda d: SINUSOID + ["--strategy=mixflow+segments=0"],
     "error: "),
    ("auto-without-budget", lambda d: SINUSOID + ["--strategy=auto"],
     "error: strategy='auto' needs a memory_budget"),
    ("budget-without-auto", lambda d: SINUSOID
     + ["--config.memory_budget=1GiB"],
     "error: memory_budget applies to --strategy auto only"),
    ("bad-budget", lambda d: SINUSOID + ["--strategy=auto",
                                         "--config.memory_budget=lots"],
     "error: "),
    # Counts, sizes and rates of the run.
    ("zero-inner-steps", lambda d: SINUSOID + ["--inner_steps=0"],
     "error: config.inner_steps must be an int >= 1, got 0."),
    ("negative-meta-steps", lambda d: SINUSOID + ["--meta_steps=-5"],
     "error: config.meta_steps must be an int >= 0, got -5."),
    ("zero-meta-batch", lambda d: SINUSOID + ["--config.meta_batch_size=0"],
     "error: config.meta_batch_size must be an int >= 1, got 0."),
    ("zero-eval-tasks", lambda d: SINUSOID + ["--config.num_eval_tasks=0"],
     "error: config.num_eval_tasks must be an int >= 1"),
    ("zero-log-every", lambda d: SINUSOID + ["--config.log_every=0"],
     "error: config.log_every must be an int >= 1"),
    ("negative-checkpoint-every", lambda d: SINUSOID
     + ["--config.checkpoint_every=-1"],
     "error: config.checkpoint_every must be an int >= 0"),
    ("zero-keep-checkpoints", lambda d: SINUSOID
     + ["--config.keep_checkpoints=0"],
     "error: config.keep_checkpoints must be an int >= 1"),
    ("zero-max-skipped", lambda d: SINUSOID + ["--config.max_skipped_steps=0"],
     "error: config.max_skipped_steps must be an int >= 1"),
    ("negative-workers", lambda d: SINUSOID + ["--config.num_workers=-1"],
     "error: config.num_workers must be an int >= 0"),
    ("negative-seed", lambda d: SINUSOID + ["--config.seed=-1"],
     "error: config.seed must be an int >= 0"),
    ("zero-cg-steps", lambda d: SINUSOID + ["--config.cg_steps=0"],
     "error: config.cg_steps must be an int >= 1"),
    ("negative-damping", lambda d: SINUSOID + ["--config.cg_damping=-1.0"],
     "error: config.cg_damping must be a finite number >= 0, got -1.0."),
    ("zero-outer-lr", lambda d: SINUSOID + ["--config.outer_lr=0.0"],
     "error: config.outer_lr must be a finite number > 0, got 0.0."),
    ("negative-outer-lr", lambda d: SINUSOID + ["--config.outer_lr=-0.001"],
     "error: config.outer_lr must be a finite number > 0, got -0.001."),
    ("nan-outer-lr", lambda d: SINUSOID + ["--config.outer_lr=nan"],
     "error: config.outer_lr must be a finite number > 0, got nan."),
    ("negative-outer-clip", lambda d: SINUSOID + ["--config.outer_clip=-1.0"],
     "error: config.outer_clip must be a finite number >= 0, got -1.0."),
    ("lifetime-max-below-lifetime", lambda d: SINUSOID
     + ["--config.online.population=2", "--config.online.lifetime=10",
        "--config.online.lifetime_max=5"],
     "error: Online.lifetime_max (5) must be 0 (every life is lifetime long) "
     "or at least lifetime (10)."),
    ("unknown-outer-optimizer", lambda d: SINUSOID
     + ["--config.outer_optimizer=rmsprop"],
     "error: config.outer_optimizer must be one of adam, sgd, got "
     "'rmsprop'."),
    ("unknown-eval-split", lambda d: SINUSOID + ["--config.eval_split=dev"],
     "error: config.eval_split must be one of train, validation, test"),
    ("zero-mesh-axis", lambda d: SINUSOID + ["--config.mesh.fsdp=0"],
     "error: config.mesh.fsdp must be an int >= 1 or -1 (the rest of the "
     "devices), got 0."),
    ("mesh-too-large", lambda d: SINUSOID + ["--config.mesh.data=1000"],
     "error: mesh data=1000 x fsdp=1 needs 1000 devices, but there are "),
    ("partial-coordinates", lambda d: SINUSOID
     + ["--coordinator_address=localhost:1234"],
     "error: --coordinator_address need(s) --num_processes and --process_id "
     "as well"),
    ("bad-process-id", lambda d: SINUSOID
     + ["--coordinator_address=localhost:1234", "--num_processes=2",
        "--process_id=2"],
     "error: --process_id must be in 0 .. 1 for --num_processes=2, got 2."),
    # The task's settings.
    ("zero-shots", lambda d: SINUSOID + ["--config.task.num_shots=0"],
     "error: num_shots"),
    ("negative-inner-lr", lambda d: SINUSOID + ["--config.task.inner_lr=-0.1"],
     "error: inner_lr must be a finite number > 0, got -0.1."),
    ("zero-width", lambda d: SINUSOID + ["--config.task.widths=(0,)"],
     "error: widths must be an int >= 1, got 0."),
    ("negative-proximal", lambda d: SINUSOID + ["--config.task.proximal=-1.0"],
     "error: proximal must be a finite number >= 0"),
    ("fewshot-zero-lr", lambda d: FEWSHOT + ["--config.task.inner_lr=0.0"],
     "error: fewshot inner_lr must be a finite number > 0, got 0.0."),
    ("fewshot-ways-above-classes", lambda d: FEWSHOT
     + ["--config.task.num_ways=50"], "-way episodes need at least 50"),
    ("lm-zero-batch", lambda d: LM + ["--config.task.batch_size=0"],
     "error: batch_size must be an int >= 1, got 0."),
    ("lm-zero-inner-lr", lambda d: LM + ["--config.task.inner_lr=0.0"],
     "error: inner_lr must be > 0, got 0.0."),
    ("seq-len-above-max", lambda d: LM + ["--config.task.seq_len=1024"],
     "error: seq_len 1024 is above the maximum length 128 of model preset "
     "'nano'"),
    ("unknown-preset", lambda d: ["--task=lm_maml",
                                  "--config.task.preset=huge"],
     "error: Unknown transformer preset 'huge'; known presets: rater, nano, "
     "tiny, "),
    # Data files.
    ("missing-data-file", lambda d: FEWSHOT
     + [f"--config.task.data_path={d / 'missing.npz'}"], "missing.npz"),
    ("npz-wrong-keys", lambda d: FEWSHOT + [
        f"--config.task.data_path={_npz(d, 'k.npz', x=np.zeros((4, 8, 8)))}"],
     "error: fewshot data_path"),
    ("npz-wrong-shape", lambda d: FEWSHOT + [
        "--config.task.data_path=" + _npz(d, "s.npz", images=np.zeros((10, 8)),
                                          labels=np.zeros((10,), int))],
     "error: fewshot data_path"),
    ("npz-lengths-differ", lambda d: FEWSHOT + [
        "--config.task.data_path=" + _npz(
            d, "l.npz", images=_images(40)["images"],
            labels=_images(39)["labels"])], "40 images but "),
    ("npz-too-few-classes", lambda d: FEWSHOT + [
        "--config.task.data_path=" + _npz(d, "c.npz", **_images(60, 3))],
     "lists label(s)"),
    ("npz-non-finite-pixels", lambda d: FEWSHOT + [
        f"--config.task.data_path={_non_finite(d)}"],
     "images contain NaN or infinite values."),
    ("text-named-npz", lambda d: FEWSHOT + [
        f"--config.task.data_path={_file(d, 'fake.npz', b'just text')}"],
     "is not a readable .npz file"),
    ("text-empty", lambda d: LM + [
        f"--config.task.data_path={_file(d, 'e.txt', b'')}"],
     "e.txt' is empty."),
    ("text-short", lambda d: LM + [
        f"--config.task.data_path={_file(d, 's.txt', b'abc')}"],
     "has 3 bytes, fewer than one sequence of seq_len + 1 = 33 bytes"),
    ("text-non-utf8-strict", lambda d: LM + [
        "--config.task.strict_utf8=True", "--config.task.data_path="
        + _file(d, "b.txt", b"ok" * 2000 + b"\xff")],
     "is not valid UTF-8 (first invalid byte at offset 4000) and strict_utf8 "
     "is set"),
    ("text-is-a-folder", lambda d: LM + [f"--config.task.data_path={d}"],
     "error: "),
    # Online learners and the data rater.
    ("negative-population", lambda d: LM
     + ["--config.online.population=-1"],
     "error: config.online.population must be an int >= 0, got -1."),
    ("lifetime-not-whole-windows", lambda d: LM_RATER
     + ["--config.online.lifetime=3"],
     "error: Online.lifetime (N=3) must be a multiple of num_inner_steps "
     "(T=2)"),
    ("online-learned-init", lambda d: LM + [
        "--config.online.population=1", "--config.online.lifetime=4"],
     "error: Online learners cannot meta-learn an initialisation"),
    ("missing-target-text", lambda d: LM_RATER
     + [f"--config.task.target_path={d / 'missing.txt'}"], "missing.txt"),
    ("zero-temperature", lambda d: LM_RATER
     + ["--config.task.temperature=0.0"],
     "error: temperature must be a finite number > 0, got 0.0."),
]


def _reset_flags():
  """Flags as before any parse: ml_collections defines one flag per
  ``--config.KEY`` override while it parses (and would refuse to define it
  again)."""
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()


def run_in_process(args):
  """``python -m launch.train ARGS`` in this process: its exit status
  (ml_collections reads the ``--config.*`` overrides from ``sys.argv``)."""
  argv = ["launch.train", *args]
  saved = sys.argv
  _reset_flags()
  try:
    sys.argv = argv
    with pytest.raises(SystemExit) as exit_:
      train.run(argv)
  finally:
    sys.argv = saved
    _reset_flags()
  return exit_.value.code


@pytest.mark.parametrize("make_args, message",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(make_args, message, tmp_path, capfd):
  (tmp_path / "file").write_text("not a directory")
  args = make_args(tmp_path)
  made = os.listdir(tmp_path)
  if not any(a.startswith("--workdir") for a in args) and message != (
      "error: --workdir is required."):
    args = args + [f"--workdir={tmp_path / 'run'}"]
  start = time.perf_counter()
  code = run_in_process(args)
  seconds = time.perf_counter() - start
  err = capfd.readouterr().err
  assert code == 2, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  errors = [line for line in err.splitlines()
            if line.startswith(("error: ", "FATAL "))]
  assert len(errors) == 1, err[-3000:]
  assert errors[0].startswith("error: ") and message in errors[0], errors[0]
  # A refused start leaves no workdir behind (only what the test made).
  assert sorted(os.listdir(tmp_path)) == sorted(made), os.listdir(tmp_path)
  print(f"{seconds:.2f} s")  # shown with -s; nothing compiled


def test_the_table_has_forty_invocations():
  assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def _digests(folder):
  return {os.path.relpath(os.path.join(d, f), folder):
          hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
          for d, _, files in os.walk(folder) for f in files}


def test_changed_setting_is_refused_and_checkpoints_untouched(tmp_path,
                                                              capfd):
  import jax
  n = jax.device_count()  # a meta-batch that every device shares
  args = SINUSOID + [f"--workdir={tmp_path}", "--config.task.widths=(8,)",
                     f"--config.meta_batch_size={n}",
                     f"--config.num_eval_tasks={n}", "--meta_steps=2",
                     "--inner_steps=2"]
  assert run_in_process(args) in (0, None)
  before = _digests(tmp_path / "checkpoints")
  assert before
  capfd.readouterr()
  code = run_in_process(args + ["--config.outer_lr=0.01", "--meta_steps=4"])
  err = capfd.readouterr().err
  assert code == 2
  assert "run.outer_lr: 0.003 in the checkpoint, now 0.01" in err
  assert _digests(tmp_path / "checkpoints") == before
