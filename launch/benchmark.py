"""Memory and speed of every gradient strategy on the weight-tied toy problem.

    python -m launch.benchmark [--depths 1,4,16] [--steps 2,4,8] [--out DIR]

For each strategy x T x depth M it compiles the meta-gradient once and reports
XLA's compiled temp memory (split into static and dynamic, see
`metaflow.memory`), the ratio standard/strategy, the compile time and the
median wall-clock time of a meta-gradient step after warm-up, with the ratio of
that time to standard's measured in the same run. Writes ``benchmark.json``
and, when matplotlib is installed, ``benchmark.png`` to ``--out``.
The approximate strategies (implicit, first_order) are costed on the same
problem, whose learned learning rates implicit cannot see and whose loss
weights first_order cannot: their rows are memory and time only (accuracy:
``python -m experiments.estimators``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Optional, Sequence

import jax
from absl import flags

import metaflow
from launch import _cli
from tasks.weight_tied import WeightTiedProblem

_MIB = 2.0**20


def _strategy_list(text: str) -> list[metaflow.Strategy]:
  """``"mixflow,implicit"`` -> the strategies; ValueError on a bad name."""
  return [metaflow.Strategy.parse(s) for s in text.split(",") if s.strip()]


def define_strategies(fv: flags.FlagValues) -> None:
  """``--strategies`` (default: all) in ``fv``."""
  _cli.define_parsed(
      "strategies", list(metaflow.all_strategies()), _strategy_list,
      "Comma-separated strategies (standard, the reference, is always "
      "measured): " + ", ".join(metaflow.valid_strategy_names()) + ".", fv,
      syntax="strategies")


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """The flags of a command line (``argv`` without the program name).

  Raises:
    UsageError: bad input.
  """
  fv = flags.FlagValues()
  define_strategies(fv)
  _cli.define_parsed("steps", "2,4,8", _cli.positive_ints,
                     "Inner steps T (comma-separated).", fv, syntax="ints")
  _cli.define_parsed("depths", "1,4,16", _cli.positive_ints,
                     "Depths M of the weight-tied network (comma-separated).",
                     fv, syntax="ints")
  flags.DEFINE_integer("width", 128, "Layer width d.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("batch", 128, "Inner batch size B.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_enum("inner_optimizer", "momentum", metaflow.optim.NAMES,
                    "Inner optimiser (adam adds the T copies of (theta, mu, "
                    "nu) to static memory).", flag_values=fv)
  flags.DEFINE_integer("repeats", 20, "Timed runs per configuration (median "
                       "reported).", lower_bound=1, flag_values=fv)
  flags.DEFINE_string("out", "benchmark_results", "Folder for benchmark.json "
                      "and benchmark.png.", flag_values=fv)
  _cli.parse_flags(fv, ["launch.benchmark", *argv], __doc__,
                   passthrough=False, outputs=("out",))
  return check_common_args(fv)


def check_common_args(fv: flags.FlagValues) -> flags.FlagValues:
  """Puts ``standard`` first among the strategies (the ratios are relative
  to it)."""
  standard = metaflow.Strategy("standard")
  if standard not in fv.strategies:
    fv.strategies = [standard, *fv.strategies]
  return fv


def measure(problem: WeightTiedProblem, example: tuple,
            strategy: metaflow.Strategy, repeats: int) -> dict:
  """Compiles and times one configuration on ``example = problem.example()``;
  returns one row of the table."""
  eta, inner_batches, outer_batch = example
  fn = metaflow.meta_value_and_grad(
      problem.inner_loss, problem.outer_loss, problem.optimizer,
      problem.num_steps, strategy, init_params=problem.init_params)
  args = (eta, None, inner_batches, outer_batch)
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  mem = metaflow.memory.report(compiled, fn.static_bytes(*args))
  return {"strategy": strategy.name, "T": problem.num_steps,
          "M": problem.depth, "width": problem.width, "batch": problem.batch,
          "inner_optimizer": problem.inner_optimizer,
          "compile_s": compile_s,
          "step_s_median": median_seconds(lambda: compiled(*args), repeats),
          **mem.as_dict()}


def median_seconds(fn, repeats: int) -> float:
  """Median wall-clock seconds of ``fn()`` (its outputs waited for) over
  ``repeats`` calls, after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(args: flags.FlagValues) -> list[dict]:
  rows = []
  header = (f"{'strategy':34s} {'T':>2s} {'M':>3s} {'temp MiB':>9s} "
            f"{'static':>7s} {'dynamic':>8s} {'std/this':>8s} "
            f"{'compile s':>9s} {'step ms':>8s} {'time/std':>8s}")
  print(header)
  print("-" * len(header))
  for num_steps in args.steps:
    for depth in args.depths:
      problem = WeightTiedProblem(depth=depth, width=args.width,
                                  batch=args.batch, num_steps=num_steps,
                                  inner_optimizer=args.inner_optimizer)
      example = problem.example()
      group = [measure(problem, example, s, args.repeats)
               for s in args.strategies]
      std = next(r for r in group if r["strategy"] == "standard")
      for r in group:
        r["memory_ratio_vs_standard"] = std["temp_bytes"] / r["temp_bytes"]
        r["time_ratio_vs_standard"] = r["step_s_median"] / std["step_s_median"]
        print(f"{r['strategy']:34s} {num_steps:2d} {depth:3d} "
              f"{r['temp_bytes'] / _MIB:9.2f} {r['static_bytes'] / _MIB:7.2f} "
              f"{r['dynamic_bytes'] / _MIB:8.2f} "
              f"{r['memory_ratio_vs_standard']:7.2f}x "
              f"{r['compile_s']:9.2f} {r['step_s_median'] * 1e3:8.2f} "
              f"{r['time_ratio_vs_standard']:8.2f}", flush=True)
      rows += group
  return rows


def plot(rows: list[dict], plt):
  """Temp memory against depth M, one panel per T (a pyplot figure)."""
  steps = sorted({r["T"] for r in rows})
  fig, axes = plt.subplots(1, len(steps), figsize=(4.5 * len(steps), 4),
                           squeeze=False, sharey=True)
  for ax, t in zip(axes[0], steps):
    for name in dict.fromkeys(r["strategy"] for r in rows):
      pts = sorted((r["M"], r["temp_bytes"] / _MIB) for r in rows
                   if r["T"] == t and r["strategy"] == name)
      ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(title=f"T = {t}", xlabel="depth M", xscale="log", yscale="log")
  axes[0][0].set_ylabel("compiled temp memory (MiB)")
  axes[0][0].legend(fontsize=7, loc="upper left")
  return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The exit status of the command (`launch._cli.call_main`)."""
  return _cli.call_main(_main, argv)


def _main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  print(f"metaflow benchmark on {jax.devices()[0].platform} "
        f"(jax {jax.__version__}); weight-tied network, width {args.width}, "
        f"batch {args.batch}, inner {args.inner_optimizer}; median of "
        f"{args.repeats} steps after warm-up")
  write_results(run(args), args.out, "benchmark", plot)
  return 0


def platform_info() -> dict:
  """Where a measurement ran: the jax version, backend, machine and CPUs."""
  return {"jax": jax.__version__, "backend": jax.devices()[0].platform,
          "machine": platform.machine(), "cpus": os.cpu_count()}


def write_results(rows: list[dict], out: str, name: str, plot_fn) -> None:
  """Writes ``out/name.json`` (the rows and the platform) and, with
  matplotlib, ``out/name.png``: the figure ``plot_fn(rows, pyplot)``."""
  os.makedirs(out, exist_ok=True)
  result = {**platform_info(), "rows": rows}
  json_path = os.path.join(out, f"{name}.json")
  with open(json_path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {json_path}")
  save_plot(rows, plot_fn, os.path.join(out, f"{name}.png"))


def save_plot(rows: list[dict], plot_fn, path: str) -> None:
  """Draws the figure ``plot_fn(rows, pyplot)`` into ``path`` (when there are
  rows and matplotlib is installed)."""
  if not rows:
    return
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot written")
    return
  fig = plot_fn(rows, plt)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(main())
