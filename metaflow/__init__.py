"""metaflow: exact, memory-lean meta-gradients for Flax NNX and optax.

The core is MixFlow-MG (Kemaev et al., ICML 2025): the meta-gradient of
truncated back-propagation through an unrolled inner loop, with the inner
gradient differentiated forward-over-reverse instead of reverse-over-reverse.
The estimators are small objects behind one interface (`Strategy`,
`metaflow.estimators`): `Standard` and `MixFlow` (exact, with memory options
that lower the floors MixFlow-MG leaves: `metaflow.segments`,
`metaflow.microbatch`, chosen for a memory budget by ``strategy="auto"``,
`metaflow.planner`), `Implicit` (iMAML) and `FirstOrder` (approximations).
Around them: `Task` (a bilevel problem on NNX modules), `MetaParams` (what is
meta-learned; eta is an `Eta`) and `BilevelTrainer` (the facade over the
pure meta-step, evaluation, Orbax checkpoints, Grain data, clu metrics, on a
device mesh of every device of every process: `metaflow.sharding`; offline,
or with persistent inner learners that train across meta-steps:
`metaflow.online`). For long sequences, `blockwise_attention` keeps the
meta-gradient's memory linear in the length. The update rule itself can be
meta-learned (`LearnedOptimizer`) and handed back as an optax optimizer
(`learned_optimizer`, `load_learned_optimizer`; `metaflow.lopt`).
"""

import importlib
from typing import TYPE_CHECKING, Any

# The engine: jax, optax and flax only.
from metaflow import (
  attention,
  estimators,
  implicit,
  lopt,
  memory,
  microbatch,
  online,
  optim,
  planner,
  segments,
  sharding,
)
from metaflow.attention import blockwise_attention
from metaflow.estimators import (
  FirstOrder,
  Implicit,
  MixFlow,
  Standard,
  Strategy,
  all_strategies,
  exact_strategies,
  exact_strategy_names,
  valid_strategy_names,
)
from metaflow.implicit import implicit_meta_grad, implicit_solve
from metaflow.lopt import (
  LearnedOptimizer,
  LearnedOptimizerState,
  learned_optimizer,
  load_learned_optimizer,
)
from metaflow.memory import MemoryReport
from metaflow.meta_params import (
  Eta,
  LearnedLearningRates,
  LossWeights,
  Meta,
  MetaParams,
)
from metaflow.mixflow import (
  first_order_value_and_grad,
  gradient_jvp,
  mixflow_value_and_grad,
)
from metaflow.online import Learners, Online
from metaflow.planner import NothingFitsError
from metaflow.program import Model, Program
from metaflow.task import Task, create_task, register, registered_tasks
from metaflow.train_state import TrainState
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
    "FitResult": "metaflow.loop",
    "NonFiniteError": "metaflow.loop",
    "IncompatibleCheckpointError": "metaflow.checkpoint",
    "checkpoint": None,
    "compiled": None,
    "data": None,
    "evaluation": None,
    "layout": None,
    "loop": None,
    "metrics": None,
    "preemption": None,
    "step": None,
    "trainer": None,
}


if TYPE_CHECKING:  # What type checkers and IDEs see of the lazy names.
  from metaflow import (
    checkpoint,
    compiled,
    data,
    evaluation,
    layout,
    loop,
    metrics,
    preemption,
    step,
  )
  from metaflow.checkpoint import IncompatibleCheckpointError
  from metaflow.loop import FitResult, NonFiniteError
  from metaflow.trainer import BilevelTrainer


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
    "Eta",
    "FirstOrder",
    "FitResult",
    "Implicit",
    "IncompatibleCheckpointError",
    "InnerLoopResult",
    "LearnedLearningRates",
    "LearnedOptimizer",
    "LearnedOptimizerState",
    "Learners",
    "LossWeights",
    "MemoryReport",
    "Meta",
    "MetaAux",
    "MetaGradient",
    "MetaParams",
    "MixFlow",
    "Model",
    "NonFiniteError",
    "NothingFitsError",
    "Online",
    "Program",
    "Standard",
    "Strategy",
    "Task",
    "TrainState",
    "all_strategies",
    "attention",
    "blockwise_attention",
    "checkpoint",
    "compiled",
    "create_task",
    "data",
    "estimators",
    "evaluation",
    "exact_strategies",
    "exact_strategy_names",
    "first_order_value_and_grad",
    "gradient_jvp",
    "implicit",
    "implicit_meta_grad",
    "implicit_solve",
    "inner_loop",
    "layout",
    "learned_optimizer",
    "load_learned_optimizer",
    "lopt",
    "loop",
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
    "step",
    "valid_strategy_names",
]
