"""`sinusoid_maml`: few-shot sinusoid regression (Finn et al., 2017).

Each task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]`` and phase
``phi ~ U[0, pi]``; ``x ~ U[-5, 5]``. An episode holds K support points (the
inner batch, used in full at each of the T inner SGD steps) and query points
(the outer batch). The inner model is an MLP 1-40-40-1 with ReLU; the inner
and outer losses are the mean squared error. What is meta-learned: the
initialisation theta0 (MAML) and, with ``learn_lr=True``, one learning rate
per parameter entry (Meta-SGD, Li et al. 2017).
"""

from __future__ import annotations

import dataclasses
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaflow import data
from metaflow._checks import check_int, check_number
from metaflow.meta_params import LearnedLearningRates, Meta, MetaParams
from metaflow.task import Task, register


class MLP(nnx.Module):
  """``[N, 1] -> [N, 1]``: Linear-ReLU blocks of the given widths, then
  linear."""

  def __init__(self, widths: tuple[int, ...], rngs: nnx.Rngs):
    sizes = (1,) + tuple(widths)
    dtype = jnp.result_type(float)  # float64 under jax.enable_x64
    self.hidden = nnx.List([nnx.Linear(a, b, param_dtype=dtype, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], 1, param_dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return self.out(x)


@dataclasses.dataclass(frozen=True)
class SinusoidSampler:
  """``rng -> episode``; support/query ``{"x": [n, 1], "y": [n, 1]}``."""
  num_shots: int
  num_query: int
  amplitude: tuple[float, float] = (0.1, 5.0)
  phase: tuple[float, float] = (0.0, math.pi)
  x_range: tuple[float, float] = (-5.0, 5.0)

  def __call__(self, rng: np.random.Generator) -> dict:
    amplitude = rng.uniform(*self.amplitude)
    phase = rng.uniform(*self.phase)

    def points(n):
      x = rng.uniform(*self.x_range, size=(n, 1)).astype(np.float32)
      return {"x": x, "y": (amplitude * np.sin(x - phase)).astype(np.float32)}

    return {"support": points(self.num_shots), "query": points(self.num_query)}


@register("sinusoid_maml")
@dataclasses.dataclass(frozen=True)
class SinusoidMAML(Task):
  """Few-shot sinusoid regression; see the module docstring.

  Attributes:
    num_shots: K, support points per task.
    num_query: query points per task (the outer batch).
    widths: hidden layer widths of the MLP.
    inner_lr: the inner SGD learning rate (the initial one if learned).
    learn_lr: also learn per-parameter-element learning rates (Meta-SGD).
    proximal: lam >= 0: iMAML's ``lam/2 ||theta - theta0||^2`` added to the
      inner loss (needed by strategy ``implicit``; 0: plain MAML).
  """
  num_shots: int = 10
  num_query: int = 10
  widths: tuple[int, ...] = (40, 40)
  inner_lr: float = 0.01
  learn_lr: bool = False
  proximal: float = 0.0

  def __post_init__(self):
    for name in ("num_shots", "num_query"):
      object.__setattr__(self, name, check_int(name, getattr(self, name)))
    object.__setattr__(self, "widths", tuple(
        check_int("widths", w) for w in self.widths))
    object.__setattr__(self, "inner_lr", check_number(
        "inner_lr", self.inner_lr, strict=True))
    object.__setattr__(self, "proximal", check_number("proximal",
                                                      self.proximal))

  def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return MLP(self.widths, rngs)

  def inner_loss(self, model: nnx.Module, meta: Meta, batch: dict) -> jax.Array:
    errors = jnp.square(model(batch["x"]) - batch["y"])[:, 0]
    return meta.weighted_mean(errors, batch["x"])

  def meta_params(self) -> MetaParams:
    lr = (LearnedLearningRates(self.inner_lr, granularity="element")
          if self.learn_lr else self.inner_lr)
    return MetaParams(learn_init=True, learning_rate=lr,
                      proximal=self.proximal)

  def dataset(self, split: str, seed: int) -> grain.MapDataset:
    return data.episodes(SinusoidSampler(self.num_shots, self.num_query), seed,
                         split)
