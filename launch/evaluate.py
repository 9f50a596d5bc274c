"""Long-horizon evaluation of a run's meta-parameters: a fresh inner model
trained for N steps with the checkpoint's eta frozen.

    python -m launch.evaluate --workdir W --inner_steps N [--baseline] \\
        [--lr_grid] [--lr_grid_points 7] [--eval_every K] [--split test] \\
        [--step S] [--out DIR]
    # a run that learned an update rule:
    python -m launch.evaluate --workdir W --inner_steps N [--seeds 5] \\
        [--adam 1e-4,...] [--sgd R,...] [--momentum R,...] [--baseline] \\
        [--task NAME] [--set KEY=VALUE ...] [--eval_every K] [--out DIR]

Meta-training sees only windows of T inner steps; this shows what its eta
does over a model's whole training. The run is rebuilt from what its
checkpoint recorded (the task, its settings, T, the seed: `launch.train`'s
config, checked as a resume is), eta is restored from checkpoint ``--step``
(default: the latest), and `BilevelTrainer.inner_curve` trains the model
from the task's initialisation for ``N`` inner steps (a multiple of T), its
held-out loss V on the outer batches of ``--split`` recorded every ``K``
steps. Next to it, the same run with:

* ``--baseline``: the initial eta (what meta-training started from: e.g. the
  initial learning rates, or an untrained data rater's equal weights);
* ``--lr_grid``: for learned learning rates (``eta.log_lr``, e.g.
  ``lm_learned_lr``), every rate set to one constant, ``--lr_grid_points``
  constants spaced evenly in log between 1/8 and 8 times the task's
  ``inner_lr``; the best of them (lowest final loss) is reported.

Writes ``DIR/evaluate.json`` (``curves``: name -> ``[[step, loss], ...]``,
``final``: name -> last loss, ``best_constant``) and ``DIR/evaluate.png``;
``DIR`` defaults to ``W/evaluate``. One device, one process.

A run that learned an update rule (``mlp_learned_optimizer``,
``lm_learned_optimizer``) is compared differently, as a user would use it:
``metaflow.load_learned_optimizer(W)`` trains fresh models of ``--task``
(default: the run's; ``--set KEY=VALUE`` changes a task field, e.g.
``--set widths=(64,32,32)``) in a plain optax loop, ``--seeds`` of them,
next to Adam at each rate of ``--adam``, SGD at ``--sgd`` and SGD with
momentum 0.9 at ``--momentum`` (`metaflow.evaluation.optax_curves`).
``evaluate.json`` then holds per optimizer the curves of every seed
(training loss, held-out loss and metrics), their means, the diverged
seeds and the first step whose mean training loss reaches Adam(1e-3)'s
final one; ``evaluate.png`` the mean training and held-out losses.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

import numpy as np
from absl import flags

from launch import _cli, _config, benchmark


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """The flags of a command line (``argv`` without the program name).

  Raises:
    UsageError: bad input.
  """
  from metaflow.data import SPLITS
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The run's --workdir.", flag_values=fv)
  flags.DEFINE_integer("inner_steps", None, "N: inner steps of the fresh "
                       "model (a multiple of T).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_boolean("baseline", False, "Also the same run with the initial "
                       "eta.", flag_values=fv)
  flags.DEFINE_boolean("lr_grid", False, "Also constant learning rates "
                       "(learned-rate tasks).", flag_values=fv)
  flags.DEFINE_integer("lr_grid_points", 7, "Constant rates of --lr_grid.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("eval_every", 0, "Steps between held-out losses (0: "
                       "N/20, rounded to whole windows).", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_integer("eval_batches", 8, "Held-out outer batches V is "
                       "averaged over.", lower_bound=1, flag_values=fv)
  flags.DEFINE_enum("split", "test", SPLITS, "Held-out split.",
                    flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder (default: "
                      "WORKDIR/evaluate).", flag_values=fv)
  flags.DEFINE_integer("seeds", 5, "Learned update rules: fresh models "
                       "(seeds 0..N-1).", lower_bound=1, flag_values=fv)
  flags.DEFINE_list("adam", [str(r) for r in ADAM_GRID], "Learned update "
                    "rules: Adam's learning rates to compare with.",
                    flag_values=fv)
  flags.DEFINE_list("sgd", [], "Learned update rules: SGD's learning rates.",
                    flag_values=fv)
  flags.DEFINE_list("momentum", [], "Learned update rules: learning rates "
                    "of SGD with momentum 0.9.", flag_values=fv)
  flags.DEFINE_string("task", None, "Learned update rules: the task of the "
                      "fresh models (default: the run's).", flag_values=fv)
  flags.DEFINE_multi_string("set", [], "Learned update rules: KEY=VALUE, a "
                            "field of --task (a Python literal), e.g. "
                            "widths=(128,); repeatable.", flag_values=fv)
  _cli.parse_flags(fv, ["launch.evaluate", *argv], __doc__, passthrough=False,
                   required=("workdir", "inner_steps"), outputs=("out",))
  return fv


#: Adam's learning rates that a learned update rule is compared with.
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _update(config, values: dict) -> None:
  """Sets the recorded ``values`` (nested dicts) on an ml_collections config
  (lists back to tuples where the config holds tuples)."""
  for key, value in values.items():
    if key not in config:
      continue  # e.g. the recorded estimator, not a setting
    if isinstance(value, dict):
      _update(config[key], value)
    else:
      if isinstance(config[key], tuple) and isinstance(value, list):
        value = tuple(value)
      config[key] = value


def rebuild(workdir: str, step: Optional[int] = None):
  """The run's trainer (one device) and its eta at checkpoint ``step``.

  Returns ``(trainer, step, eta)``.
  """
  import jax

  import tasks  # noqa: F401  (registers the built-in tasks)
  from metaflow import checkpoint, sharding
  step, fingerprint = checkpoint.saved_run(workdir, step)
  run = fingerprint["run"]
  config = _config.load_config(_config.config_path(fingerprint["task"]))
  config.unlock()
  _update(config, run)
  jax.config.update("jax_enable_x64", bool(config.x64))
  trainer = _config.build(fingerprint["task"], config,
                          mesh=sharding.make_mesh(devices=jax.devices()[:1]))
  restored = checkpoint.Checkpointer(
      workdir, trainer.fingerprint(run)).restore_step(
          step, trainer.init_state())
  return trainer, step, restored.eta


def lr_grid(trainer, eta, points: int) -> dict:
  """``{"lr=c": eta with every learned rate c}`` for ``points`` constants
  from inner_lr/8 to 8 inner_lr (log-spaced)."""
  import jax
  import jax.numpy as jnp
  if eta.log_lr is None:
    learned = [k for k, v in eta._asdict().items() if v is not None]
    raise ValueError(f"--lr_grid needs learned learning rates; "
                     f"{trainer.task.name}'s eta learns {learned}.")
  base = float(trainer.task.inner_lr)
  grid = {}
  for c in base * np.logspace(-3, 3, points, base=2.0):
    grid[f"lr={c:.3g}"] = eta._replace(log_lr=jax.tree.map(
        lambda x: jnp.full_like(x, np.log(c)), eta.log_lr))
  return grid


def plot(result: dict, plt):
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, curve in result["curves"].items():
    steps, losses = zip(*curve)
    style = dict(lw=2.2) if name == "learned" else dict(lw=1, alpha=0.7)
    ax.plot(steps, losses, label=name, **style)
  ax.set_xlabel("inner steps of a fresh model")
  ax.set_ylabel(f"held-out loss ({result['split']})")
  ax.set_title(f"{result['task']}: eta of meta-step {result['step']}")
  ax.legend(fontsize=8)
  return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The exit status of the command (`launch._cli.call_main`)."""
  return _cli.call_main(_main, argv)


def _rates(args, name: str) -> list[float]:
  try:
    rates = [float(r) for r in args[name].value]
  except ValueError:
    raise _cli.UsageError(f"--{name} takes learning rates separated by "
                          f"commas, got {','.join(args[name].value)!r}."
                          ) from None
  if any(not r > 0 for r in rates):
    raise _cli.UsageError(f"--{name}: learning rates must be > 0.")
  return rates


def fresh_task(args, run_task: str, run_settings: dict):
  """The task of the fresh models: ``--task`` (default the run's, with the
  run's settings) with the ``--set`` fields."""
  import ast

  from metaflow.task import create_task, import_task
  settings = dict(run_settings) if args.task in (None, run_task) else {}
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set takes KEY=VALUE, got {item!r}.")
    try:
      settings[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      settings[key.strip()] = value.strip()  # a plain string
  return create_task(import_task(args.task or run_task), **settings)


def compare_optimizers(args, trainer, step: int) -> dict:
  """`evaluate.json`'s content for a run that learned an update rule."""
  import optax

  from metaflow import evaluation, load_learned_optimizer
  from metaflow.lopt import learned_optimizer
  task = fresh_task(args, trainer.task.name, trainer.task.config())
  every = args.eval_every or max(1, args.inner_steps // 20)
  optimizers = {"learned": load_learned_optimizer(args.workdir, step)}
  if args.baseline:
    spec = trainer.task.meta_params()
    optimizers["initial"] = learned_optimizer(
        trainer.init_state().eta.optimizer, spec.learning_rate,
        spec.optimizer)
  for name, make in (("adam", optax.adam), ("sgd", optax.sgd),
                     ("momentum", lambda r: optax.sgd(r, momentum=0.9))):
    for rate in _rates(args, name):
      optimizers[f"{name}({rate:g})"] = make(rate)
  runs = {}
  for name, optimizer in optimizers.items():
    run = evaluation.optax_curves(
        task, optimizer, args.inner_steps, seeds=range(args.seeds),
        eval_every=every, num_eval_batches=args.eval_batches,
        split=args.split)
    run["mean"] = {k: np.mean(v, axis=0).tolist() for k, v in run.items()
                   if k.startswith(("train_", "test_"))}
    runs[name] = run
    print(f"{name}: training loss {run['mean']['train_loss'][0]:.4g} -> "
          f"{run['mean']['train_loss'][-1]:.4g}, held-out "
          f"{run['mean']['test_loss'][-1]:.4g} after {args.inner_steps} "
          f"steps, {sum(run['diverged'])}/{args.seeds} seeds diverged")
  reference = runs.get("adam(0.001)")
  for run in runs.values():
    run["reaches_adam_1e-3"] = None if reference is None else next(
        (s for s, v in zip(run["step"], run["mean"]["train_loss"])
         if v <= reference["mean"]["train_loss"][-1]), None)
  return {"task": task.name, "settings": task.config(), "optimizers": runs}


def plot_optimizers(result: dict, plt):
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for name, run in result["optimizers"].items():
    style = dict(lw=2.4, color="k") if name == "learned" else dict(
        lw=1, alpha=0.75)
    for ax, key in zip(axes, ("train_loss", "test_loss")):
      ax.plot(run["step"], run["mean"][key], label=name, **style)
  for ax, what in zip(axes, ("training loss", f"held-out loss "
                             f"({result['split']})")):
    ax.set_yscale("log")
    ax.set_xlabel("steps of a fresh model")
    ax.set_ylabel(f"{what}, mean of {result['seeds']} seeds")
  axes[0].set_title(f"{result['task']}: learned rule of meta-step "
                    f"{result['step']}", fontsize=9)
  axes[1].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  return fig


def _main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  try:
    trainer, step, eta = rebuild(args.workdir, args.step)
    if eta.optimizer is not None:
      return _write(args, {
          **compare_optimizers(args, trainer, step), "workdir":
          os.path.abspath(args.workdir), "step": step, "inner_steps":
          args.inner_steps, "split": args.split, "seeds": args.seeds},
          plot_optimizers)
    t = trainer.num_inner_steps
    every = args.eval_every or max(t, (args.inner_steps // 20) // t * t)
    runs = {"learned": eta}
    if args.baseline:
      runs["initial"] = trainer.init_state().eta
    if args.lr_grid:
      runs.update(lr_grid(trainer, eta, args.lr_grid_points))
    curves = {}
    for name, run_eta in runs.items():
      curves[name] = trainer.inner_curve(
          run_eta, args.inner_steps, eval_every=every, split=args.split,
          num_eval_batches=args.eval_batches)
      print(f"{name}: held-out loss {curves[name][0][1]:.4f} -> "
            f"{curves[name][-1][1]:.4f} after {args.inner_steps} steps")
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise _cli.UsageError(_cli.one_line(e)) from None
  final = {name: curve[-1][1] for name, curve in curves.items()}
  constants = {k: v for k, v in final.items() if k.startswith("lr=")}
  return _write(args, {
      "task": trainer.task.name, "workdir": os.path.abspath(args.workdir),
      "step": step, "inner_steps": args.inner_steps, "window": t,
      "split": args.split, "curves": curves, "final": final,
      "best_constant": min(constants, key=constants.get) if constants
      else None}, plot)


def _write(args, result: dict, plot_fn) -> int:
  """Writes ``evaluate.json`` and ``evaluate.png`` into ``--out``."""
  result.update(benchmark.platform_info())
  out = args.out or os.path.join(args.workdir, "evaluate")
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "evaluate.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
  benchmark.save_plot([result], lambda rows, plt: plot_fn(rows[0], plt),
                      os.path.join(out, "evaluate.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
