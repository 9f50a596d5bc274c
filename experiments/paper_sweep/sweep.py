"""The MixFlow-MG paper's language-model benchmark, reproduced and extended.

    python -m experiments.paper_sweep --sweep paper   [--out DIR]
    python -m experiments.paper_sweep --sweep largest [--out DIR]
    python -m experiments.paper_sweep --sweep time    [--out DIR] [--repeats N]
    python -m experiments.paper_sweep --sweep quick   [--out DIR]  (one point)

``--out`` defaults to ``experiments/paper_sweep`` (where the committed results
lie). Each sweep appends one JSON line per point to ``OUT/sweep_<name>.jsonl``
as soon as the point is measured, and a rerun skips the points already there
(delete the file to measure again); at the end the plots are redrawn from the
whole file. Every compiled figure is XLA's compiled memory analysis from
shapes only (`BilevelTrainer(shapes_only=True)`: no model is initialised), so
the paper's sizes are compiled on a laptop; ``paper``, ``largest`` and
``quick`` compile with ``--xla_backend_optimization_level=0`` (faster code
generation; the buffer assignment, made before it, is that of a default
compile). The strategies compared at every point (`COLUMNS`):

============== ================================================= ============
column         strategy                                          block remat
============== ================================================= ============
standard       ``standard``                                      no
standard_remat ``standard+remat`` (block and step remat)         yes
mixflow        ``mixflow``                                       no
mixflow_best   ``mixflow+remat+saved_inner_grads`` (the paper's) yes
additions      ``mixflow_best`` + ``segments=auto`` where they   yes
               store fewer carries than T, + ``microbatches=B``
               (one sequence per chunk)
============== ================================================= ============

``paper``: the paper's Table 1 grid (tasks lm_learned_lr, lm_maml,
lm_loss_weighting; presets chinchilla_57m to chinchilla_306m, here every
second of the 13 ladder presets between them; T in 2, 4, 8; B in 2, 4, 8; L in
2048, 4096, 8192) swept one axis at a time around the base point
(chinchilla_57m, T=8, B=2, L=8192): 3 x 13 points (the full product, 3 x 13
x 27 points at about a minute each, would take days on two cores): per point
and column static, dynamic, temp and total bytes, the ratios of temp memory,
and the floor (`BilevelTrainer.floor_memory`: one plain gradient of L and one
forward-over-reverse HVP, with and without block remat).

``largest``: the paper's Table 2, extended: for budgets of 16, 80 and 95 GiB,
lm_loss_weighting with inner Adam, L=2048, B=4 sequences per device, T in 4
and 16, the largest Chinchilla-ladder preset whose whole compiled meta-step
(arguments + outputs + temporaries, per device: what ``strategy="auto"``
compares with a budget) fits, per column, on one device and per device of an
``fsdp`` mesh of 8 and of 64 devices (forced host devices; on a mesh of N the
batch is 4N sequences and theta with the stored carries is split N ways).
The search is `launch.plan.largest_fitting` over the presets ordered by
parameter count.

``time``: presets tiny and small, lm_loss_weighting, T=4, B=4, L=256, one
device: the median meta-gradient time per column (after warm-up), its ratio
to standard's and to T plain Adam training steps of the same model and
batches (`metaflow.inner_loop` forward only), all in the same run.

``quick``: two nano points of ``paper``, for the tests.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterable, Optional, Sequence

import jax
from absl import flags

import metaflow
import tasks  # noqa: F401  (registers the built-in tasks)
from launch import _cli
from launch import plan as plan_lib
from launch.benchmark import median_seconds, platform_info, save_plot
from launch.benchmark_lm import LM_TASKS
from metaflow import data, sharding
from tasks.lm import model as lm_model

SWEEPS = ("paper", "largest", "time", "quick")
_GIB = 2.0**30
_BEST = "mixflow+remat+saved_inner_grads"


def additions_strategy(num_steps: int, batch: int) -> str:
  """The ``additions`` column: the paper's best strategy with segments where
  they store fewer carries than T (`Strategy.stored_carries`) and one
  sequence per microbatch."""
  name = _BEST
  segmented = metaflow.Strategy.parse(name + "+segments=auto")
  if segmented.stored_carries(num_steps) < num_steps:
    name = segmented.name
  return name + (f"+microbatches={batch}" if batch > 1 else "")


#: column -> (its strategy for (T, B sequences per device), block remat).
COLUMNS: dict[str, tuple[Callable[[int, int], str], bool]] = {
    "standard": (lambda T, B: "standard", False),
    "standard_remat": (lambda T, B: "standard+remat", True),
    "mixflow": (lambda T, B: "mixflow", False),
    "mixflow_best": (lambda T, B: _BEST, True),
    "additions": (additions_strategy, True),
}

#: The paper's grid (Table 1) and the base point the axes are swept around:
#: every second ladder preset from chinchilla_57m to chinchilla_306m.
PAPER_PRESETS = tuple(
    name for name, config in lm_model.PRESETS.items()
    if name.startswith("chinchilla_")
    and 57 <= int(name.split("_")[1][:-1]) <= 306)[::2]
PAPER_AXES = {"preset": PAPER_PRESETS, "T": (2, 4, 8), "B": (2, 4, 8),
              "L": (2048, 4096, 8192)}
PAPER_BASE = {"preset": "chinchilla_57m", "T": 8, "B": 2, "L": 8192}
#: ``--sweep quick``: the sweep's code path at one nano point, in a minute.
QUICK_POINTS = ({"task": "lm_loss_weighting", "preset": "nano", "T": 2, "B": 2,
                 "L": 32},)

#: The largest-model table (Table 2, extended).
LARGEST = {"task": "lm_loss_weighting", "L": 2048, "B": 4, "T": (4, 16),
           "budgets_gib": (16, 80, 95), "devices": (1, 8, 64)}
LADDER = tuple(sorted(
    (name for name in lm_model.PRESETS if name.startswith("chinchilla_")),
    key=lambda name: int(name.split("_")[1][:-1])))

#: The timed runs.
TIMED = {"task": "lm_loss_weighting", "presets": ("tiny", "small"), "T": 4,
         "B": 4, "L": 256}


def paper_points(task_names: Iterable[str] = LM_TASKS) -> list[dict]:
  """The base point and every point one axis away from it, per task."""
  points = []
  for task in task_names:
    for axis, values in PAPER_AXES.items():
      for value in values:
        point = {"task": task, **PAPER_BASE, axis: value}
        if point not in points:
          points.append(point)
  return points


# ---------------------------------------------------------------- results
def read_rows(path: str) -> list[dict]:
  """The rows of a sweep's JSON-lines file (none if it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _key(row: dict, fields: Iterable[str]) -> tuple:
  return tuple(row.get(f) for f in fields)


def _append(path: str, row: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def _create_task(task: str, preset: str, L: int, B: int, remat_blocks: bool):
  # Dense attention, as in the paper (and the committed results): the
  # blockwise attention that the LM tasks use above 512 tokens is compared
  # by experiments.long_context.
  return metaflow.create_task(
      task, preset=preset, seq_len=L, batch_size=B, remat_blocks=remat_blocks,
      attention="dense")


def _trainer(task_obj, strategy: str, T: int, mesh, shapes_only=True):
  return metaflow.BilevelTrainer(
      task_obj, strategy=strategy, num_inner_steps=T, meta_batch_size=1,
      mesh=mesh, shapes_only=shapes_only)


def _one_device():
  return sharding.make_mesh(devices=jax.devices()[:1])


# ------------------------------------------------------------------ paper
def measure_point(point: dict) -> dict:
  """Every column's compiled memory and the floors at one grid point (one
  device, a meta-batch of one episode)."""
  task, preset, T, B, L = (point[k] for k in ("task", "preset", "T", "B", "L"))
  mesh = _one_device()
  row = {**point, "num_params": lm_model.num_params(lm_model.preset(preset)),
         "columns": {}, "floor": {}, **platform_info()}
  for remat_blocks in (False, True):
    task_obj = _create_task(task, preset, L, B, remat_blocks)
    for name, (strategy_of, blocks) in COLUMNS.items():
      if blocks != remat_blocks:
        continue
      strategy = strategy_of(T, B)
      start = time.perf_counter()
      trainer = _trainer(task_obj, strategy, T, mesh)
      mem = trainer.compiled_memory()
      row["columns"][name] = {
          "strategy": strategy, "remat_blocks": blocks,
          "compile_s": round(time.perf_counter() - start, 2),
          **{k: mem.as_dict()[k] for k in ("static_bytes", "dynamic_bytes",
                                           "temp_bytes", "total_bytes")}}
    suffix = "_remat_blocks" if remat_blocks else ""
    for what, report in trainer.floor_memory().items():
      row["floor"][what + suffix] = report.temp_bytes
  row["columns"] = {name: row["columns"][name] for name in COLUMNS}
  temp = {name: c["temp_bytes"] for name, c in row["columns"].items()}
  row["ratios"] = {f"{a}/{b}": temp[a] / temp[b] for a, b in (
      ("standard", "mixflow"), ("standard", "mixflow_best"),
      ("standard", "additions"), ("standard_remat", "mixflow_best"),
      ("standard_remat", "additions"), ("mixflow_best", "additions"))}
  return row


_POINT_KEY = ("task", "preset", "T", "B", "L")


def run_points(points: list[dict], path: str) -> list[dict]:
  """Measures each point not yet in ``path`` and appends it there."""
  done = {_key(r, _POINT_KEY) for r in read_rows(path)}
  for i, point in enumerate(points):
    label = " ".join(f"{k}={point[k]}" for k in _POINT_KEY)
    if _key(point, _POINT_KEY) in done:
      print(f"[{i + 1}/{len(points)}] {label}: in {path} already, skipped",
            flush=True)
      continue
    start = time.perf_counter()
    row = measure_point(point)
    _append(path, row)
    c, r = row["columns"], row["ratios"]
    print(f"[{i + 1}/{len(points)}] {label}: temp GiB "
          + " ".join(f"{n} {v['temp_bytes'] / _GIB:.2f}" for n, v in c.items())
          + f"; standard/best {r['standard/mixflow_best']:.1f}x, "
          f"standard/additions {r['standard/additions']:.1f}x "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
  return read_rows(path)


# ---------------------------------------------------------------- largest
def _largest_search(T: int, devices: int, column: str) -> dict:
  """The largest `LADDER` preset per budget for one column, T and mesh."""
  strategy_of, remat_blocks = COLUMNS[column]
  B, L = LARGEST["B"], LARGEST["L"]
  strategy = strategy_of(T, B)
  mesh = (_one_device() if devices == 1 else sharding.make_mesh(
      data=1, fsdp=devices, devices=jax.devices()[:devices]))
  totals: dict[int, Optional[int]] = {}

  def measure(k: int) -> int:
    if k not in totals:
      task_obj = _create_task(LARGEST["task"], LADDER[k], L, B * devices,
                              remat_blocks)
      totals[k] = _trainer(task_obj, strategy, T, mesh).compiled_memory(
          whole_step=True).total_bytes
    return totals[k]

  coords = [lm_model.num_params(lm_model.preset(p)) for p in LADDER]
  base = measure(0)
  result = {"T": T, "devices": devices, "column": column,
            "strategy": strategy, "remat_blocks": remat_blocks,
            "budgets": {}, **platform_info()}
  for gib in LARGEST["budgets_gib"]:
    search = plan_lib.largest_fitting(measure, coords, int(gib * _GIB), base,
                                      max_probes=10)
    above = search.next_above()
    result["budgets"][str(gib)] = {
        "preset": None if search.best is None else LADDER[search.best],
        "num_params": None if search.best is None else coords[search.best],
        "total_bytes": None if search.best is None else totals[search.best],
        "next_preset": None if above is None else LADDER[above],
        "next_total_bytes": None if above is None else totals[above],
        "at_limit": search.best == len(LADDER) - 1, "capped": search.capped}
  result["probes"] = {LADDER[k]: t for k, t in sorted(totals.items())}
  return result


_LARGEST_KEY = ("T", "devices", "column")


def run_largest(path: str) -> list[dict]:
  """Every (T, mesh, column) search not yet in ``path``, appended there."""
  done = {_key(r, _LARGEST_KEY) for r in read_rows(path)}
  for T in LARGEST["T"]:
    for devices in LARGEST["devices"]:
      for column in COLUMNS:
        if (T, devices, column) in done:
          continue
        start = time.perf_counter()
        row = _largest_search(T, devices, column)
        _append(path, row)
        print(f"T={T} devices={devices} {column:14s} "
              + " ".join(f"{g} GiB: {b['preset']}"
                         for g, b in row["budgets"].items())
              + f" ({len(row['probes'])} compiles, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
  return read_rows(path)


# ------------------------------------------------------------------- time
def run_time(path: str, repeats: int) -> list[dict]:
  """Median meta-gradient time per column and of T plain Adam steps, per
  `TIMED` preset not yet in ``path``."""
  done = {r["preset"] for r in read_rows(path)}
  T, B, L = TIMED["T"], TIMED["B"], TIMED["L"]
  for preset in TIMED["presets"]:
    if preset in done:
      continue
    row = {"task": TIMED["task"], "preset": preset, "T": T, "B": B, "L": L,
           "repeats": repeats,
           "num_params": lm_model.num_params(lm_model.preset(preset)),
           "columns": {}, **platform_info()}
    batch = None
    for name, (strategy_of, remat_blocks) in COLUMNS.items():
      task_obj = _create_task(TIMED["task"], preset, L, B, remat_blocks)
      trainer = _trainer(task_obj, strategy_of(T, B), T, _one_device(),
                         shapes_only=False)
      eta = trainer.init_state().eta
      if batch is None:  # the same batches for every column
        batch = data.take(task_obj.episodes("train", 0, T), 1)
      seconds = median_seconds(
          lambda: trainer.meta_value_and_grad(eta, batch), repeats)
      row["columns"][name] = {"strategy": strategy_of(T, B),
                              "step_s_median": seconds}
      print(f"{preset} {name:14s} {seconds * 1e3:9.1f} ms", flush=True)
      if name == "standard":  # T plain Adam steps of the same model
        f = trainer.functional
        inner, _ = task_obj.split_episode(
            jax.tree.map(lambda x: x[0], batch), T)
        theta0 = trainer.spec.theta0(eta, trainer.theta_init)
        adapt = jax.jit(metaflow.inner_loop(f.inner_loss, f.optimizer, T,
                                            "standard"))
        row["adam_T_steps_s_median"] = median_seconds(
            lambda: adapt(eta, theta0, inner), repeats)
        print(f"{preset} {T} Adam steps   "
              f"{row['adam_T_steps_s_median'] * 1e3:9.1f} ms", flush=True)
    for c in row["columns"].values():
      c["ratio_to_standard"] = (c["step_s_median"]
                                / row["columns"]["standard"]["step_s_median"])
      c["ratio_to_adam_T_steps"] = (c["step_s_median"]
                                    / row["adam_T_steps_s_median"])
    _append(path, row)
  return read_rows(path)


# ------------------------------------------------------------------ plots
_AXIS_LABELS = {"preset": "parameters (M)", "T": "inner steps T",
                "B": "sequences B", "L": "sequence length L"}


def plot_paper(rows: list[dict], plt):
  """Temp memory against each swept axis (one row of panels per task), one
  line per column, the HVP floor dashed."""
  task_names = list(dict.fromkeys(r["task"] for r in rows))
  axes_names = [a for a in PAPER_AXES
                if len({r[a] for r in rows}) > 1] or ["T"]
  fig, axs = plt.subplots(len(task_names), len(axes_names), squeeze=False,
                          figsize=(3.6 * len(axes_names),
                                   3.0 * len(task_names)))
  for i, task in enumerate(task_names):
    for j, axis in enumerate(axes_names):
      ax = axs[i][j]
      others = [a for a in PAPER_AXES if a != axis]
      line = sorted((r for r in rows if r["task"] == task and all(
          r[a] == PAPER_BASE[a] for a in others)),
          key=lambda r: r["num_params"] if axis == "preset" else r[axis])
      if not line:  # not the paper grid (quick): every row of the task
        line = sorted((r for r in rows if r["task"] == task),
                      key=lambda r: r[axis] if axis != "preset"
                      else r["num_params"])
      xs = [r["num_params"] / 1e6 if axis == "preset" else r[axis]
            for r in line]
      for name in COLUMNS:
        ax.plot(xs, [r["columns"][name]["temp_bytes"] / _GIB for r in line],
                marker="o", ms=3, label=name)
      ax.plot(xs, [r["floor"]["hvp_remat_blocks"] / _GIB for r in line],
              "k--", lw=1, label="floor: one HVP (block remat)")
      ax.set_yscale("log")
      if axis in ("T", "B", "L"):
        ax.set_xscale("log", base=2)
      ax.set_xlabel(_AXIS_LABELS[axis])
      if j == 0:
        ax.set_ylabel(f"{task}\ncompiled temp GiB")
  axs[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
  return fig


def plot_largest(rows: list[dict], plt):
  """Parameters of the largest preset that fits, per budget and mesh, one
  bar per column ("+": the ladder's largest fits); one panel per T."""
  steps = sorted({r["T"] for r in rows})
  fig, axs = plt.subplots(1, len(steps), squeeze=False,
                          figsize=(6.5 * len(steps), 3.6))
  for ax, T in zip(axs[0], steps):
    groups = [(d, g) for d in LARGEST["devices"]
              for g in LARGEST["budgets_gib"]]
    width = 0.8 / len(COLUMNS)
    for i, name in enumerate(COLUMNS):
      values, capped = [], []
      for d, g in groups:
        r = next((r for r in rows if (r["T"], r["devices"], r["column"])
                  == (T, d, name)), None)
        entry = r["budgets"][str(g)] if r else {}
        values.append((entry.get("num_params") or 0) / 1e6)
        capped.append(bool(entry.get("at_limit")))
      xs = [k + i * width for k in range(len(groups))]
      ax.bar(xs, values, width, label=name)
      for x, v, top in zip(xs, values, capped):
        if top:  # the ladder's largest preset fits: a lower bound
          ax.text(x, v, "+", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(groups))])
    ax.set_xticklabels([f"{g} GiB\n{d} dev" for d, g in groups], fontsize=7)
    ax.set_ylabel("largest preset that fits\n(M parameters, byte vocabulary)")
    ax.set_title(f"T={T}, L={LARGEST['L']}, B={LARGEST['B']} per device")
  axs[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
  return fig


# ------------------------------------------------------------------- main
def run(sweep: str, out: str, repeats: int = 5) -> list[dict]:
  """Runs (or resumes) ``sweep`` into ``out``; returns all its rows."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f"sweep_{sweep}.jsonl")
  print(f"sweep {sweep} -> {path} (jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, {jax.device_count()} devices)",
        flush=True)
  if sweep in ("paper", "quick"):
    points = paper_points() if sweep == "paper" else list(QUICK_POINTS)
    rows = run_points(points, path)
    save_plot(rows, plot_paper, os.path.join(out, f"sweep_{sweep}.png"))
  elif sweep == "largest":
    rows = run_largest(path)
    save_plot(rows, plot_largest, os.path.join(out, "sweep_largest.png"))
  elif sweep == "time":
    rows = run_time(path, repeats)
  else:
    raise ValueError(f"unknown sweep {sweep!r}; expected one of {SWEEPS}")
  return rows


#: Sweeps that only compile: code generation without optimisation (the
#: buffer assignment is made before it).
_FAST_COMPILE = ("--xla_backend_optimization_level=0",)


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """The flags of a command line (``argv`` without the program name).

  Raises:
    UsageError: bad input.
  """
  fv = flags.FlagValues()
  flags.DEFINE_enum("sweep", None, SWEEPS, "The sweep: paper (Table 1), "
                    "largest (Table 2), time, quick (two small points); "
                    "resumable, one JSON line per point in "
                    "OUT/sweep_NAME.jsonl.", flag_values=fv)
  flags.DEFINE_string("out", "experiments/paper_sweep", "Folder of the JSON "
                      "lines and the plots.", flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "Timed meta-gradients per column of "
                       "the time sweep (median reported).", lower_bound=1,
                       flag_values=fv)
  _cli.parse_flags(fv, ["experiments.paper_sweep", *argv], __doc__,
                   passthrough=False, required=("sweep",), outputs=("out",))
  return fv


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point (``argv`` without the program name; default
  ``sys.argv[1:]``): the exit status; bad input is one ``error: ...`` line on
  stderr, status 2. Starts JAX's backend with the devices and compile flags
  the sweep needs (in a process where JAX has started already, ``largest``
  needs it to have 64 devices)."""
  return _cli.call_main(_main, argv)


def _main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  devices = max(LARGEST["devices"]) if args.sweep == "largest" else 0
  _cli.start_backend(devices, () if args.sweep == "time" else _FAST_COMPILE)
  run(args.sweep, args.out, args.repeats)
  return 0
