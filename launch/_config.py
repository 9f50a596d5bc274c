"""The runners' configs: a task's ml_collections config file, its overrides on
the command line, the checks of the run's own settings, and the trainer they
build. Private to ``launch``: `launch.train`, `launch.plan` and
`launch.evaluate` share it (their public names re-export what a user calls).

A config file defines ``get_config()`` (or ``get_config(arg)``, given as
``--config=FILE:ARG``) returning an ``ml_collections.ConfigDict``; the
defaults of every task start from ``launch/configs/default.py``; a task
without a file of its own gets ``task_fields.py:<task>`` (the defaults and
its dataclass's fields as ``config.task``).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import os
import re
import shutil
import textwrap
from typing import Optional, Sequence

import ml_collections

from launch._cli import UsageError, flag_value, one_line

#: The task configs shipped with the runners.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: Config keys that may change when a run is resumed: they change how long it
#: runs, how often it reports, and how (on which devices) the same
#: meta-gradient is computed, not the trajectory of the meta-parameters.
#: (``strategy`` only among the exact strategies: the trainer's fingerprint
#: records the estimator, `metaflow.Strategy.fingerprint`, so a switch to or
#: from implicit or first_order is refused.)
#: (``num_workers`` is not one of them:
#: Grain's iterator state has another form with worker processes.)
RESUMABLE_KEYS = ("meta_steps", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints", "max_skipped_steps", "strategy",
                  "memory_budget", "mesh")

#: Outer optimisers by name (``config.outer_optimizer``).
OUTER_OPTIMIZERS = ("adam", "sgd")




def config_path(task: str) -> str:
  """The default config of ``task``: ``launch/configs/<task>.py``, or for a
  task without one ``task_fields.py:<task>`` (the shared defaults and the
  task's own fields)."""
  path = os.path.join(CONFIG_DIR, f"{task}.py")
  if os.path.exists(path):
    return path
  return os.path.join(CONFIG_DIR, "task_fields.py") + f":{task}"


def load_config(path: str):
  """``get_config()`` of a config file, or ``get_config(arg)`` for
  ``file:arg`` (as ml_collections' ``--config`` reads it).

  Raises:
    UsageError: the file does not exist, does not compile, has no
      ``get_config``, or its ``get_config`` raises (one line, naming the file
      and, for a syntax error, the line).
  """
  file, *arg = path.split(":", 1)
  if not os.path.exists(file):
    raise UsageError(f"config file {file!r} does not exist.")
  if not os.path.isfile(file):
    raise UsageError(f"config file {file!r} is not a file.")
  spec = importlib.util.spec_from_file_location("_metaflow_config", file)
  if spec is None or spec.loader is None:
    raise UsageError(f"config file {file!r} is not a Python file.")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UsageError(f"config file {file!r} line {e.lineno}: syntax error: "
                     f"{one_line(e.msg)}.") from None
  except Exception as e:  # noqa: BLE001  (the user's code: any error)
    raise UsageError(f"config file {file!r} failed to load: "
                     f"{type(e).__name__}: {one_line(e)}") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise UsageError(f"config file {file!r} defines no get_config() (a config "
                     "file returns its ml_collections.ConfigDict from "
                     "get_config()).")
  try:
    config = get_config(*arg)
  except Exception as e:  # noqa: BLE001
    raise UsageError(f"{file}: get_config({', '.join(map(repr, arg))}) "
                     f"failed: {type(e).__name__}: {one_line(e)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f"{file}: get_config() must return an "
                     f"ml_collections.ConfigDict, got {type(config).__name__}.")
  return config





def import_task_modules(argv: Sequence[str]) -> None:
  """Imports the modules of ``--task_module`` (comma-separated), which
  register their own tasks.

  Raises:
    UsageError: a module that cannot be imported.
  """
  from metaflow.task import import_module

  try:
    for module in (flag_value(argv, "task_module") or "").split(","):
      if module.strip():
        import_module(module.strip(), "--task_module")
  except ValueError as e:
    raise UsageError(str(e)) from None


def prepare_argv(argv: Sequence[str]) -> list[str]:
  """Checks ``--task`` and the ``--config.*`` keys and adds the task's default
  ``--config`` file, so that absl parses the rest.

  Raises:
    UsageError: missing or unknown task, missing config file, unknown key.
  """
  import tasks  # noqa: F401  (registers the built-in tasks)
  from metaflow.task import import_task, registered_tasks

  argv = list(argv)
  task = flag_value(argv, "task")
  import_task_modules(argv)
  try:
    if not task:
      raise UsageError("--task is required; registered tasks: "
                       f"{', '.join(registered_tasks())} (or "
                       "package.module:ClassName).")
    import_task(task)
  except ValueError as e:
    raise UsageError(str(e)) from None
  path = flag_value(argv, "config")
  if path is None:
    path = config_path(task)
    argv.insert(1, f"--config={path}")
  config = load_config(path)
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    node = config
    for i, part in enumerate(key.split(".")):
      if not hasattr(node, "keys") or part not in node:
        parent = ".".join(key.split(".")[:i]) or "config"
        valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
        raise UsageError(f"unknown config key {key!r} (valid keys of {parent}: "
                         f"{valid}).")
      node = node[part]
  return argv


def _outer_optimizer(name: str, learning_rate: float, clip: float = 0.0):
  """The optax optimiser ``name`` (one of `OUTER_OPTIMIZERS`, checked by
  `check_config`), after ``optax.clip_by_global_norm(clip)`` of the
  meta-gradient when ``clip > 0``."""
  import optax
  optimizer = getattr(optax, name)(learning_rate)
  if clip:
    return optax.chain(optax.clip_by_global_norm(clip), optimizer)
  return optimizer



#: Top-level settings checked by `check_config`: key -> (kind, low).
#: ``int``: an int >= low; ``float``: a finite number > low (``>=`` for
#: ``"float>="``); ``axis``: -1 (the rest) or an int >= 1.
_SETTINGS = {
    "inner_steps": ("int", 1), "meta_steps": ("int", 0),
    "meta_batch_size": ("int", 1), "num_eval_tasks": ("int", 1),
    "log_every": ("int", 1), "eval_every": ("int", 0),
    "checkpoint_every": ("int", 0), "keep_checkpoints": ("int", 1),
    "max_skipped_steps": ("int", 1), "num_workers": ("int", 0),
    "seed": ("int", 0), "cg_steps": ("int", 1),
    "outer_lr": ("float", 0.0), "cg_damping": ("float>=", 0.0),
    "outer_clip": ("float>=", 0.0),
    "mesh.data": ("axis", None), "mesh.fsdp": ("axis", None),
    "online.population": ("int", 0), "online.lifetime": ("int", 0),
    "online.lifetime_max": ("int", 0),
}


def check_config(config) -> None:
  """Checks the run's own settings (the task checks ``config.task``) before
  anything is built, one line per problem.

  Raises:
    ValueError: a setting of ``launch/configs/default.py`` missing (a config
      file starts from its ``get_config()``), a count or size out of range,
      a learning rate or damping that is not a positive (non-negative)
      finite number, an unknown outer optimiser or split.
  """
  from launch.configs import default
  from metaflow._checks import check_axis_size, check_int, check_number
  from metaflow.data import SPLITS

  have = dict(_leaves(config))
  missing = [k for k, _ in _leaves(default.get_config()) if k not in have
             and not (k == "task" or k.startswith("task."))]
  if missing:
    raise ValueError(f"the config lacks {', '.join(missing)} (a config file "
                     "starts from launch/configs/default.py's get_config()).")
  for key, (kind, low) in _SETTINGS.items():
    value = config
    for part in key.split("."):
      value = value[part]
    name = f"config.{key}"
    if kind == "int":
      check_int(name, value, low)
    elif kind == "axis":
      check_axis_size(name, value)
    else:
      check_number(name, value, low, strict=kind == "float")
  if config.outer_optimizer not in OUTER_OPTIMIZERS:
    raise ValueError(f"config.outer_optimizer must be one of "
                     f"{', '.join(OUTER_OPTIMIZERS)}, got "
                     f"{config.outer_optimizer!r}.")
  if config.eval_split not in SPLITS:
    raise ValueError(f"config.eval_split must be one of {', '.join(SPLITS)}, "
                     f"got {config.eval_split!r}.")


def strategy_of(config):
  """``config.strategy`` with ``config.cg_steps`` and ``config.cg_damping``
  (which apply to ``implicit`` only; non-default values with another
  strategy are refused); ``"auto"`` as it is (the trainer resolves it)."""
  from metaflow.estimators import Strategy
  if config.strategy.strip().lower() == "auto":
    return "auto"
  if config.memory_budget:
    raise ValueError("memory_budget applies to --strategy auto only (got "
                     f"strategy {config.strategy!r}).")
  return Strategy.parse(config.strategy, cg_steps=config.cg_steps,
                        cg_damping=config.cg_damping)


def build(task_name: str, config, *, mesh=None, shapes_only: bool = False):
  """The task and `BilevelTrainer` of a config; ValueError etc. on bad input.

  ``mesh``: instead of the config's (``launch.plan`` plans on a part of the
  devices); ``shapes_only``: a trainer for compiled memory only."""
  from metaflow import sharding
  from metaflow.online import Online
  from metaflow.task import create_task, import_task
  from metaflow.trainer import BilevelTrainer

  check_config(config)
  if mesh is None:
    mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
  task = create_task(import_task(task_name), **config.task.to_dict())
  online = Online(config.online.population, config.online.lifetime,
                  config.online.lifetime_max)
  return BilevelTrainer(
      task, strategy=strategy_of(config), num_inner_steps=config.inner_steps,
      meta_batch_size=None if online.enabled else config.meta_batch_size,
      online=online,
      outer_optimizer=_outer_optimizer(config.outer_optimizer, config.outer_lr,
                                       config.outer_clip),
      seed=config.seed, eval_split=config.eval_split,
      num_eval_tasks=config.num_eval_tasks, num_workers=config.num_workers,
      mesh=mesh, memory_budget=config.memory_budget or None,
      shapes_only=shapes_only)


@contextlib.contextmanager
def no_workdir_on_refusal(workdir: str):
  """Removes ``workdir`` when the block refuses to start (`UsageError`) and
  the directory did not exist before it: a refused start leaves nothing
  behind. A workdir that existed (a run to resume) is never touched."""
  existed = os.path.lexists(workdir)
  try:
    yield
  except UsageError:
    if not existed:
      shutil.rmtree(workdir, ignore_errors=True)
    raise


# ------------------------------------------------------------------- help
def _first_sentence(text: str) -> str:
  text = one_line(text)
  end = text.find(". ")
  return text if end < 0 else text[:end + 1]


def task_lines() -> list[str]:
  """One line per registered task: its name and its docstring's first
  sentence."""
  import tasks  # noqa: F401  (registers the built-in tasks)
  from metaflow.task import registered_tasks, task_class

  width = max(map(len, registered_tasks()))
  lines = []
  for name in registered_tasks():
    doc = inspect.getdoc(task_class(name)) or ""
    summary = _first_sentence(doc.split("\n\n")[0])
    if len(summary) > 94 - width:
      summary = summary[:91 - width].rsplit(" ", 1)[0] + " ..."
    lines.append(f"  {name:<{width}}  {summary}")
  return lines


def _comment_docs(path: str) -> dict[str, str]:
  """``{key: doc}`` from a config file's comments: the trailing comment of
  ``config.KEY = ...`` or else the comment block just above it, for the
  file and the ``launch.configs`` modules it imports (theirs first)."""
  with open(path) as f:
    source = f.read()
  docs: dict[str, str] = {}
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ImportFrom) and node.module == "launch.configs":
      for alias in node.names:
        docs.update(_comment_docs(os.path.join(CONFIG_DIR,
                                               f"{alias.name}.py")))
  lines = source.splitlines()
  for number, line in enumerate(lines):
    match = re.match(r"\s*config((?:\.\w+)+)\s*=[^#]*(?:#\s*(.*))?$", line)
    if not match:
      continue
    key, doc = match.group(1)[1:], match.group(2)
    if doc:  # continued on comment-only lines below, at the same column
      column = line.index("#")
      for below in lines[number + 1:]:
        if below.find("#") != column or below[:column].strip():
          break
        doc += " " + below[column:].lstrip("#").strip()
    else:
      block = []
      for above in reversed(lines[:number]):
        if not above.strip().startswith("#"):
          break
        block.insert(0, above.strip().lstrip("#").strip())
      doc = " ".join(block)
    if doc:
      docs[key] = doc
  return docs


def _field_docs(cls) -> dict[str, str]:
  """``{field: doc}`` from the ``Attributes:``/``Args:`` sections of the
  docstrings of ``cls`` and its bases (the class's own first)."""
  docs: dict[str, str] = {}
  for klass in reversed(cls.__mro__):
    doc = inspect.getdoc(klass) or ""
    section, name, indent = False, None, 0
    for line in doc.splitlines():
      if re.fullmatch(r"(Attributes|Args):\s*", line):
        section, name = True, None
        continue
      if not section:
        continue
      if line and not line.startswith(" "):
        section = False
        continue
      match = re.match(r"(\s+)(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
      if match and (name is None or len(match.group(1)) <= indent):
        indent, name = len(match.group(1)), match.group(2)
        docs[name] = match.group(3)
      elif name and line.strip():
        docs[name] += " " + line.strip()
  return docs


def _leaves(config, prefix=""):
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def config_key_lines(task: str) -> list[str]:
  """Every ``--config.KEY=default`` of ``task``'s default config, each with
  the line that explains it (the config files' comments, the task's field
  docs)."""
  from metaflow.task import task_class

  path = config_path(task)
  config = load_config(path)
  docs = _comment_docs(path.split(":", 1)[0])
  fields = _field_docs(task_class(task))
  lines = []
  for key, value in _leaves(config):
    doc = docs.get(key)
    if not doc and key.startswith("task."):
      doc = fields.get(key[len("task."):])
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    doc = doc or docs.get(parent) or ""
    lines.append(f"  --config.{key}={value!r}")
    lines += textwrap.wrap(one_line(doc), 78, initial_indent=" " * 6,
                           subsequent_indent=" " * 6)
  return lines


def task_help(task: Optional[str] = None) -> str:
  """The registered tasks, one line each; with ``task``, every ``--config``
  key of its default config with its default and what it means.

  Raises:
    UsageError: ``task`` is not a registered task (or importable class), or
      its config file cannot be loaded.
  """
  text = ["registered tasks (--task NAME, or package.module:ClassName):",
          *task_lines()]
  if task:
    from metaflow.task import import_task
    try:
      import_task(task)
    except ValueError as e:
      raise UsageError(str(e)) from None
    path = os.path.relpath(config_path(task))
    text += ["", f"config keys of {task} (--config.KEY=VALUE; the defaults "
             f"of --config={path}):", *config_key_lines(task)]
  else:
    text += ["", "--task NAME --help lists the --config.KEY settings of a "
             "task with their defaults."]
  return "\n".join(text)

