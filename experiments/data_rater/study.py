"""The data-curation experiment: does a meta-learned data rater tell useful
text from noise, and does filtering by it save training compute?

    python -m experiments.data_rater [--out experiments/data_rater] \\
        [--meta_steps 300] [--train_steps 600] [--keep 0.75] [--tiny]

1. **A noisy pool** from the bundled texts (`build_pool`): sequences of
   ``seq_len + 1`` bytes of Shakespeare (bundled as
   ``metaflow/_data/tinyshakespeare.txt``, the on-target kind; its last tenth
   is held out as the target), a quarter of them corrupted, in equal thirds:
   random bytes, the sequence's own bytes shuffled, one of its characters
   repeated; plus off-target text, Python's documentation (the embedded
   corpus), as many sequences as were corrupted. The sequences are shuffled
   into one file; ``pool_labels.json`` names each one's kind (``{"names":
   KINDS, "kinds": [index into names per sequence]}``, read by
   `experiments.data_rater.signal`).
2. **Meta-training** `lm_data_rater` online on the pool, V on the target.
3. **Scores**: the trained rater scores every sequence of the pool; ROC AUC
   of telling clean on-target sequences (positive) from each corrupted kind
   and from the off-target text.
4. **Filtering**: fresh models (same initialisation, same held-out target
   batches) trained with plain next-byte loss for ``--train_steps`` inner
   steps, so on the same number of tokens, on (a) the whole pool, (b) its top
   ``--keep`` fraction by score, (c) a random subset of the same size. Reported:
   their held-out target loss curves, and the fraction of (a)'s tokens that
   (b) needs to reach (a)'s final loss.

Writes ``OUT/data_rater.json`` and ``OUT/data_rater_scores.png``,
``OUT/data_rater_curves.png`` (``experiments/data_rater/`` is committed).
``--tiny`` is the test's size (under a minute of meta-training; random
bytes, repeated characters and off-target text separate, shuffled text does
not).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Optional, Sequence

import numpy as np
from absl import flags

from launch import _cli, benchmark, curate
from metaflow import data

SHAKESPEARE = data.bundled_path("tinyshakespeare.txt")
KINDS = ("clean", "random_bytes", "shuffled", "repeated", "off_target")

#: The experiment's settings at the default and the test size.
SIZES = {
    "default": dict(preset="tiny", seq_len=64, batch_size=16, inner_steps=2,
                    population=4, lifetime=200, meta_steps=300, outer_lr=3e-3,
                    inner_lr=3e-3, train_steps=600, pool_bytes=400_000),
    # A faster-learning inner model (inner_lr) with a longer life, so that
    # the 60 meta-steps see models past the unigram stage.
    "tiny": dict(preset="nano", seq_len=64, batch_size=8, inner_steps=2,
                 population=2, lifetime=300, meta_steps=60, outer_lr=1e-2,
                 inner_lr=1e-2, train_steps=40, pool_bytes=40_000),
}


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """The flags of a command line (``argv`` without the program name).

  Raises:
    UsageError: bad input.
  """
  fv = flags.FlagValues()
  flags.DEFINE_string("out", "experiments/data_rater", "Output folder (the "
                      "pool, the filtered subsets, the JSON and the plots).",
                      flag_values=fv)
  flags.DEFINE_boolean("tiny", False, "The test's size.", flag_values=fv)
  flags.DEFINE_integer("meta_steps", None, "Meta-steps of the rater "
                       "(default: the size's).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("train_steps", None, "Inner steps of the fresh models "
                       "(default: the size's).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_float("keep", 0.75, "Fraction of the pool the rater keeps, in "
                     "(0, 1).", flag_values=fv)
  flags.DEFINE_string("shakespeare", SHAKESPEARE, "The on-target text.",
                      flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the pool, the models and the "
                       "random subset.", lower_bound=0, flag_values=fv)
  _cli.parse_flags(fv, ["experiments.data_rater", *argv], __doc__,
                   passthrough=False, outputs=("out",))
  return fv  # --keep and --shakespeare: checked by `run`.


def _cut(tokens: np.ndarray, length: int) -> np.ndarray:
  n = tokens.shape[0] // length
  return tokens[:n * length].reshape(n, length)


def build_pool(out: str, on_target: bytes, off_target: bytes, length: int,
               pool_bytes: int, seed: int) -> tuple[str, str, np.ndarray]:
  """Writes ``OUT/pool.txt`` and ``OUT/target.txt`` (the held-out last
  tenth of ``on_target``); returns their paths and each pool sequence's kind
  (an index into `KINDS`)."""
  rng = np.random.default_rng(seed)
  on = np.frombuffer(on_target, np.uint8)
  held = on.shape[0] // 10
  target, on = on[-held:], on[:-held]
  clean = _cut(on[:pool_bytes], length)
  n = clean.shape[0]
  corrupt = rng.permutation(n)[:n // 4]
  kinds = np.zeros(n, np.int64)
  sequences = clean.copy()
  for j, i in enumerate(corrupt):
    kind = 1 + j % 3
    kinds[i] = kind
    if kind == 1:
      sequences[i] = rng.integers(0, 256, length, dtype=np.uint8)
    elif kind == 2:
      sequences[i] = rng.permutation(clean[i])
    else:
      sequences[i] = rng.choice(clean[i])
  off = _cut(np.frombuffer(off_target, np.uint8), length)
  off = off[rng.permutation(off.shape[0])[:corrupt.shape[0]]]
  sequences = np.concatenate([sequences, off])
  kinds = np.concatenate([kinds, np.full(off.shape[0], 4)])
  order = rng.permutation(sequences.shape[0])
  os.makedirs(out, exist_ok=True)
  pool_path, target_path = (os.path.join(out, name)
                            for name in ("pool.txt", "target.txt"))
  with open(pool_path, "wb") as f:
    f.write(sequences[order].tobytes())
  with open(target_path, "wb") as f:
    f.write(target.tobytes())
  return pool_path, target_path, kinds[order]


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
  """The probability that a positive scores above a negative (ties 1/2)."""
  from sklearn.metrics import roc_auc_score
  y = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
  return float(roc_auc_score(y, np.concatenate([positive, negative])))


def tokens_to_reach(curve: list, loss: float) -> Optional[int]:
  """The first step of ``curve`` (``[(step, loss), ...]``) at or below
  ``loss``, linearly interpolated between evaluations; None if never."""
  for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
    if l1 <= loss:
      if l0 <= loss:
        return s0
      return int(round(s0 + (s1 - s0) * (l0 - loss) / (l0 - l1)))
  return None


def _task(settings: dict, data_path: str, target_path: str):
  from metaflow.task import create_task
  return create_task(
      "lm_data_rater", data_path=data_path, target_path=target_path,
      preset=settings["preset"], seq_len=settings["seq_len"],
      batch_size=settings["batch_size"], inner_lr=settings["inner_lr"])


def _write_subset(path: str, sequences: np.ndarray, rows: np.ndarray) -> str:
  with open(path, "wb") as f:
    f.write(sequences[rows].tobytes())
  return path


def run(args: flags.FlagValues) -> dict:
  import jax
  import optax

  import tasks  # noqa: F401  (registers lm_data_rater)
  from metaflow import sharding
  from metaflow.online import Online
  from metaflow.trainer import BilevelTrainer
  from tasks.lm import text

  # The pool holds random bytes by construction: not UTF-8, on purpose.
  warnings.filterwarnings("ignore", category=UnicodeWarning)
  settings = dict(SIZES["tiny" if args.tiny else "default"])
  for key in ("meta_steps", "train_steps"):
    if getattr(args, key) is not None:
      settings[key] = getattr(args, key)
  if not os.path.isfile(args.shakespeare):
    raise FileNotFoundError(f"the on-target text {args.shakespeare!r} does "
                            "not exist.")
  if not 0 < args.keep < 1:
    raise ValueError(f"--keep must be in (0, 1), got {args.keep}.")
  length = settings["seq_len"] + 1
  pool, target, kinds = build_pool(
      args.out, open(args.shakespeare, "rb").read(), text.embedded_text(),
      length, settings["pool_bytes"], args.seed)
  with open(os.path.join(args.out, "pool_labels.json"), "w") as f:
    json.dump({"names": list(KINDS), "kinds": kinds.tolist()}, f)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  t = settings["inner_steps"]

  start = time.perf_counter()
  trainer = BilevelTrainer(
      _task(settings, pool, target), num_inner_steps=t, seed=args.seed,
      outer_optimizer=optax.adam(settings["outer_lr"]), num_eval_tasks=8,
      online=Online(settings["population"], settings["lifetime"]), mesh=mesh)
  fit = trainer.fit(settings["meta_steps"], log_every=max(
      1, settings["meta_steps"] // 10), console=not args.tiny)
  meta_seconds = time.perf_counter() - start

  (scores,) = curate.score_files(trainer, fit.state.eta, [pool], 256)
  clean = scores[kinds == 0]
  auc = {kind: roc_auc(clean, scores[kinds == k])
         for k, kind in enumerate(KINDS) if k}
  sequences = curate.sequences(pool, length)
  rng = np.random.default_rng(args.seed + 1)
  rater_rows = curate.top_fraction(scores, args.keep)
  random_rows = np.sort(rng.permutation(len(scores))[:len(rater_rows)])
  subsets = {
      "whole pool": pool,
      "rater filtered": _write_subset(os.path.join(args.out, "rater.txt"),
                                      sequences, rater_rows),
      "random filtered": _write_subset(os.path.join(args.out, "random.txt"),
                                       sequences, random_rows)}
  kept = {kind: float(np.mean(np.isin(np.flatnonzero(kinds == k),
                                      rater_rows)))
          for k, kind in enumerate(KINDS)}

  steps = settings["train_steps"]
  every = max(t, steps // 20 // t * t)
  curves = {}
  for name, path in subsets.items():
    fresh = BilevelTrainer(_task(settings, path, target), num_inner_steps=t,
                           meta_batch_size=1, seed=args.seed, mesh=mesh)
    # The initial rater weights every sequence 1: plain training.
    curves[name] = fresh.inner_curve(fresh.init_state().eta, steps,
                                     eval_every=every)
  final = {name: curve[-1][1] for name, curve in curves.items()}
  reach = tokens_to_reach(curves["rater filtered"], final["whole pool"])
  return {
      "settings": settings, "keep": args.keep, "seed": args.seed,
      "pool_sequences": {kind: int(np.sum(kinds == k))
                         for k, kind in enumerate(KINDS)},
      "meta_training": {"seconds": meta_seconds,
                        "initial_eval": fit.initial_eval,
                        "final_eval": fit.final_eval},
      "roc_auc": auc,
      "kept_fraction_by_kind": kept,
      "score_by_kind": {kind: {"mean": float(np.mean(scores[kinds == k])),
                               "std": float(np.std(scores[kinds == k]))}
                        for k, kind in enumerate(KINDS)},
      "tokens_per_step": settings["batch_size"] * settings["seq_len"],
      "curves": curves, "final_target_loss": final,
      "rater_steps_to_whole_pool_final": reach,
      "rater_token_fraction": None if reach is None else reach / steps,
      "scores": {kind: scores[kinds == k].tolist()
                 for k, kind in enumerate(KINDS)},
      **benchmark.platform_info()}


def plot_scores(result: dict, plt):
  fig, ax = plt.subplots(figsize=(7, 4))
  for kind, values in result["scores"].items():
    ax.hist(values, bins=40, alpha=0.55, label=(
        f"{kind} (AUC {result['roc_auc'][kind]:.2f})" if kind != "clean"
        else kind), density=True)
  ax.set_xlabel("rater score")
  ax.set_ylabel("density")
  ax.set_title("pool sequences by kind (AUC: clean vs the kind)")
  ax.legend(fontsize=8)
  return fig


def plot_curves(result: dict, plt):
  fig, ax = plt.subplots(figsize=(7, 4))
  tokens = result["tokens_per_step"]
  for name, curve in result["curves"].items():
    steps, losses = zip(*curve)
    ax.plot(np.array(steps) * tokens, losses, label=name)
  ax.set_xlabel("training tokens")
  ax.set_ylabel("held-out target loss")
  ax.set_title(f"fresh models, keep {result['keep']:.0%}")
  ax.legend()
  return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The exit status of the command (`launch._cli.call_main`)."""
  return _cli.call_main(_main, argv)


def _main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  try:
    result = run(args)
  except (ValueError, FileNotFoundError) as e:
    raise _cli.UsageError(_cli.one_line(e)) from None
  path = os.path.join(args.out, "data_rater.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
  for name, fn in (("scores", plot_scores), ("curves", plot_curves)):
    benchmark.save_plot([result], lambda rows, plt, fn=fn: fn(rows[0], plt),
                        os.path.join(args.out, f"data_rater_{name}.png"))
  print("ROC AUC (clean vs):", {k: round(v, 3)
                                for k, v in result["roc_auc"].items()})
  print("final target loss:", {k: round(v, 4) for k, v in
                               result["final_target_loss"].items()})
  print("rater-filtered token fraction to reach the whole pool's final "
        f"loss: {result['rater_token_fraction']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
