"""The meta-gradient estimators: one small frozen object each, one file
each, behind one interface (`Strategy`, `metaflow.estimators.base`).

=================  ======  ===============================================
``Standard``       exact   reverse-over-reverse (the reference)
``MixFlow``        exact   MixFlow-MG: forward-over-reverse rule for g_t
``Implicit``       approx  implicit differentiation at theta_T (iMAML)
``FirstOrder``     approx  g_t a constant (first-order MAML)
=================  ======  ===============================================

The exact ones take the memory options of `Exact` (remat, saved inner
gradients, segments, micro-batches). ``Strategy.parse(string)`` and
``Strategy(mode, **options)`` build any of them.
"""

# isort: off
# Registered in this order, the order of `valid_strategy_names`: the exact
# estimators first, the reference first among them.
from metaflow.estimators.base import (
  OPTIONS_HELP,
  Strategy,
  all_strategies,
  exact_strategies,
  exact_strategy_names,
  from_mode,
  valid_strategy_names,
)
from metaflow.estimators.exact import INNER_GRAD_NAME, Exact
from metaflow.estimators.standard import Standard
from metaflow.estimators.mixflow import MixFlow
from metaflow.estimators.implicit import Implicit
from metaflow.estimators.first_order import FirstOrder
# isort: on

__all__ = [
    "INNER_GRAD_NAME",
    "OPTIONS_HELP",
    "Exact",
    "FirstOrder",
    "Implicit",
    "MixFlow",
    "Standard",
    "Strategy",
    "all_strategies",
    "exact_strategies",
    "exact_strategy_names",
    "from_mode",
    "valid_strategy_names",
]
