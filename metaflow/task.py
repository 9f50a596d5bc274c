"""`Task`: the contract a bilevel problem implements, and the task registry.

A task says what the inner model is, what the inner loss L and the outer loss V
are on ``(model, meta, batch)``, what is meta-learned (`MetaParams`), which
inner optimiser Phi runs, and where the episodes come from. The framework
(`BilevelTrainer`) does everything else: it splits the model with
``nnx.split`` into the trained state theta (``nnx.Param`` by default) and the
rest, re-merges a module around each theta inside the inner loop, builds eta,
the meta-gradient, the outer loop, evaluation, checkpoints and metrics.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from metaflow import optim
from metaflow._checks import PyTree
from metaflow.estimators import Strategy
from metaflow.meta_params import Eta, Meta, MetaParams

if TYPE_CHECKING:  # Grain is imported by the trainer, not by the engine.
  import grain


class Task(abc.ABC):
  """A bilevel problem: subclass it, implement the abstract methods, register.

  **Episodes.** `dataset` returns a ``grain.MapDataset`` whose items are
  episodes (dicts of numpy arrays, one task each). `split_episode` turns an
  episode into ``(inner_batches, outer_batch)``; by default an episode is
  ``{"support": ..., "query": ...}``, every inner step sees the whole support
  set (full-batch, as in MAML) and V is evaluated on the query set. Episodes
  are stacked into meta-batches and vmapped. A task whose episodes depend on
  T (a fresh batch per inner step, e.g. a text stream) implements `episodes`
  instead of `dataset`.

  **Inner state policy (BatchNorm and other non-Param state).** Only the state
  selected by ``trainable`` (``nnx.Param``) is theta: it is updated by the
  inner optimiser and differentiated. Every other variable (e.g. BatchNorm's
  running statistics, ``nnx.BatchStat``) is a constant of the whole bilevel
  problem: each inner step re-merges the module with the values it had at
  initialisation, and any update a module makes to it during a loss is
  discarded (never carried between inner steps, never meta-learned). A
  BatchNorm in training mode therefore normalises with the statistics of the
  current batch (transductive batch norm, as in MAML) and needs no carried
  state; in evaluation mode it uses the initial running statistics. Prefer
  LayerNorm/GroupNorm when that matters.

  **Strategies.** Every meta-parameter kind of `MetaParams` (learned
  initialisation, learning rates, loss weights, user meta-parameters) works
  with every exact gradient strategy (``standard``, ``mixflow``, ``+remat``,
  ``+remat+saved_inner_grads``): eta may enter theta0, Phi and L, and all of
  them compute the same meta-gradient. The approximate ones (``implicit``,
  ``first_order``) see only some of these paths; each refuses what it would
  get as zero (`metaflow.Strategy.check_meta_params`). A task whose losses
  cannot be handled by some strategy lists the ones it supports in
  ``supported_strategies`` and says why in ``unsupported_reason``;
  `check_strategy` then rejects the others before anything is compiled.
  MixFlow-MG differentiates the inner gradient forward-mode, so L must be
  ``jax.jvp``-able (a custom-VJP op without a JVP rule inside L is the
  typical reason to restrict a task to ``standard``).

  **Sharding** (`metaflow.sharding`, several devices or processes). Every
  device computes on its own share of each meta-batch. By default the
  meta-batch's episodes are split over the devices (each episode's inner
  loop runs whole on one device). A task whose episodes are large batches
  of independent examples (a language model: one episode of T batches of B
  sequences per meta-step) sets ``example_axes`` so that the examples of
  every batch are split instead, and its parameters theta over the mesh's
  ``fsdp`` axis by `partition_rules`. With several processes each process
  reads only its share (`local_episodes`).

  Class attributes:
    name: the registry name (set by `register`).
    trainable: the ``nnx`` filter of theta (default ``nnx.Param``).
    resample_init: if True and the initialisation is not meta-learned, theta0
      is a fresh model initialisation at every meta-step (drawn from the
      trainer's RNG), so learned hyper-parameters do not overfit one init.
    supported_strategies: strategy names this task supports (None: all).
    unsupported_reason: why the others are not supported.
    example_axes: None (default): the meta-batch's episodes are split over
      the devices. Otherwise a pytree prefix of an episode giving, for each
      leaf, the axis of its independent examples, which is split over the
      devices instead (the language-model tasks: ``{"inner": 1, "outer":
      0}``, the B sequences of the inner batches ``[T, B, L+1]`` and of the
      outer batch ``[B, L+1]``). The losses must treat those examples
      symmetrically (a mean over them), as a batch.
  """

  name: ClassVar[str] = ""
  trainable: ClassVar[Any] = nnx.Param
  resample_init: bool = False
  supported_strategies: ClassVar[Optional[tuple[str, ...]]] = None
  unsupported_reason: ClassVar[str] = ""
  example_axes: ClassVar[Optional[PyTree]] = None

  @abc.abstractmethod
  def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """The inner model, freshly initialised from ``rngs``."""

  @abc.abstractmethod
  def inner_loss(self, model: nnx.Module, meta: Meta,
                 batch: PyTree) -> jax.Array:
    """L: the scalar inner (training) loss of ``model`` on one batch.

    Use ``meta.weighted_mean(per_example_losses, features)`` to reduce so that
    learned loss weights (if the `MetaParams` has them) apply.
    """

  def outer_loss(self, model: nnx.Module, meta: Meta,
                 batch: PyTree) -> jax.Array:
    """V: the scalar outer (validation) loss of the adapted model; by default
    the inner loss without loss weighting."""
    return self.inner_loss(model, meta.unweighted(), batch)

  @abc.abstractmethod
  def meta_params(self) -> MetaParams:
    """What is meta-learned."""

  def inner_optimizer(self, learning_rate: Any) -> optax.GradientTransformation:
    """Phi, given the (possibly learned, pytree or per-step) learning rate;
    plain SGD by default. Use `metaflow.optim` (safe to differentiate)."""
    return optim.sgd(learning_rate)

  def dataset(self, split: str, seed: int) -> grain.MapDataset:
    """Episodes of ``split`` (``"train"``, ``"validation"`` or ``"test"``),
    deterministic given ``seed``; see `metaflow.data.episodes`.

    A task implements this, or `episodes` when an episode depends on T."""
    raise NotImplementedError(
        f"Task {self.name or type(self).__name__!r} implements neither "
        "dataset(split, seed) nor episodes(split, seed, num_inner_steps).")

  def episodes(self, split: str, seed: int, num_inner_steps: int
               ) -> grain.MapDataset:
    """The episodes the trainer uses for a T-step inner loop.

    By default `dataset` (episodes that do not depend on T, whose inner
    batches `split_episode` makes). Override it instead of `dataset` when
    each inner step needs its own batch, e.g. a text stream whose episodes
    hold T fresh batches ``[T, ...]`` for the inner loop.
    """
    del num_inner_steps
    return self.dataset(split, seed)

  def local_episodes(self, split: str, seed: int, num_inner_steps: int,
                     examples: tuple[tuple[int, int], ...]) -> grain.MapDataset:
    """`episodes` holding only the examples ``examples`` (ranges ``(start,
    stop)`` along `example_axes`, concatenated): what one process reads when
    the examples are split over processes. By default whole episodes are
    read and cut; override it to read only those examples."""
    return self.episodes(split, seed, num_inner_steps).map(
        TakeExamples(self.example_axes, tuple(examples)))

  def partition_rules(self) -> Optional[tuple[tuple[str, Any], ...]]:
    """How theta is split over the mesh's ``fsdp`` axis: ``(regex,
    jax.sharding.PartitionSpec)`` pairs matched against parameter paths
    (see `metaflow.sharding.param_specs`), or None for the default (each
    large parameter's largest axis that ``fsdp`` divides). Used only when
    `example_axes` is set: episodes split over devices keep theta whole."""
    return None

  def split_episode(self, episode: PyTree, num_steps: int
                    ) -> tuple[PyTree, PyTree]:
    """``(inner_batches, outer_batch)``; inner leaves get a leading axis T.

    By default an episode is ``{"support": ..., "query": ...}``: every inner
    step sees the support set, V the query set. Override it for another
    layout.

    Raises:
      ValueError: (default) an episode without ``"support"`` or
        ``"query"``.
    """
    keys = list(episode) if isinstance(episode, Mapping) else None
    missing = [k for k in ("support", "query") if keys is None or k not in keys]
    if missing:
      found = (f"its keys are {keys}" if keys is not None else
               f"it is a {type(episode).__name__}, not a dict")
      raise ValueError(
          f"Task {self.name or type(self).__name__!r}: an episode has no "
          f"{' and no '.join(repr(k) for k in missing)} ({found}). The "
          "default Task.split_episode expects episodes {'support': inner "
          "batch, 'query': outer batch}: return those from Task.dataset, or "
          "override Task.split_episode(episode, num_steps) -> "
          "(inner_batches, outer_batch) for your own keys.")
    inner = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_steps,) + jnp.shape(x)),
        episode["support"])
    return inner, episode["query"]

  def eval_metrics(self, model: nnx.Module, meta: Meta, batch: PyTree
                   ) -> dict[str, jax.Array]:
    """Extra scalar metrics of the adapted model on the outer batch (e.g.
    accuracy), averaged over evaluation episodes. None by default."""
    del model, meta, batch
    return {}

  def config(self) -> dict[str, Any]:
    """The task's settings (for checkpoint compatibility checks): the
    dataclass fields of a dataclass task, else empty."""
    if dataclasses.is_dataclass(self):
      return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {}

  def check_strategy(self, strategy: Strategy) -> None:
    """Raises ValueError, before anything is compiled, if this task cannot
    use ``strategy``."""
    if (self.supported_strategies is not None
        and strategy.name not in self.supported_strategies):
      raise ValueError(
          f"Task {self.name or type(self).__name__!r} does not support "
          f"strategy {strategy.name!r} (supported: "
          f"{', '.join(self.supported_strategies)}): "
          f"{self.unsupported_reason or 'no reason given'}")


@dataclasses.dataclass(frozen=True)
class TakeExamples:
  """Grain map: an episode -> the examples ``ranges`` (``(start, stop)``
  pairs, concatenated) along each leaf's axis in ``axes`` (a pytree prefix
  of the episode, see `Task.example_axes`). Picklable."""
  axes: PyTree
  ranges: tuple[tuple[int, int], ...]

  def __call__(self, episode: PyTree) -> PyTree:
    def take(axis, subtree):
      index = np.concatenate([np.arange(a, b) for a, b in self.ranges])
      return jax.tree.map(lambda x: np.take(x, index, axis=axis), subtree)
    return jax.tree.map(take, self.axes, episode)


@dataclasses.dataclass(frozen=True)
class Functional:
  """A task's losses as pure functions of ``(theta, eta, batch)``.

  ``theta`` is the pure dict of the trained state; the other state (``rest``)
  is a constant of the inner loop (see `Task`'s inner state policy), an
  argument of the trainer's jitted functions (`metaflow.program.Model`).
  This is the bridge between NNX modules and the engine
  (`metaflow.meta_value_and_grad`).

  ``gathered``: optional shardings (a pytree like theta) that theta is
  constrained to where the module uses it. The trainer passes replicated
  shardings: theta stays split over the mesh's ``fsdp`` axis in the inner
  loop's carry and is gathered for each loss evaluation (FSDP), so XLA keeps
  the activations split by the batch. (Left to itself, XLA's sharding
  propagation may instead split activations like the parameters, e.g. by
  width or heads, and keep every example's activations on every device.)
  """
  task: Task
  spec: MetaParams
  graphdef: nnx.GraphDef
  rest: PyTree
  gathered: Optional[PyTree] = None

  @staticmethod
  def split(task: Task, model: nnx.Module
            ) -> tuple[nnx.GraphDef, PyTree, PyTree]:
    """``(graphdef, theta, rest)`` of ``model``: theta the state selected by
    ``task.trainable`` and rest the other state, both pure dicts."""
    graphdef, theta, rest = nnx.split(model, task.trainable, ...)
    return graphdef, nnx.to_pure_dict(theta), nnx.to_pure_dict(rest)

  @classmethod
  def of(cls, task: Task, model: nnx.Module) -> tuple["Functional", PyTree]:
    """Splits ``model``; returns the functional view and its theta."""
    graphdef, theta, rest = cls.split(task, model)
    return cls(task, task.meta_params(), graphdef, rest), theta

  def model(self, theta: PyTree) -> nnx.Module:
    """A module with parameters ``theta`` (and the constant rest)."""
    if self.gathered is not None:
      theta = jax.lax.with_sharding_constraint(theta, self.gathered)
    return nnx.merge(self.graphdef, theta, self.rest)

  def inner_loss(self, theta: PyTree, eta: Eta, batch: PyTree) -> jax.Array:
    """The task's L with the spec's regulariser (`MetaParams.regularised`)."""
    loss = self.task.inner_loss(self.model(theta), self.spec.view(eta), batch)
    return self.spec.regularised(loss, theta, eta)

  def outer_loss(self, theta: PyTree, eta: Eta, batch: PyTree) -> jax.Array:
    return self.task.outer_loss(self.model(theta), self.spec.view(eta), batch)

  def eval_metrics(self, theta: PyTree, eta: Eta, batch: PyTree) -> dict:
    return self.task.eval_metrics(self.model(theta), self.spec.view(eta), batch)

  def optimizer(self, eta: Eta) -> optax.GradientTransformation:
    """Phi for meta-parameters eta (learned learning rates enter here)."""
    return self.spec.inner_optimizer(eta, self.task.inner_optimizer)


_REGISTRY: dict[str, type[Task]] = {}


def register(name: str) -> Callable[[type[Task]], type[Task]]:
  """Class decorator: registers a `Task` subclass under ``name``."""
  def wrap(cls: type[Task]) -> type[Task]:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
      raise TypeError(
          f"register({name!r}) expects a Task subclass, got {cls!r}.")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"A different task is already registered as {name!r}: "
                       f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__name__}.")
    cls.name = name
    _REGISTRY[name] = cls
    return cls
  return wrap


def registered_tasks() -> tuple[str, ...]:
  """Names of the registered tasks, sorted."""
  return tuple(sorted(_REGISTRY))


def import_task(spec: str) -> str:
  """The registry name of the task ``spec`` names, importing it if needed.

  ``spec`` is a registered name, or ``"package.module:ClassName"``: a `Task`
  subclass defined anywhere importable (how a user's own task is launched
  without editing this repository). That module is imported and the class
  registered under ``spec`` (or, if the module registers it itself, under
  its own name).

  Raises:
    ValueError: a module that cannot be imported, no such class, not a Task
      subclass, or an unknown registered name.
  """
  if ":" not in spec:
    if spec not in _REGISTRY:
      raise ValueError(f"unknown task {spec!r}; registered tasks: "
                       f"{', '.join(registered_tasks()) or '(none)'} (or "
                       "give package.module:ClassName).")
    return spec
  module_name, _, class_name = spec.partition(":")
  module = import_module(module_name, f"task {spec!r}")
  cls = getattr(module, class_name, None)
  if cls is None:
    raise ValueError(f"task {spec!r}: module {module_name} has no "
                     f"{class_name!r}.")
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    kind = "class" if isinstance(cls, type) else type(cls).__name__
    raise ValueError(f"task {spec!r}: {class_name} is a {kind}, not a "
                     "metaflow.Task subclass.")
  if cls.name and _REGISTRY.get(cls.name) is cls:
    return cls.name
  register(spec)(cls)
  return spec


def task_class(name: str) -> type[Task]:
  """The class of the task ``name`` (a registered name or
  ``"package.module:ClassName"``, as `import_task` takes).

  Raises:
    ValueError: as `import_task`.
  """
  return _REGISTRY[import_task(name)]


def task_defaults(name: str) -> dict[str, Any]:
  """The settings of registered task ``name`` that have a default (the
  fields of a dataclass task), at their defaults."""
  cls = task_class(name)
  if not dataclasses.is_dataclass(cls):
    return {}
  defaults = {}
  for field in dataclasses.fields(cls):
    if field.default is not dataclasses.MISSING:
      defaults[field.name] = field.default
    elif field.default_factory is not dataclasses.MISSING:
      defaults[field.name] = field.default_factory()
  return defaults


def import_module(name: str, what: str):
  """``importlib.import_module(name)``; ValueError naming ``what`` if the
  module cannot be found or fails while it is imported."""
  import importlib
  try:
    return importlib.import_module(name)
  except Exception as e:  # noqa: BLE001 (the user's module: any error)
    raise ValueError(f"{what}: cannot import module {name!r} "
                     f"({type(e).__name__}: {e}).") from None


def create_task(name: str, **settings: Any) -> Task:
  """The registered task ``name`` constructed with ``settings``.

  Raises:
    ValueError: unknown task name, or a setting the task does not have.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown task {name!r}; registered tasks: "
                     f"{', '.join(registered_tasks()) or '(none)'}.")
  cls = _REGISTRY[name]
  if dataclasses.is_dataclass(cls):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
      raise ValueError(f"Task {name!r} has no setting(s) {', '.join(unknown)}; "
                       f"its settings are: {', '.join(sorted(known))}.")
  return cls(**settings)
