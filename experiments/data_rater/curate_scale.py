"""``launch.curate`` at scale: peak memory at two corpus sizes, throughput,
and a run killed halfway and resumed.

    python -m experiments.data_rater.curate_scale \\
        --out experiments/data_rater/curate_scale [--gigabytes 1.0] \\
        [--small_gigabytes 0.1] [--files 4] [--workdir W] [--batch_size 256] \\
        [--tmp_dir DIR] [--keep_data]

1. The rater: ``--workdir`` (a ``launch.train`` run of ``lm_data_rater``),
   or a tiny one trained here (3 meta-steps of the task's config with 4
   sequences of 64 bytes per inner batch and learners of 8 inner steps: the
   rater preset and ``seq_len`` at their defaults, so scoring costs what a
   real rater costs).
2. For each corpus size (``--small_gigabytes``, then ``--gigabytes``): a
   synthetic text corpus of ``--files`` files (random words of a fixed
   vocabulary of 512, 12 per line; deterministic; written in chunks) is
   curated by ``python -m launch.curate ... --keep 0.5`` in a subprocess,
   measuring its peak resident memory (``ru_maxrss`` of that process, from
   ``os.wait4``), the median of its resident memory sampled every half
   second (the peak is one instant, and moves by tens of MB between runs of
   the same corpus; the samples are kept, drawn against time in
   ``curate_scale.png``, and the largest corpus's highest sample over the
   smallest run's length is reported beside the smallest's), its wall
   time and its scoring rate (sequences per second, from curate's own
   progress line: the scoring loop only).
3. On the small corpus, a second curate is killed (SIGKILL) half a record
   interval after its progress record passes half the sequences (so its
   outputs hold batches past the record), then rerun with the same command:
   the resumed run must report scoring exactly the sequences after the
   record, and its outputs (the JSON lines, the ``.npy`` scores, the kept
   files) must be byte for byte the uninterrupted run's. Also reported: the
   sequences the killed run had flushed past its last record (those are
   scored again).

Writes ``OUT/curate_scale.json`` and, with matplotlib, ``curate_scale.png``.
The corpora and outputs go to a temporary folder (in ``--tmp_dir``; about 3
times the corpus size on disk at the largest), deleted at the end unless
``--keep_data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
from absl import flags

from launch import _cli
from launch.curate import RECORD_SECONDS

#: Bytes written per chunk of the corpus.
CHUNK_BYTES = 1 << 24
#: Seconds between two samples of the curate's resident memory.
SAMPLE_SECONDS = 0.5


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """The flags of a command line (``argv`` without the program name).

  Raises:
    UsageError: bad input.
  """
  fv = flags.FlagValues()
  flags.DEFINE_string("out", None, "Folder of curate_scale.json.",
                      flag_values=fv)
  flags.DEFINE_float("gigabytes", 1.0, "The large corpus (GB, 1e9 bytes).",
                     lower_bound=1e-4, flag_values=fv)
  flags.DEFINE_float("small_gigabytes", 0.1, "The small corpus (GB), also "
                     "the one killed and resumed.", lower_bound=1e-4,
                     flag_values=fv)
  flags.DEFINE_integer("files", 4, "Files per corpus.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_string("workdir", None, "An lm_data_rater run to score with "
                      "(default: train a tiny one).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 256, "curate's --batch_size.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_string("tmp_dir", None, "Where the temporary folder goes "
                      "(default: the system's).", flag_values=fv)
  flags.DEFINE_boolean("keep_data", False, "Keep the temporary folder.",
                       flag_values=fv)
  _cli.parse_flags(fv, ["experiments.data_rater.curate_scale", *argv],
                   __doc__ or "", passthrough=False, required=("out",),
                   outputs=("out",))
  return fv


def write_corpus(folder: str, total_bytes: int, files: int,
                 seed: int = 0) -> list[str]:
  """``files`` text files of ``total_bytes`` together (as equal as can be)
  in ``folder``: random words of a fixed vocabulary, 12 to a line, written
  in chunks of about `CHUNK_BYTES`; the same for the same arguments."""
  rng = np.random.default_rng(seed)
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
  words = [bytes(letters[rng.integers(0, 26, rng.integers(2, 9))])
           for _ in range(512)]
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(files):
    size = total_bytes // files + (i < total_bytes % files)
    path = os.path.join(folder, f"part{i:03d}.txt")
    file_rng = np.random.default_rng([seed, i])
    with open(path, "wb") as f:
      written = 0
      while written < size:
        ids = file_rng.integers(0, len(words), CHUNK_BYTES // 6)
        lines = [b" ".join(words[j] for j in ids[k:k + 12])
                 for k in range(0, ids.size, 12)]
        chunk = (b"\n".join(lines) + b"\n")[:size - written]
        f.write(chunk)
        written += len(chunk)
    paths.append(path)
  return paths


def run_measured(argv: Sequence[str], log: str) -> dict:
  """Runs ``argv`` (stdout and stderr to ``log``) and returns its exit
  status, wall seconds, peak resident memory (MB: its own ``ru_maxrss``),
  its resident memory sampled every `SAMPLE_SECONDS` (``rss_mb``: a list
  in MB, from ``/proc``; empty elsewhere than Linux) and output."""
  began = time.monotonic()
  samples = []
  with open(log, "w") as f:
    proc = subprocess.Popen(list(argv), stdout=f, stderr=subprocess.STDOUT,
                            cwd=_cli.REPO_ROOT)
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      samples.extend(_resident_kb(proc.pid))
      time.sleep(SAMPLE_SECONDS)
  proc.returncode = os.waitstatus_to_exitcode(status)
  with open(log) as f:
    output = f.read()
  return {"returncode": proc.returncode,
          "seconds": time.monotonic() - began,
          "peak_rss_mb": usage.ru_maxrss / 1024,
          "rss_mb": [kb / 1024 for kb in samples], "output": output}


def _resident_kb(pid: int) -> list[int]:
  """``[VmRSS]`` of a process in kB, or ``[]`` (no ``/proc``, or gone)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      return [int(line.split()[1]) for line in f
              if line.startswith("VmRSS:")]
  except OSError:
    return []


def curate_argv(workdir: str, paths: Sequence[str], out: str,
                batch_size: int) -> list[str]:
  """The curate command of the benchmark: every sequence scored, the top
  half of each file kept (next to ``out``)."""
  return [sys.executable, "-m", "launch.curate", "--workdir", workdir,
          "--data_path", ",".join(paths), "--out", out, "--keep", "0.5",
          "--kept_out", os.path.join(os.path.dirname(out), "kept"),
          "--batch_size", str(batch_size)]


def scoring_rate(output: str) -> float:
  """Sequences per second of curate's last progress line in ``output``."""
  rates = re.findall(r"sequences, (\d+)/s", output)
  if not rates:
    raise RuntimeError(f"no progress line in curate's output: {output[-500:]}")
  return float(rates[-1])


def digests(folder: str) -> dict[str, str]:
  """SHA-256 of every file under ``folder`` but the progress record and the
  logs, by relative path (read in chunks)."""
  result = {}
  for root, _, names in os.walk(folder):
    for name in sorted(names):
      if name.endswith((".progress.json", ".log")):
        continue
      path = os.path.join(root, name)
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda f=f: f.read(1 << 22), b""):
          h.update(block)
      result[os.path.relpath(path, folder)] = h.hexdigest()
  return result


def _checked(result: dict, what: str) -> dict:
  if result["returncode"] != 0:
    raise RuntimeError(f"{what} failed (status {result['returncode']}): "
                       f"{result['output'][-2000:]}")
  return result


def measure(workdir: str, paths: Sequence[str], folder: str,
            batch_size: int) -> dict:
  """One uninterrupted curate of ``paths`` into ``folder``."""
  os.makedirs(folder, exist_ok=True)
  out = os.path.join(folder, "scores.jsonl")
  result = _checked(run_measured(curate_argv(workdir, paths, out,
                                             batch_size),
                                 os.path.join(folder, "curate.log")),
                    "launch.curate")
  with open(out + ".progress.json") as f:
    sequences = sum(json.load(f)["counts"])
  rss = result["rss_mb"]
  return {"bytes": sum(os.path.getsize(p) for p in paths),
          "files": len(paths), "sequences": sequences,
          "peak_rss_mb": round(result["peak_rss_mb"], 1),
          "median_rss_mb": round(float(np.median(rss)), 1) if rss else None,
          "rss_mb_samples": [round(x, 1) for x in rss],
          "wall_seconds": round(result["seconds"], 1),
          "sequences_per_second": scoring_rate(result["output"]),
          "outputs": digests(folder)}


def interrupt(workdir: str, paths: Sequence[str], folder: str,
              batch_size: int) -> dict:
  """A curate of ``paths`` into ``folder`` killed (SIGKILL) once its
  progress record passes half the sequences, then rerun to the end."""
  os.makedirs(folder, exist_ok=True)
  out = os.path.join(folder, "scores.jsonl")
  argv = curate_argv(workdir, paths, out, batch_size)
  with open(os.path.join(folder, "killed.log"), "w") as log:
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            cwd=_cli.REPO_ROOT)
    record = None
    while proc.poll() is None:
      try:
        with open(out + ".progress.json") as f:
          record = json.load(f)
      except (OSError, ValueError):
        record = None
      if record and 2 * record["sequences"] >= sum(record["counts"]):
        # Between two records: the outputs hold batches past this one.
        time.sleep(RECORD_SECONDS / 2)
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.1)
    proc.wait()
  if proc.returncode != -signal.SIGKILL or record is None:
    raise RuntimeError(f"curate ended (status {proc.returncode}) before it "
                       "could be killed halfway; use a larger "
                       "--small_gigabytes.")
  with open(out + ".progress.json") as f:
    recorded = json.load(f)["sequences"]
  with open(out, "rb") as f:
    flushed = sum(block.count(b"\n") for block in iter(
        lambda: f.read(1 << 22), b""))
  resumed = _checked(run_measured(argv, os.path.join(folder, "resumed.log")),
                     "the resumed launch.curate")
  match = re.search(r"resumed at sequence (\d+) of (\d+): scored (\d+) ",
                    resumed["output"])
  if match is None:
    raise RuntimeError(f"the rerun did not resume: {resumed['output'][-2000:]}")
  start, total, scored = (int(g) for g in match.groups())
  return {"sequences": total, "recorded_at_kill": recorded,
          "flushed_at_kill": flushed, "rescored": flushed - recorded,
          "resumed_at": start, "resumed_scored": scored,
          "scored_only_the_remainder": start == recorded
                                       and scored == total - recorded,
          "resumed_peak_rss_mb": round(resumed["peak_rss_mb"], 1),
          "outputs": digests(folder)}


def train_rater(workdir: str) -> None:
  """A tiny lm_data_rater run (module docstring) in ``workdir``."""
  _checked(run_measured([
      sys.executable, "-m", "launch.train", "--task=lm_data_rater",
      f"--workdir={workdir}", "--meta_steps=3", "--config.task.batch_size=4",
      "--config.online.lifetime=8", "--config.num_eval_tasks=2"],
      workdir + ".log"), "launch.train")


def run(args: flags.FlagValues, scratch: str) -> dict:
  """The measurements (module docstring), with ``scratch`` for the data."""
  from launch.benchmark import platform_info
  workdir = args.workdir
  if workdir is None:
    workdir = os.path.join(scratch, "rater")
    print(f"training a tiny rater in {workdir}", flush=True)
    train_rater(workdir)
  sizes = sorted({args.small_gigabytes, args.gigabytes})
  result = {"workdir": args.workdir or "a tiny rater trained here",
            "batch_size": args.batch_size,
            "sizes": [], **platform_info()}
  for gigabytes in sizes:
    corpus = os.path.join(scratch, f"corpus_{gigabytes:g}GB")
    began = time.monotonic()
    paths = write_corpus(corpus, int(gigabytes * 1e9), args.files)
    print(f"{gigabytes:g} GB corpus written in "
          f"{time.monotonic() - began:.0f} s; curating", flush=True)
    row = {"gigabytes": gigabytes, **measure(
        workdir, paths, os.path.join(scratch, f"curated_{gigabytes:g}GB"),
        args.batch_size)}
    print(f"  {row['sequences']} sequences: peak RSS {row['peak_rss_mb']} MB"
          f" (median {row['median_rss_mb']} MB),"
          f" {row['sequences_per_second']:.0f} sequences/s scoring, "
          f"{row['wall_seconds']} s in all", flush=True)
    if gigabytes == args.small_gigabytes:
      print(f"killing a curate of the {gigabytes:g} GB corpus halfway and "
            "resuming it", flush=True)
      killed = interrupt(workdir, paths,
                         os.path.join(scratch, f"resumed_{gigabytes:g}GB"),
                         args.batch_size)
      killed["identical_outputs"] = killed.pop("outputs") == row["outputs"]
      result["interruption"] = {"gigabytes": gigabytes, **killed}
      print(f"  killed at {killed['recorded_at_kill']} recorded "
            f"({killed['flushed_at_kill']} flushed) of "
            f"{killed['sequences']}; the rerun scored "
            f"{killed['resumed_scored']}; identical outputs: "
            f"{killed['identical_outputs']}", flush=True)
    del row["outputs"]
    result["sizes"].append(row)
    shutil.rmtree(corpus)
  result.update(memory_summary(result["sizes"]))
  return result


def memory_summary(rows: Sequence[dict]) -> dict:
  """The largest corpus's memory against the smallest's: the ratios of
  their peaks and medians, and the largest's sampled peak over the first
  as many samples as the smallest run took (the same length of run: the
  peak of a longer run is the highest of more samples)."""
  small, large = rows[0], rows[-1]
  summary = {"peak_rss_ratio_largest_to_smallest": round(
      large["peak_rss_mb"] / small["peak_rss_mb"], 3)}
  if small["rss_mb_samples"] and large["rss_mb_samples"]:
    summary["median_rss_ratio_largest_to_smallest"] = round(
        large["median_rss_mb"] / small["median_rss_mb"], 3)
    first = large["rss_mb_samples"][:len(small["rss_mb_samples"])]
    summary["sampled_peak_mb_over_the_smallest_runs_length"] = {
        "smallest": max(small["rss_mb_samples"]), "largest": max(first)}
  return summary


def plot(rows: Sequence[dict], plt):
  """Resident memory against time, one line per corpus size."""
  fig, ax = plt.subplots(figsize=(7, 3.5))
  for row in rows:
    rss = row["rss_mb_samples"]
    ax.plot(np.arange(len(rss)) * SAMPLE_SECONDS, rss, lw=0.8,
            label=f"{row['gigabytes']:g} GB ({row['sequences']:,} sequences;"
                  f" peak {row['peak_rss_mb']:.0f} MB)")
  ax.set_xlabel("seconds since launch.curate started")
  ax.set_ylabel("resident memory (MB)")
  ax.set_ylim(bottom=0)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title("launch.curate --keep 0.5, sampled every "
               f"{SAMPLE_SECONDS:g} s", fontsize=9)
  return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The exit status of the command (`launch._cli.call_main`)."""
  return _cli.call_main(_main, argv)


def _main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  scratch = tempfile.mkdtemp(prefix="curate_scale_", dir=args.tmp_dir)
  try:
    result = run(args, scratch)
  except RuntimeError as e:
    raise _cli.CommandError(_cli.one_line(str(e))) from None
  finally:
    if args.keep_data:
      print(f"kept {scratch}")
    else:
      shutil.rmtree(scratch, ignore_errors=True)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "curate_scale.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
  if result["sizes"][0]["rss_mb_samples"]:
    from launch.benchmark import save_plot
    save_plot(result["sizes"], plot,
              os.path.join(args.out, "curate_scale.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
