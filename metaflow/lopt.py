"""Learned optimizers: the inner update rule Phi as a meta-parameter.

`LearnedOptimizer` is the spec (the features, the network's sizes, how its
output becomes an update); its weights are ``eta.optimizer`` when
``MetaParams(optimizer=LearnedOptimizer(...))`` meta-learns them, and
`learned_optimizer` turns weights into an ordinary
``optax.GradientTransformation`` that any optax loop can use on any pytree
of parameters.

The rule, per parameter tensor p (any shape S) with gradient g at the step
that makes t+1 updates (t = 0 first):

* statistics kept in the optimizer state (the inner loop's carry, next to
  theta): momenta ``m_k <- beta_k m_k + (1 - beta_k) g`` for each
  ``beta_k`` of ``momenta`` (K of them) and a second moment
  ``v <- beta2 v + (1 - beta2) g^2``; bias-corrected ``mhat_k = m_k /
  (1 - beta_k^(t+1))``, ``vhat = v / (1 - beta2^(t+1))``;
* Adam directions ``a_k = mhat_k / (sqrt(vhat + eps_root) + eps)``
  (scale-free: the same for g and c g);
* features per entry, ``x = [a_1..a_K, n(g), n(mhat_1)..n(mhat_K),
  n(sqrt vhat), n(p)]`` (F = 2K + 3), where ``n(y) = y / sqrt(mean_S(y^2) +
  1e-30)`` normalises a tensor by its RMS (the network sees directions and
  relative sizes, never the raw scale of the gradients of a given model), and
  step-count features ``tau_j = tanh((t+1) / s_j)`` for each ``s_j`` of
  ``time_scales``, shared by every entry;
* a small MLP shared by every entry of every tensor, ``h = act(x W_x + tau
  W_tau + b)`` then ``len(hidden) - 1`` more ``act(h W + b)`` layers, and a
  linear output ``o = h W_out + b_out``, plus a linear skip from the Adam
  directions: the direction ``d = sum_k c_k a_k + o_0``;
* the update ``u`` of the tensor, by ``output``:

  - ``"normalized"`` (Celo2-like): ``u = d / rms_S(d)``, a direction whose
    RMS over the tensor is 1, so each tensor moves by the learning rate
    times at most sqrt(size) in norm, whatever the network outputs;
  - ``"magnitude"`` (learned_optimization-like): ``u = d * exp(o_1)``, a
    direction and a per-entry log-magnitude, unbounded;

  and the parameter moves by ``-lr(t) * u``, lr a float, a schedule
  ``count -> lr`` or a pytree of per-tensor rates (`metaflow.optim.
  scale_by_learning_rate`; with `LearnedLearningRates` the learned rates).

Initialisation (`LearnedOptimizer.init`): the hidden layers LeCun-normal,
``W_out`` and ``b_out`` zero, and the skip ``c`` one-hot on the momentum
``start_momentum``; so at the start ``o = 0``, ``d = a_(start)``, and

* ``"magnitude"`` is exactly Adam(b1=start_momentum, b2=beta2, eps, eps_root)
  at learning rate lr: ``u = mhat / (sqrt(vhat + eps_root) + eps)``;
* ``"normalized"`` is Adam's direction RMS-normalised per tensor.

Every entry of eta.optimizer gets a meta-gradient from the start: ``c`` and
the output layer through ``d`` directly, the hidden layers as soon as the
output layer leaves zero (as a zero-initialised residual branch). Every
operation is differentiable JAX (the RMS is ``sqrt(mean + 1e-30)``; Adam's
square root ``sqrt(vhat + eps_root)`` has a finite derivative at v = 0 with
``eps_root > 0``), so the exact strategies differentiate the update Phi with
respect to theta, the state and eta, forward-over-reverse (MixFlow-MG) or
reverse-over-reverse (standard), like any other inner optimiser.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Literal, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from metaflow._checks import PyTree, check_number
from metaflow.optim import (
  DEFAULT_EPS_ROOT,
  LearningRate,
  scale_by_learning_rate,
)

Output = Literal["normalized", "magnitude"]
#: Hidden-layer activations by name.
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh,
               "silu": jax.nn.silu}
_TINY = 1e-30  # inside the RMS's square root: finite derivative at 0


class LearnedOptimizerState(NamedTuple):
  """The carry of the learned rule.

  Attributes:
    count: int32 [], the number of updates made.
    momenta: one params-shaped pytree per ``beta_k`` of ``momenta``.
    nu: params-shaped, the second moment ``v``.
  """
  count: jax.Array
  momenta: tuple[PyTree, ...]
  nu: PyTree


@dataclasses.dataclass(frozen=True)
class LearnedOptimizer:
  """The spec of a learned per-parameter update rule (module docstring).

  Attributes:
    hidden: the MLP's hidden widths (shared across every parameter entry).
    output: ``"normalized"`` (the direction RMS-normalised per tensor, times
      the learning rate) or ``"magnitude"`` (a direction times a learned
      per-entry ``exp(log-magnitude)``, times the learning rate).
    momenta: the momentum decay rates beta_k, each a feature and one of the
      Adam directions the skip mixes.
    beta2: the second moment's decay rate.
    eps, eps_root: Adam's, in ``mhat / (sqrt(vhat + eps_root) + eps)``
      (``eps_root > 0`` keeps the meta-gradient finite where v = 0).
    time_scales: s_j of the step-count features ``tanh((t+1) / s_j)``.
    start_momentum: the beta_k whose Adam direction the rule starts from.
    activation: the hidden layers' nonlinearity (`ACTIVATIONS`).
  """
  hidden: tuple[int, ...] = (16, 16)
  output: Output = "normalized"
  momenta: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
  beta2: float = 0.999
  eps: float = 1e-8
  eps_root: float = DEFAULT_EPS_ROOT
  time_scales: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0)
  start_momentum: float = 0.9
  activation: str = "relu"

  def __post_init__(self):
    for name in ("hidden", "momenta", "time_scales"):
      value = getattr(self, name)
      if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"LearnedOptimizer.{name} must be a tuple, got "
                        f"{value!r}.")
      object.__setattr__(self, name, tuple(value))
    if not self.hidden or not all(
        isinstance(h, int) and not isinstance(h, bool) and h > 0
        for h in self.hidden):
      raise ValueError("LearnedOptimizer.hidden must be one or more positive "
                       f"widths, e.g. (16, 16), got {self.hidden!r}.")
    if self.output not in ("normalized", "magnitude"):
      raise ValueError("LearnedOptimizer.output must be 'normalized' or "
                       f"'magnitude', got {self.output!r}.")
    if not self.momenta or not all(0 <= b < 1 for b in self.momenta):
      raise ValueError("LearnedOptimizer.momenta must be one or more decay "
                       f"rates in [0, 1), got {self.momenta!r}.")
    if not 0 <= self.beta2 < 1:
      raise ValueError(f"LearnedOptimizer.beta2 must be in [0, 1), got "
                       f"{self.beta2!r}.")
    check_number("LearnedOptimizer.eps", self.eps)
    check_number("LearnedOptimizer.eps_root", self.eps_root)
    if not all(s > 0 for s in self.time_scales):
      raise ValueError("LearnedOptimizer.time_scales must be positive, got "
                       f"{self.time_scales!r}.")
    if self.start_momentum not in self.momenta:
      raise ValueError(
          f"LearnedOptimizer.start_momentum {self.start_momentum!r} must be "
          f"one of momenta {self.momenta!r}.")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"LearnedOptimizer.activation must be one of "
                       f"{sorted(ACTIVATIONS)}, got {self.activation!r}.")

  @property
  def num_features(self) -> int:
    """F, the per-entry features: K Adam directions and K + 3 normalised
    statistics (g, each momentum, sqrt(v), the parameter)."""
    return 2 * len(self.momenta) + 3

  @property
  def num_outputs(self) -> int:
    return 1 if self.output == "normalized" else 2

  def init(self, key: jax.Array) -> dict:
    """The weights of a rule that starts at (normalised) Adam (module
    docstring), in the default float dtype.

    Returns:
      A dict: ``layers``, one ``{"kernel": [fan_in, width], "bias":
      [width]}`` per hidden layer (fan_in F for the first); ``time``,
      ``[len(time_scales), hidden[0]]``; ``out``, ``{"kernel": [hidden[-1],
      num_outputs], "bias": [num_outputs]}``; ``skip``, ``[K]``.
    """
    dtype = jnp.result_type(float)
    sizes = (self.num_features, *self.hidden)
    keys = jax.random.split(key, len(self.hidden) + 1)

    def lecun(k, fan_in, fan_out):
      return (jax.random.normal(k, (fan_in, fan_out), dtype)
              / math.sqrt(fan_in))

    layers = [{"kernel": lecun(k, n, m), "bias": jnp.zeros((m,), dtype)}
              for k, n, m in zip(keys[:-1], sizes[:-1], sizes[1:])]
    scales = len(self.time_scales)
    skip = jnp.zeros((len(self.momenta),), dtype).at[
        self.momenta.index(self.start_momentum)].set(1.0)
    return {
        "layers": layers,
        "time": lecun(keys[-1], max(scales, 1), self.hidden[0])[:scales],
        "out": {"kernel": jnp.zeros((self.hidden[-1], self.num_outputs),
                                    dtype),
                "bias": jnp.zeros((self.num_outputs,), dtype)},
        "skip": skip,
    }

  def describe(self) -> dict[str, Any]:
    """The spec as JSON values (what a resumed run must match, and what
    `metaflow.load_learned_optimizer` rebuilds the rule from)."""
    return dataclasses.asdict(self)

  # ------------------------------------------------------------- the rule
  def _direction(self, weights: dict, grad: jax.Array, param: jax.Array,
                 momenta: Sequence[jax.Array], nu: jax.Array,
                 count: jax.Array) -> jax.Array:
    """``u`` of one tensor (shape S) from its statistics after the update
    that makes ``count`` updates (module docstring)."""
    dtype = jnp.promote_types(grad.dtype, jnp.float32)
    t = count.astype(dtype)
    g, p, nu = grad.astype(dtype), param.astype(dtype), nu.astype(dtype)
    mhat = [m.astype(dtype) / (1 - b ** t) for m, b in
            zip(momenta, self.momenta)]
    vhat = nu / (1 - self.beta2 ** t)
    denominator = jnp.sqrt(vhat + self.eps_root) + self.eps
    adam = [m / denominator for m in mhat]
    scaled = [g, *mhat, jnp.sqrt(vhat + self.eps_root), p]
    x = jnp.stack(adam + [_rms_normalised(y) for y in scaled], axis=-1)

    act = ACTIVATIONS[self.activation]
    w = jax.tree.map(lambda a: a.astype(dtype), weights)
    tau = jnp.tanh(t / jnp.asarray(self.time_scales, dtype))
    h = x
    for i, layer in enumerate(w["layers"]):
      pre = h @ layer["kernel"] + layer["bias"]
      if i == 0:
        pre = pre + tau @ w["time"]
      h = act(pre)
    out = h @ w["out"]["kernel"] + w["out"]["bias"]
    d = jnp.stack(adam, axis=-1) @ w["skip"] + out[..., 0]
    if self.output == "normalized":
      return _rms_normalised(d)
    return d * jnp.exp(out[..., 1])

  def scale_by_rule(self, weights: dict) -> optax.GradientTransformation:
    """The rule's direction ``u`` (without the learning rate): an optax
    transformation whose state is `LearnedOptimizerState`. Its update needs
    ``params`` (a feature)."""

    def init_fn(params):
      zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
      return LearnedOptimizerState(
          count=jnp.zeros([], jnp.int32),
          momenta=tuple(zeros() for _ in self.momenta), nu=zeros())

    def update_fn(updates, state, params=None):
      if params is None:
        raise ValueError("The learned optimizer reads the parameters (a "
                         "feature): call update(grads, state, params).")
      momenta = tuple(
          jax.tree.map(lambda m, g, b=b: b * m + (1 - b) * g, mu, updates)
          for mu, b in zip(state.momenta, self.momenta))
      nu = jax.tree.map(
          lambda v, g: self.beta2 * v + (1 - self.beta2) * jnp.square(g),
          state.nu, updates)
      count = jnp.asarray(optax.safe_int32_increment(state.count))

      def leaf(g, p, v, *ms):
        return self._direction(weights, g, p, ms, v, count).astype(g.dtype)

      new = jax.tree.map(leaf, updates, params, nu, *momenta)
      return new, LearnedOptimizerState(count=count, momenta=momenta, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _rms_normalised(y: jax.Array) -> jax.Array:
  """``y / sqrt(mean(y^2) + 1e-30)`` over the whole tensor."""
  return y / jnp.sqrt(jnp.mean(jnp.square(y)) + _TINY)


def learned_optimizer(weights: dict, learning_rate: LearningRate = 1e-3,
                      spec: LearnedOptimizer = LearnedOptimizer()
                      ) -> optax.GradientTransformation:
  """The learned rule with ``weights`` as an optax optimizer: the update of
  each parameter is ``-learning_rate * u`` (module docstring).

  Args:
    weights: the rule's weights, ``spec.init(key)``'s structure (e.g. a
      meta-trained ``eta.optimizer``).
    learning_rate: a float, a schedule ``count -> float``, or a pytree of
      per-tensor rates (`metaflow.optim.scale_by_learning_rate`).
    spec: the `LearnedOptimizer` the weights belong to.

  Returns:
    An ``optax.GradientTransformation`` (jit- and vmap-friendly; its update
    needs ``params``).
  """
  if not isinstance(spec, LearnedOptimizer):
    raise TypeError(f"spec must be a LearnedOptimizer, got {spec!r}.")
  expected = jax.eval_shape(spec.init, jax.random.key(0))
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
  try:
    same = shapes(weights) == shapes(expected)
  except (TypeError, ValueError):
    same = False
  if not same:
    raise ValueError(
        "The weights do not have the structure of this spec's "
        f"LearnedOptimizer.init: got shapes {shapes(weights)}, expected "
        f"{shapes(expected)}.")
  return optax.chain(spec.scale_by_rule(weights),
                     scale_by_learning_rate(learning_rate))


def load_learned_optimizer(workdir: Union[str, os.PathLike],
                           step: Optional[int] = None,
                           learning_rate: Optional[LearningRate] = None
                           ) -> optax.GradientTransformation:
  """The update rule meta-learned by the run in ``workdir``, as an optax
  optimizer (`learned_optimizer`), with nothing of the meta-training
  machinery: the spec and the learning rate from the config recorded with
  checkpoint ``step`` (default: the latest), the weights from its
  ``eta.optimizer``.

  Args:
    workdir: a ``launch.train --workdir`` (or ``BilevelTrainer.fit``'s).
    step: which checkpoint (default: the latest).
    learning_rate: overrides the run's. Needed when the run learned
      per-tensor or per-element rates (tied to its model's parameters);
      a learned scalar rate (per step or not) is read from the checkpoint.

  Raises:
    FileNotFoundError / ValueError: no such checkpoint, or the run learned
      no update rule, in one line.
  """
  from metaflow import checkpoint  # Orbax: on first use only
  step, config = checkpoint.saved_run(workdir, step)
  described = (config.get("meta_params") or {})
  if "optimizer" not in described:
    raise ValueError(f"The run in {str(workdir)!r} does not learn an update "
                     "rule (its MetaParams has no LearnedOptimizer).")
  spec = LearnedOptimizer(**described["optimizer"])
  eta = checkpoint.saved_state(workdir, step)["eta"]
  weights = eta["optimizer"]
  weights["layers"] = _as_list(weights["layers"])
  if learning_rate is None:
    learning_rate = _saved_learning_rate(described["learning_rate"], eta,
                                         workdir)
  return learned_optimizer(jax.tree.map(jnp.asarray, weights),
                           learning_rate, spec)


def _as_list(layers: Any) -> list:
  """A restored list (Orbax may give ``{"0": ..., "1": ...}``)."""
  if isinstance(layers, dict):
    return [layers[k] for k in sorted(layers, key=int)]
  return list(layers)


def _saved_learning_rate(saved: Any, eta: dict, workdir: Any) -> LearningRate:
  """The recorded run's learning rate: a float, or its learned scalar
  rate(s) from ``eta["log_lr"]`` (a schedule over steps when per step)."""
  if not isinstance(saved, dict):
    return float(saved)
  if saved.get("granularity") != "scalar":
    raise ValueError(
        f"The run in {str(workdir)!r} learned {saved.get('granularity')} "
        "learning rates, tied to its model's parameters: pass "
        "learning_rate= to use its rule on other parameters.")
  lr = jnp.exp(jnp.asarray(eta["log_lr"]))
  if not saved.get("per_step"):
    return lr
  return lambda count: lr[jnp.minimum(count, lr.shape[0] - 1)]
