"""Data curation with a trained data rater: score every sequence of a corpus
and keep the best.

    python -m launch.curate --workdir W --data_path F1,F2 --out scores.jsonl \\
        [--keep 0.9 --kept_out DIR] [--batch_size 256] [--step S]

The rater is eta of the checkpoint of run ``W`` (a ``launch.train`` run of
``lm_data_rater``, or of any task with a ``score_sequences(rater_params,
tokens)`` method; ``--step`` picks the checkpoint, default the latest).
Each file is cut as the task cuts its text: consecutive, non-overlapping
sequences of ``seq_len + 1`` bytes from the file's start (a remainder
shorter than one sequence is neither scored nor kept). The sequences are
scored in jitted batches of ``--batch_size`` (the last one padded), with a
progress bar on stderr, and ``--out`` gets one JSON line per sequence, in
file order::

    {"path": "F1", "index": i, "offset": byte offset, "score": s}

Higher scores are sequences the rater up-weights. With ``--keep q`` (0 < q
<= 1), for each input file the top ``round(q n)`` of its n sequences by
score (at least one; ties keep the earlier), in their original order, are
written to ``DIR/<file name>`` (``--kept_out``): the filtered corpus, to
train on with ``--config.task.data_path``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

import numpy as np
from absl import flags

from launch import _cli


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
  flags.DEFINE_string("out", None, "The scores (JSON lines).", flag_values=fv)
  flags.DEFINE_float("keep", None, "Fraction of each file's sequences to keep, "
                     "in (0, 1] (with --kept_out).", flag_values=fv)
  flags.DEFINE_string("kept_out", None, "Directory of the kept text (with "
                      "--keep).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 256, "Sequences per jitted batch.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).",
                       lower_bound=0, flag_values=fv)
  _cli.parse_flags(fv, ["launch.curate", *argv], __doc__, passthrough=False,
                   required=("workdir", "data_path", "out"))
  return fv


def check_args(args: flags.FlagValues) -> list[str]:
  """The files to score; ValueError/FileNotFoundError on bad arguments."""
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
  _cli.check_output_folder(os.path.dirname(args.out) or ".", "out")
  return paths


def sequences(path: str, length: int) -> np.ndarray:
  """``uint8 [n, length]``: the file's consecutive sequences (a view of a
  memory map)."""
  tokens = np.memmap(path, dtype=np.uint8, mode="r")
  n = tokens.shape[0] // length
  if n == 0:
    raise ValueError(f"text file {path!r} has {tokens.shape[0]} bytes, "
                     f"fewer than one sequence of seq_len + 1 = {length}.")
  return np.asarray(tokens[:n * length]).reshape(n, length)


def top_fraction(scores: np.ndarray, keep: float) -> np.ndarray:
  """Indices, in increasing order, of the ``round(keep n)`` (>= 1) highest
  ``scores`` (ties: the earlier)."""
  k = max(1, int(round(keep * scores.shape[0])))
  order = np.argsort(-scores, kind="stable")
  return np.sort(order[:k])


class _Progress:
  """A one-line progress bar on stderr."""

  def __init__(self, total: int):
    self.total, self.done = total, 0

  def __call__(self, n: int) -> None:
    self.done += n
    width = 30
    filled = int(width * self.done / max(self.total, 1))
    sys.stderr.write(f"\rscoring [{'#' * filled}{'.' * (width - filled)}] "
                     f"{self.done}/{self.total} sequences")
    if self.done >= self.total:
      sys.stderr.write("\n")
    sys.stderr.flush()


def score_files(trainer, eta, paths: Sequence[str], batch_size: int
                ) -> list[np.ndarray]:
  """Each file's sequence scores ``float [n]`` under the rater ``eta``."""
  import jax
  import jax.numpy as jnp
  task = trainer.task
  if not hasattr(task, "score_sequences"):
    raise ValueError(f"task {task.name!r} has no data rater "
                     "(score_sequences); curate needs an lm_data_rater run.")
  params = eta.loss_weights
  score = jax.jit(lambda params, tokens: task.score_sequences(
      params, jnp.asarray(tokens)))
  length = task.seq_len + 1
  files = [sequences(path, length) for path in paths]
  progress = _Progress(sum(f.shape[0] for f in files))
  result = []
  for seqs in files:
    out = []
    for start in range(0, seqs.shape[0], batch_size):
      chunk = seqs[start:start + batch_size]
      padded = np.zeros((batch_size, length), np.uint8)
      padded[:chunk.shape[0]] = chunk
      out.append(np.asarray(score(params, padded))[:chunk.shape[0]])
      progress(chunk.shape[0])
    result.append(np.concatenate(out).astype(np.float64))
  return result


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The exit status of the command (`launch._cli.call_main`)."""
  return _cli.call_main(_main, argv)


def _main(argv: Sequence[str]) -> int:
  from launch import evaluate
  args = parse_args(argv)
  try:
    paths = check_args(args)
    trainer, step, eta = evaluate.rebuild(args.workdir, args.step)
    scores = score_files(trainer, eta, paths, args.batch_size)
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise _cli.UsageError(_cli.one_line(e)) from None
  length = trainer.task.seq_len + 1
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    for path, file_scores in zip(paths, scores):
      for i, s in enumerate(file_scores):
        f.write(json.dumps({"path": path, "index": i, "offset": i * length,
                            "score": float(s)}) + "\n")
  total = sum(s.shape[0] for s in scores)
  print(f"scored {total} sequences of {len(paths)} file(s) with the rater "
        f"of meta-step {step}: wrote {args.out}")
  if args.keep is not None:
    os.makedirs(args.kept_out, exist_ok=True)
    for path, file_scores in zip(paths, scores):
      kept = top_fraction(file_scores, args.keep)
      seqs = sequences(path, length)
      target = os.path.join(args.kept_out, os.path.basename(path))
      with open(target, "wb") as f:
        f.write(seqs[kept].tobytes())
      print(f"kept {kept.shape[0]} of {seqs.shape[0]} sequences "
            f"({100 * kept.shape[0] / seqs.shape[0]:.1f}%) of {path}: "
            f"wrote {target}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
