"""Grain pipelines of episodes: deterministic, random-access, checkpointable.

An episode dataset is ``grain.MapDataset.range(n).map(Seeded(sample, ...))``:
item ``i`` is ``sample(np.random.default_rng([seed, split, i]))``. Its content
therefore depends only on ``(seed, split, i)``, not on worker processes or on
the order of reads, and the position of an iterator over it (its Grain state,
checkpointed by the trainer) is all that resuming needs.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from typing import Callable, Optional, Sequence

import grain
import jax
import numpy as np

from metaflow._checks import PyTree

#: The splits of a task; meta-train, held-out validation and test episodes.
SPLITS = ("train", "validation", "test")

#: Episodes per split dataset: "unbounded" for procedural tasks.
NUM_EPISODES = 2**31 - 1


#: Files shipped with the package (``metaflow/_data``), by name.
BUNDLED = ("tinyshakespeare.txt",)


def bundled_path(name: str) -> str:
  """The path of a data file shipped with metaflow (package data, found through
  `importlib.resources`, so it works from a clone and from an installed wheel).

  ``"tinyshakespeare.txt"``: the works of Shakespeare, 1,115,394 bytes of
  public-domain UTF-8 text, for the language-model examples and studies.

  Raises:
    ValueError: ``name`` is not one of `BUNDLED`.
  """
  if name not in BUNDLED:
    raise ValueError(f"no bundled data file {name!r}; metaflow ships "
                     f"{', '.join(BUNDLED)}.")
  return str(importlib.resources.files("metaflow") / "_data" / name)


def check_split(split: str) -> int:
  """Index of ``split`` in `SPLITS`; ValueError for an unknown split."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  return SPLITS.index(split)


@dataclasses.dataclass(frozen=True)
class Seeded:
  """``index -> sample(rng)`` with ``rng`` seeded by ``(seed, split, index)``.

  A picklable Grain map function (worker processes receive a copy).
  """
  sample: Callable[[np.random.Generator], PyTree]
  seed: int
  split: int

  def __call__(self, index: int) -> PyTree:
    return self.sample(
        np.random.default_rng([self.seed, self.split, int(index)]))


def episodes(sample: Callable[[np.random.Generator], PyTree], seed: int,
             split: str, num_episodes: int = NUM_EPISODES) -> grain.MapDataset:
  """A deterministic dataset of ``num_episodes`` episodes of ``split``.

  Args:
    sample: ``rng -> episode`` (a dict of numpy arrays); must be picklable
      (a module-level function or a dataclass instance) for worker processes.
    seed: the data seed.
    split: one of `SPLITS` (distinct splits give independent streams).
    num_episodes: length of the dataset.
  """
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}.")
  return grain.MapDataset.range(num_episodes).map(
      Seeded(sample, int(seed), check_split(split)))


#: How to fix episodes of different shapes (the end of the error message).
SAME_SHAPES = (
    "Every episode of a task must have the same keys and shapes (they are "
    "stacked into meta-batches): make Task.dataset (or Task.episodes) return "
    "equally shaped episodes, padded or cropped; Task.split_episode then "
    "makes (inner_batches, outer_batch) of one.")


def stack(items: Sequence[PyTree], indices: Optional[Sequence[int]] = None,
          what: str = "episode") -> PyTree:
  """Stacks equally shaped pytrees of numpy arrays on a new leading axis.

  Raises:
    ValueError: two items of different structure or shapes, one line
      naming both (by ``indices``, default their positions: ``what``
      ``indices[i]``) and the key that differs.
  """
  indices = list(range(len(items))) if indices is None else list(indices)
  first = jax.tree_util.tree_flatten_with_path(items[0])
  fix = SAME_SHAPES
  for index, item in zip(indices[1:], items[1:]):
    leaves, tree = jax.tree_util.tree_flatten_with_path(item)
    if tree != first[1]:
      raise ValueError(
          f"{what.capitalize()}s of different structure: {what} {index} has "
          f"keys {_keys(leaves)} but {what} {indices[0]} has "
          f"{_keys(first[0])}. {fix}")
    for (path, a), (_, b) in zip(first[0], leaves):
      if np.shape(a) != np.shape(b):
        raise ValueError(
            f"{what.capitalize()}s of different shapes: {what} {index} has "
            f"{jax.tree_util.keystr(path) or 'its value'} of shape "
            f"{np.shape(b)} but {what} {indices[0]} has {np.shape(a)}. {fix}")
  return jax.tree.map(lambda *leaves: np.stack(leaves), *items)


def _keys(leaves) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in leaves]


@dataclasses.dataclass(frozen=True)
class MetaBatch:
  """Grain map: ``k ->`` meta-batch ``k`` (episodes ``k*size ... k*size +
  size - 1`` of ``dataset``, stacked), or only the episodes at the positions
  ``owned`` (``(start, stop)`` ranges of ``range(size)``) when a process
  reads its share. Picklable."""
  dataset: grain.MapDataset
  size: int
  owned: tuple[tuple[int, int], ...]

  def __call__(self, index: int) -> PyTree:
    first = int(index) * self.size
    positions = [first + j for start, stop in self.owned
                 for j in range(start, stop)]
    return stack([self.dataset[i] for i in positions], positions)


def meta_batches(dataset: grain.MapDataset, meta_batch_size: int,
                 num_workers: int = 0,
                 worker_buffer_size: Optional[int] = None, *,
                 owned: Optional[Sequence[tuple[int, int]]] = None
                 ) -> grain.IterDataset:
  """Stacks episodes into meta-batches (leading axis ``meta_batch_size``).

  Item ``k`` is meta-batch ``k`` (episodes ``k * meta_batch_size ...``), so
  an iterator's state is the index of the next meta-batch, whatever
  ``owned`` is: the data position of a run is the same in every process and
  for any number of processes.

  With ``num_workers > 0`` the episodes are produced by Grain worker
  processes (``mp_prefetch``); the result and its checkpointable state do not
  depend on the number of workers. Worker processes need absl flags parsed:
  `launch.train` runs under ``absl.app``; elsewhere call
  ``absl.flags.FLAGS.mark_as_parsed()`` first.

  Args:
    dataset: the episodes.
    meta_batch_size: episodes per meta-batch.
    num_workers: Grain worker processes (0: in this process).
    worker_buffer_size: meta-batches each worker prepares ahead (default 1).
    owned: only these positions of every meta-batch (``(start, stop)``
      ranges of ``range(meta_batch_size)``): this process's share, see
      `metaflow.sharding.process_share`. Default: all.
  """
  if meta_batch_size < 1:
    raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}.")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
  owned = ((0, meta_batch_size),) if owned is None else tuple(
      (int(a), int(b)) for a, b in owned)
  if not owned or not all(0 <= a < b <= meta_batch_size for a, b in owned):
    raise ValueError(f"owned {owned} must be non-empty ranges within the "
                     f"meta-batch of {meta_batch_size}.")
  ds = grain.MapDataset.range(len(dataset) // meta_batch_size).map(
      MetaBatch(dataset, meta_batch_size, owned)).to_iter_dataset()
  if num_workers:
    options = grain.MultiprocessingOptions(
        num_workers=num_workers,
        per_worker_buffer_size=worker_buffer_size or 1)
    ds = ds.mp_prefetch(options)
  return ds


def take(dataset: grain.MapDataset, n: int) -> PyTree:
  """The first ``n`` items of ``dataset`` stacked (leading axis ``n``)."""
  return MetaBatch(dataset, n, ((0, n),))(0)
