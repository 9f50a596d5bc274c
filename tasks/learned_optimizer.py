"""`mlp_learned_optimizer`: meta-learn the update rule of MLP classifiers on
the 8x8 digits.

What is meta-learned is the inner optimiser itself: a
`metaflow.LearnedOptimizer` (``eta.optimizer``, a small per-parameter MLP;
`metaflow.lopt`), which replaces the task's hand-written optimiser. The
inner problem: an MLP ``64 -> widths -> 10`` (activation ``activation``)
trained by cross-entropy on mini-batches of ``batch_size`` digits; the
outer loss V is the cross-entropy of theta_T on a held-out batch. Meant to
be meta-trained with online learners (``--config.online.*``): each
learner is a fresh random MLP that the rule trains for a drawn lifetime,
one window of T steps per meta-step, so the rule is meta-learned for every
stage of training rather than for the first T steps.

Data: scikit-learn's 1,797 digits (no download; the ``examples`` extra),
pixels divided by 16, shuffled once (seed 0) and cut into three parts:
1,297 training images (every inner batch), 250 held-out images (the outer
batch of the ``train`` and ``validation`` episodes) and 250 test images (the
outer batch of ``test`` episodes). An episode ``{"inner": {"x": [T, B, 64],
"y": [T, B]}, "outer": {"x": [B, 64], "y": [B]}}`` draws its batches with
replacement between batches (without within one).
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from metaflow import data
from metaflow._checks import check_int, check_number
from metaflow.lopt import ACTIVATIONS, LearnedOptimizer
from metaflow.meta_params import Meta, MetaParams
from metaflow.task import Task, register

#: Images of each part of the shuffled digits: training, held-out, test.
PARTS = (1297, 250, 250)


@functools.lru_cache(maxsize=1)
def digit_parts() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  """``((x, y) of training, held-out, test)``: x float32 ``[n, 64]`` in
  [0, 1], y int32 ``[n]``."""
  from tasks.fewshot import load_digits_arrays
  images, labels = load_digits_arrays()
  order = np.random.default_rng(0).permutation(len(labels))
  x = (images.reshape(len(labels), -1)[order] / 16.0).astype(np.float32)
  y = labels[order].astype(np.int32)
  cuts = np.cumsum(PARTS)[:-1]
  return tuple(zip(np.split(x, cuts), np.split(y, cuts)))


class Classifier(nnx.Module):
  """``[N, 64] -> [N, 10]`` logits: Linear + activation per hidden width,
  then Linear."""

  def __init__(self, widths: tuple[int, ...], activation: str,
               rngs: nnx.Rngs):
    sizes = (64,) + tuple(widths)
    dtype = jnp.result_type(float)
    self.hidden = nnx.List([nnx.Linear(a, b, param_dtype=dtype, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], 10, param_dtype=dtype, rngs=rngs)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    for layer in self.hidden:
      x = act(layer(x))
    return self.out(x)


@dataclasses.dataclass(frozen=True)
class DigitBatches:
  """``rng -> episode`` of T inner batches and one outer batch (module
  docstring); ``outer_part`` 1 (held-out) or 2 (test)."""
  num_steps: int
  batch_size: int
  outer_part: int

  def __call__(self, rng: np.random.Generator) -> dict:
    (x, y), (xo, yo) = (digit_parts()[0], digit_parts()[self.outer_part])
    idx = np.stack([rng.choice(len(y), self.batch_size, replace=False)
                    for _ in range(self.num_steps)])
    out = rng.choice(len(yo), self.batch_size, replace=False)
    return {"inner": {"x": x[idx], "y": y[idx]},
            "outer": {"x": xo[out], "y": yo[out]}}


@register("mlp_learned_optimizer")
@dataclasses.dataclass(frozen=True)
class MLPLearnedOptimizer(Task):
  """Digits MLPs trained by a learned update rule (module docstring).

  Attributes:
    widths: hidden widths of the classifier (64 -> widths -> 10).
    activation: its nonlinearity (`metaflow.lopt.ACTIVATIONS`).
    batch_size: B, digits per inner batch and per outer batch.
    inner_lr: the learning rate that scales the rule's update.
    rule_hidden: the learned optimizer's hidden widths.
    rule_output: ``"normalized"`` or ``"magnitude"``
      (`metaflow.LearnedOptimizer.output`).
  """
  widths: tuple[int, ...] = (32,)
  activation: str = "relu"
  batch_size: int = 128
  inner_lr: float = 1e-3
  rule_hidden: tuple[int, ...] = (16, 16)
  rule_output: str = "normalized"
  resample_init: bool = True

  def __post_init__(self):
    object.__setattr__(self, "widths", tuple(
        check_int("widths", w) for w in self.widths))
    object.__setattr__(self, "batch_size", check_int(
        "batch_size", self.batch_size))
    if self.batch_size > PARTS[1]:
      raise ValueError(f"batch_size must be at most {PARTS[1]} (the "
                       f"held-out part's size), got {self.batch_size}.")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                       f"got {self.activation!r}.")
    object.__setattr__(self, "inner_lr", check_number(
        "inner_lr", self.inner_lr, strict=True))
    self.rule  # noqa: B018  (checks rule_hidden and rule_output)

  @property
  def rule(self) -> LearnedOptimizer:
    return LearnedOptimizer(hidden=tuple(self.rule_hidden),
                            output=self.rule_output)  # type: ignore[arg-type]

  def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return Classifier(self.widths, self.activation, rngs)

  def inner_loss(self, model: nnx.Module, meta: Meta, batch: dict
                 ) -> jax.Array:
    del meta
    logits = model(batch["x"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]))

  def eval_metrics(self, model: nnx.Module, meta: Meta, batch: dict
                   ) -> dict[str, jax.Array]:
    del meta
    return {"accuracy": jnp.mean(jnp.argmax(model(batch["x"]), -1)
                                 == batch["y"])}

  def meta_params(self) -> MetaParams:
    return MetaParams(learning_rate=self.inner_lr, optimizer=self.rule)

  def episodes(self, split: str, seed: int, num_inner_steps: int
               ) -> grain.MapDataset:
    part = 2 if split == "test" else 1
    return data.episodes(DigitBatches(num_inner_steps, self.batch_size, part),
                         seed, split)

  def split_episode(self, episode: dict, num_steps: int
                    ) -> tuple[dict, dict]:
    del num_steps
    return episode["inner"], episode["outer"]
