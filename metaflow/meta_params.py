"""`MetaParams`: a declarative spec of what is meta-learned, and `Eta`.

The meta-parameters eta are an `Eta`, a small typed pytree (checkpointable,
shardable, a parameter tree for optax), with a field per kind that the spec
turns on (None when off):

====================  =======================================================
``eta.init``          learned initialisation theta0 (MAML): a pytree shaped
                      like theta; the inner loop starts from it.
``eta.log_lr``        learned inner learning rates, log-parameterised
                      (``lr = exp(log_lr)``, so they stay positive); a
                      scalar, one per parameter tensor, or one per parameter
                      element, each optionally with a leading axis T (one
                      per inner step). They enter the inner optimiser's
                      update Phi.
``eta.loss_weights``  the ``nnx.Param`` state of a small NNX rater network
                      whose output gives per-example or per-token weights
                      ``w = max_weight * sigmoid(rater(features))`` in
                      ``[0, max_weight]``; they enter the inner loss L.
``eta.user``          arbitrary user meta-parameters ``{name: pytree}``,
                      read by the task's losses through `Meta.user`.
``eta.optimizer``     the weights of a learned update rule
                      (`metaflow.LearnedOptimizer`): Phi itself; the
                      learning rate (fixed or learned) scales its update.
====================  =======================================================

`MetaParams.init` builds eta; `MetaParams.theta0`, `MetaParams.inner_optimizer`
and `Meta` (the view that losses receive) are how each kind is used. Every kind
is differentiated by every exact gradient strategy: eta may enter theta0, Phi
and L. With a learned initialisation, ``proximal=lam`` adds iMAML's
``lam/2 ||theta - eta.init||^2`` to L (`MetaParams.regularised`), for every
strategy. The approximate estimators see only some of these paths; each
refuses the kinds whose meta-gradient it misses
(`metaflow.Strategy.check_meta_params`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from metaflow._checks import PyTree, check_number
from metaflow.lopt import LearnedOptimizer, learned_optimizer

Granularity = Literal["scalar", "tensor", "element"]


class Eta(NamedTuple):
  """The meta-parameters eta: one field per kind of `MetaParams` (None
  where the spec does not learn it). What the outer optimiser updates and
  the meta-gradient is shaped like.

  Attributes:
    init: the learned initialisation theta0, shaped like theta.
    log_lr: the log learning rates (`LearnedLearningRates`).
    loss_weights: the rater network's ``nnx.Param`` state (`LossWeights`).
    user: ``{name: pytree}``, the user meta-parameters.
    optimizer: the learned update rule's weights (`LearnedOptimizer.init`).
  """
  init: PyTree = None
  log_lr: PyTree = None
  loss_weights: PyTree = None
  user: PyTree = None
  optimizer: PyTree = None


def _qualified_name(fn: Any) -> str:
  """A callable by name (a partial with its arguments), for fingerprints
  (a repr would hold an address that differs between processes)."""
  if isinstance(fn, functools.partial):
    args = [repr(a) for a in fn.args] + [f"{k}={v!r}" for k, v
                                         in sorted(fn.keywords.items())]
    return f"partial({_qualified_name(fn.func)}, {', '.join(args)})"
  name = getattr(fn, "__qualname__", None)
  if name is None:
    return type(fn).__qualname__
  return f"{getattr(fn, '__module__', '')}.{name}"


@dataclasses.dataclass(frozen=True)
class LearnedLearningRates:
  """Learned inner learning rates ``exp(eta.log_lr)``.

  Attributes:
    init: initial learning rate (every entry starts at ``log(init)``).
    granularity: ``"scalar"`` (one rate), ``"tensor"`` (one per parameter
      tensor) or ``"element"`` (one per parameter entry, Meta-SGD).
    per_step: if True, each of the T inner steps has its own rates (a leading
      axis T on every leaf of ``eta.log_lr``).
    stacked: top-level keys of theta whose leaves stack several layers'
      tensors on a leading axis (layers applied by a scan, e.g. a
      transformer's ``"blocks"``): at ``"tensor"`` granularity each layer's
      tensor gets its own rate, a leaf of shape ``[layers, 1, ..., 1]``
      (broadcast against the parameter), as if the layers were unstacked.
  """
  init: float = 1e-2
  granularity: Granularity = "tensor"
  per_step: bool = False
  stacked: tuple[str, ...] = ()

  def __post_init__(self):
    if self.granularity not in ("scalar", "tensor", "element"):
      raise ValueError(
          f"LearnedLearningRates.granularity must be 'scalar', 'tensor' or "
          f"'element', got {self.granularity!r}.")
    if isinstance(self.stacked, str) or not all(
        isinstance(k, str) for k in self.stacked):
      raise TypeError("LearnedLearningRates.stacked must be a tuple of "
                      f"top-level parameter names, got {self.stacked!r}.")
    object.__setattr__(self, "stacked", tuple(self.stacked))
    if not self.init > 0:
      raise ValueError(
          f"LearnedLearningRates.init must be > 0 (it is log-parameterised), "
          f"got {self.init}.")

  def init_log_lr(self, theta: PyTree, num_steps: int) -> PyTree:
    lead = (num_steps,) if self.per_step else ()
    # The default float dtype (float64 under jax.enable_x64).
    log_init = jnp.log(jnp.asarray(self.init, jnp.result_type(float)))

    def full(shape):
      return jnp.full(lead + tuple(shape), log_init)

    if self.granularity == "scalar":
      return full(())
    if self.granularity == "element":
      return jax.tree.map(lambda p: full(jnp.shape(p)), theta)
    keys = list(theta) if isinstance(theta, Mapping) else []
    missing = [k for k in self.stacked if k not in keys]
    if missing:
      raise ValueError(f"LearnedLearningRates.stacked names {missing}, which "
                       f"are not top-level keys of the parameters {keys}.")

    def per_layer(p):  # [layers, ...] -> one rate per layer, [layers, 1, ...]
      return full(jnp.shape(p)[:1] + (1,) * (jnp.ndim(p) - 1))

    if not self.stacked:
      return jax.tree.map(lambda p: full(()), theta)
    return {k: jax.tree.map(per_layer if k in self.stacked else
                            (lambda p: full(())), v)
            for k, v in theta.items()}


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Per-example or per-token loss weights from a meta-learned NNX rater.

  Attributes:
    network: ``rngs -> nnx.Module``; the module maps features ``[..., F]``
      (chosen by the task, see `Meta.weighted_mean`) to scores ``[..., 1]`` or
      ``[...]``. Its ``nnx.Param`` state is ``eta.loss_weights``.
    max_weight: weights are ``max_weight * sigmoid(score)``, in
      ``[0, max_weight]``; with the default 2 a rater that outputs 0 gives
      weight 1 (the unweighted loss).
    normalise: ``"sigmoid"`` (the default, each weight on its own, as
      above) or ``"softmax"``: the n scores of one call (a whole batch)
      compete, ``w = n * softmax(scores / temperature)`` (weights sum to n;
      equal scores give 1 each: DataRater's normalisation). A softmax
      weight depends on the whole batch, so L is not a mean of
      per-example terms: micro-batching is refused.
    temperature: the softmax temperature (``"softmax"`` only).
  """
  network: Callable[[nnx.Rngs], nnx.Module]
  max_weight: float = 2.0
  normalise: Literal["sigmoid", "softmax"] = "sigmoid"
  temperature: float = 1.0

  def __post_init__(self):
    if not callable(self.network):
      raise TypeError("LossWeights.network must be a callable rngs -> "
                      f"nnx.Module, got {self.network!r}.")
    if not self.max_weight > 0:
      raise ValueError(f"LossWeights.max_weight must be > 0, got "
                       f"{self.max_weight}.")
    if self.normalise not in ("sigmoid", "softmax"):
      raise ValueError("LossWeights.normalise must be 'sigmoid' or "
                       f"'softmax', got {self.normalise!r}.")
    check_number("LossWeights.temperature", self.temperature, strict=True)

  @functools.cached_property
  def graphdef(self) -> nnx.GraphDef:
    """The rater's structure (no arrays are allocated to find it)."""
    abstract = nnx.eval_shape(lambda: self.network(nnx.Rngs(0)))
    graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
    return graphdef

  def init_params(self, key: jax.Array) -> PyTree:
    _, params, rest = nnx.split(self.network(nnx.Rngs(key)), nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError(
          "The loss-weight rater may only hold nnx.Param state (it is applied "
          "functionally inside the inner loss); found other state: "
          f"{jax.tree.structure(rest)}.")
    return nnx.to_pure_dict(params)

  def weights(self, params: PyTree, features: jax.Array) -> jax.Array:
    rater = nnx.merge(self.graphdef, params)
    score = rater(features)
    if score.ndim == features.ndim and score.shape[-1] == 1:
      score = score[..., 0]
    if self.normalise == "softmax":
      flat = jax.nn.softmax(score.reshape(-1) / self.temperature)
      return (score.size * flat).reshape(score.shape)
    return self.max_weight * jax.nn.sigmoid(score)


@dataclasses.dataclass(frozen=True)
class MetaParams:
  """What is meta-learned; composable (any subset of the kinds).

  Attributes:
    learn_init: learn theta0 (MAML) as ``eta.init``.
    learning_rate: the inner learning rate: a fixed float, or
      `LearnedLearningRates` to learn it (``eta.log_lr``).
    loss_weights: optional `LossWeights` rater (``eta.loss_weights``).
    user: ``{name: key -> pytree}`` initialisers of arbitrary user
      meta-parameters (``eta.user[name]``), read by losses via `Meta.user`.
    proximal: lam >= 0; with ``learn_init``, the inner loss is
      ``L + lam/2 ||theta - eta.init||^2`` (iMAML's inner problem, whose
      minimiser depends on the initialisation). 0: no term.
    optimizer: optional `LearnedOptimizer`: the inner update rule is
      learned (``eta.optimizer``) and replaces the task's
      ``inner_optimizer``; ``learning_rate`` (fixed or learned) scales its
      update, so the kinds compose.
  """
  learn_init: bool = False
  learning_rate: Union[float, LearnedLearningRates] = 1e-2
  loss_weights: Optional[LossWeights] = None
  user: Mapping[str, Callable[[jax.Array], PyTree]] = dataclasses.field(
      default_factory=dict)
  proximal: float = 0.0
  optimizer: Optional[LearnedOptimizer] = None

  def __post_init__(self):
    if not isinstance(self.learning_rate, LearnedLearningRates):
      if isinstance(self.learning_rate, bool) or not isinstance(
          self.learning_rate, (int, float)) or not self.learning_rate > 0:
        raise ValueError(
            "MetaParams.learning_rate must be a positive float or "
            f"LearnedLearningRates, got {self.learning_rate!r}.")
    for name, fn in self.user.items():
      if not callable(fn):
        raise TypeError(f"MetaParams.user[{name!r}] must be a callable "
                        f"key -> pytree, got {fn!r}.")
    if self.optimizer is not None and not isinstance(
        self.optimizer, LearnedOptimizer):
      raise TypeError("MetaParams.optimizer must be a LearnedOptimizer or "
                      f"None, got {self.optimizer!r}.")
    if not self.kinds:
      raise ValueError(
          "MetaParams learns nothing: set learn_init=True, "
          "learning_rate=LearnedLearningRates(...), loss_weights=LossWeights("
          "...), user={...} or optimizer=LearnedOptimizer(...).")
    lam = check_number("MetaParams.proximal", self.proximal)
    if lam and not self.learn_init:
      raise ValueError(
          "MetaParams.proximal pulls theta towards the learned initialisation "
          "eta.init: it needs learn_init=True.")
    object.__setattr__(self, "proximal", float(lam))

  @property
  def kinds(self) -> tuple[str, ...]:
    """The fields of `Eta` this spec learns, e.g. ``("init", "log_lr")``."""
    learned = {"init": self.learn_init,
               "log_lr": self.learning_rate_is_learned,
               "loss_weights": self.loss_weights is not None,
               "user": bool(self.user),
               "optimizer": self.optimizer is not None}
    return tuple(kind for kind in Eta._fields if learned[kind])

  @property
  def learning_rate_is_learned(self) -> bool:
    return isinstance(self.learning_rate, LearnedLearningRates)

  @property
  def mean_over_examples(self) -> bool:
    """Whether L is a mean of per-example terms (False with softmax loss
    weights, each of which depends on the whole batch)."""
    return (self.loss_weights is None
            or self.loss_weights.normalise != "softmax")

  def describe(self) -> dict[str, Any]:
    """The spec as JSON values (callables by qualified name): what a
    resumed run must match beyond eta's shapes (``"optimizer"`` only when
    the update rule is learned, so older runs' fingerprints still match)."""
    lr, weights = self.learning_rate, self.loss_weights
    described = {
        "learn_init": self.learn_init,
        "learning_rate": (dataclasses.asdict(lr)
                          if isinstance(lr, LearnedLearningRates) else lr),
        "loss_weights": None if weights is None else {
            "network": _qualified_name(weights.network),
            "max_weight": weights.max_weight, "normalise": weights.normalise,
            "temperature": weights.temperature},
        "user": {name: _qualified_name(fn) for name, fn
                 in sorted(self.user.items())},
        "proximal": self.proximal,
    }
    if self.optimizer is not None:
      described["optimizer"] = self.optimizer.describe()
    return described

  def init(self, key: jax.Array, theta: PyTree, num_steps: int) -> Eta:
    """The initial eta for inner parameters shaped like ``theta``.

    Args:
      key: PRNG key (for the rater, user initialisers and the learned
        optimizer: ``fold_in(key, 2)``, so that adding one changes no other
        kind's draw).
      theta: the inner model's initial parameters (copied into ``eta.init``
        when the initialisation is learned).
      num_steps: T (the leading axis of per-step learning rates).
    """
    k_rater, k_user = jax.random.split(key)
    eta = Eta()
    if self.learn_init:
      eta = eta._replace(init=jax.tree.map(jnp.asarray, theta))
    if isinstance(self.learning_rate, LearnedLearningRates):
      eta = eta._replace(
          log_lr=self.learning_rate.init_log_lr(theta, num_steps))
    if self.loss_weights is not None:
      eta = eta._replace(
          loss_weights=self.loss_weights.init_params(k_rater))
    if self.user:
      keys = jax.random.split(k_user, len(self.user))
      eta = eta._replace(user={name: fn(k) for (name, fn), k
                               in zip(sorted(self.user.items()), keys)})
    if self.optimizer is not None:
      eta = eta._replace(
          optimizer=self.optimizer.init(jax.random.fold_in(key, 2)))
    return eta

  def theta0(self, eta: Eta, theta: PyTree) -> PyTree:
    """The inner loop's start: ``eta.init`` if learned, else ``theta``."""
    return eta.init if self.learn_init else theta

  def learning_rate_for(self, eta: Eta):
    """The inner learning rate: a float, a pytree, or a per-step schedule."""
    if not isinstance(self.learning_rate, LearnedLearningRates):
      return self.learning_rate
    lr = jax.tree.map(jnp.exp, eta.log_lr)
    if not self.learning_rate.per_step:
      return lr

    def schedule(count):
      def at(leaf):
        return leaf[jnp.minimum(count, leaf.shape[0] - 1)]
      return jax.tree.map(at, lr)

    return schedule

  def inner_optimizer(self, eta: Eta,
                      make: Callable[[Any], optax.GradientTransformation]
                      ) -> optax.GradientTransformation:
    """The inner optimiser: ``make(learning_rate)`` with eta's learning
    rate, or the learned rule ``eta.optimizer`` scaled by it."""
    if self.optimizer is not None:
      return learned_optimizer(eta.optimizer, self.learning_rate_for(eta),
                               self.optimizer)
    return make(self.learning_rate_for(eta))

  def regularised(self, inner_loss: jax.Array, theta: PyTree, eta: Eta
                  ) -> jax.Array:
    """``L + lam/2 ||theta - eta.init||^2`` (``L`` itself when
    ``proximal`` is 0): the inner loss every strategy differentiates."""
    if not self.proximal:
      return inner_loss
    sq = sum(jnp.sum(jnp.square(t - t0)) for t, t0 in
             zip(jax.tree.leaves(theta), jax.tree.leaves(eta.init)))
    return inner_loss + 0.5 * self.proximal * sq

  def view(self, eta: Eta) -> "Meta":
    """The `Meta` that the task's losses receive."""
    return Meta(self, eta)


class Meta:
  """What a loss sees of eta: loss weighting and user meta-parameters.

  Built by the framework inside the traced loss; differentiating through its
  methods differentiates with respect to eta.
  """

  def __init__(self, spec: MetaParams, eta: Eta, weighted: bool = True):
    self.spec = spec
    self.eta = eta
    self._weighted = weighted

  @property
  def user(self) -> dict:
    """``eta.user``: the user meta-parameters by name."""
    return self.eta.user or {}

  def unweighted(self) -> "Meta":
    """The same view with loss weighting off (for the outer loss V)."""
    return Meta(self.spec, self.eta, weighted=False)

  def loss_weights(self, features: jax.Array) -> Optional[jax.Array]:
    """Weights ``[...]`` in ``[0, max_weight]`` for features ``[..., F]``,
    or None when the spec has no loss weighting (or this view is unweighted)."""
    if self.spec.loss_weights is None or not self._weighted:
      return None
    return self.spec.loss_weights.weights(self.eta.loss_weights, features)

  def weighted_mean(self, losses: jax.Array,
                    features: Optional[jax.Array] = None) -> jax.Array:
    """``mean(w * losses)`` with ``w = loss_weights(features)``, or
    ``mean(losses)`` without loss weighting.

    Args:
      losses: per-example ``[B]`` or per-token ``[B, L]`` losses.
      features: ``[*losses.shape, F]``, the rater's input (required when the
        spec has loss weights).
    """
    w = self.loss_weights(features) if features is not None else None
    if self.spec.loss_weights is not None and self._weighted:
      if w is None:
        raise ValueError("This MetaParams learns loss weights: the task must "
                         "pass features to Meta.weighted_mean.")
      if w.shape != losses.shape:
        raise ValueError(f"Loss weights have shape {w.shape} but the losses "
                         f"have shape {losses.shape}.")
      return jnp.mean(w * losses)
    return jnp.mean(losses)
