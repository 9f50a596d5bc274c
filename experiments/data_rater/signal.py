"""Where a data rater's signal comes from: per kind of pool sequence, how
well the meta-gradient tells it from clean text, by the inner model's age.

    python -m experiments.data_rater.signal --pool_dir DIR \\
        [--ages 0,10,50,200,500,1000] [--per_kind 48] [--out FILE.json]

``DIR`` holds ``pool.txt``, ``target.txt`` and ``pool_labels.json`` (each
pool sequence's kind), as `experiments.data_rater` writes them.

**What is measured.** DataRater weights the per-sequence losses l_i of an
inner batch by ``w = B softmax(s / temperature)`` and meta-learns the
scores s through V, the target loss after the inner steps. After one inner
step of Adam from theta (preconditioner ``P = 1 / (sqrt(nu) + eps)``, rate
alpha),

    d V(theta_1) / d w_i = -alpha <grad V(theta), P grad l_i(theta)> / B,

so the rater is pushed to raise the score of sequence i in proportion to
its *preconditioned alignment* ``a_i = <grad V, P grad l_i>`` with the
target (relative to the batch's mean, through the softmax). A rater can
learn to tell kind k from clean text only where a_i does: the ROC AUC of
a_i, clean sequences against kind k, is the ceiling of what the
meta-gradient teaches at that age. Reported per age of a model trained
plainly (uniform weights) on the pool: the AUC of a_i, of the cosine of
grad l_i with grad V (unpreconditioned), and of -l_i (what a filter on the
model's own loss would use), for each kind; and V.
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

import numpy as np
from absl import flags

from launch import _cli


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
  from experiments.data_rater.study import roc_auc
  return roc_auc(positive, negative)


def signal_by_age(task, pool: np.ndarray, kinds: np.ndarray,
                  kind_names: Sequence[str], target: np.ndarray,
                  ages: Sequence[int], per_kind: int = 48,
                  seed: int = 0) -> list[dict]:
  """The signal's AUCs (module docstring) at each of ``ages`` (increasing).

  Args:
    task: an ``lm_data_rater`` task (its inner model, inner rate and batch
      size).
    pool: uint8 ``[N, L+1]``, the pool's sequences; ``kinds``: int ``[N]``,
      each one's index into ``kind_names`` (0: clean).
    target: uint8 ``[M, L+1]``, target sequences (V's batch: up to 64).
    ages: inner steps of plain training (batches of the task's size drawn
      from the pool) at which to measure.
    per_kind: sequences of each kind measured.

  Returns:
    One dict per age: ``age``, ``target_loss`` (V) and, per kind but
    clean, ``{"alignment": AUC, "cosine": AUC, "neg_loss": AUC}``.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from tasks.lm import model as lm_model

  rng = np.random.default_rng(seed)
  graphdef, theta = nnx.split(task.make_model(nnx.Rngs(seed)), nnx.Param)

  def loss(theta, batch):   # mean next-byte loss of batch [B, L+1]
    return jnp.mean(lm_model.next_token_losses(nnx.merge(graphdef, theta),
                                               batch))

  def flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])

  optimizer = optax.adam(task.inner_lr)

  @jax.jit
  def train_step(theta, state, batch):
    updates, state = optimizer.update(jax.grad(loss)(theta, batch), state,
                                      theta)
    return optax.apply_updates(theta, updates), state

  @jax.jit
  def measure(theta, nu, sequences, target):
    grad_v = flat(jax.grad(loss)(theta, target))
    precondition = flat(jax.tree.map(lambda v: 1 / (jnp.sqrt(v) + 1e-8), nu))
    per_sequence = jax.vmap(lambda s: flat(jax.grad(loss)(theta, s[None])))(
        sequences)                                     # [n, |theta|]
    cosine = per_sequence @ grad_v / (
        jnp.linalg.norm(per_sequence, axis=1) * jnp.linalg.norm(grad_v))
    alignment = (per_sequence * precondition) @ grad_v
    losses = jax.vmap(lambda s: loss(theta, s[None]))(sequences)
    return alignment, cosine, -losses, loss(theta, target)

  sample = np.concatenate([
      rng.choice(np.flatnonzero(kinds == k), min(per_kind, int(np.sum(
          kinds == k))), replace=False)
      for k in range(len(kind_names)) if np.any(kinds == k)])
  sample_kinds = kinds[sample]
  target = target[rng.permutation(len(target))[:64]]
  state = optimizer.init(theta)
  rows, age = [], 0
  for goal in ages:
    for _ in range(goal - age):
      batch = pool[rng.choice(len(pool), task.batch_size, replace=False)]
      theta, state = train_step(theta, state, batch)
    age = goal
    nu = optax.tree_utils.tree_get(state, "nu")
    values = [np.asarray(x) for x in measure(theta, nu, pool[sample],
                                             target)]
    row = {"age": goal, "target_loss": float(values[3])}
    for k, name in enumerate(kind_names):
      if k == 0 or not np.any(sample_kinds == k):
        continue
      row[name] = {
          measure_name: _auc(value[sample_kinds == 0],
                             value[sample_kinds == k])
          for measure_name, value in zip(("alignment", "cosine", "neg_loss"),
                                         values[:3])}
    rows.append(row)
  return rows


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("pool_dir", None, "Folder of pool.txt, target.txt and "
                      "pool_labels.json.", flag_values=fv)
  flags.DEFINE_list("ages", ["0", "10", "50", "200", "500", "1000"],
                    "Inner steps of plain training at which to measure.",
                    flag_values=fv)
  flags.DEFINE_integer("per_kind", 48, "Sequences of each kind measured.",
                       lower_bound=2, flag_values=fv)
  flags.DEFINE_string("preset", "tiny", "The inner model's preset.",
                      flag_values=fv)
  flags.DEFINE_integer("seq_len", 64, "Bytes per sequence L (the pool's "
                       "sequences are L + 1 long).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_string("out", None, "Write the rows here (JSON).",
                      flag_values=fv)
  _cli.parse_flags(fv, ["experiments.data_rater.signal", *argv], __doc__ or "",
                   passthrough=False, required=("pool_dir",))
  return fv


def run(args: flags.FlagValues) -> list[dict]:
  import os
  import warnings

  import tasks  # noqa: F401  (registers lm_data_rater)
  from metaflow.task import create_task

  directory = args.pool_dir
  paths = {name: os.path.join(directory, name) for name in
           ("pool.txt", "target.txt", "pool_labels.json")}
  for path in paths.values():
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path!r} does not exist (--pool_dir must "
                              "hold pool.txt, target.txt, pool_labels.json).")
  try:
    ages = sorted(int(a) for a in args.ages)
  except ValueError:
    raise ValueError(f"--ages must be integers, got {args.ages}.") from None
  if ages[0] < 0:
    raise ValueError(f"--ages must be >= 0, got {ages}.")
  # A noisy pool is not UTF-8, on purpose.
  warnings.filterwarnings("ignore", category=UnicodeWarning)
  labels = json.load(open(paths["pool_labels.json"]))
  width = args.seq_len + 1
  pool = np.frombuffer(open(paths["pool.txt"], "rb").read(), np.uint8)
  if pool.size != len(labels["kinds"]) * width:
    raise ValueError(f"pool.txt holds {pool.size} bytes, not "
                     f"{len(labels['kinds'])} sequences of {width} bytes "
                     "(--seq_len + 1).")
  target = np.frombuffer(open(paths["target.txt"], "rb").read(), np.uint8)
  target = target[:target.size // width * width].reshape(-1, width)
  task = create_task("lm_data_rater", data_path=paths["pool.txt"],
                     target_path=paths["target.txt"], preset=args.preset,
                     seq_len=args.seq_len, batch_size=16)
  return signal_by_age(task, pool.reshape(-1, width),
                       np.asarray(labels["kinds"]), labels["names"], target,
                       ages, args.per_kind)


def main(argv: Optional[Sequence[str]] = None) -> int:
  return _cli.call_main(_main, argv)


def _main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  try:
    rows = run(args)
  except (ValueError, FileNotFoundError) as e:
    raise _cli.UsageError(_cli.one_line(str(e))) from None
  for row in rows:
    print(f"age {row['age']:5d}  V {row['target_loss']:.3f}  " + "  ".join(
        f"{k} {v['alignment']:.2f}/{v['cosine']:.2f}/{v['neg_loss']:.2f}"
        for k, v in row.items() if isinstance(v, dict)))
  print("(AUC against clean text: preconditioned alignment / cosine / "
        "-loss)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
