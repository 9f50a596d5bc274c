"""metaflow: exact, memory-lean meta-gradients for Flax NNX and optax.

The core is MixFlow-MG (Kemaev et al., ICML 2025): the meta-gradient of
truncated back-propagation through an unrolled inner loop, with the inner
gradient differentiated forward-over-reverse instead of reverse-over-reverse.
Behind the same `Strategy` switch: the implicit (iMAML) and first-order
approximations (`metaflow.implicit`, `metaflow.mixflow`), and two memory
options that lower the floors MixFlow-MG leaves (`metaflow.segments`,
`metaflow.microbatch`), chosen for a memory budget by ``strategy="auto"``
(`metaflow.planner`). Around it: `Task` (a bilevel problem on NNX modules),
`MetaParams` (what is meta-learned) and `BilevelTrainer` (outer loop,
evaluation, Orbax checkpoints, Grain data, clu metrics, on a device mesh of
every device of every process: `metaflow.sharding`; offline, or with
persistent inner learners that train across meta-steps: `metaflow.online`).
"""

import importlib
from typing import TYPE_CHECKING, Any

# The engine: jax, optax and flax only.
from metaflow import (
  implicit,
  memory,
  microbatch,
  online,
  optim,
  planner,
  segments,
  sharding,
)
from metaflow.implicit import implicit_meta_grad, implicit_solve
from metaflow.memory import MemoryReport
from metaflow.meta_params import (
  LearnedLearningRates,
  LossWeights,
  Meta,
  MetaParams,
)
from metaflow.mixflow import (
  first_order_value_and_grad,
  gradient_jvp,
  inner_value_and_grad,
  mixflow_value_and_grad,
)
from metaflow.online import Learners, Online
from metaflow.planner import NothingFitsError
from metaflow.strategy import (
  Strategy,
  all_strategies,
  exact_strategies,
  exact_strategy_names,
  valid_strategy_names,
)
from metaflow.task import Task, create_task, register, registered_tasks
from metaflow.unroll import (
  InnerLoopResult,
  MetaAux,
  MetaGradient,
  inner_loop,
  meta_value_and_grad,
  meta_value_and_grad_with_aux,
)

# The training loop, which also needs Orbax, Grain, clu and tensorboardX:
# imported on first use (PEP 562), so that a user of the engine alone in their
# own loop does not pay for them. ``name: module`` (a module of its own when
# the module is None).
_LAZY = {
    "BilevelTrainer": "metaflow.trainer",
    "FitResult": "metaflow.trainer",
    "TrainState": "metaflow.trainer",
    "IncompatibleCheckpointError": "metaflow.checkpoint",
    "checkpoint": None,
    "data": None,
    "metrics": None,
    "preemption": None,
    "trainer": None,
}


if TYPE_CHECKING:  # What type checkers and IDEs see of the lazy names.
  from metaflow import checkpoint, data, metrics, preemption
  from metaflow.checkpoint import IncompatibleCheckpointError
  from metaflow.trainer import BilevelTrainer, FitResult, TrainState


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module 'metaflow' has no attribute {name!r}")
  module = _LAZY[name]
  if module is None:
    value = importlib.import_module(f"metaflow.{name}")
  else:
    value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "BilevelTrainer",
    "FitResult",
    "IncompatibleCheckpointError",
    "InnerLoopResult",
    "LearnedLearningRates",
    "Learners",
    "LossWeights",
    "MemoryReport",
    "Meta",
    "MetaAux",
    "MetaGradient",
    "MetaParams",
    "NothingFitsError",
    "Online",
    "Strategy",
    "Task",
    "TrainState",
    "all_strategies",
    "checkpoint",
    "create_task",
    "data",
    "exact_strategies",
    "exact_strategy_names",
    "first_order_value_and_grad",
    "gradient_jvp",
    "implicit",
    "implicit_meta_grad",
    "implicit_solve",
    "inner_loop",
    "inner_value_and_grad",
    "memory",
    "meta_value_and_grad",
    "meta_value_and_grad_with_aux",
    "metrics",
    "microbatch",
    "online",
    "mixflow_value_and_grad",
    "optim",
    "planner",
    "preemption",
    "register",
    "registered_tasks",
    "segments",
    "sharding",
    "valid_strategy_names",
]
