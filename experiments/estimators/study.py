"""Which meta-gradient to use when: exact (mixflow), implicit and first_order.

    python -m experiments.estimators
        [--tasks sinusoid_maml,fewshot_classification]
        [--steps 1,5,20,100,1000] [--cg_steps 20] [--meta_steps 200]
        [--budget_s 60] [--out DIR]

Three parts, for each task (a learned initialisation with iMAML's proximal
term ``lam/2 ||theta - theta0||^2`` in L, so that all three estimators
address the same bilevel problem; the settings of each part are in
`SETTINGS`):

1. **Accuracy** (float64, one episode): for each T, the meta-gradient of
   each estimator against (a) the exact unrolled one of the same T
   (``mixflow``) and (b) the exact implicit gradient at the true inner
   solution (``implicit`` after ``--solve_steps`` inner steps with
   ``--solve_cg_steps`` CG steps; its stationarity ``||grad L||`` is
   reported, as is that of theta_T at each T): cosine similarity and
   relative error ``||g - ref|| / ||ref||``. With them, XLA's compiled temp
   memory and the median time of a meta-gradient (float64, this machine).
   The proximal strength and inner learning rate are chosen so that
   sinusoid's inner loop does converge (a ReLU network under plain SGD
   otherwise stalls at kinks or oscillates: ``||grad L||`` stays O(0.1-10));
   fewshot's, at its default settings, does not, which is the point of
   showing it.
2. **Equal meta-steps** (float32, the task's settings in `SETTINGS`, with a
   proximal term): each estimator meta-trains for ``--meta_steps`` steps at
   T = ``--train_steps`` (default: `SETTINGS`'); held-out (test split) outer
   loss and, for classification, accuracy, against the same adaptation from the
   initial (random) initialisation.
3. **Equal wall-clock**: the same, for ``--budget_s`` seconds of meta-steps
   each (after compiling).

Writes ``study_estimators.json`` and ``study_estimators.png`` to ``--out``.
`notebooks/02_which_meta_gradient.ipynb` runs a small version and reads it.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np
import optax
from absl import flags
from jax.flatten_util import ravel_pytree

import metaflow
import tasks  # noqa: F401  (registers the built-in tasks)
from launch import _cli
from launch.benchmark import median_seconds, write_results
from metaflow import sharding

ESTIMATORS = ("mixflow", "implicit", "first_order")

#: Per-task settings: the task's settings for the accuracy study
#: (``accuracy``) and for meta-training (``training``, with the trainer's
#: meta-batch and outer Adam rate), and the metric reported.
SETTINGS = {
    "sinusoid_maml": {
        "accuracy": {"widths": (20, 20), "inner_lr": 0.008, "proximal": 20.0},
        "training": {"proximal": 1.0}, "train_steps": 5, "train_cg_steps": 20,
        "meta_batch_size": 25, "outer_lr": 3e-3, "metric": "outer_loss"},
    # Training: 16 SGD steps at 0.05 (at the defaults, 5 steps at 0.2, the
    # Hessian at theta_T is far from positive definite and implicit's
    # meta-training goes nowhere: tests/test_fewshot.py).
    "fewshot_classification": {
        "accuracy": {"proximal": 2.0},
        "training": {"proximal": 2.0, "inner_lr": 0.05}, "train_steps": 16,
        "train_cg_steps": 5,  # as iMAML (Rajeswaran et al.) on Omniglot
        "meta_batch_size": 4, "outer_lr": 3e-3, "metric": "accuracy"},
}


def _strategy(name: str, cg_steps: int) -> metaflow.Strategy:
  if name == "implicit":
    return metaflow.Strategy("implicit", cg_steps=cg_steps)
  return metaflow.Strategy.parse(name)


def _one_device():
  return sharding.make_mesh(devices=jax.devices()[:1])


def _trainer(task, strategy, num_steps, meta_batch_size, outer_lr=1e-3,
             num_eval_tasks=64):
  return metaflow.BilevelTrainer(
      task, strategy=strategy, num_inner_steps=num_steps,
      meta_batch_size=meta_batch_size, outer_optimizer=optax.adam(outer_lr),
      seed=0, eval_split="test", num_eval_tasks=num_eval_tasks,
      mesh=_one_device())


def compare(g, ref) -> dict:
  """Cosine similarity and relative error ``||g - ref|| / ||ref||``."""
  a, b = (np.asarray(ravel_pytree(t)[0]) for t in (g, ref))
  return {"cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
          "rel_error": float(np.linalg.norm(a - b) / np.linalg.norm(b))}


def stationarity(trainer, eta, batch) -> float:
  """Mean over the meta-batch of ``||grad_theta L(theta_T)||`` (on the last
  inner batch) after the trainer's T inner steps from ``eta.init``."""
  f, T = trainer.functional, trainer.num_inner_steps
  loop = metaflow.inner_loop(f.inner_loss, f.optimizer, T, "standard")

  def one(episode):
    inner, _ = trainer.task.split_episode(episode, T)
    theta_T = loop(eta, eta.init, inner).params
    last = jax.tree.map(lambda x: x[-1], inner)
    return optax.tree.norm(jax.grad(f.inner_loss)(theta_T, eta, last))

  return float(jax.numpy.mean(jax.jit(jax.vmap(one))(batch)))


def episode_memory(trainer, eta, batch) -> int:
  """Compiled temp bytes of the engine's meta-gradient of one episode, its
  T inner batches passed in as arguments (`BilevelTrainer.compiled_memory`
  would also count the T copies that the default `Task.split_episode`
  broadcasts the support set into inside the program: data, not the
  estimator's)."""
  episode = jax.tree.map(lambda x: x[0], batch)
  inner, outer = trainer.task.split_episode(episode, trainer.num_inner_steps)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        (eta, eta.init, inner, outer))
  return metaflow.memory.analyze(trainer.meta_gradient, *shapes).temp_bytes


def accuracy_table(task_name: str, steps: Sequence[int], cg_steps: int,
                   solve_steps: int, solve_cg_steps: int, repeats: int = 5,
                   task_settings: Optional[dict] = None,
                   meta_batch_size: int = 1) -> dict:
  """Part 1 (float64): the rows ``{estimator, T, vs_exact, vs_solution,
  inner_grad_norm, temp_bytes, step_s_median}`` and the reference
  solution's stationarity. ``task_settings`` update ``SETTINGS``'s."""
  settings = dict(SETTINGS[task_name]["accuracy"], **(task_settings or {}))
  with jax.enable_x64(True):
    task = metaflow.create_task(task_name, **settings)
    solver = _trainer(task, _strategy("implicit", solve_cg_steps), solve_steps,
                      meta_batch_size)
    eta = solver.init_state().eta
    batch = next(solver.train_batches())
    _, g_star = solver.meta_value_and_grad(eta, batch)
    solution = {"solve_steps": solve_steps, "solve_cg_steps": solve_cg_steps,
                "grad_norm": stationarity(solver, eta, batch)}
    rows = []
    for T in steps:
      grads = {}
      for name in ESTIMATORS:
        trainer = _trainer(task, _strategy(name, cg_steps), T, meta_batch_size)
        _, grads[name] = trainer.meta_value_and_grad(eta, batch)
        rows.append({
            "task": task_name, "estimator": name, "T": T,
            "vs_solution": compare(grads[name], g_star),
            "temp_bytes": episode_memory(trainer, eta, batch),
            "step_s_median": median_seconds(
                lambda: trainer.meta_value_and_grad(eta, batch), repeats)})
      grad_norm = stationarity(trainer, eta, batch)  # the same loop for all
      for row in rows[-len(ESTIMATORS):]:
        row["vs_exact"] = compare(grads[row["estimator"]], grads["mixflow"])
        row["inner_grad_norm"] = grad_norm
  return {"task": task_name, "settings": settings, "cg_steps": cg_steps,
          "solution": solution, "rows": rows}


def train_table(task_name: str, cg_steps: Optional[int],
                train_steps: Optional[int],
                meta_steps: int, budget_s: float, num_eval_tasks: int = 100,
                task_settings: Optional[dict] = None) -> list[dict]:
  """Parts 2 and 3 (float32): per estimator, held-out metrics after
  ``meta_steps`` meta-steps and after ``budget_s`` seconds of meta-steps
  (the first, compiling, step and the evaluations not counted; a run goes
  on until both are reached)."""
  settings = SETTINGS[task_name]
  train_steps = train_steps or settings["train_steps"]
  cg_steps = cg_steps or settings["train_cg_steps"]
  task = metaflow.create_task(
      task_name, **dict(settings["training"], **(task_settings or {})))
  rows = []
  for name in ESTIMATORS:
    trainer = _trainer(task, _strategy(name, cg_steps), train_steps,
                       settings["meta_batch_size"], settings["outer_lr"],
                       num_eval_tasks)
    state = trainer.init_state()
    initial = trainer.evaluate(state.eta)
    batches = trainer.train_batches()
    state, _ = trainer.step(state, next(batches))  # compiles; not timed
    jax.block_until_ready(state)
    done, seconds, at_steps = 1, 0.0, None
    while done < meta_steps or seconds < budget_s:
      if done == meta_steps:
        at_steps = trainer.evaluate(state.eta)
      start = time.perf_counter()
      state, _ = trainer.step(state, next(batches))
      jax.block_until_ready(state)
      seconds += time.perf_counter() - start
      done += 1
    if at_steps is None:  # meta_steps reached exactly at the end
      at_steps = trainer.evaluate(state.eta)
    rows.append({"task": task_name, "estimator": name, "T": train_steps,
                 "cg_steps": cg_steps if name == "implicit" else None,
                 "settings": dict(settings["training"],
                                  **(task_settings or {})),
                 "initial": initial, "after_meta_steps": at_steps,
                 "meta_steps": meta_steps,
                 "after_budget": trainer.evaluate(state.eta),
                 "budget_s": budget_s, "steps_in_budget": done,
                 "step_s": seconds / max(done - 1, 1)})
  return rows


def run(args: flags.FlagValues) -> dict:
  result = {"accuracy": [], "training": []}
  for name in args.tasks:
    table = accuracy_table(name, args.steps, args.cg_steps, args.solve_steps,
                           args.solve_cg_steps, args.repeats)
    result["accuracy"].append(table)
    print(f"\n{name} {table['settings']}; reference: implicit after "
          f"{args.solve_steps} inner steps, ||grad L|| = "
          f"{table['solution']['grad_norm']:.2e}")
    print(f"{'estimator':12s} {'T':>5s} {'cos exact':>10s} {'err exact':>10s} "
          f"{'cos sol':>8s} {'err sol':>9s} {'|g_T|':>8s} {'temp MiB':>9s} "
          f"{'ms':>8s}")
    for r in table["rows"]:
      print(f"{r['estimator']:12s} {r['T']:5d} {r['vs_exact']['cosine']:10.4f} "
            f"{r['vs_exact']['rel_error']:10.2e} "
            f"{r['vs_solution']['cosine']:8.4f} "
            f"{r['vs_solution']['rel_error']:9.2e} "
            f"{r['inner_grad_norm']:8.1e} {r['temp_bytes'] / 2**20:9.2f} "
            f"{r['step_s_median'] * 1e3:8.1f}",
            flush=True)
    rows = train_table(name, None, args.train_steps,
                       args.meta_steps, args.budget_s)
    result["training"] += rows
    metric = SETTINGS[name]["metric"]
    for r in rows:
      print(f"{name} {r['estimator']:12s} T={r['T']}: {metric} "
            f"{r['initial'][metric]:.4f} (initial) -> "
            f"{r['after_meta_steps'][metric]:.4f} after {r['meta_steps']} "
            f"steps; {r['after_budget'][metric]:.4f} after {r['budget_s']:.0f}"
            f" s ({r['steps_in_budget']} steps)", flush=True)
  return result


def plot(result: dict, plt):
  """One row per task: agreement with the exact unrolled gradient and with
  the implicit gradient at the solution, memory and time against T, and the
  equal-time training result."""
  tables = result["accuracy"]
  fig, axes = plt.subplots(len(tables), 5, figsize=(22, 4 * len(tables)),
                           squeeze=False)
  for ax_row, table in zip(axes, tables):
    name = table["task"]
    for i, est in enumerate(ESTIMATORS):
      rows = [r for r in table["rows"] if r["estimator"] == est]
      ts = [r["T"] for r in rows]
      style = dict(marker="o", color=f"C{i}", label=est)
      if est != "mixflow":
        ax_row[0].plot(ts, [r["vs_exact"]["cosine"] for r in rows], **style)
      ax_row[1].plot(ts, [r["vs_solution"]["cosine"] for r in rows], **style)
      ax_row[2].plot(ts, [r["temp_bytes"] / 2**20 for r in rows], **style)
      ax_row[3].plot(ts, [r["step_s_median"] * 1e3 for r in rows], **style)
    ax_row[0].set(title=f"{name}: cosine vs exact unrolled", xscale="log")
    ax_row[1].set(title="cosine vs implicit at the solution", xscale="log")
    ax_row[2].set(title="compiled temp memory (MiB)", xscale="log",
                  yscale="log")
    ax_row[3].set(title="time per meta-gradient (ms)", xscale="log",
                  yscale="log")
    for ax in ax_row[:4]:
      ax.set_xlabel("T")
      ax.legend(fontsize=7)
    metric = SETTINGS[name]["metric"]
    rows = [r for r in result["training"] if r["task"] == name]
    x = np.arange(len(rows))
    ax_row[4].bar(x - 0.2, [r["initial"][metric] for r in rows], 0.4,
                  label="initial")
    ax_row[4].bar(x + 0.2, [r["after_budget"][metric] for r in rows], 0.4,
                  label="after equal time")
    ax_row[4].set_xticks(x, [r["estimator"] for r in rows])
    ax_row[4].set(title=f"held-out {metric}")
    ax_row[4].legend(fontsize=7)
  return fig


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """The flags of a command line (``argv`` without the program name).

  Raises:
    UsageError: bad input.
  """
  fv = flags.FlagValues()
  _cli.define_parsed("tasks", "sinusoid_maml,fewshot_classification",
                     _cli.names_in(tuple(SETTINGS), "task(s)"),
                     "Comma-separated tasks: " + ", ".join(SETTINGS) + ".", fv,
                     syntax="tasks")
  _cli.define_parsed("steps", "1,5,20,100,1000", _cli.positive_ints,
                     "Inner steps T of the accuracy study (comma-separated).",
                     fv, syntax="ints")
  flags.DEFINE_integer("cg_steps", 20, "Implicit's CG steps in the accuracy "
                       "study (training: SETTINGS' train_cg_steps).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("solve_steps", 5000, "Inner steps of the reference "
                       "solution.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("solve_cg_steps", 200, "CG steps of the reference "
                       "solution.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("train_steps", None, "T of the meta-training "
                       "comparison (default: SETTINGS').", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("meta_steps", 200, "Meta-steps of the equal-steps "
                       "comparison.", lower_bound=1, flag_values=fv)
  flags.DEFINE_float("budget_s", 60.0, "Seconds of meta-steps per estimator "
                     "(equal time).", lower_bound=0.0, flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "Timed meta-gradients (median "
                       "reported).", lower_bound=1, flag_values=fv)
  flags.DEFINE_string("out", "study_results", "Output folder.",
                      flag_values=fv)
  _cli.parse_flags(fv, ["experiments.estimators", *argv], __doc__,
                   passthrough=False, outputs=("out",))
  return fv


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The exit status of the command (`launch._cli.call_main`)."""
  return _cli.call_main(_main, argv)


def _main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  print(f"metaflow estimator study on {jax.devices()[0].platform} "
        f"(jax {jax.__version__})")
  result = run(args)
  write_results(result, args.out, "study_estimators", plot)
  return 0


if __name__ == "__main__":
  sys.exit(main())
