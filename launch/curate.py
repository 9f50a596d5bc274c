"""Data curation with a trained data rater: score every sequence of a corpus
and keep the best, in streaming fashion, resumable, on one or many hosts.

    python -m launch.curate --workdir W --data_path F1,F2 --out scores.jsonl \\
        [--keep 0.9 --kept_out DIR] [--batch_size 256] [--step S] \\
        [--num_processes N --process_id p] [--restart] [--stop_after K]

The rater is eta of the checkpoint of run ``W`` (a ``launch.train`` run of
``lm_data_rater``, or of any task with a ``score_sequences(rater_params,
tokens)`` method; ``--step`` picks the checkpoint, default the latest).
Each file is cut as the task cuts its text: consecutive, non-overlapping
sequences of ``seq_len + 1`` bytes from the file's start (a remainder
shorter than one sequence is neither scored nor kept). The sequences of all
files, one after the other, are read lazily in batches of ``--batch_size``
(a ``grain.MapDataset`` of batches, read ahead by a thread; the last batch
padded) and scored by the jitted rater, with a progress bar on stderr. The
results are written as they come, flushed per batch: ``--out`` gets one JSON
line per sequence, in file order::

    {"path": "F1", "index": i, "offset": byte offset, "score": s}

and ``--out.npy`` the same scores as one array ``[sequences]`` (the rater's
float dtype). Memory does not grow with the corpus: the files and the score
array are read and written in chunks, never held whole, and glibc's malloc is
held to 2 arenas (`limit_malloc_arenas`).

Higher scores are sequences the rater up-weights. With ``--keep q`` (0 < q
<= 1), for each input file the top ``round(q n)`` of its n sequences by
score (at least one; ties keep the earlier), in their original order, are
written to ``DIR/<file name>`` (``--kept_out``): the filtered corpus, to
train on with ``--config.task.data_path``. The threshold is found exactly
in a few passes over ``--out.npy`` (`kept_chunks`), then the kept sequences
are copied file by file.

Resuming: ``--out.progress.json`` records the command and how far the
outputs are complete; it is replaced (write, fsync, rename) at most every
second, after ``--out`` and ``--out.npy`` are fsynced. SIGTERM or SIGINT
(Ctrl-C) stops after the batch in flight with the record written and exit
status 0, as does ``--stop_after K`` after K batches; after any stop, SIGKILL
included, the same command continues from the record (the outputs cut back
to it) without rescoring what it covers (after a SIGKILL, at most the
last second's batches are scored again), and the finished outputs are byte
for byte those of an uninterrupted run. A record of another command (other
files or file sizes, run, meta-step, batch size or shard) is refused;
``--restart`` ignores it and scores from the start. Rerun once finished,
the command scores nothing: it says so and only redoes ``--keep`` (which
may change between runs).

Many hosts: with ``--num_processes N --process_id p`` (0 <= p < N), the
processes are independent (no jax.distributed, no collectives) and each
scores whole files: the files are dealt out by size, largest first, each to
the process with the fewest bytes so far (ties: the lower id;
`shard_files`), and a process scores its own in ``--data_path`` order. Its
outputs carry the shard in their name, ``scores.jsonl`` ->
``scores-00001-of-00004.jsonl`` (`shard_path`; with its own ``.npy`` and
``.progress.json``), and its kept files go to ``DIR/<file name>`` as
without shards. All processes must be given the same ``--data_path``. One
machine: ``python -m launch.cluster.local --num_processes N --module
launch.curate -- --workdir W --data_path ... --out scores.jsonl`` (the
``--coordinator_address`` it adds is accepted and ignored); Slurm: ``srun sh
-c 'python -m launch.curate ... --num_processes $SLURM_NTASKS --process_id
$SLURM_PROCID'``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from absl import flags

from launch import _cli

#: Seconds between two progress records (and progress-bar updates).
RECORD_SECONDS = 1.0
#: Seconds between two progress lines when stderr is not a terminal.
LOG_SECONDS = 10.0
#: Scores (and sequences) per chunk of the kept pass.
CHUNK = 1 << 16


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """The flags of a command line (``argv`` without the program name).

  Raises:
    UsageError: bad input.
  """
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The rater's run (a launch.train "
                      "--workdir).", flag_values=fv)
  flags.DEFINE_string("data_path", None, "Comma-separated text files to "
                      "score.", flag_values=fv)
  flags.DEFINE_string("out", None, "The scores (JSON lines); also OUT.npy "
                      "and OUT.progress.json.", flag_values=fv)
  flags.DEFINE_float("keep", None, "Fraction of each file's sequences to keep, "
                     "in (0, 1] (with --kept_out).", flag_values=fv)
  flags.DEFINE_string("kept_out", None, "Directory of the kept text (with "
                      "--keep).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 256, "Sequences per jitted batch.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "N: processes that share the "
                       "files (with --process_id); this one writes OUT's "
                       "shard p of N.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "p: this process, 0 .. N - 1 "
                       "(with --num_processes).", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "Ignored (launch.cluster."
                      "local passes it; the processes never talk).",
                      flag_values=fv)
  flags.DEFINE_boolean("restart", False, "Score from the start, ignoring "
                       "OUT.progress.json.", flag_values=fv)
  flags.DEFINE_integer("stop_after", 0, "Stop after this many batches of this "
                       "run, resumable, as SIGTERM does (0: score all).",
                       lower_bound=0, flag_values=fv)
  _cli.parse_flags(fv, ["launch.curate", *argv], __doc__ or "",
                   passthrough=False, required=("workdir", "data_path", "out"))
  return fv


def check_args(args: flags.FlagValues) -> list[str]:
  """The files to score (all processes'); ValueError/FileNotFoundError on bad
  arguments."""
  paths = [p.strip() for p in args.data_path.split(",") if p.strip()]
  if not paths:
    raise ValueError("--data_path names no file.")
  names = [os.path.basename(p) for p in paths]
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"text file {path!r} does not exist (or is "
                              "not a file).")
  if (args.keep is None) != (args.kept_out is None):
    raise ValueError("--keep and --kept_out go together.")
  if args.keep is not None:
    if not (0 < args.keep <= 1):
      raise ValueError(f"--keep must be in (0, 1], got {args.keep}.")
    if len(set(names)) != len(names):
      raise ValueError("--kept_out would get two files of one name: "
                       f"{sorted(names)}; give files of distinct names.")
    _cli.check_output_folder(args.kept_out, "kept_out")
  if (args.num_processes is None) != (args.process_id is None):
    raise ValueError("--num_processes and --process_id go together.")
  if args.num_processes is not None:
    n, p = args.num_processes, args.process_id
    if n < 1:
      raise ValueError(f"--num_processes must be at least 1, got {n}.")
    if not 0 <= p < n:
      raise ValueError(f"--process_id must be in 0 .. {n - 1} for "
                       f"--num_processes={n}, got {p}.")
    if n > len(paths):
      raise ValueError(f"--num_processes={n} but --data_path names "
                       f"{len(paths)} file(s): each process scores whole "
                       "files.")
  _cli.check_output_folder(os.path.dirname(args.out) or ".", "out")
  return paths


def shard_files(sizes: Sequence[int], num_processes: int) -> list[list[int]]:
  """Each process's files (indices into ``sizes``, increasing): dealt out by
  size, largest first (ties: the earlier), each to the process with the
  fewest bytes so far (ties: the lower id)."""
  loads, shards = [0] * num_processes, [[] for _ in range(num_processes)]
  for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
    p = loads.index(min(loads))
    loads[p] += sizes[i]
    shards[p].append(i)
  return [sorted(s) for s in shards]


def shard_path(path: str, process_id: int, num_processes: int) -> str:
  """Process ``process_id``'s output for ``path``: ``scores.jsonl`` ->
  ``scores-00001-of-00004.jsonl`` (no extension: the suffix at the end)."""
  root, ext = os.path.splitext(path)
  return f"{root}-{process_id:05d}-of-{num_processes:05d}{ext}"


def sequence_counts(paths: Sequence[str], length: int) -> list[int]:
  """Sequences of ``length`` bytes of each file; ValueError for a file
  shorter than one."""
  counts = []
  for path in paths:
    size = os.path.getsize(path)
    if size < length:
      raise ValueError(f"text file {path!r} has {size} bytes, fewer than "
                       f"one sequence of seq_len + 1 = {length}.")
    counts.append(size // length)
  return counts


def read_sequences(path: str, length: int, start: int, stop: int
                   ) -> np.ndarray:
  """``uint8 [stop - start, length]``: sequences ``start .. stop - 1`` of a
  file (read, not mapped: nothing stays resident)."""
  data = np.fromfile(path, np.uint8, count=(stop - start) * length,
                     offset=start * length)
  return data.reshape(stop - start, length)


def sequences(path: str, length: int) -> np.ndarray:
  """``uint8 [n, length]``: the file's consecutive sequences (a view of a
  memory map; for a file that fits in memory)."""
  n = sequence_counts([path], length)[0]
  tokens = np.memmap(path, dtype=np.uint8, mode="r")
  return np.asarray(tokens[:n * length]).reshape(n, length)


@dataclasses.dataclass(frozen=True)
class ReadBatch:
  """Grain map: batch ``b`` -> rows ``b B .. (b + 1) B - 1`` of the files'
  sequences one after the other: ``tokens`` uint8 ``[B, length]``,
  ``file`` int ``[B]`` (the file's position in ``paths``; -1 for the padding
  after the last sequence), ``index`` int ``[B]`` (the sequence in its
  file). Picklable."""
  paths: tuple[str, ...]
  counts: tuple[int, ...]
  length: int
  batch_size: int

  def __len__(self) -> int:
    return -(-sum(self.counts) // self.batch_size)

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    ends = np.cumsum(self.counts)
    first, stop = int(b) * self.batch_size, min(
        (int(b) + 1) * self.batch_size, int(ends[-1]))
    tokens = np.zeros((self.batch_size, self.length), np.uint8)
    file = np.full(self.batch_size, -1, np.int64)
    index = np.zeros(self.batch_size, np.int64)
    row = first
    while row < stop:
      f = int(np.searchsorted(ends, row, side="right"))
      begin = int(ends[f]) - self.counts[f]
      end = min(stop, int(ends[f]))
      rows = slice(row - first, end - first)
      tokens[rows] = read_sequences(self.paths[f], self.length, row - begin,
                                    end - begin)
      file[rows], index[rows] = f, np.arange(row - begin, end - begin)
      row = end
    return {"tokens": tokens, "file": file, "index": index}


def batches(read: ReadBatch):
  """The batches of ``read`` as a ``grain.IterDataset``, read ahead by a
  thread; its iterator's state is the index of the next batch."""
  import grain
  return grain.MapDataset.range(len(read)).map(read).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


def order_keys(scores: np.ndarray) -> np.ndarray:
  """Unsigned integer keys (as wide as the float ``scores``) in the order of
  the scores: equal scores get equal keys (-0 = +0), NaN the lowest."""
  scores = np.asarray(scores)
  bits = scores.dtype.itemsize * 8
  utype = np.dtype(f"uint{bits}")
  raw = (scores + scores.dtype.type(0)).view(utype)  # -0.0 + 0.0 = +0.0
  top = utype.type(1 << (bits - 1))
  keys = np.where(raw & top, ~raw, raw | top)
  keys[np.isnan(scores)] = 0
  return keys


def kept_chunks(read: Callable[[int, int], np.ndarray], n: int, keep: float,
                chunk: int = CHUNK) -> Iterator[np.ndarray]:
  """The top ``round(keep n)`` (at least 1) of ``n`` scores (ties: the
  earlier; NaN lowest), found exactly without holding them: the k-th largest
  by a radix select over 16-bit digits of `order_keys` (two passes over
  float32 scores, four over float64), then one pass to pick.

  Args:
    read: ``(start, stop) ->`` scores ``[stop - start]`` (float32/float64).
    n: number of scores.
    keep: fraction in (0, 1].
    chunk: scores per read.

  Yields:
    For each chunk ``start = 0, chunk, ...``: the kept indices in it
    (increasing, relative to ``start``).
  """
  if n == 0:
    return
  k = max(1, int(round(keep * n)))
  bits = read(0, 1).dtype.itemsize * 8
  prefix = 0
  for shift in range(bits - 16, -1, -16):
    counts = np.zeros(1 << 16, np.int64)
    for start in range(0, n, chunk):
      keys = order_keys(read(start, min(n, start + chunk)))
      if shift + 16 < bits:
        keys = keys[(keys >> (shift + 16)) == prefix]
      counts += np.bincount(((keys >> shift) & 0xFFFF).astype(np.int64),
                            minlength=1 << 16)
    above = np.cumsum(counts[::-1])[::-1]  # above[v]: digits >= v
    digit = int(np.nonzero(above >= k)[0][-1])
    k -= int(above[digit] - counts[digit])
    prefix = (prefix << 16) | digit
  # prefix: the k-th largest key; the first k of its ties are kept.
  ties = 0
  for start in range(0, n, chunk):
    keys = order_keys(read(start, min(n, start + chunk)))
    equal = keys == prefix
    tie_rank = ties + np.cumsum(equal)
    ties = int(tie_rank[-1])
    yield np.nonzero((keys > prefix) | (equal & (tie_rank <= k)))[0]


def top_fraction(scores: np.ndarray, keep: float) -> np.ndarray:
  """Indices, in increasing order, of the ``round(keep n)`` (>= 1) highest
  ``scores`` (ties: the earlier; `kept_chunks` on an array)."""
  return np.concatenate(list(kept_chunks(
      lambda a, b: scores[a:b], scores.shape[0], keep)))


def rater(trainer, eta) -> Callable[[np.ndarray], np.ndarray]:
  """The jitted scores ``[B]`` of tokens uint8 ``[B, L+1]`` under the rater
  ``eta`` of ``trainer``'s task; ValueError for a task without one."""
  import jax
  import jax.numpy as jnp
  task = trainer.task
  if not hasattr(task, "score_sequences"):
    raise ValueError(f"task {task.name!r} has no data rater "
                     "(score_sequences); curate needs an lm_data_rater run.")
  params = eta.loss_weights
  jitted = jax.jit(lambda params, tokens: task.score_sequences(
      params, jnp.asarray(tokens)))
  return lambda tokens: jitted(params, tokens)


def score_files(trainer, eta, paths: Sequence[str], batch_size: int
                ) -> list[np.ndarray]:
  """Each file's sequence scores ``float64 [n]`` under the rater ``eta``, in
  memory (for pools that fit in it; the command streams to disk)."""
  score = rater(trainer, eta)
  length = trainer.task.seq_len + 1
  read = ReadBatch(tuple(paths), tuple(sequence_counts(paths, length)),
                   length, batch_size)
  scores = [np.zeros(n) for n in read.counts]
  progress = Progress(0, sum(read.counts))
  for item in batches(read):
    n = int((item["file"] >= 0).sum())
    values = np.asarray(score(item["tokens"]))[:n]
    for f in np.unique(item["file"][:n]):
      mine = item["file"][:n] == f
      scores[f][item["index"][:n][mine]] = values[mine]
    progress(n)
  progress.close()
  return scores


class Progress:
  """A progress bar on stderr: sequences done of the total and this run's
  rate; on a terminal one line redrawn every `RECORD_SECONDS`, elsewhere (a
  log, a launcher's pipe) a line every `LOG_SECONDS`."""

  def __init__(self, done: int, total: int):
    self.total, self.done, self.start = total, done, done
    self.began = self.drawn = time.monotonic()
    self.tty = sys.stderr.isatty()

  def __call__(self, n: int, force: bool = False) -> None:
    self.done += n
    now = time.monotonic()
    if not force and now - self.drawn < (RECORD_SECONDS if self.tty
                                         else LOG_SECONDS):
      return
    self.drawn = now
    width = 30
    filled = int(width * self.done / max(self.total, 1))
    rate = (self.done - self.start) / max(now - self.began, 1e-9)
    line = (f"scoring [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done}/{self.total} sequences, {rate:.0f}/s")
    sys.stderr.write("\r" + line if self.tty else line + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    self(0, force=True)
    if self.tty:
      sys.stderr.write("\n")
    sys.stderr.flush()


@dataclasses.dataclass
class Outputs:
  """A shard's outputs: ``out`` (JSON lines), ``out.npy`` (the scores) and
  ``out.progress.json`` (the command and how far the two are complete)."""
  out: str

  @property
  def scores(self) -> str:
    return self.out + ".npy"

  @property
  def record(self) -> str:
    return self.out + ".progress.json"

  def read_record(self) -> Optional[dict]:
    try:
      with open(self.record) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read the progress record {self.record}: "
                       f"{e}; --restart scores from the start.") from None

  def write_record(self, record: dict, *files) -> None:
    """Fsyncs ``files`` (open outputs), then replaces the record atomically."""
    for f in files:
      f.flush()
      os.fsync(f.fileno())
    temporary = self.record + ".tmp"
    with open(temporary, "w") as f:
      json.dump(record, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, self.record)

  def scores_layout(self) -> tuple[int, np.dtype, int]:
    """``(n, dtype, offset)`` of ``out.npy``: its length, dtype and the byte
    offset of its data."""
    try:
      array = np.load(self.scores, mmap_mode="r")
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read {self.scores}: {e}; --restart scores "
                       "from the start.") from None
    return array.shape[0], array.dtype, array.offset

  def read_scores(self, start: int, stop: int) -> np.ndarray:
    """Scores ``start .. stop - 1`` of ``out.npy`` (read, not mapped)."""
    _, dtype, offset = self.scores_layout()
    return np.fromfile(self.scores, dtype, count=stop - start,
                       offset=offset + start * dtype.itemsize)


def refusal(record: dict, command: dict, outputs: Outputs) -> Optional[str]:
  """Why ``record`` (a progress record) is not of ``command``, or None."""
  saved = record.get("command", {})
  differ = [k for k in sorted(set(saved) | set(command))
            if saved.get(k) != command.get(k)]
  if not differ:
    return None
  what = ["other files or file sizes" if k == "files" else
          f"{k} {saved.get(k)} there, {command.get(k)} here" for k in differ]
  return (f"{outputs.record} records another command ({'; '.join(what)}); "
          "give another --out, or --restart to score from the start.")


def _number(x: float) -> str:
  return repr(x) if math.isfinite(x) else json.dumps(x)


def _json_lines(item: dict, scores: np.ndarray, paths: Sequence[str],
                length: int) -> str:
  """The JSON lines of a batch's real rows."""
  quoted = [json.dumps(p) for p in paths]
  return "".join(
      f'{{"path": {quoted[f]}, "index": {i}, "offset": {i * length}, '
      f'"score": {_number(s)}}}\n'
      for f, i, s in zip(item["file"].tolist(), item["index"].tolist(),
                         scores.tolist()))


class _Stop:
  """SIGTERM/SIGINT while scoring: remembered, answered after the batch."""

  def __init__(self):
    self.signal: Optional[str] = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._on_signal)
    return self

  def _on_signal(self, signum, frame):  # noqa: ARG002
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def score_shard(score: Callable[[np.ndarray], np.ndarray], dtype,
                read: ReadBatch, outputs: Outputs, command: dict,
                record: Optional[dict], stop_after: int = 0) -> dict:
  """Scores ``read``'s batches from ``record``'s position (None: from the
  start) to the end or a stop, writing ``outputs`` as they come.

  Args:
    score: tokens uint8 ``[B, length]`` -> scores ``[B]``.
    dtype: the scores' dtype (of ``out.npy``).
    read: the shard's batches.
    outputs: where they go.
    command: the fingerprint of the command, kept in the record.
    record: the progress record to continue from, or None.
    stop_after: stop after this many batches (0: never).

  Returns:
    The final record, with ``scored`` (sequences scored by this call) and
    ``stopped`` (the signal, ``--stop_after`` or None).
  """
  total = sum(read.counts)
  if record is None:
    if os.path.exists(outputs.record):  # --restart: no stale record left
      os.remove(outputs.record)
    np.lib.format.open_memmap(outputs.scores, mode="w+", dtype=dtype,
                              shape=(total,)).flush()
    open(outputs.out, "wb").close()
    record = {"command": command, "data": None, "sequences": 0,
              "out_bytes": 0, "length": read.length,
              "counts": list(read.counts), "finished": False}
  elif (not os.path.exists(outputs.out)
        or os.path.getsize(outputs.out) < record["out_bytes"]):
    raise ValueError(f"{outputs.out} is missing or shorter than "
                     f"{outputs.record} says; --restart scores from the "
                     "start.")
  n, saved, offset = outputs.scores_layout()
  if (n, saved) != (total, np.dtype(dtype)):
    raise ValueError(f"{outputs.scores} holds {n} {saved} scores, not "
                     f"{total} {np.dtype(dtype)}; --restart scores from the "
                     "start.")
  done = record["sequences"]
  iterator = iter(batches(read))
  if record["data"] is not None:
    iterator.set_state(record["data"])
  progress, scored, stopped, count = Progress(done, total), 0, None, 0
  with open(outputs.out, "r+b") as out, open(outputs.scores, "r+b") as npy, \
      _Stop() as stop:
    out.truncate(record["out_bytes"])
    out.seek(record["out_bytes"])
    npy.seek(offset + done * np.dtype(dtype).itemsize)
    last = time.monotonic()
    for item in iterator:
      n = int((item["file"] >= 0).sum())
      scores = np.asarray(score(item["tokens"]))[:n].astype(dtype)
      out.write(_json_lines(item, scores, read.paths, read.length).encode())
      npy.write(scores.tobytes())
      out.flush()
      npy.flush()
      done, scored, count = done + n, scored + n, count + 1
      progress(n)
      stopped = stop.signal or ("--stop_after" if count == stop_after
                                else None)
      finished = done == total
      if stopped or finished or time.monotonic() - last >= RECORD_SECONDS:
        record.update(data=iterator.get_state(), sequences=done,
                      out_bytes=out.tell(), finished=finished)
        outputs.write_record(record, out, npy)
        last = time.monotonic()
      if stopped:
        break
    progress.close()
  return {**record, "scored": scored, "stopped": stopped}


def write_kept(outputs: Outputs, record: dict, paths: Sequence[str],
               keep: float, folder: str) -> Iterator[tuple[int, int, str]]:
  """Writes the kept sequences of each file of a finished shard to
  ``folder/<file name>`` (`kept_chunks` per file), and yields ``(kept, of,
  written file)`` per file."""
  os.makedirs(folder, exist_ok=True)
  read, length, first = outputs.read_scores, record["length"], 0
  for path, n in zip(paths, record["counts"]):
    target = os.path.join(folder, os.path.basename(path))
    kept = 0
    with open(target + ".tmp", "wb") as f:
      chunks = kept_chunks(lambda a, b, first=first: read(first + a, first + b),
                           n, keep)
      for start, indices in zip(range(0, n, CHUNK), chunks):
        if indices.size:
          rows = read_sequences(path, length, start, start + int(indices[-1])
                                + 1)
          f.write(rows[indices].tobytes())
          kept += indices.size
    os.replace(target + ".tmp", target)
    first += n
    yield kept, n, target


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The exit status of the command (`launch._cli.call_main`)."""
  return _cli.call_main(_main, argv)


def _command(args: flags.FlagValues, paths: Sequence[str], step: int) -> dict:
  """The fingerprint of what the outputs depend on."""
  return {"files": [[os.path.abspath(p), os.path.getsize(p)] for p in paths],
          "workdir": os.path.abspath(args.workdir), "step": step,
          "batch_size": args.batch_size,
          "shard": [args.process_id or 0, args.num_processes or 1]}


def limit_malloc_arenas(arenas: int = 2) -> bool:
  """Caps glibc's malloc at ``arenas`` arenas (``mallopt(M_ARENA_MAX)``, as
  the environment variable ``MALLOC_ARENA_MAX`` would); False where the C
  library has no such option (not glibc), which changes nothing.

  By default glibc gives each thread that contends for the heap an arena of
  its own, up to 8 per core, and a block freed into one arena serves only
  that arena's later allocations; scoring allocates on Grain's reading
  thread and XLA's. In one pair of otherwise equal runs (1,500 batches of a
  0.5 GB corpus), 2 arenas held the peak of anonymous resident memory to
  501 MB against 591 MB by default (docs/results.md, "Curation at scale",
  has every run since, and how much the peak moves between runs). Called
  first thing by the command, before jax starts its threads.
  """
  try:
    return bool(ctypes.CDLL(None).mallopt(-8, arenas))  # -8: M_ARENA_MAX
  except (OSError, AttributeError):
    return False


def _main(argv: Sequence[str]) -> int:
  limit_malloc_arenas()
  from metaflow import checkpoint
  args = parse_args(argv)
  try:
    paths = check_args(args)
    out = args.out
    if args.num_processes is not None:
      shards = shard_files([os.path.getsize(p) for p in paths],
                           args.num_processes)
      paths = [paths[i] for i in shards[args.process_id]]
      out = shard_path(out, args.process_id, args.num_processes)
    outputs = Outputs(out)
    step, _ = checkpoint.saved_run(args.workdir, args.step)
    command = _command(args, paths, step)
    record = None if args.restart else outputs.read_record()
    why = refusal(record, command, outputs) if record else None
    if why:
      raise ValueError(why)
    if record is not None and record["finished"]:
      print(f"{out} already holds the scores of all {record['sequences']} "
            f"sequences of {len(paths)} file(s) ({outputs.record}); nothing "
            "to score (--restart scores again).")
    else:
      record = _score(args, paths, outputs, command, record)
      if record["stopped"]:
        return 0
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise _cli.UsageError(_cli.one_line(str(e))) from None
  if args.keep is not None:
    kept = write_kept(outputs, record, paths, args.keep, args.kept_out)
    for path, (k, n, target) in zip(paths, kept):
      print(f"kept {k} of {n} sequences ({100 * k / n:.1f}%) of {path}: "
            f"wrote {target}")
  return 0


def _score(args, paths: Sequence[str], outputs: Outputs, command: dict,
           record: Optional[dict]) -> dict:
  """Rebuilds the rater and scores the shard from ``record``; prints what was
  done."""
  import jax

  from launch import evaluate
  trainer, step, eta = evaluate.rebuild(args.workdir, command["step"])
  score = rater(trainer, eta)
  length = trainer.task.seq_len + 1
  read = ReadBatch(tuple(paths), tuple(sequence_counts(paths, length)),
                   length, args.batch_size)
  if record is not None and record["length"] != length:
    raise ValueError(f"{outputs.record} records sequences of "
                     f"{record['length']} bytes, the run's are {length}; "
                     "--restart scores from the start.")
  dtype = jax.eval_shape(score, jax.ShapeDtypeStruct(
      (args.batch_size, length), np.uint8)).dtype
  before = 0 if record is None else record["sequences"]
  os.makedirs(os.path.dirname(os.path.abspath(outputs.out)), exist_ok=True)
  result = score_shard(score, dtype, read, outputs, command, record,
                       args.stop_after)
  total = sum(read.counts)
  resumed = (f"resumed at sequence {before} of {total}: " if before else "")
  if result["stopped"]:
    print(f"{resumed}stopped by {result['stopped']} after {result['scored']} "
          f"sequences ({result['sequences']} of {total} done, recorded in "
          f"{outputs.record}); run the same command to resume.")
  else:
    print(f"{resumed}scored {result['scored']} sequences of {len(paths)} "
          f"file(s) with the rater of meta-step {step}: wrote {outputs.out}")
  return result


if __name__ == "__main__":
  sys.exit(main())
