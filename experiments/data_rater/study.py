"""The data-curation experiment: does a meta-learned data rater tell useful
text from noise, and does filtering by it save training compute?

    python -m experiments.data_rater [--out experiments/data_rater] \\
        [--meta_steps 300] [--train_steps 600] [--keep 0.75,0.6] [--tiny] \\
        [--pools code,prose,structured] [--refilter]

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
2. **Meta-training** `lm_data_rater` online on the pool, V on the target,
   at the task's own defaults (`default_settings`: its config's).
3. **Scores**: the trained rater scores every sequence of the pool; ROC AUC
   of telling clean on-target sequences (positive) from each corrupted kind
   and from the off-target text.
4. **Filtering** (`add_filtering`): fresh models (per seed, the same
   initialisation and held-out target batches for every subset; each curve
   the mean over 3 seeds) trained with plain next-byte loss for
   ``--train_steps`` inner steps, so on the same number of tokens, on (a) the
   whole pool, (b) its top fraction by score, for each ``--keep``, (c) a
   random subset of the same size. Reported: their held-out target loss
   curves, and the fraction of (a)'s tokens that (b) and (c) need to reach
   (a)'s final loss.

Writes ``OUT/data_rater.json`` and ``OUT/data_rater_scores.png``,
``OUT/data_rater_curves.png`` (``experiments/data_rater/`` is committed).
``--tiny`` is the test's size (under a minute of meta-training).

``--pools code,prose,structured`` runs the same steps 2-4, with the same
settings, on each pool of `experiments.data_rater.pools` instead (a kind of
text as the target, the two others off-target, five corruptions): each
pool's result in ``OUT/pools/<kind>/``, the summary in
``OUT/generalisation.json`` and ``OUT/generalisation.png``. ``--refilter``
redoes only step 4 (for other ``--keep`` fractions) from the pools and
scores an earlier run left in ``OUT``. The command compiles each program
once (`compilation_cache`), though step 4 builds a trainer per subset.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Optional, Sequence

import numpy as np
from absl import flags

from launch import _cli, benchmark, curate
from metaflow import data

SHAKESPEARE = data.bundled_path("tinyshakespeare.txt")
KINDS = ("clean", "random_bytes", "shuffled", "repeated", "off_target")

#: The task fields the study takes from ``lm_data_rater``'s config.
TASK_FIELDS = ("preset", "seq_len", "batch_size", "inner_lr", "rater_preset",
               "rater_ngrams", "temperature")


def default_settings() -> dict:
  """The study's settings: ``lm_data_rater``'s own defaults (its config,
  `launch.configs.lm_data_rater`: what ``launch.train --task=lm_data_rater``
  runs), plus the study's ``train_steps`` and ``filter_seeds`` (of the
  fresh models: each curve is the mean of that many seeds') and
  ``pool_bytes`` (of clean text in the pool)."""
  from launch.configs import lm_data_rater
  config = lm_data_rater.get_config()
  return dict(task={k: config.task[k] for k in TASK_FIELDS},
              inner_steps=config.inner_steps,
              population=config.online.population,
              lifetime=config.online.lifetime, meta_steps=config.meta_steps,
              outer_lr=config.outer_lr, train_steps=600, filter_seeds=3,
              pool_bytes=400_000)


#: The test's size: the defaults with a smaller, faster-learning inner
#: model (nano, inner_lr) and a longer life, so that 60 meta-steps see
#: models past the unigram stage.
TINY = dict(task=dict(preset="nano", batch_size=8, inner_lr=1e-2),
            population=2, lifetime=300, meta_steps=60, outer_lr=1e-2,
            train_steps=40, filter_seeds=1, pool_bytes=40_000)


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
  flags.DEFINE_list("keep", ["0.75", "0.6"], "Fractions of the pool the "
                    "rater keeps, each in (0, 1) (the first one's figures "
                    "are the headline's and the plots').", flag_values=fv)
  flags.DEFINE_string("shakespeare", SHAKESPEARE, "The on-target text.",
                      flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the pool, the models and the "
                       "random subset.", lower_bound=0, flag_values=fv)
  flags.DEFINE_list("pools", [], "Instead of the study's own pool, the "
                    "generalisation study on these pools of "
                    "experiments.data_rater.pools (code, prose, structured): "
                    "each in OUT/pools/<kind>/, the summary in "
                    "OUT/generalisation.json.", flag_values=fv)
  flags.DEFINE_boolean("refilter", False, "No meta-training: step 4 again "
                       "(for --keep) on the pools and saved scores of OUT's "
                       "earlier run.", flag_values=fv)
  _cli.parse_flags(fv, ["experiments.data_rater", *argv], __doc__,
                   passthrough=False, outputs=("out",))
  return fv  # --keep and --shakespeare: checked by `run` / `run_pools`.


def cut(tokens: np.ndarray, length: int) -> np.ndarray:
  """uint8 ``[M]`` -> ``[M // length, length]``: consecutive sequences (the
  last partial one dropped)."""
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
  clean = cut(on[:pool_bytes], length)
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
  off = cut(np.frombuffer(off_target, np.uint8), length)
  off = off[rng.permutation(off.shape[0])[:corrupt.shape[0]]]
  sequences = np.concatenate([sequences, off])
  kinds = np.concatenate([kinds, np.full(off.shape[0], 4)])
  order = rng.permutation(sequences.shape[0])
  pool_path, target_path = write_pool(out, sequences[order], target)
  return pool_path, target_path, kinds[order]


def write_pool(out: str, sequences: np.ndarray, target: np.ndarray
               ) -> tuple[str, str]:
  """Writes ``sequences`` (uint8 ``[N, L+1]``) to ``OUT/pool.txt`` and
  ``target`` (uint8 ``[M]``) to ``OUT/target.txt``; returns their paths."""
  os.makedirs(out, exist_ok=True)
  pool_path, target_path = (os.path.join(out, name)
                            for name in ("pool.txt", "target.txt"))
  with open(pool_path, "wb") as f:
    f.write(sequences.tobytes())
  with open(target_path, "wb") as f:
    f.write(target.tobytes())
  return pool_path, target_path


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
  return create_task("lm_data_rater", data_path=data_path,
                     target_path=target_path, **settings["task"])


def _write_subset(path: str, sequences: np.ndarray, rows: np.ndarray) -> str:
  with open(path, "wb") as f:
    f.write(sequences[rows].tobytes())
  return path


def run(args: flags.FlagValues) -> dict:
  """The study on its own pool (`build_pool`), written to ``args.out``."""
  from tasks.lm import text

  settings, keeps = _settings(args)
  if args.refilter:
    return refilter(args.out, keeps)
  if not os.path.isfile(args.shakespeare):
    raise FileNotFoundError(f"the on-target text {args.shakespeare!r} does "
                            "not exist.")
  pool, target, kinds = build_pool(
      args.out, open(args.shakespeare, "rb").read(), text.embedded_text(),
      settings["task"]["seq_len"] + 1, settings["pool_bytes"], args.seed)
  with open(os.path.join(args.out, "pool_labels.json"), "w") as f:
    json.dump({"names": list(KINDS), "kinds": kinds.tolist()}, f)
  return evaluate(settings, pool, target, kinds, KINDS, args.out, args.seed,
                  keeps, console=not args.tiny)


def _settings(args: flags.FlagValues) -> tuple[dict, tuple[float, ...]]:
  """The settings (`default_settings`, or the tiny size, with the flags'
  overrides) and the keep fractions."""
  try:
    keeps = tuple(float(k) for k in args.keep)
  except ValueError:
    raise ValueError(f"--keep must be numbers in (0, 1), got "
                     f"{','.join(args.keep)}.") from None
  if not keeps or not all(0 < k < 1 for k in keeps):
    raise ValueError(f"--keep must be numbers in (0, 1), got "
                     f"{','.join(args.keep)}.")
  settings = default_settings()
  if args.tiny:
    settings.update({**TINY, "task": {**settings["task"], **TINY["task"]}})
  for key in ("meta_steps", "train_steps"):
    if getattr(args, key) is not None:
      settings[key] = getattr(args, key)
  return settings, keeps


def evaluate(settings: dict, pool: str, target: str, kinds: np.ndarray,
             names: Sequence[str], out: str, seed: int,
             keeps: Sequence[float], console: bool = True) -> dict:
  """Meta-trains the rater on ``pool`` towards ``target``, scores the pool
  and compares fresh models on the whole pool, its rater-filtered top
  fractions ``keeps`` and random subsets of the same sizes (the module
  docstring's steps 2-4; `add_filtering`). ``kinds``: each pool sequence's
  index into ``names`` (``names[0]`` the clean kind). Returns the result
  (the JSON's)."""
  import jax
  import optax

  import tasks  # noqa: F401  (registers lm_data_rater)
  from metaflow import sharding
  from metaflow.online import Online
  from metaflow.trainer import BilevelTrainer

  # The pool holds random bytes by construction: not UTF-8, on purpose.
  warnings.filterwarnings("ignore", category=UnicodeWarning)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])

  start = time.perf_counter()
  trainer = BilevelTrainer(
      _task(settings, pool, target), num_inner_steps=settings["inner_steps"],
      seed=seed,
      outer_optimizer=optax.adam(settings["outer_lr"]), num_eval_tasks=8,
      online=Online(settings["population"], settings["lifetime"]), mesh=mesh)
  fit = trainer.fit(settings["meta_steps"], log_every=max(
      1, settings["meta_steps"] // 10), console=console)
  meta_seconds = time.perf_counter() - start

  (scores,) = curate.score_files(trainer, fit.state.eta, [pool], 256)
  clean = scores[kinds == 0]
  result = {
      "settings": settings, "seed": seed,
      "pool_sequences": {kind: int(np.sum(kinds == k))
                         for k, kind in enumerate(names)},
      "meta_training": {"seconds": meta_seconds,
                        "initial_eval": fit.initial_eval,
                        "final_eval": fit.final_eval},
      "roc_auc": {kind: roc_auc(clean, scores[kinds == k])
                  for k, kind in enumerate(names) if k},
      "score_by_kind": {kind: {"mean": float(np.mean(scores[kinds == k])),
                               "std": float(np.std(scores[kinds == k]))}
                        for k, kind in enumerate(names)},
      "tokens_per_step": (settings["task"]["batch_size"]
                          * settings["task"]["seq_len"]),
      "scores": {kind: scores[kinds == k].tolist()
                 for k, kind in enumerate(names)},
      **benchmark.platform_info()}
  return add_filtering(result, pool, target, kinds, names, keeps, out)


def add_filtering(result: dict, pool: str, target: str, kinds: np.ndarray,
                  names: Sequence[str], keeps: Sequence[float], out: str
                  ) -> dict:
  """``result`` (a scored pool's: ``settings``, ``seed``, ``scores`` by
  kind) with the filtering's step 4 added: fresh models (plain next-byte
  loss; per seed, the same initialisation and target batches for every
  subset; each curve the mean over ``settings["filter_seeds"]`` seeds)
  trained ``train_steps`` inner steps on the whole ``pool``, and for each
  fraction of ``keeps`` on its top fraction by score and on a random subset
  of the same size (``OUT/rater.txt``, ``OUT/random.txt``: the last fraction's).

  Per fraction (``by_keep``, keyed ``f"{keep:g}"``): the held-out target
  loss curves, their final losses, the fraction of the whole pool's tokens
  at which each subset first reaches the whole pool's final loss (None:
  never), and the fraction of each kind kept. The first fraction's are
  also at the top level (``keep``, ``curves``, ``final_target_loss``,
  ``rater_token_fraction``, ``random_token_fraction``,
  ``kept_fraction_by_kind``)."""
  import jax

  from metaflow import sharding
  from metaflow.trainer import BilevelTrainer

  warnings.filterwarnings("ignore", category=UnicodeWarning)  # the pools'
  settings, seed = result["settings"], result["seed"]
  scores = np.zeros(kinds.shape[0])
  for k, kind in enumerate(names):
    scores[kinds == k] = result["scores"][kind]
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  t, steps = settings["inner_steps"], settings["train_steps"]
  every = max(t, steps // 20 // t * t)

  def curve(path: str) -> list:
    runs = []
    for i in range(settings.get("filter_seeds", 1)):
      fresh = BilevelTrainer(_task(settings, path, target), num_inner_steps=t,
                             meta_batch_size=1, seed=seed + i, mesh=mesh)
      # The initial rater weights every sequence 1: plain training.
      runs.append(fresh.inner_curve(fresh.init_state().eta, steps,
                                    eval_every=every))
    return [(step, float(np.mean([run[j][1] for run in runs])))
            for j, (step, _) in enumerate(runs[0])]

  sequences = curate.sequences(pool, settings["task"]["seq_len"] + 1)
  os.makedirs(out, exist_ok=True)
  whole = curve(pool)
  by_keep = {}
  for keep in keeps:
    rng = np.random.default_rng(seed + 1)
    rater_rows = curate.top_fraction(scores, keep)
    random_rows = np.sort(rng.permutation(len(scores))[:len(rater_rows)])
    curves = {
        "whole pool": whole,
        "rater filtered": curve(_write_subset(os.path.join(
            out, "rater.txt"), sequences, rater_rows)),
        "random filtered": curve(_write_subset(os.path.join(
            out, "random.txt"), sequences, random_rows))}
    final = {name: c[-1][1] for name, c in curves.items()}
    by_keep[f"{keep:g}"] = {
        "curves": curves, "final_target_loss": final,
        "rater_token_fraction": _token_fraction(
            curves["rater filtered"], final["whole pool"], steps),
        "random_token_fraction": _token_fraction(
            curves["random filtered"], final["whole pool"], steps),
        "kept_fraction_by_kind": {
            kind: float(np.mean(np.isin(np.flatnonzero(kinds == k),
                                        rater_rows)))
            for k, kind in enumerate(names)}}
  return {**result, "keep": keeps[0], **by_keep[f"{keeps[0]:g}"],
          "by_keep": by_keep}


def refilter(out: str, keeps: Sequence[float]) -> dict:
  """`add_filtering` again on the pool of ``OUT/data_rater.json`` (its
  pool files and saved scores; no meta-training), for ``keeps``."""
  path = os.path.join(out, "data_rater.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--refilter needs {path}, a study's result.")
  with open(path) as f:
    result = json.load(f)
  with open(os.path.join(out, "pool_labels.json")) as f:
    labels = json.load(f)
  return add_filtering(
      result, os.path.join(out, "pool.txt"), os.path.join(out, "target.txt"),
      np.asarray(labels["kinds"]), labels["names"], keeps, out)


def _token_fraction(curve: list, loss: float, steps: int) -> Optional[float]:
  """The fraction of ``steps`` at which ``curve`` first reaches ``loss``
  (None: never)."""
  reach = tokens_to_reach(curve, loss)
  return None if reach is None else reach / steps


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

  def draw(curve, **style):
    steps, losses = zip(*curve)
    ax.plot(np.array(steps) * tokens, losses, **style)

  draw(result["curves"]["whole pool"], color="k", label="whole pool")
  for j, (keep, row) in enumerate(result["by_keep"].items()):
    for name, color in (("rater filtered", "C0"), ("random filtered", "C1")):
      draw(row["curves"][name], color=color, ls=("-", "--", ":")[j % 3],
           label=f"{name}, keep {float(keep):.0%}")
  ax.set_xlabel("training tokens")
  ax.set_ylabel("held-out target loss")
  ax.set_title("fresh models on the whole and the filtered pools")
  ax.legend(fontsize=8)
  return fig


def run_pools(args: flags.FlagValues) -> dict:
  """The generalisation study: `evaluate` on each pool of ``args.pools``
  (`experiments.data_rater.pools`), with the same settings (with
  ``--refilter``, `refilter` on the pools already there); each pool's
  result written to ``OUT/pools/<kind>/``. Returns the summary."""
  from experiments.data_rater import pools

  settings, keeps = _settings(args)
  unknown = sorted(set(args.pools) - set(pools.KINDS_OF_TEXT))
  if unknown:
    raise ValueError(f"unknown pools {unknown}; known: "
                     f"{', '.join(pools.KINDS_OF_TEXT)}.")
  texts = {kind: make() for kind, make in pools.TEXTS.items()}
  summary = {"settings": settings, "keeps": list(keeps), "pools": {}}
  for kind in args.pools:
    out = os.path.join(args.out, "pools", kind)
    if args.refilter:
      result = refilter(out, keeps)
    else:
      pool, target, kinds, names = pools.build(
          out, kind, settings["task"]["seq_len"] + 1,
          settings["pool_bytes"], args.seed, texts)
      result = evaluate(settings, pool, target, kinds, names, out,
                        args.seed, keeps, console=not args.tiny)
    _write(result, out)
    summary["settings"] = result["settings"]
    summary["pools"][kind] = {
        "roc_auc": result["roc_auc"],
        "meta_training_seconds": result["meta_training"]["seconds"],
        "by_keep": {keep: {key: value for key, value in row.items()
                           if key != "curves"}
                    for keep, row in result["by_keep"].items()}}
  summary.update(benchmark.platform_info())
  return summary


def plot_generalisation(summary: dict, plt):
  pools = list(summary["pools"])
  fig, axes = plt.subplots(1, len(pools), figsize=(4.5 * len(pools), 4),
                           squeeze=False)
  for ax, kind in zip(axes[0], pools):
    auc = summary["pools"][kind]["roc_auc"]
    bars = ax.barh(list(auc), list(auc.values()))
    ax.bar_label(bars, fmt="%.3f", label_type="center", color="w",
                 fontsize=8)
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlim(0.0, 1.0)
    ax.set_title(f"target: {kind}", fontsize=9)
    ax.set_xlabel("ROC AUC, clean vs the kind")
  fig.suptitle("one rater's defaults on pools it was not tuned on")
  return fig


def _write(result: dict, out: str) -> None:
  """``OUT/data_rater.json`` and its two plots."""
  path = os.path.join(out, "data_rater.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
  for name, fn in (("scores", plot_scores), ("curves", plot_curves)):
    benchmark.save_plot([result], lambda rows, plt, fn=fn: fn(rows[0], plt),
                        os.path.join(out, f"data_rater_{name}.png"))
  print("ROC AUC (clean vs):", {k: round(v, 3)
                                for k, v in result["roc_auc"].items()})
  print("final target loss:", {k: round(v, 4) for k, v in
                               result["final_target_loss"].items()})
  for keep, row in result["by_keep"].items():
    print(f"keep {keep}: token fraction to reach the whole pool's final "
          f"loss: rater filtered {row['rater_token_fraction']}, random "
          f"filtered {row['random_token_fraction']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The exit status of the command (`launch._cli.call_main`)."""
  return _cli.call_main(_main, argv)


@contextlib.contextmanager
def compilation_cache():
  """JAX's persistent compilation cache in a temporary folder, unless the
  process already has one (``JAX_COMPILATION_CACHE_DIR``): the filtering
  builds a trainer per subset and seed, and its programs, the same shapes
  each time, then compile once instead of once per curve. Must be entered
  before the process's first compilation (JAX reads the folder then)."""
  import jax
  if jax.config.jax_compilation_cache_dir:
    yield
    return
  with tempfile.TemporaryDirectory(prefix="metaflow-study-jax-cache-") as d:
    jax.config.update("jax_compilation_cache_dir", d)
    # Every program, not only those compiling for over a second.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield


def _main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  try:
    with compilation_cache():
      if args.pools:
        summary = run_pools(args)
      else:
        _write(run(args), args.out)
        return 0
  except (ValueError, FileNotFoundError) as e:
    raise _cli.UsageError(_cli.one_line(e)) from None
  path = os.path.join(args.out, "generalisation.json")
  with open(path, "w") as f:
    json.dump(summary, f, indent=1)
  benchmark.save_plot([summary], lambda rows, plt: plot_generalisation(
      rows[0], plt), os.path.join(args.out, "generalisation.png"))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
