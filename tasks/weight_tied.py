"""The paper's toy memory benchmark: a weight-tied deep network.

The inner model applies ONE layer ``h <- tanh(h W + b)`` M times (a
``lax.scan`` over depth), then a linear read-out. The parameter count is fixed
(``d*d + d + d``) while the activations of one inner step grow linearly with
the depth M, which is exactly the regime where reverse-over-reverse
(``standard``) pays for every inner step's backward intermediates and
MixFlow-MG does not.

Meta-parameters eta (all three kinds at once): a learned initialisation of
theta (MAML), a per-tensor log learning rate entering the inner optimiser's
update (SGD with momentum by default; plain SGD or Adam on request, Adam making
the T stored copies of (theta, mu, nu) the static floor), and per-example loss
weights ``2 * sigmoid(logits)`` entering the inner loss L (the mixed second
derivative H_et matters).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaflow import optim


@dataclasses.dataclass(frozen=True)
class WeightTiedProblem:
  """Sizes of the problem (depth M, width d, batch B, T inner steps) and the
  inner optimiser (``"sgd"``, ``"momentum"`` or ``"adam"``)."""

  depth: int
  width: int = 128
  batch: int = 128
  num_steps: int = 4
  inner_optimizer: str = "momentum"
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.inner_optimizer not in optim.NAMES:
      raise ValueError(f"inner_optimizer must be one of {optim.NAMES}, "
                       f"got {self.inner_optimizer!r}.")

  def forward(self, theta, x):
    """x: [B, d] -> predictions [B]."""
    def layer(h, _):
      return jnp.tanh(h @ theta["w"] + theta["b"]), None
    h, _ = jax.lax.scan(layer, x, None, length=self.depth)
    return h @ theta["readout"]

  def inner_loss(self, theta, eta, batch):
    """Per-example weighted squared error: L(theta, eta, x_t)."""
    weights = 2.0 * jax.nn.sigmoid(eta["example_logits"])
    err = (self.forward(theta, batch["x"]) - batch["y"]) ** 2
    return jnp.mean(weights * err)

  def outer_loss(self, theta, eta, batch):
    """Plain squared error on the validation batch: V(theta_T, eta, x_val)."""
    del eta
    return jnp.mean((self.forward(theta, batch["x"]) - batch["y"]) ** 2)

  def init_params(self, eta):
    return eta["init"]

  def optimizer(self, eta):
    learning_rates = jax.tree.map(jnp.exp, eta["log_lr"])
    return optim.create(self.inner_optimizer, learning_rates)

  @property
  def _base_lr(self) -> float:
    return 0.01 if self.inner_optimizer == "adam" else 0.05

  def example(self, seed: int = 0):
    """Returns ``(eta, inner_batches, outer_batch)`` with fixed random data.

    Shapes: ``inner_batches["x"]`` is [T, B, d], ``inner_batches["y"]`` [T, B];
    the outer batch has the same shapes without T.
    """
    rng = np.random.default_rng(seed)
    d, b, t = self.width, self.batch, self.num_steps
    cast = lambda a: jnp.asarray(a, dtype=self.dtype)
    init = {"w": cast(rng.standard_normal((d, d)) / np.sqrt(d)),
            "b": cast(np.zeros(d)),
            "readout": cast(rng.standard_normal(d) / np.sqrt(d))}
    eta = {"init": init,
           "log_lr": jax.tree.map(lambda p: cast(np.log(self._base_lr)), init),
           "example_logits": cast(np.zeros(b))}
    teacher = rng.standard_normal(d) / np.sqrt(d)
    def batch(*lead):
      x = rng.standard_normal((*lead, b, d))
      return {"x": cast(x), "y": cast(np.sin(x @ teacher))}
    return eta, batch(t), batch()
