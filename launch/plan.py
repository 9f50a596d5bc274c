"""What fits a memory budget: the strategy table and the largest T, L, model.

    python -m launch.plan --task lm_loss_weighting [--config FILE] \\
        [--config.task.seq_len=256 ...] [--budget 16GiB] [--out plan_results] \\
        [--search quick|full] [--max_steps 4096] \\
        [--searches num_inner_steps,seq_len,preset] [--max_probes N] \\
        [--host_devices N]

The config is read as ``launch.train`` reads it (``launch/configs/<task>.py``
by default, ``--config.key=value`` overrides); the budget is ``--budget``, else
``config.memory_budget``, else 16GiB, per device. Everything is compiled
shapes-only (``BilevelTrainer(shapes_only=True)``: no model is initialised and
nothing runs), so presets far larger than this machine's memory are planned in
seconds each. What is measured, per device of the config's mesh:

1. Every candidate strategy of ``--strategy auto`` (`metaflow.planner.
   candidates`, fastest first) at the config's shapes: XLA's compiled memory of
   the whole jitted meta-step (`BilevelTrainer.compiled_memory(whole_step=
   True)`: arguments + outputs + temporaries - aliased, the figure ``auto``
   compares with the budget), split into static (the stored carries) and
   dynamic. The verdict is the first that fits: what ``--strategy auto
   --config.memory_budget=BUDGET`` chooses (with segments, its schedule,
   stored levels and recompute factor: the inner loop's forward passes per
   meta-step, relative to none).
2. With the candidate of the smallest total there (the "probe strategy"), the
   largest value that still fits of each of (``--searches``):
   ``num_inner_steps`` (T, up to ``--max_steps``), and for the language-model
   tasks ``seq_len`` (L, in steps of 8 from the config's, up to the preset's
   max_length, 131072 for most: on random bytes, ``data_path=synthetic``,
   since shapes do not depend on the text; with blockwise attention, the
   default above 512 tokens, memory grows about linearly in L) and
   ``preset`` (the largest of `tasks.lm.model.PRESETS`, in their order of
   size, from the config's, at its T, B and L), each other setting as in the
   config. A search assumes memory grows with the value; it
   interpolates between the figures compiled (memory is close to affine in T
   and in the parameter count) and stops when the next value up is known not
   to fit, or after ``--max_probes`` compiles (the answer is then a lower
   bound, marked so, with the smallest value known not to fit).
   ``--search quick`` (the default: a minute or two on 2 CPU cores) compiles
   each search's limit first and at most 2 probes per search, so a search
   ends with the limit, the interpolated value (a lower bound) or none;
   ``--search full`` (minutes) starts next to the config's value and
   compiles up to 8 (``--max_probes N`` sets either's count). Since
   ``auto`` also tries the probe strategy (and more candidates at larger
   T), ``auto`` fits wherever the probe strategy does: each largest value
   is one ``auto`` fits, and a lower bound of auto's own.
   If even the config does not fit, each largest value is none.

Prints the report on stdout (the settings, the table, the verdict, each
search's result as it ends) and, as it goes, one progress line per compile
on stderr (``launch.plan: [N] what: total bytes, fits or not, seconds``),
and one per search started. Writes ``OUT/plan.json``: task, budget_bytes,
config, search (its mode and probes), candidates (static, dynamic and total
bytes per device, fits, recompute_factor), choice, probe_strategy, largest
(each with its total_bytes and the probes compiled) and compile_seconds.

The figures are XLA's buffer assignment for this backend. On XLA:CPU that is
the compiler's plan for a CPU, not a measurement on an accelerator: a TPU or
GPU compiler fuses and schedules differently, and its allocator adds
fragmentation and runtime buffers, so keep a margin (plan with a budget below
the device's memory). When this command starts JAX itself it compiles with
XLA's ``--xla_backend_optimization_level=0`` (LLVM code generation without
optimisation, about twice as fast to compile on CPU); the buffer assignment is
made before code generation, so the figures are those of a default compile.
``--host_devices N`` makes N CPU host devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=N``) so that a mesh of N devices
(``--config.mesh.data=D --config.mesh.fsdp=F``, D x F = N) can be planned on
a laptop. A mesh of explicit sizes uses that many of the devices (the first);
``-1`` for an axis means the rest of all the devices, as in ``launch.train``.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from absl import flags

from launch import _config
from launch._cli import (
  UsageError,
  flag_value,
  one_line,
  parse_flags,
  start_backend,
  wants_help,
)

if TYPE_CHECKING:
  import jax
  import ml_collections

  from metaflow import memory
  from metaflow.trainer import BilevelTrainer

#: What `largest_fitting` can search, in the order they are reported.
SEARCHES = ("num_inner_steps", "seq_len", "preset")
#: The budget when neither --budget nor config.memory_budget gives one.
DEFAULT_BUDGET = "16GiB"
#: seq_len is searched in steps of this many bytes.
SEQ_LEN_STEP = 8
#: ``--search``: the most compiles per search (unless ``--max_probes`` says)
#: and whether a search compiles its limit first. quick is the default.
SEARCH_MODES = {"quick": (2, True), "full": (8, False)}
#: XLA flag: no LLVM optimisation (the buffer assignment is made before it).
_FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


# ------------------------------------------------------------------ search
@dataclasses.dataclass
class Search:
  """A `largest_fitting` result, by index into its ``coords``.

  Attributes:
    best: the largest index known to fit; None when index 0 does not.
    totals: every compiled figure, index -> total bytes (None: it could not
      be built, `errors` says why; counted as not fitting).
    errors: index -> why it could not be built.
    capped: the probes ran out before the next index up was known not to
      fit: ``best`` is a lower bound.
  """
  best: Optional[int]
  totals: dict[int, Optional[int]]
  errors: dict[int, str]
  capped: bool

  def next_above(self) -> Optional[int]:
    """The smallest index compiled above ``best`` (it does not fit)."""
    above = [k for k in self.totals if self.best is None or k > self.best]
    return min(above) if above else None


def largest_fitting(measure: Callable[[int], Optional[int]],
                    coords: Sequence[float], budget: int, base_total: int,
                    max_probes: int = 8, top_first: bool = False) -> Search:
  """The largest index ``k`` of ``coords`` with ``measure(k) <= budget``.

  ``measure(k)`` is the compiled total bytes at the k-th value (None: it
  cannot be built; treated as not fitting); it is assumed to grow with k.
  ``coords`` (increasing) place the values on an axis along which memory is
  about affine (the value itself, or a parameter count): the next index is
  the one where the line through the closest figures meets the budget
  (extrapolated while nothing is known not to fit, the value doubled when
  one figure is known; inside the bracket with the Illinois rule, which keeps
  a curved figure from being approached from one side only), clamped into
  the open bracket. ``base_total`` is ``measure(0)``, already known.
  ``top_first``: the first call is the last index (the search's limit), so
  that a limit that fits ends the search at once and one that does not
  brackets it (a search of few probes).

  Args:
    measure: index -> compiled total bytes per device, or None.
    coords: increasing positions of the values (``len(coords) >= 1``).
    budget: bytes per device.
    base_total: ``measure(0)``.
    max_probes: the most calls of ``measure``.
    top_first: measure the last index first.

  Returns:
    A `Search`; ``best`` None when the base does not fit.
  """
  totals, errors = {0: base_total}, {}
  if base_total > budget:
    return Search(None, totals, errors, capped=False)
  last = len(coords) - 1
  lo, hi, probes = 0, None, 0
  # Illinois rule: a bracket end kept twice in a row weighs half as much in
  # the interpolation (regula falsi alone creeps up on a curved figure).
  weight, kept = {"lo": 1.0, "hi": 1.0}, None

  def fits(k):
    return totals[k] is not None and totals[k] <= budget

  def index_at(target, low, high):
    return min(max(bisect.bisect_right(coords, target) - 1, low), high)

  while lo < last and (hi is None or hi - lo > 1):
    if probes >= max_probes:
      return Search(lo, totals, errors, capped=True)
    if top_first and probes == 0:
      k = last
    elif hi is None:  # extrapolate from the two largest figures that fit
      below = [k for k in totals if k < lo and fits(k)]
      rise = totals[lo] - totals[max(below)] if below else 0
      if rise > 0:
        slope = rise / (coords[lo] - coords[max(below)])
        target = coords[lo] + (budget - totals[lo]) / slope
      else:
        target = 2 * coords[lo] if coords[lo] > 0 else coords[lo] + 1
      k = index_at(target, lo + 1, last)
    elif totals[hi] is None or totals[hi] <= totals[lo]:
      k = (lo + hi) // 2
    else:  # interpolate inside the bracket
      below = (budget - totals[lo]) * weight["lo"]
      above = (totals[hi] - budget) * weight["hi"]
      target = coords[lo] + (coords[hi] - coords[lo]) * below / (below + above)
      k = index_at(target, lo + 1, hi - 1)
    try:
      totals[k] = measure(k)
    except (ValueError, TypeError) as e:
      totals[k], errors[k] = None, one_line(e)
    probes += 1
    side = "lo" if fits(k) else "hi"
    if side == "lo":
      lo = k
    else:
      hi = k
    other = "hi" if side == "lo" else "lo"
    weight[side] = 1.0
    if kept == other:  # the other end was kept again
      weight[other] /= 2
    kept = other
  return Search(lo, totals, errors, capped=False)


# ------------------------------------------------------------ the trainers
def make_mesh(config: "ml_collections.ConfigDict") -> "jax.sharding.Mesh":
  """The config's mesh for planning: explicit sizes D x F use the first D x F
  devices; with -1 for an axis, every device (as `launch.train.build`).

  Raises:
    ValueError: sizes the devices cannot make (with the --host_devices hint).
  """
  import jax

  from metaflow import sharding

  data, fsdp = config.mesh.data, config.mesh.fsdp
  devices = jax.devices()
  if isinstance(data, int) and isinstance(fsdp, int) and data > 0 and fsdp > 0:
    devices = devices[:data * fsdp]
  try:
    return sharding.make_mesh(data=data, fsdp=fsdp, devices=devices)
  except ValueError as e:
    raise ValueError(f"{str(e).rstrip('.')}; --host_devices N makes N CPU "
                     "devices to plan a larger mesh.") from None


def build_trainer(task_name: str, config: "ml_collections.ConfigDict",
                  mesh: "jax.sharding.Mesh", strategy,
                  num_inner_steps: int, **task_overrides) -> "BilevelTrainer":
  """The shapes-only `BilevelTrainer` that `launch.train.build` makes of
  ``config`` with ``strategy``, T = ``num_inner_steps`` and the task's fields
  replaced by ``task_overrides`` (e.g. ``seq_len=256``)."""
  from metaflow.estimators import Strategy

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.strategy = Strategy.parse(strategy).name
    config.memory_budget = ""
    config.inner_steps = num_inner_steps
    for key, value in task_overrides.items():
      config.task[key] = value
  return _config.build(task_name, config, mesh=mesh, shapes_only=True)


def _progress(message: str) -> None:
  """One progress line on stderr, at once (stdout carries the report)."""
  print(f"launch.plan: {message}", file=sys.stderr, flush=True)


class _Clock:
  """Runs the compiles, reports each as it ends (`_progress`), and counts
  them and their seconds."""

  def __init__(self, budget: int):
    self.budget, self.seconds, self.count = budget, 0.0, 0

  def memory(self, what: str,
             compile_memory: Callable[[], "memory.MemoryReport"]
             ) -> "memory.MemoryReport":
    """``compile_memory()`` (a build and a compile), reported as ``what``.

    Raises:
      ValueError, TypeError: as ``compile_memory`` (reported first).
    """
    self.count += 1
    start = time.perf_counter()
    try:
      report = compile_memory()
    except (ValueError, TypeError) as e:
      seconds = time.perf_counter() - start
      _progress(f"[{self.count}] {what}: cannot be built ({seconds:.1f} s): "
                f"{one_line(e)}")
      raise
    finally:
      self.seconds += time.perf_counter() - start
    seconds = time.perf_counter() - start
    fits = "fits" if report.total_bytes <= self.budget else "does not fit"
    _progress(f"[{self.count}] {what}: {_fmt(report.total_bytes)}, {fits}, "
              f"{seconds:.1f} s")
    return report


# ------------------------------------------------------------------ report
def _fmt(n: Optional[int]) -> str:
  from metaflow.memory import format_bytes
  return "-" if n is None else format_bytes(n)


def _largest_entry(search: Search, values: Sequence, strategy: str,
                   unit: str) -> dict:
  """The JSON entry of one search (``values[k]`` is the k-th value)."""
  above = search.next_above()
  best = search.best
  return {
      "value": None if best is None else values[best],
      "total_bytes": None if best is None else search.totals[best],
      "next_value": None if above is None else values[above],
      "next_total_bytes": None if above is None else search.totals[above],
      "next_error": search.errors.get(above),
      "limit": values[-1], "at_limit": best == len(values) - 1,
      "capped": search.capped, "strategy": strategy, "step": unit,
      "compiles": len(search.totals) - 1,
      "probes": [{"value": values[k], "total_bytes": t,
                  "fits": best is not None and k <= best,
                  **({"error": search.errors[k]} if k in search.errors else {})}
                 for k, t in sorted(search.totals.items())],
  }


def _summary(name: str, entry: dict) -> str:
  """One line: the largest value of a search and its figure."""
  if entry["value"] is None:
    base = entry["probes"][0]
    return (f"largest {name}: none (even the config's {base['value']} needs "
            f"{_fmt(base['total_bytes'])})")
  line = f"largest {name}: {entry['value']} ({_fmt(entry['total_bytes'])})"
  if entry["capped"]:
    line += (f", at least: the search stopped after {entry['compiles']} "
             "compiles (--search full or more --max_probes search further)")
    if entry["next_value"] is not None:
      line += (f"; {entry['next_value']} needs "
               f"{_fmt(entry['next_total_bytes'])}")
  elif entry["at_limit"]:
    line += f", the search's limit {entry['limit']}"
  elif entry["next_error"]:
    line += f"; {entry['next_value']} cannot be built: {entry['next_error']}"
  else:
    line += (f"; {entry['next_value']} needs "
             f"{_fmt(entry['next_total_bytes'])}")
  return line


# -------------------------------------------------------------------- plan
def _parse(argv: Sequence[str]):
  """The flags and the config of a command line (without the program name).

  ``--help`` prints the usage, the flags and the registered tasks (with
  ``--task``, its config's keys) and exits.

  Raises:
    UsageError: bad flags, task, config file, key or value.
  """
  from ml_collections import config_flags

  argv = ["launch.plan", *argv]
  if not wants_help(argv):
    argv = _config.prepare_argv(argv)  # --task, the --config file, its keys
  fv = flags.FlagValues()
  flags.DEFINE_string("task", None, "Registered task name.", flag_values=fv)
  flags.DEFINE_string("budget", None, "Memory per device, e.g. 16GiB, 80GB "
                      "(default: config.memory_budget, else "
                      f"{DEFAULT_BUDGET}).", flag_values=fv)
  flags.DEFINE_string("out", "plan_results", "Folder for plan.json.",
                      flag_values=fv)
  flags.DEFINE_enum("search", "quick", list(SEARCH_MODES), "quick: each "
                    "search compiles its limit first and at most "
                    f"{SEARCH_MODES['quick'][0]} probes (a minute or two on "
                    "2 CPU cores); full: from the config's value up, at most "
                    f"{SEARCH_MODES['full'][0]} probes per search.",
                    flag_values=fv)
  flags.DEFINE_integer("max_steps", 4096, "Largest T the T search tries.",
                       flag_values=fv)
  flags.DEFINE_list("searches", list(SEARCHES), "Which largest values to "
                    f"search (comma-separated; some of {', '.join(SEARCHES)}; "
                    "empty: only the table).", flag_values=fv)
  flags.DEFINE_integer("max_probes", None, "Most compiles per search "
                       "(default: --search's).", flag_values=fv)
  flags.DEFINE_integer("host_devices", 0, "Make N CPU host devices (sets "
                       "XLA_FLAGS before JAX starts).", flag_values=fv)
  config_flags.DEFINE_config_file(
      "config", None, "ml_collections config file (default: "
      "launch/configs/<task>.py).", flag_values=fv, lock_config=True,
      sys_argv=argv)
  parse_flags(fv, argv, __doc__, passthrough=False, required=("task",),
              outputs=("out",),
              help_extra=lambda: _config.task_help(flag_value(argv, "task")))
  unknown = sorted(set(fv.searches) - set(SEARCHES))
  if unknown:
    raise UsageError(f"unknown --searches {', '.join(unknown)}; expected some "
                     f"of {', '.join(SEARCHES)}.")
  if fv.max_probes is None:
    fv.max_probes = SEARCH_MODES[fv.search][0]
  for name, low in (("max_steps", 1), ("max_probes", 0), ("host_devices", 0)):
    if fv[name].value < low:
      raise UsageError(f"--{name} must be >= {low}, got {fv[name].value}.")
  return fv, fv.config


def plan(argv: Sequence[str]) -> dict:
  """Compiles the table and the searches of a command line (no program name
  in ``argv``), prints them, writes ``plan.json`` and returns its content.

  Raises:
    UsageError: bad input (flags, config, budget, a config that cannot be
      built).
  """
  from metaflow import planner

  start = time.perf_counter()
  fv, config = _parse(argv)
  try:
    budget = planner.parse_bytes(fv.budget or config.memory_budget
                                 or DEFAULT_BUDGET)
  except ValueError as e:
    raise UsageError(f"--budget: {e}") from None
  start_backend(fv.host_devices, [_FAST_COMPILE_FLAG])

  import jax

  from metaflow import sharding

  task_name, clock = fv.task, _Clock(budget)
  max_probes, top_first = fv.max_probes, SEARCH_MODES[fv.search][1]
  lm = "seq_len" in config.task and "preset" in config.task
  T = config.inner_steps
  with jax.enable_x64(bool(config.x64)):
    try:
      mesh = make_mesh(config)
      trainer = build_trainer(task_name, config, mesh, "mixflow", T)
    except (ValueError, TypeError, OSError, ImportError) as e:
      raise UsageError(one_line(e)) from None
    settings = {"num_inner_steps": T, "meta_batch_size": config.meta_batch_size,
                "batch_size": config.task.get("batch_size"),
                "seq_len": config.task.get("seq_len"),
                "preset": config.task.get("preset"),
                "mesh": {"data": int(mesh.shape[sharding.DATA]),
                         "fsdp": int(mesh.shape[sharding.FSDP]),
                         "devices": int(mesh.size)},
                "x64": bool(config.x64)}
    if lm:
      from tasks.lm import model as lm_model
      settings["num_params"] = lm_model.num_params(trainer.task.model_config)
    print(f"launch.plan {task_name} on {jax.devices()[0].platform} (jax "
          f"{jax.__version__}): T={T}, meta-batch {config.meta_batch_size}"
          + (f", preset {settings['preset']} ({settings['num_params']:,} "
             f"parameters), B={settings['batch_size']}, L={settings['seq_len']}"
             if lm else "")
          + f"; mesh {sharding.describe(mesh)}; budget {_fmt(budget)} per "
          "device.", flush=True)

    # 1. Every candidate of --strategy auto (as BilevelTrainer resolves it).
    rows = []
    options, refused = trainer.strategy_candidates()
    skipped = [{"strategy": name, "reason": one_line(reason)}
               for name, reason in refused.items()]
    if options:
      _progress(f"compiling the {len(options)} candidates of --strategy auto "
                f"at T={T}, fastest first")
    for i, s in enumerate(options):
      report = clock.memory(
          f"candidate {i + 1}/{len(options)} {s.name}",
          lambda s=s: trainer.memory_with(s))
      rows.append(planner.Candidate(s, report, report.total_bytes <= budget))
    if not rows:
      raise UsageError(f"task {task_name!r} supports none of the candidate "
                       f"strategies: {'; '.join(s['reason'] for s in skipped)}")
    print(planner.table(rows, budget))
    for s in skipped:
      print(f"{s['strategy']:56s} skipped: {s['reason']}")
    choice = next((r.strategy.name for r in rows if r.fits), None)
    leanest = min(rows, key=lambda r: r.memory.total_bytes)
    probe = leanest.strategy.name
    if choice:
      chosen = next(r for r in rows if r.fits)
      recomputed = planner.recomputation(chosen.strategy, T)
      print(f"verdict: --strategy auto with a budget of {_fmt(budget)} "
            f"chooses {choice} ({_fmt(chosen.memory.total_bytes)} per device"
            + (f"; {recomputed}" if recomputed else "") + ").")
    else:
      recomputed = planner.recomputation(leanest.strategy, T)
      print(f"verdict: nothing fits {_fmt(budget)} per device: the leanest, "
            f"{probe}" + (f" ({recomputed})" if recomputed else "")
            + f", needs {_fmt(leanest.memory.total_bytes)}; "
            f"{planner.fit_hint(T)}.", flush=True)

    # 2. The largest T, L and preset with the leanest strategy.
    def measure(name, value):
      change = {name: value}
      steps = change.pop("num_inner_steps", T)
      if name == "seq_len":
        # Shapes do not depend on the text, and no bundled text is long
        # enough for the presets' longest sequences: random bytes.
        from tasks.lm import text as lm_text
        change.update(data_path=lm_text.SYNTHETIC)
        if "target_path" in config.task:
          change.update(target_path="")

      def compile_memory():
        t = build_trainer(task_name, config, mesh, probe, steps, **change)
        return t.memory_with(t.strategy)

      return clock.memory(f"{name}={value}", compile_memory).total_bytes

    axes = {}  # name -> (values, coords, step)
    if "num_inner_steps" in fv.searches:
      values = range(T, max(T, fv.max_steps) + 1)
      axes["num_inner_steps"] = (values, values, "1")
    if lm and "seq_len" in fv.searches:
      from tasks.lm import model as lm_model
      top = lm_model.PRESETS[config.task.preset].max_length
      values = range(config.task.seq_len, max(config.task.seq_len, top) + 1,
                     SEQ_LEN_STEP)
      axes["seq_len"] = (values, values, str(SEQ_LEN_STEP))
    if lm and "preset" in fv.searches:
      from tasks.lm import model as lm_model
      names = list(lm_model.PRESETS)
      values = [p for p in names[names.index(config.task.preset):]
                if lm_model.PRESETS[p].max_length >= config.task.seq_len]
      sizes = [lm_model.num_params(lm_model.PRESETS[p]) for p in values]
      axes["preset"] = (values, sizes, "the next preset")
    if axes:
      print(f"largest values that fit with the probe strategy {probe} (the "
            "leanest above), one setting changed at a time:", flush=True)
    searches = {}
    base_total = leanest.memory.total_bytes
    for name, (values, coords, step) in axes.items():
      _progress(f"search {name}: {values[0]} to {values[-1]} with {probe}, "
                f"at most {max_probes} compiles (--search {fv.search}"
                + (", the limit first)" if top_first else ")"))
      found = largest_fitting(
          lambda k, name=name, values=values: measure(name, values[k]),
          coords, budget, base_total, max_probes, top_first)
      searches[name] = _largest_entry(found, values, probe, step)
      print("  " + _summary(name, searches[name]), flush=True)
    largest = {name: searches.get(name) for name in SEARCHES}
  seconds = time.perf_counter() - start
  print(f"{clock.count} shapes-only compiles in {clock.seconds:.1f} s "
        f"({seconds:.1f} s in all). XLA:{jax.devices()[0].platform}'s buffer "
        "assignment, not a measurement on an accelerator: keep a margin.")
  result = {
      "task": task_name, "budget_bytes": budget, "config": settings,
      "search": {"mode": fv.search, "max_probes": max_probes,
                 "top_first": top_first, "max_steps": fv.max_steps,
                 "searches": list(axes)},
      "candidates": [{**r.as_dict(),
                      "recompute_factor": r.strategy.recompute_factor(T)}
                     for r in rows],
      "skipped": skipped, "choice": choice, "probe_strategy": probe,
      "largest": largest, "compile_seconds": clock.seconds,
      "compiles": clock.count, "wall_seconds": seconds,
      "backend": jax.devices()[0].platform, "jax": jax.__version__,
  }
  os.makedirs(fv.out, exist_ok=True)
  path = os.path.join(fv.out, "plan.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
  return result


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point (``argv`` without the program name; default
  ``sys.argv[1:]``): bad input is reported as ``error: ...`` with exit status
  2."""
  try:
    plan(sys.argv[1:] if argv is None else list(argv))
  except UsageError as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
