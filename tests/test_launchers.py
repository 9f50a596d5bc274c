"""The launchers: launch.cluster.local with a stand-in module (processes,
output, failures, signals, no orphans), and the commands of
launch.cluster.tpu_pod and launch.cluster.slurm (dry runs, and real runs
against fake gcloud/sbatch programs). No JAX runs here."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time

import pytest

from launch.cluster import local, slurm, tpu_pod

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = shlex.quote(sys.executable)

#: The stand-in for launch.train: writes its pid to DIR/pid<p>, prints its
#: arguments and the XLA device-count flag it saw, then behaves per --mode.
STANDIN = textwrap.dedent("""\
    import json, os, signal, sys, time

    args = sys.argv[1:]
    opts = dict(a[2:].split("=", 1) for a in args if "=" in a)
    p, mode, piddir = int(opts["process_id"]), opts["mode"], opts["piddir"]
    if mode == "ignore_term" and p == 0:
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(os.path.join(piddir, f"pid{p}.tmp"), "w") as f:
      f.write(str(os.getpid()))
    os.replace(os.path.join(piddir, f"pid{p}.tmp"),
               os.path.join(piddir, f"pid{p}"))
    count = [f.split("=", 1)[1] for f in os.environ.get("XLA_FLAGS", "").split()
             if f.startswith("--xla_force_host_platform_device_count=")]
    print(f"process {p} argv={json.dumps(args)} "
          f"device_count={','.join(count) or None} "
          f"xla_flags={os.environ.get('XLA_FLAGS')!r} "
          f"platforms={os.environ.get('JAX_PLATFORMS')}", flush=True)
    print(f"stderr of process {p}", file=sys.stderr, flush=True)
    if mode == "ok":
      sys.exit(0)
    if mode in ("fail", "ignore_term") and p == 1:
      deadline = time.monotonic() + 20
      while (not os.path.exists(os.path.join(piddir, "pid0"))
             and time.monotonic() < deadline):
        time.sleep(0.01)
      sys.exit(3)
    while True:
      time.sleep(3600)
""")


@pytest.fixture
def standin(tmp_path):
  """(tmp_path with the stand-in module, environment for
  launch.cluster.local)."""
  (tmp_path / "standin_mod.py").write_text(STANDIN)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(tmp_path)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  env["XLA_FLAGS"] = ("--xla_cpu_enable_fast_math=false "
                      "--xla_force_host_platform_device_count=4")
  env.pop("JAX_PLATFORMS", None)
  return tmp_path, env


def _local(tmp_path, mode, *launcher_args, n=2):
  return [sys.executable, "-m", "launch.cluster.local", "--num_processes",
          str(n),
          "--module", "standin_mod", *launcher_args, "--", f"--mode={mode}",
          f"--piddir={tmp_path}"]


def _pids(tmp_path, n=2, timeout=20.0):
  """Waits for the stand-ins' pid files; returns their pids."""
  deadline = time.monotonic() + timeout
  paths = [tmp_path / f"pid{p}" for p in range(n)]
  while not all(path.exists() for path in paths):
    assert time.monotonic() < deadline, "the stand-ins did not start"
    time.sleep(0.02)
  return [int(path.read_text()) for path in paths]


def _zombie(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except OSError:
    return False


def _assert_gone(pids, timeout=5.0, allow_zombie=False):
  """Every pid is gone (os.kill(pid, 0) raises ProcessLookupError) within
  ``timeout`` seconds; with ``allow_zombie`` a dead, unreaped one counts."""
  deadline = time.monotonic() + timeout
  for pid in pids:
    while True:
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        break
      if allow_zombie and _zombie(pid):
        break
      if time.monotonic() > deadline:
        for other in pids:  # Do not leave it behind for the next test.
          try:
            os.kill(other, signal.SIGKILL)
          except ProcessLookupError:
            pass
        pytest.fail(f"process {pid} is still running")
      time.sleep(0.02)


# launch.cluster.local: real processes.


@pytest.mark.subprocess
def test_local_runs_all_processes(standin):
  tmp_path, env = standin
  result = subprocess.run(
      _local(tmp_path, "ok", "--devices_per_process", "2", "--port", "23456"),
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  lines = result.stdout.splitlines()
  assert lines and all(line[:4] in ("[0] ", "[1] ") for line in lines), lines
  for p in range(2):
    argv = (f'["--mode=ok", "--piddir={tmp_path}", '
            f'"--coordinator_address=localhost:23456", "--num_processes=2", '
            f'"--process_id={p}"]')
    assert (f"[{p}] process {p} argv={argv} device_count=2 "
            "xla_flags='--xla_cpu_enable_fast_math=false "
            "--xla_force_host_platform_device_count=2' platforms=cpu"
            in lines), lines
    assert f"[{p}] stderr of process {p}" in lines  # stderr is merged in.
  _assert_gone(_pids(tmp_path))


@pytest.mark.subprocess
def test_local_without_devices_passes_the_environment_unchanged(standin):
  tmp_path, env = standin
  result = subprocess.run(_local(tmp_path, "ok", n=1), cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  assert ("device_count=4 xla_flags='--xla_cpu_enable_fast_math=false "
          "--xla_force_host_platform_device_count=4' platforms=None"
          in result.stdout)
  assert "--coordinator_address=localhost:" in result.stdout


@pytest.mark.subprocess
@pytest.mark.parametrize("mode", ["fail", "ignore_term"])
def test_local_failure_stops_the_others(standin, mode):
  tmp_path, env = standin
  start = time.monotonic()
  result = subprocess.run(_local(tmp_path, mode), cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
  assert time.monotonic() - start < 30
  pids = _pids(tmp_path)
  assert result.returncode == 3, result.stdout + result.stderr
  assert (f"launch.cluster.local: process 1 (pid {pids[1]}) exited with "
          "status 3; stopping the others." in result.stderr.splitlines())
  _assert_gone(pids)


@pytest.mark.subprocess
def test_local_child_killed_by_signal(standin):
  tmp_path, env = standin
  proc = subprocess.Popen(_local(tmp_path, "sleep"), cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  pids = _pids(tmp_path)
  os.kill(pids[1], signal.SIGKILL)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 128 + signal.SIGKILL
  assert (f"launch.cluster.local: process 1 (pid {pids[1]}) was killed by "
          "signal SIGKILL; stopping the others." in stderr.splitlines()), stderr
  _assert_gone(pids)


@pytest.mark.subprocess
def test_local_sigterm_ends_the_children(standin):
  tmp_path, env = standin
  proc = subprocess.Popen(_local(tmp_path, "sleep"), cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  pids = _pids(tmp_path)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 128 + signal.SIGTERM
  assert ("launch.cluster.local: received SIGTERM; stopping the processes."
          in stderr)
  _assert_gone(pids)


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="PR_SET_PDEATHSIG is Linux only")
def test_local_sigkill_of_the_launcher_leaves_no_orphan(standin):
  tmp_path, env = standin
  proc = subprocess.Popen(_local(tmp_path, "sleep"), cwd=REPO_ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  pids = _pids(tmp_path)
  proc.kill()
  proc.wait(timeout=10)
  _assert_gone(pids, allow_zombie=True)  # Reaped by init, not by us.


def test_local_dry_run(monkeypatch, capsys):
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 "
                     "--xla_force_host_platform_device_count=4")
  with pytest.raises(SystemExit) as exit_info:
    local.run(["launch.cluster.local", "--num_processes", "2",
               "--devices_per_process",
               "3", "--port", "12345", "--dry_run", "--", "--task",
               "sinusoid_maml", "--workdir", "runs/a b"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out.splitlines() == [
      "JAX_PLATFORMS=cpu XLA_FLAGS='--xla_foo=1 "
      f"--xla_force_host_platform_device_count=3' {PYTHON} -m launch.train "
      "--task sinusoid_maml --workdir 'runs/a b' "
      f"--coordinator_address=localhost:12345 --num_processes=2 "
      f"--process_id={p}" for p in range(2)]
  with pytest.raises(SystemExit):
    local.run(["launch.cluster.local", "--num_processes", "1", "--dry_run",
               "--",
               "--task", "t"])
  line, = capsys.readouterr().out.splitlines()
  assert line.startswith(f"{PYTHON} -m launch.train --task t "
                         "--coordinator_address=localhost:")


@pytest.mark.parametrize("args, message", [
    (["--num_processes", "0", "--", "--task", "t"],
     "--num_processes must be at least 1, got 0."),
    (["--", "--task", "t"], "--num_processes is required."),
    (["--num_processes", "2", "--devices_per_process", "0", "--", "x"],
     "--devices_per_process must be at least 1, got 0."),
    (["--num_processes", "2"], "nothing after --"),
    (["--num_processes", "2", "--"], "nothing after --"),
    (["--num_processes", "2", "--port", "70000", "--", "x"],
     "--port must be in 1-65535"),
    (["--num_processes", "two", "--", "x"], "--num_processes=two"),
    (["--num_processes", "2", "--bogus", "--", "x"], "bogus"),
    (["--num_processes", "2", "extra", "--", "x"],
     "unexpected arguments before --: extra"),
    (["--num_processes", "2", "--", "--task", "t", "--process_id=1"],
     "--process_id must not be given after --"),
])
def test_local_bad_input(capsys, args, message):
  with pytest.raises(SystemExit) as exit_info:
    local.run(["launch.cluster.local", *args])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err


# launch.cluster.tpu_pod.


def _tpu(*args):
  return ["launch.cluster.tpu_pod", "--tpu", "pod-1", "--zone", "us-central2-b",
          *args]


TRAIN = ["--task", "lm_maml", "--workdir", "/mnt/runs/lm maml",
         "--config.task.data_path=a.txt"]
REMOTE_TRAIN = ("'cd ~/metaflow && .venv/bin/python -m launch.train --task "
                "lm_maml --workdir '\"'\"'/mnt/runs/lm maml'\"'\"' "
                "--config.task.data_path=a.txt --distributed'")


def test_tpu_pod_dry_run(capsys):
  with pytest.raises(SystemExit) as exit_info:
    tpu_pod.run(_tpu("--project", "my-proj", "--dry_run", "--", *TRAIN))
  assert exit_info.value.code == 0
  archive = os.path.join(tempfile.gettempdir(), "metaflow-tpu-XXXXXXXX",
                         "metaflow-src.tar.gz")
  where = "--zone=us-central2-b --project=my-proj --worker=all"
  assert capsys.readouterr().out.splitlines() == [
      f"git archive --format=tar.gz -o {archive} HEAD",
      f"gcloud compute tpus tpu-vm scp {archive} pod-1:metaflow-src.tar.gz "
      f"{where}",
      f"gcloud compute tpus tpu-vm ssh pod-1 {where} --command 'mkdir -p "
      "~/metaflow && tar -xzf ~/metaflow-src.tar.gz -C ~/metaflow && rm -f "
      "~/metaflow-src.tar.gz && cd ~/metaflow && python3 -m venv .venv && "
      ".venv/bin/pip install -c constraints.txt -e . "
      "'\"'\"'jax[tpu]==0.10.2'\"'\"''",
      f"gcloud compute tpus tpu-vm ssh pod-1 {where} --command {REMOTE_TRAIN}",
  ]
  with pytest.raises(SystemExit):
    tpu_pod.run(_tpu("--nosetup", "--remote_dir", "/opt/my dir", "--dry_run",
                     "--", "--task", "t", "--workdir=/mnt/w"))
  assert capsys.readouterr().out.splitlines() == [
      "gcloud compute tpus tpu-vm ssh pod-1 --zone=us-central2-b "
      "--worker=all --command 'cd '\"'\"'/opt/my dir'\"'\"' && "
      ".venv/bin/python -m launch.train --task t --workdir=/mnt/w "
      "--distributed'"]


def test_tpu_pod_remote_command_round_trips():
  """What the remote shell runs is exactly the train arguments."""
  command = tpu_pod.train_command("pod-1", "z", None, "/opt/x", TRAIN)
  remote = command[command.index("--command") + 1]
  assert shlex.split(remote) == ["cd", "/opt/x", "&&", ".venv/bin/python",
                                 "-m", "launch.train", *TRAIN, "--distributed"]


def _fake_program(bin_dir, name, body):
  bin_dir.mkdir(exist_ok=True)
  path = bin_dir / name
  path.write_text("#!/bin/sh\n" + body)
  path.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir(os.path.join(REPO_ROOT, ".git")),
                    reason="needs a git checkout")
def test_tpu_pod_runs_the_commands(tmp_path, monkeypatch, capsys):
  log = tmp_path / "gcloud.log"
  # A fake gcloud: logs its arguments, keeps the archive scp'd, fails when
  # FAIL_ON is one of its arguments.
  _fake_program(tmp_path / "bin", "gcloud", textwrap.dedent(f"""\
      for a in "$@"; do printf '%s|' "$a" >> {log}; done; echo >> {log}
      if [ "$4" = scp ]; then cp "$5" {tmp_path}/copied.tar.gz; fi
      for a in "$@"; do [ "$a" = "$FAIL_ON" ] && exit 7; done
      exit 0
      """))
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}"
                     f"{os.environ['PATH']}")
  with pytest.raises(SystemExit) as exit_info:
    tpu_pod.run(_tpu("--", *TRAIN))
  assert exit_info.value.code == 0
  calls = [line.split("|")[:-1] for line in log.read_text().splitlines()]
  assert [call[3] for call in calls] == ["scp", "ssh", "ssh"]
  assert calls[0][5:] == ["pod-1:metaflow-src.tar.gz", "--zone=us-central2-b",
                          "--worker=all"]
  assert calls[2][-1] == shlex.split(REMOTE_TRAIN)[0]
  assert not os.path.exists(calls[0][4])  # The local archive is removed.
  with tarfile.open(tmp_path / "copied.tar.gz") as tar:
    assert "pyproject.toml" in tar.getnames()

  log.unlink()
  monkeypatch.setenv("FAIL_ON", "scp")
  with pytest.raises(SystemExit) as exit_info:
    tpu_pod.run(_tpu("--", *TRAIN))
  assert exit_info.value.code == 1
  assert len(log.read_text().splitlines()) == 1  # Stopped after the scp.
  err = capsys.readouterr().err.splitlines()
  assert err[-1].startswith("error: exit status 7 from: gcloud compute tpus "
                            "tpu-vm scp ")


@pytest.mark.parametrize("args, message", [
    (["launch.cluster.tpu_pod", "--zone", "z", "--", *TRAIN],
     "--tpu is required."),
    (["launch.cluster.tpu_pod", "--tpu", "t", "--", *TRAIN],
     "--zone is required."),
    (_tpu("--", "--task", "t"), "must include --workdir."),
    (_tpu("--", "--workdir", "/w"), "must include --task."),
    (_tpu(), "must include --task."),
    (_tpu("--", "--task", "t", "--workdir", "runs/x"),
     "--workdir must be an absolute path"),
    (_tpu("--", *TRAIN, "--distributed"),
     "--distributed must not be given after --"),
    (_tpu("--setup=maybe", "--", *TRAIN), "setup"),
])
def test_tpu_pod_bad_input(capsys, args, message):
  at = args.index("--") if "--" in args else len(args)
  with pytest.raises(SystemExit) as exit_info:
    tpu_pod.run([*args[:at], "--dry_run", *args[at:]])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err


# launch.cluster.slurm.


def _expected_script(train, partition=True):
  return "\n".join([
      "#!/bin/bash",
      "#SBATCH --job-name=metaflow",
      "#SBATCH --nodes=2",
      "#SBATCH --ntasks-per-node=4",
      "#SBATCH --gpus-per-node=4",
      "#SBATCH --cpus-per-task=8",
      *(["#SBATCH --partition=gpu", "#SBATCH --account=proj"]
        if partition else []),
      "#SBATCH --time=24:00:00",
      "#SBATCH --output=slurm-%j.out",
      "",
      "# Written by python -m launch.cluster.slurm. One task per GPU; JAX's",
      "# jax.distributed.initialize() takes the coordinator (first node),",
      "# the process count and id from srun's SLURM_* variables and uses",
      "# the GPU numbered SLURM_LOCALID (every task sees the node's GPUs).",
      "set -euo pipefail",
      f"cd {shlex.quote(REPO_ROOT)}",
      "srun --kill-on-bad-exit=1 --cpus-per-task=8 .venv/bin/python -m "
      f"launch.train {train} --distributed",
      ""])


def test_slurm_dry_run(capsys, tmp_path):
  script = tmp_path / "job.sbatch"
  with pytest.raises(SystemExit) as exit_info:
    slurm.run(["launch.cluster.slurm", "--nodes", "2", "--gpus_per_node", "4",
               "--partition", "gpu", "--account", "proj", "--script",
               str(script), "--dry_run", "--", *TRAIN])
  assert exit_info.value.code == 0
  train = ("--task lm_maml --workdir '/mnt/runs/lm maml' "
           "--config.task.data_path=a.txt")
  assert capsys.readouterr().out == (_expected_script(train)
                                     + f"\nsbatch {script}\n")
  assert not script.exists()  # A dry run writes nothing.


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(REPO_ROOT, ".venv", "bin", "python")),
    reason="launch.cluster.slurm checks that .venv/bin/python exists")
def test_slurm_submits(tmp_path, monkeypatch, capsys):
  log = tmp_path / "sbatch.log"
  _fake_program(tmp_path / "bin", "sbatch",
                f'echo "$@" > {log}; cp "$1" {tmp_path}/submitted\n'
                'echo "Submitted batch job 42"\n')
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}"
                     f"{os.environ['PATH']}")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    slurm.run(["launch.cluster.slurm", "--nodes", "2", "--gpus_per_node", "4",
               "--",
               "--task", "t", "--workdir", "runs/t"])
  assert exit_info.value.code == 0
  assert log.read_text() == "metaflow.sbatch\n"
  assert ((tmp_path / "submitted").read_text()
          == (tmp_path / "metaflow.sbatch").read_text()
          == _expected_script("--task t --workdir runs/t", partition=False))
  assert capsys.readouterr().err == ("launch.cluster.slurm: wrote "
                                     "metaflow.sbatch\n"
                                     "launch.cluster.slurm: sbatch "
                                     "metaflow.sbatch\n")


@pytest.mark.parametrize("args, message", [
    (["--gpus_per_node", "4"], "--nodes is required."),
    (["--nodes", "1"], "--gpus_per_node is required."),
    (["--nodes", "0", "--gpus_per_node", "4"],
     "--nodes must be at least 1, got 0."),
    (["--nodes", "1", "--gpus_per_node", "0"],
     "--gpus_per_node must be at least 1, got 0."),
    (["--nodes", "1", "--gpus_per_node", "1", "--cpus_per_task", "0"],
     "--cpus_per_task must be at least 1, got 0."),
    (["--nodes", "1", "--gpus_per_node", "1", "--time", "tomorrow"],
     "--time 'tomorrow' is not a Slurm time limit"),
    (["--nodes", "1", "--gpus_per_node", "1", "--job_name", "a b"],
     "--job_name must not contain whitespace"),
])
def test_slurm_bad_input(capsys, args, message):
  with pytest.raises(SystemExit) as exit_info:
    slurm.run(["launch.cluster.slurm", *args, "--dry_run", "--", "--task", "t",
               "--workdir", "w"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err


def test_slurm_needs_sbatch_and_train_arguments(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("PATH", str(tmp_path))
  for train, message in [
      (["--task", "t", "--workdir", "w"], "error: sbatch is not on PATH"),
      (["--task", "t"], "error: the launch.train arguments after -- must "
       "include --workdir."),
      (["--task", "t", "--workdir", "w", "--num_processes=2"],
       "error: --num_processes must not be given after --")]:
    with pytest.raises(SystemExit) as exit_info:
      slurm.run(["launch.cluster.slurm", "--nodes", "1", "--gpus_per_node",
                 "1", "--",
                 *train])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(message)
