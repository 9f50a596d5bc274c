"""Memory and speed of every gradient strategy on the language-model tasks.

    python -m launch.benchmark_lm [--tasks lm_loss_weighting] [--preset tiny] \\
        [--steps 4] [--batch 4] [--seq_len 512] [--attention auto] \\
        [--repeats 5] [--out DIR]

For each task x T x B x L x strategy it builds the `BilevelTrainer` the
command line would (meta-batch of one episode: T inner batches of B sequences
of L bytes, inner Adam, one outer batch), compiles its meta-gradient and
reports XLA's compiled temp memory (static = T copies of (theta, mu, nu), and
dynamic, see `metaflow.memory`) with the ratio standard/strategy; with
``--repeats N > 0`` also the median wall-clock time of N meta-gradients after
warm-up and its ratio to standard's, measured in the same run. Memory needs
shapes only, so large presets can be analysed without running them
(``--repeats 0``), at any L up to the presets' 131072 (``--attention
blockwise``, the default above 512 tokens, keeps the meta-gradient's memory
linear in L; the batches are random bytes unless ``--data_path`` names
text). Writes ``benchmark_lm.json`` and ``benchmark_lm.png``.
An approximate strategy that a task's meta-parameters cannot use (implicit
with learned learning rates, first_order with loss weights) is skipped with
the reason; lm_maml gets iMAML's proximal term (``--proximal``) so that
implicit applies.

``--mesh data=D,fsdp=F`` compiles each meta-gradient for that device mesh
(`metaflow.sharding`: the B sequences split over all D x F devices, theta and
the stored carries over fsdp) and reports per-device memory next to the
one-device figures of the same configuration (compiled in the same run) and
their ratios. On a CPU, ``--host_devices N`` makes N host devices (it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts):

    python -m launch.benchmark_lm --tasks lm_maml --preset chinchilla_57m \\
        --steps 4 --batch 8 --seq_len 2048 --repeats 0 \\
        --host_devices 8 --mesh data=1,fsdp=8

The paper's predefined sweeps (Table 1's grid, the largest model that fits,
step times) are ``python -m experiments.paper_sweep``.
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Optional, Sequence

import jax
from absl import flags

import metaflow
import tasks  # noqa: F401  (registers the built-in tasks)
from launch import _cli
from launch.benchmark import (
  check_common_args,
  define_strategies,
  median_seconds,
  write_results,
)
from metaflow import data, sharding
from tasks.lm import model as lm_model

_MIB = 2.0**20
#: The language-model tasks (`experiments.paper_sweep` sweeps them too).
LM_TASKS = ("lm_learned_lr", "lm_maml", "lm_loss_weighting")


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """The flags of a command line (``argv`` without the program name).

  Raises:
    UsageError: bad input.
  """
  fv = flags.FlagValues()
  _cli.define_parsed("tasks", "lm_loss_weighting",
                     _cli.names_in(LM_TASKS, "task(s)"),
                     "Comma-separated tasks: " + ", ".join(LM_TASKS) + ".", fv,
                     syntax="tasks")
  define_strategies(fv)
  flags.DEFINE_float("proximal", 1.0, "lm_maml's proximal strength (iMAML's "
                     "term, which implicit needs).", lower_bound=0.0,
                     flag_values=fv)
  flags.DEFINE_enum("preset", "tiny", list(lm_model.PRESETS),
                    "Model preset (tasks.lm.model.PRESETS).", flag_values=fv)
  _cli.define_parsed("steps", "4", _cli.positive_ints,
                     "Inner steps T (comma-separated).", fv, syntax="ints")
  _cli.define_parsed("batch", "4", _cli.positive_ints,
                     "Sequences per inner step B (comma-separated).", fv,
                     syntax="ints")
  _cli.define_parsed("seq_len", "512", _cli.positive_ints,
                     "Sequence lengths L (comma-separated).", fv,
                     syntax="ints")
  flags.DEFINE_enum("compute_dtype", "", ["", "bfloat16"], "Activations' "
                    "dtype (empty: the parameters').", flag_values=fv)
  flags.DEFINE_boolean("remat_blocks", False, "jax.checkpoint around each "
                       "transformer block.", flag_values=fv)
  _cli.define_parsed("attention", "auto",
                     _cli.names_in(lm_model.ATTENTION, "attention(s)"),
                     "The transformer's attention, comma-separated to compare "
                     "in one run: dense ([heads, L, L] scores), blockwise "
                     "(metaflow.blockwise_attention: memory linear in L) or "
                     f"auto (blockwise above {lm_model.BLOCKWISE_ABOVE} "
                     "tokens).", fv, syntax="attention")
  flags.DEFINE_integer("attention_block", 512, "Tokens per tile of blockwise "
                       "attention.", lower_bound=1, flag_values=fv)
  flags.DEFINE_string("data_path", "synthetic", "Text file(s) for the batches "
                      "(empty: the embedded corpus; synthetic: random bytes, "
                      "any L: memory and time do not depend on the bytes).",
                      flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "Timed meta-gradients per configuration "
                       "(0: memory only, nothing runs).", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_string("out", "benchmark_results", "Folder for "
                      "benchmark_lm.json and benchmark_lm.png.",
                      flag_values=fv)
  _cli.define_parsed("mesh", None, _mesh, "data=D,fsdp=F: per-device memory "
                     "on that mesh, next to one device's (default: one device "
                     "only).", fv, syntax="data=D,fsdp=F")
  flags.DEFINE_integer("host_devices", 0, "Make N CPU host devices for --mesh "
                       "(sets XLA_FLAGS before JAX starts).", lower_bound=0,
                       flag_values=fv)
  _cli.parse_flags(fv, ["launch.benchmark_lm", *argv], __doc__,
                   passthrough=False, outputs=("out",))
  return check_common_args(fv)


def _mesh(text: str) -> dict[str, int]:
  """``"data=1,fsdp=8"`` -> ``{"data": 1, "fsdp": 8}``."""
  try:
    sizes = {k.strip(): int(v) for k, v in
             (part.split("=") for part in text.split(","))}
  except ValueError:
    raise ValueError(f"expected data=D,fsdp=F, got {text!r}.") from None
  if not set(sizes) <= {"data", "fsdp"}:
    raise ValueError(f"mesh axes are data and fsdp, got {sorted(sizes)}.")
  return sizes


def measure(task: metaflow.Task, num_steps: int, strategy: metaflow.Strategy,
            repeats: int, mesh=None) -> dict:
  """Compiled memory (and, with ``repeats``, the median step time) of one
  meta-gradient of ``task`` with ``strategy``; one row of the table. With a
  ``mesh`` (`metaflow.sharding.make_mesh` sizes) the figures are per device
  of that mesh, and ``one_device`` holds the one-device memory."""
  one_device = sharding.make_mesh(devices=jax.devices()[:1])
  trainer = metaflow.BilevelTrainer(
      task, strategy=strategy, num_inner_steps=num_steps, meta_batch_size=1,
      mesh=one_device if mesh is None else sharding.make_mesh(**mesh))
  start = time.perf_counter()
  mem = trainer.compiled_memory()
  row = {"strategy": strategy.name, "compile_s": time.perf_counter() - start,
         "mesh": sharding.describe(trainer.mesh), **mem.as_dict()}
  if mesh is not None:
    one = metaflow.BilevelTrainer(
        task, strategy=strategy, num_inner_steps=num_steps, meta_batch_size=1,
        mesh=one_device).compiled_memory()
    row["one_device"] = one.as_dict()
    row["temp_ratio_one_device"] = one.temp_bytes / mem.temp_bytes
    row["static_ratio_one_device"] = one.static_bytes / mem.static_bytes
  if repeats:
    eta = trainer.init_state().eta
    batch = data.take(task.episodes("train", 0, num_steps), 1)
    row["step_s_median"] = median_seconds(
        lambda: trainer.meta_value_and_grad(eta, batch), repeats)
  return row


def run(args: flags.FlagValues) -> list[dict]:
  rows = []
  header = (f"{'task':18s} {'strategy':34s} {'T':>2s} {'B':>2s} {'L':>6s} "
            f"{'attention':>9s} {'temp MiB':>9s} {'static':>7s} "
            f"{'dynamic':>8s} "
            f"{'std/this':>8s} {'compile s':>9s} {'step ms':>8s} "
            f"{'time/std':>8s}")
  print(header)
  print("-" * len(header))
  for name in args.tasks:
    for num_steps in args.steps:
      for batch in args.batch:
        for seq_len, attention in itertools.product(args.seq_len,
                                                    args.attention):
          task = metaflow.create_task(
              name, preset=args.preset, seq_len=seq_len, batch_size=batch,
              compute_dtype=args.compute_dtype, data_path=args.data_path,
              remat_blocks=args.remat_blocks, attention=attention,
              attention_block=args.attention_block,
              **({"proximal": args.proximal} if name == "lm_maml" else {}))
          setting = {"task": name, "preset": args.preset, "T": num_steps,
                     "B": batch, "L": seq_len,
                     "compute_dtype": args.compute_dtype or "params",
                     "remat_blocks": args.remat_blocks,
                     "attention": ("blockwise" if task.model_config.blockwise(
                         seq_len) else "dense"),
                     "attention_block": args.attention_block,
                     "num_params": lm_model.num_params(task.model_config)}
          group = []
          for s in args.strategies:
            try:
              s.check_meta_params(task.meta_params())
            except ValueError as e:  # an estimator this task cannot use
              print(f"{name:18s} {s.name:34s} skipped: {e}", flush=True)
              continue
            group.append({**setting, **measure(task, num_steps, s,
                                               args.repeats, args.mesh)})
          std = next(r for r in group if r["strategy"] == "standard")
          for r in group:
            r["memory_ratio_vs_standard"] = std["temp_bytes"] / r["temp_bytes"]
            step = time_ratio = float("nan")
            if args.repeats:
              r["time_ratio_vs_standard"] = (r["step_s_median"]
                                             / std["step_s_median"])
              step = r["step_s_median"] * 1e3
              time_ratio = r["time_ratio_vs_standard"]
            print(f"{name:18s} {r['strategy']:34s} {num_steps:2d} {batch:2d} "
                  f"{seq_len:6d} {r['attention']:>9s} "
                  f"{r['temp_bytes'] / _MIB:9.2f} "
                  f"{r['static_bytes'] / _MIB:7.2f} "
                  f"{r['dynamic_bytes'] / _MIB:8.2f} "
                  f"{r['memory_ratio_vs_standard']:7.2f}x "
                  f"{r['compile_s']:9.2f} {step:8.1f} {time_ratio:8.2f}",
                  flush=True)
            if args.mesh is not None:
              one = r["one_device"]
              print(f"{'':18s}   one device: temp "
                    f"{one['temp_bytes'] / _MIB:.2f} MiB (static "
                    f"{one['static_bytes'] / _MIB:.2f}): per device "
                    f"{r['temp_ratio_one_device']:.2f}x less temp, "
                    f"{r['static_ratio_one_device']:.2f}x less static",
                    flush=True)
          rows += group
  return rows


def plot(rows: list[dict], plt):
  """Temp memory per strategy, one group of bars per setting (a pyplot
  figure)."""
  settings = list(dict.fromkeys(
      (r["task"], r["T"], r["B"], r["L"], r["attention"]) for r in rows))
  strategies = list(dict.fromkeys(r["strategy"] for r in rows))
  fig, ax = plt.subplots(figsize=(3 + 2.4 * len(settings), 4))
  width = 0.8 / len(strategies)
  for i, name in enumerate(strategies):
    values = [next((r["temp_bytes"] / _MIB for r in rows
                    if r["strategy"] == name
                    and (r["task"], r["T"], r["B"], r["L"],
                         r["attention"]) == s), 0)
              for s in settings]
    ax.bar([j + i * width for j in range(len(settings))], values, width,
           label=name)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))])
  ax.set_xticklabels([f"{t}\nT={n} B={b} L={length}\n{attention}"
                      for t, n, b, length, attention in settings],
                     fontsize=7)
  ax.set_ylabel("compiled temp memory (MiB)")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
  return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The exit status of the command (`launch._cli.call_main`)."""
  return _cli.call_main(_main, argv)


def _main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  if args.host_devices:
    _cli.start_backend(args.host_devices)
  try:  # before anything compiles: the mesh fits the devices
    mesh = sharding.make_mesh(**args.mesh) if args.mesh else None
  except ValueError as e:
    raise _cli.UsageError(f"--mesh: {_cli.one_line(e)}") from None
  print(f"metaflow LM benchmark on {jax.devices()[0].platform} "
        f"(jax {jax.__version__}); preset {args.preset}"
        + (f", mesh {sharding.describe(mesh)}" if mesh else "")
        + (" with per-block remat" if args.remat_blocks else "")
        + ", inner Adam; "
        + (f"median of {args.repeats} steps after warm-up" if args.repeats
           else "memory only"))
  write_results(run(args), args.out, "benchmark_lm", plot)
  return 0


if __name__ == "__main__":
  sys.exit(main())
