"""What several modules share: the `PyTree` alias and the argument checks.

Every public entry point checks its counts and sizes before anything is
traced, so that a bad value is a one-line ``ValueError`` naming the setting
instead of a shape error deep inside XLA. The checks live here once; each
module passes the name the user knows the setting by (``"num_steps (T)"``,
``"config.meta_batch_size"``, ``"TransformerConfig.d_model"``).

``bool`` is refused where an int is asked for (``True`` is an ``int`` to
Python, never a count to a user); numpy integers and floats are accepted.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

# A nested structure of arrays (dicts, lists, tuples, NNX states, ...).
PyTree = Any


def check_int(name: str, value: Any, minimum: int = 1) -> int:
  """``int(value)``; ValueError unless ``value`` is an int ``>= minimum``."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < minimum):
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
  return int(value)


def check_axis_size(name: str, value: Any) -> int:
  """A mesh axis size: an int ``>= 1``, or ``-1`` for the devices left."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or (value < 1 and value != -1)):
    raise ValueError(f"{name} must be an int >= 1 or -1 (the rest of the "
                     f"devices), got {value!r}.")
  return int(value)


def check_number(name: str, value: Any, minimum: float = 0.0, *,
                 strict: bool = False) -> float:
  """``float(value)``; ValueError unless ``value`` is a finite real number
  ``>= minimum`` (``> minimum`` when ``strict``)."""
  real = not isinstance(value, bool) and isinstance(value, numbers.Real)
  number = float(value) if real else math.nan  # pyright: ignore[reportArgumentType]
  if not (math.isfinite(number)
          and (number > minimum if strict else number >= minimum)):
    bound = f"{'>' if strict else '>='} {minimum:g}"
    raise ValueError(f"{name} must be a finite number {bound}, got "
                     f"{value!r}.")
  return number
