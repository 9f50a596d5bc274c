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

**A family of architectures.** With ``family_size`` G > 1 every learner
is G classifiers side by side: the task's own (``widths``,
``activation``) and G - 1 more drawn once per run (``family_seed``) from
``family_depths`` (hidden layers, uniform), ``family_widths`` (each
layer's width, log-uniform) and ``family_activations``; all G start from
the learner's key, see the same batches and are trained by the same rule.
L is the sum of the G members' cross-entropies, so each member's gradient
is its own and, the rule working per tensor, each member trains exactly as
it would alone; V is their mean. eta is meta-learned on G architectures at
once. (Shapes are fixed within a run, so the draws are
per run, not per life; seeds and data differ per life.)

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


class Family(nnx.Module):
  """``[N, 64] -> [G, N, 10]``: G `Classifier` s of their own
  architectures ``((widths, activation), ...)`` on the same inputs."""

  def __init__(self, architectures: tuple[tuple[tuple[int, ...], str], ...],
               rngs: nnx.Rngs):
    self.members = nnx.List([Classifier(widths, activation, rngs)
                             for widths, activation in architectures])

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.stack([member(x) for member in self.members])


def draw_architectures(size: int, depths: tuple[int, int],
                       widths: tuple[int, int], activations: tuple[str, ...],
                       seed: int) -> list[tuple[tuple[int, ...], str]]:
  """``size`` architectures ``(widths, activation)``: a depth uniform in
  ``depths`` (both ends), each hidden width log-uniform in ``widths`` (both
  ends, rounded), an activation uniform over ``activations``."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(size):
    depth = int(rng.integers(depths[0], depths[1] + 1))
    sizes = np.exp(rng.uniform(np.log(widths[0]), np.log(widths[1] + 1),
                               depth))
    out.append((tuple(int(min(w, widths[1])) for w in np.floor(sizes)),
                str(activations[rng.integers(len(activations))])))
  return out


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


def _cross_entropy(model: nnx.Module, batch: dict) -> jax.Array:
  """The mean cross-entropy of a classifier (``[]``) or of each member of
  a family (``[G]``)."""
  logits = model(batch["x"])   # [N, 10], or [G, N, 10] for a family
  labels = jnp.broadcast_to(batch["y"], logits.shape[:-1])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, labels), axis=-1)


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
    resample_init: every fresh model from a new key (online learners are).
    family_size: G, classifiers per learner: 1 trains the ``widths`` one
      alone; G > 1 adds G - 1 drawn architectures (module docstring,
      `architectures`; the task's config, ``launch.train``'s default, uses
      4).
    family_depths: ``(min, max)`` hidden layers of a drawn architecture.
    family_widths: ``(min, max)`` width of each of its hidden layers.
    family_activations: the activations it draws from.
    family_seed: seeds the draws.
  """
  widths: tuple[int, ...] = (32,)
  activation: str = "relu"
  batch_size: int = 128
  inner_lr: float = 1e-3
  rule_hidden: tuple[int, ...] = (16, 16)
  rule_output: str = "normalized"
  resample_init: bool = True
  family_size: int = 1
  family_depths: tuple[int, int] = (1, 3)
  family_widths: tuple[int, int] = (16, 128)
  family_activations: tuple[str, ...] = ("relu", "tanh", "gelu", "silu")
  family_seed: int = 0

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
    check_int("family_size", self.family_size)
    check_int("family_seed", self.family_seed, 0)
    for name in ("family_depths", "family_widths"):
      value = tuple(getattr(self, name))
      if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{name} must be (min, max) with min <= max, got "
                         f"{value!r}.")
      object.__setattr__(self, name, tuple(check_int(name, v) for v in value))
    object.__setattr__(self, "family_activations",
                       tuple(self.family_activations))
    unknown = set(self.family_activations) - set(ACTIVATIONS)
    if unknown or not self.family_activations:
      raise ValueError(f"family_activations must be some of "
                       f"{sorted(ACTIVATIONS)}, got "
                       f"{self.family_activations!r}.")
    self.rule  # noqa: B018  (checks rule_hidden and rule_output)

  @property
  def rule(self) -> LearnedOptimizer:
    return LearnedOptimizer(hidden=tuple(self.rule_hidden),
                            output=self.rule_output)  # type: ignore[arg-type]

  @functools.cached_property
  def architectures(self) -> tuple[tuple[tuple[int, ...], str], ...]:
    """The G ``(widths, activation)`` of a learner: the task's own, then
    ``family_size - 1`` drawn (`draw_architectures`)."""
    drawn = draw_architectures(self.family_size - 1, self.family_depths,
                               self.family_widths, self.family_activations,
                               self.family_seed)
    return ((self.widths, self.activation), *drawn)

  def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
    if self.family_size == 1:
      return Classifier(self.widths, self.activation, rngs)
    return Family(self.architectures, rngs)

  def inner_loss(self, model: nnx.Module, meta: Meta, batch: dict
                 ) -> jax.Array:
    """L: the cross-entropy, summed over a family's members (each member's
    gradient is then its own)."""
    del meta
    return jnp.sum(_cross_entropy(model, batch))

  def outer_loss(self, model: nnx.Module, meta: Meta, batch: dict
                 ) -> jax.Array:
    """V: the cross-entropy, the mean over a family's members."""
    del meta
    return jnp.mean(_cross_entropy(model, batch))

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
