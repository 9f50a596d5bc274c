"""`Layout`: where every array of meta-training lives, computed once.

For a `Program` on a ``(data, fsdp)`` mesh (`metaflow.sharding`), one
frozen object holds the abstract shapes and the shardings of everything
the jitted functions take and return, and this process's share:

* a meta-batch (leaves ``[B, ...]``): split over every device along B
  (whole episodes), or, for a task with `Task.example_axes`, along the
  examples axis of every leaf; this process reads only its ranges of it
  (`share`);
* theta: split over ``fsdp`` by the task's partition rules (example-split
  tasks) or replicated; inside each loss it is gathered (`gathered`);
* the `TrainState`: eta replicated except a learned initialisation (like
  theta), the outer optimiser's state like eta, step and RNG replicated,
  online learners like the inner carry with a leading P (replicated P,
  theta over ``fsdp``) or whole learners split over the devices like
  episodes.

Nothing here runs a computation on a device except the abstract
evaluations (``jax.eval_shape``) of the model and the initial state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metaflow import data, sharding
from metaflow._checks import PyTree
from metaflow.online import Learners
from metaflow.program import Model, Program
from metaflow.train_state import TrainState, initial_state


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """Shapes and shardings of a program's arrays on a mesh (module
  docstring); build one with `Layout.build`.

  Attributes:
    mesh: the ``(data, fsdp)`` mesh.
    split_examples: whether the examples of every batch are split over the
      devices (`Task.example_axes`) instead of whole episodes.
    batch_shapes: a meta-batch ``[B, ...]`` as ``jax.ShapeDtypeStruct`` leaves.
    batch_shardings: its ``NamedSharding`` per leaf.
    split_size: the size of the split axis (B, or the examples per batch).
    share: the ranges ``(start, stop)`` of the split axis this process's
      devices hold (`metaflow.sharding.process_share`).
    model_shapes: the `Model`'s shapes (theta and rest).
    model_shardings: theta's shardings (by the partition rules) and rest's
      (replicated).
    state_shapes: the `TrainState`'s shapes (one ``jax.eval_shape`` of
      `initial_state`).
    state_shardings: the `TrainState`'s shardings.
  """
  mesh: Mesh
  split_examples: bool
  batch_shapes: PyTree
  batch_shardings: PyTree
  split_size: int
  share: tuple[tuple[int, int], ...]
  model_shapes: Model
  model_shardings: Model
  state_shapes: TrainState
  state_shardings: TrainState

  @classmethod
  def build(cls, program: Program, mesh: Mesh) -> "Layout":
    """The layout of ``program`` on ``mesh``.

    Raises:
      ValueError: example axes that do not fit the episodes, a batch the
        mesh does not divide, or a first episode ``split_episode`` cannot
        split; one line each, before anything is compiled.
    """
    task, t = program.task, program.num_inner_steps
    mesh = sharding.check_mesh(mesh)
    first = data.take(task.episodes("train", program.seed, t), 1)
    name = task.name or type(task).__name__
    _check_split(task, name, jax.tree.map(lambda x: x[0], first), t)
    batch_shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((program.meta_batch_size,)
                                       + x.shape[1:], x.dtype), first)
    split_examples = task.example_axes is not None
    axes, size = _split_axes(task, name, batch_shapes)
    if split_examples:
      sharding.check_batch_divisible(
          f"Task {name!r}: the number of examples per batch (its "
          "example_axes, split over the devices)", size, mesh,
          "the built-in language-model tasks: --config.task.batch_size")
    else:
      sharding.check_batch_divisible("meta_batch_size", size, mesh,
                                     "--config.meta_batch_size")
    batch_shardings = jax.tree.map(
        lambda x, axis: NamedSharding(mesh, sharding.batch_spec(x.ndim, axis)),
        batch_shapes, axes)

    model_shapes = jax.eval_shape(lambda: program.init_model(program.seed))
    replicated = sharding.replicated(mesh)
    theta_specs = (sharding.param_specs(model_shapes.theta, mesh,
                                        task.partition_rules())
                   if split_examples else
                   jax.tree.map(lambda _: PartitionSpec(), model_shapes.theta))
    model_shardings = Model(sharding.named(mesh, theta_specs),
                            jax.tree.map(lambda _: replicated,
                                         model_shapes.rest))
    state_shapes = jax.eval_shape(functools.partial(initial_state, program),
                                  model_shapes.theta)
    layout = cls(mesh, split_examples, batch_shapes, batch_shardings,
                 size, sharding.process_share(mesh, size), model_shapes,
                 model_shardings, state_shapes, state_shapes)
    return dataclasses.replace(
        layout, state_shardings=layout._state_shardings(program))

  # -------------------------------------------------------------- shardings
  @property
  def replicated(self) -> NamedSharding:
    return sharding.replicated(self.mesh)

  @property
  def theta_shardings(self) -> PyTree:
    return self.model_shardings.theta

  @property
  def gathered(self) -> PyTree:
    """theta's shardings where a loss uses it: replicated (FSDP's gather
    before use, which keeps the activations split by the batch)."""
    return jax.tree.map(lambda _: self.replicated, self.model_shapes.theta)

  def chunked(self, shardings: PyTree) -> PyTree:
    """``shardings`` with a leading unsplit axis (stacked meta-batches)."""
    return jax.tree.map(
        lambda s: NamedSharding(self.mesh, PartitionSpec(None, *s.spec)),
        shardings)

  def _state_shardings(self, program: Program) -> TrainState:
    state = self.state_shapes
    eta = state.eta._replace(**{
        kind: jax.tree.map(lambda _: self.replicated, value)
        for kind, value in state.eta._asdict().items() if kind != "init"})
    eta = eta._replace(init=None if state.eta.init is None
                       else self.theta_shardings)
    return TrainState(
        step=self.replicated, eta=eta,
        opt_state=sharding.optimizer_state_shardings(
            program.outer, state.opt_state, eta, self.mesh),
        rng=self.replicated,
        learners=self._learners_shardings(program, state))

  def _learners_shardings(self, program: Program, state: TrainState
                          ) -> Optional[Learners]:
    """Per learner, theta and s laid out like the inner loop's carry
    (split over ``fsdp`` for example-split tasks, a replicated leading P),
    or whole learners split over the devices like episodes; None
    offline."""
    if not program.learning.enabled:
      return None
    if not self.split_examples:
      population = NamedSharding(self.mesh, PartitionSpec(sharding.BATCH_AXES))
      return jax.tree.map(lambda _: population, state.learners)
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                       state.learners.opt_state)
    return Learners(self.chunked(self.theta_shardings),
                    self.chunked(self.inner_state_shardings(program, one)),
                    self.replicated,
                    None if state.learners.lifetime is None
                    else self.replicated)

  def inner_state_shardings(self, program: Program, inner_state: PyTree
                            ) -> PyTree:
    """Shardings of one inner optimiser state s (shapes ``inner_state``):
    entries shaped like theta as theta, the rest replicated."""
    # The optimiser's structure (which state entries are shaped like theta)
    # needs a concrete eta (learned rates are read when it is built): zeros
    # that numpy allocates lazily and that are never written.
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                         self.state_shapes.eta)
    return sharding.optimizer_state_shardings(
        program.inner_optimizer(zeros), inner_state, self.theta_shardings,
        self.mesh)

  # ------------------------------------------------------------------ data
  def episodes(self, program: Program, split: str
               ) -> tuple[Any, tuple[tuple[int, int], ...]]:
    """This process's episodes of ``split`` and the meta-batch positions
    it reads (its share: positions of episodes, or examples within
    them)."""
    task, t, seed = program.task, program.num_inner_steps, program.seed
    if not self.split_examples:
      return task.episodes(split, seed, t), self.share
    everything = ((0, program.meta_batch_size),)
    if self.share == ((0, self.split_size),):
      return task.episodes(split, seed, t), everything
    return task.local_episodes(split, seed, t, self.share), everything

  def global_batch(self, local: PyTree, chunks: Optional[int] = None
                   ) -> PyTree:
    """Global arrays of this process's share of a meta-batch (leaves
    ``[B, ...]``), or of ``chunks`` stacked meta-batches."""
    shapes, shardings = self.batch_shapes, self.batch_shardings
    if chunks is not None:
      shapes = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct((chunks,) + x.shape, x.dtype), shapes)
      shardings = self.chunked(shardings)
    _check_shapes(local, shapes, shardings)
    return sharding.global_batch(local, shardings, shapes)

  def vmap(self, fn: Callable) -> Callable:
    """``jax.vmap`` over the episodes of a meta-batch; split over the
    devices when whole episodes are."""
    return jax.vmap(fn, spmd_axis_name=(None if self.split_examples
                                        else sharding.BATCH_AXES))

  def abstract(self, tree: PyTree, shardings: PyTree) -> PyTree:
    """``tree`` (arrays or shapes) as ``jax.ShapeDtypeStruct`` leaves carrying
    ``shardings``: arguments to lower a jitted function with."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
        tree, shardings)

  @property
  def episodes_per_device(self) -> int:
    """How many of a meta-batch's episodes one device computes (all of
    them, on its share of the examples, when examples are split)."""
    b = int(jax.tree.leaves(self.batch_shapes)[0].shape[0])
    return b if self.split_examples else b // sharding.batch_size_divisor(
        self.mesh)


def _check_split(task, name: str, episode: PyTree, num_steps: int) -> None:
  """One line, before anything is compiled, when ``task.split_episode``
  cannot split the first training episode."""
  try:
    jax.eval_shape(lambda e: task.split_episode(e, num_steps), episode)
  except KeyError as e:
    keys = list(episode) if isinstance(episode, dict) else type(episode)
    raise ValueError(
        f"Task {name!r}: split_episode cannot split episode 0 of split "
        f"'train' (KeyError: {e}; the episode's keys: {keys}). Episodes "
        "come from Task.dataset (or Task.episodes) and "
        "Task.split_episode(episode, num_steps) makes (inner_batches, "
        "outer_batch) of one: make the two agree.") from None
  except ValueError as e:
    raise ValueError(f"{e} (Episode 0 of split 'train'.)") from None


def _check_shapes(local: PyTree, shapes: PyTree, shardings: PyTree) -> None:
  """One line when a (share of a) meta-batch does not have the shapes the
  run was laid out for (those of the first training episode): every axis
  but the split one, whose share a process holds, must match."""
  paths = jax.tree_util.tree_leaves_with_path(shapes)
  for (path, want), got, s in zip(paths, jax.tree.leaves(local),
                                  jax.tree.leaves(shardings)):
    split = [i for i, entry in enumerate(s.spec) if entry is not None]
    got, want = tuple(np.shape(got)), tuple(want.shape)
    if len(got) != len(want) or any(
        g != w for i, (g, w) in enumerate(zip(got, want)) if i not in split):
      raise ValueError(
          f"Episodes of different shapes: a meta-batch has "
          f"{jax.tree_util.keystr(path)} of shape {got}, but the run was "
          f"laid out for {want} from episode 0 of split 'train'. "
          + data.SAME_SHAPES)


def _split_axes(task, name: str, batch_shapes: PyTree) -> tuple[PyTree, int]:
  """The split axis of every leaf of a meta-batch and its one size."""
  if task.example_axes is not None:
    try:
      axes = jax.tree.map(
          lambda axis, sub: jax.tree.map(lambda _: axis + 1, sub),
          task.example_axes, batch_shapes)
    except ValueError as e:
      raise ValueError(f"Task {name!r}: example_axes "
                       f"{task.example_axes!r} is not a prefix of its "
                       f"episodes' structure: {e}") from None
  else:
    axes = jax.tree.map(lambda _: 0, batch_shapes)
  sizes = {x.shape[axis] if 0 <= axis < x.ndim else -1 for x, axis in
           zip(jax.tree.leaves(batch_shapes), jax.tree.leaves(axes))}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(f"Task {name!r}: its episodes' example axes "
                     f"{task.example_axes!r} must exist and have one "
                     f"size in every leaf; found sizes {sizes}.")
  (size,) = sizes
  return axes, size
