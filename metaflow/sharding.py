"""Sharding of meta-training over the devices of every process (jax.sharding).

One device mesh with two named axes, built over all devices of all processes:

* ``data``: devices that hold different examples of a batch and the same
  parameters (data parallelism);
* ``fsdp``: devices that also hold different examples, and additionally split
  the inner parameters theta, the inner optimiser state and everything the
  meta-gradient stores per inner step (the T carries ``(theta, s)``), which
  are gathered where they are used (fully sharded data parallelism, ZeRO-3).

What is split, per array (the trainer applies these; the engine never sees a
mesh: sharding is a property of the arrays it is given, and XLA's SPMD
partitioner propagates it through the jitted meta-step):

============================  ==============================================
batch (episodes or examples)  one axis split over ``("data", "fsdp")``:
                              whole episodes of a meta-batch, or the
                              examples inside an episode
                              (`Task.example_axes`)
theta, eta["init"]            with ``example_axes``: by the task's partition
                              rules over ``fsdp`` (`param_specs`),
                              replicated over ``data``; otherwise
                              replicated (theta is per episode)
the rest of eta, outer        replicated (the outer optimiser state follows
optimiser scalars, RNG, step  eta)
============================  ==============================================

A rule is ``(regex, PartitionSpec)``, matched with ``re.search`` against a
parameter's path (``"blocks/attn/query/kernel"``); the first match wins; a
parameter no rule matches gets `default_spec` (its largest axis that ``fsdp``
divides, for parameters of at least `MIN_SHARDED_SIZE` entries).

With several processes (``jax.distributed``), each process reads only its
share of every batch (`process_share`: the ranges of the split axis that its
devices hold) and `global_batch` assembles the global arrays with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from metaflow._checks import PyTree, check_axis_size

Rules = Sequence[tuple[str, PartitionSpec]]

#: The mesh axis names, in order.
DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)

#: The mesh axes a batch is split over (every device gets its own examples).
BATCH_AXES = AXES

#: Parameters with fewer entries are replicated by `default_spec`: gathering
#: them would cost more than storing them.
MIN_SHARDED_SIZE = 2**14


def make_mesh(data: int = -1, fsdp: int = 1, *,
              devices: Optional[Sequence[jax.Device]] = None  # pyright: ignore[reportInvalidTypeForm]
              ) -> Mesh:
  """The ``(data, fsdp)`` device mesh of a run.

  Args:
    data: devices along ``data``; -1: all devices not used by ``fsdp``.
    fsdp: devices along ``fsdp``; -1: all devices not used by ``data``.
    devices: the devices (default: ``jax.devices()``, every device of every
      process). ``devices=jax.devices()[:1]`` runs on one device.

  Returns:
    A ``jax.sharding.Mesh`` with axes ``("data", "fsdp")`` of type
    ``Auto`` (jit-level sharding: XLA propagates the annotations).

  Raises:
    ValueError: sizes that are not ints >= 1 or -1, two -1s, or a product
      that is not the number of devices.
  """
  data = check_axis_size("mesh data", data)
  fsdp = check_axis_size("mesh fsdp", fsdp)
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("at most one mesh axis may be -1 (the rest of the "
                     "devices), got data=-1 and fsdp=-1.")
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if count % known:
      raise ValueError(f"mesh {'fsdp' if data == -1 else 'data'}={known} "
                       f"does not divide the {count} devices.")
    data, fsdp = ((count // known, fsdp) if data == -1
                  else (data, count // known))
  if data * fsdp != count:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} "
                     f"devices, but there are {count}; use -1 for one axis "
                     "(the rest of the devices).")
  return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def check_mesh(mesh: Any) -> Mesh:
  """``mesh`` if it is a ``jax.sharding.Mesh`` with axes ("data", "fsdp")."""
  if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
    raise TypeError("mesh must be a jax.sharding.Mesh with axes ('data', "
                    "'fsdp'), e.g. metaflow.sharding.make_mesh(data=-1, "
                    f"fsdp=1); got {mesh!r}.")
  return mesh


def describe(mesh: Mesh) -> str:
  """``"data=2 x fsdp=4 (8 devices, 2 processes)"``."""
  processes = len({d.process_index for d in mesh.devices.flat})
  return (f"data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]} "
          f"({mesh.size} device{'s' if mesh.size > 1 else ''}, {processes} "
          f"process{'es' if processes > 1 else ''})")


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of an array every device holds whole."""
  return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------- parameters
def path_name(path: tuple) -> str:
  """``"blocks/attn/query/kernel"`` for a pytree key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def default_spec(shape: Sequence[int], fsdp: int) -> PartitionSpec:
  """The spec of a parameter no rule names: its largest axis that ``fsdp``
  divides over ``fsdp`` (the last such axis on ties), or replicated when it
  has fewer than `MIN_SHARDED_SIZE` entries or no axis is divisible."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return PartitionSpec()
  candidates = [(size, axis) for axis, size in enumerate(shape)
                if size % fsdp == 0]
  if not candidates:
    return PartitionSpec()
  _, axis = max(candidates)
  return PartitionSpec(*([None] * axis + [FSDP]))


def _spec_axis_size(mesh: Mesh, entry: Any) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  return int(np.prod([mesh.shape[n] for n in names if n is not None]))


def param_specs(params: PyTree, mesh: Mesh,
                rules: Optional[Rules] = None) -> PyTree:
  """The ``PartitionSpec`` of every parameter (leaves: arrays or shapes).

  Args:
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct`` leaves).
    mesh: the ``(data, fsdp)`` mesh.
    rules: ``(regex, PartitionSpec)`` pairs matched against each parameter's
      path (`path_name`); the first match wins; unmatched parameters get
      `default_spec`.

  Raises:
    ValueError: a rule gives a spec whose rank differs from the parameter's,
      or that splits an axis the mesh does not divide (naming both, and the
      fix).
  """
  compiled = [(re.compile(pattern), spec) for pattern, spec in (rules or ())]
  fsdp = mesh.shape[FSDP]

  def spec_of(path, leaf):
    name, shape = path_name(path), tuple(np.shape(leaf))
    for pattern, spec in compiled:
      if pattern.search(name):
        break
    else:
      return default_spec(shape, fsdp)
    if len(spec) > len(shape):
      raise ValueError(f"partition rule {pattern.pattern!r} gives {spec} for "
                       f"parameter {name} of shape {list(shape)}: more axes "
                       "than the parameter has.")
    for axis, entry in enumerate(spec):
      size = _spec_axis_size(mesh, entry)
      if entry is not None and shape[axis] % size:
        raise ValueError(
            f"parameter {name} of shape {list(shape)}: axis {axis} "
            f"({shape[axis]}) is not divisible by the {size} devices of mesh "
            f"axis {entry!r} (rule {pattern.pattern!r}); use an fsdp size "
            f"that divides {shape[axis]}.")
    return spec

  return jax.tree_util.tree_map_with_path(spec_of, params)


def named(mesh: Mesh, specs: PyTree) -> PyTree:
  """A ``NamedSharding`` for each ``PartitionSpec`` of a pytree."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


# ------------------------------------------------------------------ batches
def batch_spec(ndim: int, axis: int) -> PartitionSpec:
  """An ``ndim``-array whose ``axis`` is split over `BATCH_AXES`."""
  if not 0 <= axis < ndim:
    raise ValueError(f"batch axis {axis} is out of range for an array of "
                     f"rank {ndim}.")
  return PartitionSpec(*([None] * axis + [BATCH_AXES]))


def batch_size_divisor(mesh: Mesh) -> int:
  """The number of parts a batch axis is split into (all devices)."""
  return _spec_axis_size(mesh, BATCH_AXES)


def check_batch_divisible(what: str, size: int, mesh: Mesh,
                          setting: str) -> None:
  """ValueError (one line naming both numbers and the fix) unless the mesh
  divides a batch axis of ``size``; ``setting`` is the option to change."""
  parts = batch_size_divisor(mesh)
  if size % parts:
    raise ValueError(
        f"{what} {size} is not divisible by the {parts} devices of the mesh "
        f"(data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]}): every device "
        f"computes on an equal share. Use a multiple of {parts} ({setting}) "
        "or fewer devices (--config.mesh.data, --config.mesh.fsdp).")


def process_share(mesh: Mesh, size: int) -> tuple[tuple[int, int], ...]:
  """The ranges ``(start, stop)`` of a batch axis of ``size`` (split over
  `BATCH_AXES`) that this process's devices hold, in order, adjacent ranges
  merged. The process reads exactly these examples; `global_batch`
  assembles the global array from them."""
  sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  indices = sharding.addressable_devices_indices_map((size,)).values()
  owned = sorted({(s.start or 0, size if s.stop is None else s.stop)
                  for (s,) in (index or (slice(None),) for index in indices)})
  merged = []
  for start, stop in owned:
    if merged and merged[-1][1] >= start:
      merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
    else:
      merged.append((start, stop))
  return tuple(merged)


def global_batch(local: PyTree, shardings: PyTree, shapes: PyTree) -> PyTree:
  """Global arrays from this process's share of a batch.

  Args:
    local: numpy leaves holding this process's ranges (`process_share`) of
      the split axis, concatenated in order (the whole batch on one process).
    shardings: the ``NamedSharding`` of each leaf.
    shapes: the global shape of each leaf (a ``jax.ShapeDtypeStruct``).
  """
  return jax.tree.map(
      lambda x, s, shape: jax.make_array_from_process_local_data(
          s, np.asarray(x, shape.dtype), shape.shape),
      local, shardings, shapes)


def shard_bytes(shapes: PyTree, shardings: PyTree) -> int:
  """Bytes one device holds of arrays ``shapes`` laid out by ``shardings``
  (the largest shard of each leaf)."""
  def one(x, s):
    shard = s.shard_shape(tuple(x.shape))
    return int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return sum(jax.tree.leaves(jax.tree.map(one, shapes, shardings)))


def optimizer_state_shardings(optimizer: Any, state: PyTree,
                              param_shardings: PyTree,
                              mesh: Mesh) -> PyTree:
  """Shardings of an optax state (arrays or shapes): every entry shaped like
  the parameters (momenta, ...) takes its parameter's sharding, the rest
  (step counts, ...) is replicated (``optax.tree_map_params``)."""
  import optax  # Only needed here; keeps this module light to import.
  return optax.tree_map_params(
      optimizer, lambda _, s: s, state, param_shardings,
      transform_non_params=lambda _: replicated(mesh))
