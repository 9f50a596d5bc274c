"""metaflow: exact, memory-lean meta-gradients for Flax NNX and optax.

The core is MixFlow-MG (Kemaev et al., ICML 2025): the meta-gradient of
truncated back-propagation through an unrolled inner loop, with the inner
gradient differentiated forward-over-reverse instead of reverse-over-reverse.
"""

from metaflow import memory, optim
from metaflow.memory import MemoryReport
from metaflow.mixflow import inner_value_and_grad, mixflow_value_and_grad
from metaflow.strategy import Strategy, all_strategies, valid_strategy_names
from metaflow.unroll import (InnerLoopResult, MetaAux, MetaGradient, inner_loop,
                             meta_value_and_grad, meta_value_and_grad_with_aux)

__version__ = "0.1.0"

__all__ = [
    "InnerLoopResult",
    "MemoryReport",
    "MetaAux",
    "MetaGradient",
    "Strategy",
    "all_strategies",
    "inner_loop",
    "inner_value_and_grad",
    "memory",
    "meta_value_and_grad",
    "meta_value_and_grad_with_aux",
    "mixflow_value_and_grad",
    "optim",
    "valid_strategy_names",
]
