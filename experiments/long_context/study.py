"""Long context and long horizons: the meta-gradient's memory along L and T.

    python -m experiments.long_context [--sweep length,horizon,time]
        [--preset chinchilla_57m] [--out experiments/long_context]

Everything is XLA's compiled memory of one meta-gradient (shapes only:
``launch.benchmark_lm``'s `measure`, one device, meta-batch of one episode,
inner Adam, per-block remat), except the ``time`` sweep, which runs.

* ``length``: dense against blockwise attention (`metaflow.
  blockwise_attention`) for L = 1024 to 131072 (``--lengths``; dense up to
  ``--dense_max``, 32768) at T=4, B=1, per strategy (standard, mixflow,
  mixflow+remat+saved_inner_grads). On a log-log plot the slope of memory
  against L is about 2 for dense attention (the ``[heads, L, L]`` scores and
  their tangents) and about 1 for MixFlow-MG
  with blockwise attention; the legend gives each slope, fitted over the
  largest four lengths.
* ``horizon``: one level of segments (``+segments=K``, K = round(sqrt T))
  against nested segments (``+segments=auto``: the schedule of least stored
  carries, `metaflow.segments`) for T = 64 to 16384 (``--horizons``) at
  L=2048 (``--horizon_seq_len``), B=1, with MixFlow-MG, per-step remat and
  saved inner gradients; each row gives the schedule, its stored carries and
  its recompute factor.
* ``time``: the median meta-gradient time (``--repeats``, after warm-up) on
  the ``tiny`` preset in the same run: dense against blockwise attention at
  L=512 (B=4, T=4), and one level against nested segments at T=256 (L=128,
  B=4).

Writes ``long_context_<sweep>.json`` and ``long_context_<sweep>.png`` to
``--out``; the committed ones are those of this folder, read by
``notebooks/03_memory_planning.ipynb``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from absl import flags

import metaflow
import tasks  # noqa: F401  (registers the built-in tasks)
from launch import _cli
from launch.benchmark import write_results
from launch.benchmark_lm import measure
from tasks.lm import model as lm_model

SWEEPS = ("length", "horizon", "time")
TASK = "lm_loss_weighting"
LENGTH_STRATEGIES = ("standard", "mixflow", "mixflow+remat+saved_inner_grads")
HORIZON_STRATEGY = "mixflow+remat+saved_inner_grads"
_GIB = 2.0**30


def _task(preset: str, seq_len: int, batch: int, attention: str,
          remat: bool = True) -> metaflow.Task:
  return metaflow.create_task(TASK, preset=preset, seq_len=seq_len,
                              batch_size=batch, attention=attention,
                              remat_blocks=remat, data_path="synthetic")


def _report(row: dict) -> None:
  print(f"  {row['sweep']:7s} L={row['L']:6d} T={row['T']:5d} "
        f"{row['attention']:9s} {row['strategy']:52s} "
        f"temp {row['temp_bytes'] / _GIB:8.2f} GiB (static "
        f"{row['static_bytes'] / _GIB:.2f})"
        + (f" {row['step_s_median'] * 1e3:.0f} ms"
           if "step_s_median" in row else ""), flush=True)


def length_sweep(preset: str, lengths: Sequence[int], dense_max: int,
                 strategies: Sequence[str] = LENGTH_STRATEGIES) -> list[dict]:
  rows = []
  for seq_len in lengths:
    for attention in ("dense", "blockwise")[seq_len > dense_max:]:
      task = _task(preset, seq_len, 1, attention)
      for name in strategies:
        row = {"sweep": "length", "preset": preset, "L": seq_len, "T": 4,
               "B": 1, "attention": attention,
               **measure(task, 4, metaflow.Strategy.parse(name), 0)}
        rows.append(row)
        _report(row)
  return rows


def _horizon_strategies(num_steps: int) -> list[metaflow.Strategy]:
  one = max(1, round(math.sqrt(num_steps)))
  return [metaflow.Strategy.parse(f"{HORIZON_STRATEGY}+segments={one}"),
          metaflow.Strategy.parse(f"{HORIZON_STRATEGY}+segments=auto")]


def _schedule(strategy: metaflow.Strategy, num_steps: int) -> dict:
  """The segment lengths a strategy uses at T, its stored carries and its
  recompute factor (forward passes of the inner loop per meta-gradient)."""
  lengths = strategy.segment_length_for(num_steps) or ()
  lengths = (lengths,) if isinstance(lengths, int) else tuple(lengths)
  return {"schedule": "/".join(map(str, lengths)), "levels": len(lengths),
          "stored_carries": strategy.stored_carries(num_steps),
          "recompute_factor": strategy.recompute_factor(num_steps)}


def horizon_sweep(preset: str, horizons: Sequence[int], seq_len: int
                  ) -> list[dict]:
  rows = []
  task = _task(preset, seq_len, 1, "auto")
  attention = "blockwise" if task.model_config.blockwise(seq_len) else "dense"
  for num_steps in horizons:
    for strategy in _horizon_strategies(num_steps):
      row = {"sweep": "horizon", "preset": preset, "L": seq_len,
             "T": num_steps,
             "B": 1, "attention": attention,
             **_schedule(strategy, num_steps),
             **measure(task, num_steps, strategy, 0)}
      rows.append(row)
      _report(row)
  return rows


def time_sweep(repeats: int) -> list[dict]:
  rows = []
  for attention in ("dense", "blockwise"):
    task = _task("tiny", 512, 4, attention, remat=False)
    row = {"sweep": "time", "comparison": "attention", "preset": "tiny",
           "L": 512, "T": 4, "B": 4, "attention": attention,
           **measure(task, 4, metaflow.Strategy.parse("mixflow"), repeats)}
    rows.append(row)
    _report(row)
  task = _task("tiny", 128, 4, "dense", remat=False)
  for strategy in _horizon_strategies(256):
    row = {"sweep": "time", "comparison": "segments", "preset": "tiny",
           "L": 128, "T": 256, "B": 4, "attention": "dense",
           **_schedule(strategy, 256), **measure(task, 256, strategy, repeats)}
    rows.append(row)
    _report(row)
  return rows


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
  """The least-squares slope of log y against log x."""
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def plot_length(rows: list[dict], plt):
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for attention, style in (("dense", "--"), ("blockwise", "-")):
    for name in LENGTH_STRATEGIES:
      points = sorted((r["L"], r["temp_bytes"] / _GIB) for r in rows
                      if r["attention"] == attention and r["strategy"] == name)
      if not points:
        continue
      xs, ys = zip(*points)
      fit = slope(xs[-4:], ys[-4:]) if len(xs) >= 2 else float("nan")
      ax.plot(xs, ys, style, marker="o",
              label=f"{attention} {name} (slope {fit:.2f})")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length L")
  ax.set_ylabel("compiled temp memory (GiB)")
  ax.set_title(f"{rows[0]['preset']}, T=4, B=1, per-block remat")
  ax.legend(fontsize=7)
  return fig


def plot_horizon(rows: list[dict], plt):
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, nested in (("one level, K = sqrt T", False),
                        ("nested, segments=auto", True)):
    line = sorted((r for r in rows if r["strategy"].endswith("auto")
                   == nested), key=lambda r: r["T"])
    if line:
      ax.plot([r["T"] for r in line], [r["temp_bytes"] / _GIB for r in line],
              marker="o", label=label)
    for r in line:  # what each point costs: forward passes of the loop
      ax.annotate(f"{r['stored_carries']} carries, x{r['recompute_factor']}",
                  (r["T"], r["temp_bytes"] / _GIB), fontsize=6,
                  textcoords="offset points", xytext=(4, -10))
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("inner steps T")
  ax.set_ylabel("compiled temp memory (GiB); labels: stored carries, "
                "forward passes", fontsize=8)
  ax.set_title(f"{rows[0]['preset']}, L={rows[0]['L']}, B=1, "
               f"{HORIZON_STRATEGY}")
  ax.legend(fontsize=8)
  return fig


def plot_time(rows: list[dict], plt):
  fig, ax = plt.subplots(figsize=(6, 3.5))
  labels = [f"{r['attention']} L={r['L']}" if r["comparison"] == "attention"
            else f"segments={r['schedule']} T={r['T']}" for r in rows]
  ax.barh(labels, [r["step_s_median"] for r in rows])
  ax.set_xlabel("median meta-gradient time (s), tiny preset, this machine")
  return fig


PLOTS = {"length": plot_length, "horizon": plot_horizon, "time": plot_time}


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  fv = flags.FlagValues()
  _cli.define_parsed("sweep", ",".join(SWEEPS),
                     _cli.names_in(SWEEPS, "sweep(s)"),
                     "Comma-separated sweeps: " + ", ".join(SWEEPS) + ".", fv,
                     syntax="sweeps")
  flags.DEFINE_enum("preset", "chinchilla_57m", list(lm_model.PRESETS),
                    "Model of the length and horizon sweeps.", flag_values=fv)
  _cli.define_parsed("lengths", "1024,2048,4096,8192,16384,32768,65536,131072",
                     _cli.positive_ints, "L of the length sweep.", fv,
                     syntax="ints")
  _cli.define_parsed("length_strategies", ",".join(LENGTH_STRATEGIES),
                     _cli.names_in(LENGTH_STRATEGIES, "strategy(ies)"),
                     "Strategies of the length sweep.", fv,
                     syntax="strategies")
  flags.DEFINE_integer("dense_max", 32768, "Longest L compiled with dense "
                       "attention (its [heads, L, L] buffers: a terabyte of "
                       "scores at 131072).", lower_bound=1, flag_values=fv)
  _cli.define_parsed("horizons", "64,256,1024,4096,16384", _cli.positive_ints,
                     "T of the horizon sweep.", fv, syntax="ints")
  flags.DEFINE_integer("horizon_seq_len", 2048, "L of the horizon sweep.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "Timed meta-gradients per row of the "
                       "time sweep.", lower_bound=1, flag_values=fv)
  flags.DEFINE_string("out", "experiments/long_context", "Folder for the "
                      "JSON and PNG files.", flag_values=fv)
  _cli.parse_flags(fv, ["experiments.long_context", *argv], __doc__,
                   passthrough=False, outputs=("out",))
  return fv


def run(args: flags.FlagValues) -> dict[str, list[dict]]:
  results = {}
  for sweep in args.sweep:
    print(f"sweep {sweep}:", flush=True)
    if sweep == "length":
      rows = length_sweep(args.preset, args.lengths, args.dense_max,
                          args.length_strategies)
    elif sweep == "horizon":
      rows = horizon_sweep(args.preset, args.horizons, args.horizon_seq_len)
    else:
      rows = time_sweep(args.repeats)
    write_results(rows, args.out, f"long_context_{sweep}", PLOTS[sweep])
    results[sweep] = rows
  return results


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The exit status of the command (`launch._cli.call_main`)."""
  return _cli.call_main(_main, argv)


def _main(argv: Sequence[str]) -> int:
  run(parse_args(argv))
  return 0
