"""`Exact`: what the exact estimators share, their memory options.

The exact estimators (`Standard`, `MixFlow`) compute the meta-gradient of
the T unrolled steps (truncated BPTT) and differ only in how the outer
reverse pass differentiates the inner gradient g_t (their `rule`). Both
take four options that change what is stored or recomputed, never the
result:

* ``remat`` (``+remat``): each inner step wrapped in ``jax.checkpoint``, so
  its intermediates are recomputed in the backward pass instead of stored.
* ``save_inner_grads`` (``+saved_inner_grads``): under ``remat``, g_t kept
  as a named residual (`INNER_GRAD_NAME`) so the backward pass does not
  recompute the inner gradient.
* ``segment_length`` (``+segments=K``, ``+segments=K1/K2/...``,
  ``+segments=auto``): the carry ``(theta, s)`` stored only every K steps,
  each segment recomputed in the backward pass (`metaflow.segments`):
  ceil(T/K) + K stored carries instead of T, for one more forward pass;
  nested, segments of K1 cut into pieces of K2, ...: ceil(T/K1) +
  ceil(K1/K2) + ... + Kn carries for n more forward passes; ``auto``: the
  schedule that stores the fewest (`metaflow.segments.schedule`: about
  e ln T carries, for about ln T forward passes; none for T <= 5).
* ``microbatches`` (``+microbatches=M``): L, g_t, MixFlow-MG's JVP and V
  evaluated in M chunks of every batch's leading axis and accumulated
  (`metaflow.microbatch`): dynamic memory about 1/M, the same arithmetic.
  Choosing it states that L and V are means over that axis.

With MixFlow-MG, remat saves little (the step's residuals are already just
its inputs and the optimiser update's) and costs a recomputation of g_t; on
XLA:CPU that recomputation's working set is not shared with the JVP's (XLA
materialises the zero-initialised stacks of both loops at the start of the
step), so ``mixflow+remat`` needs MORE memory than ``mixflow``;
``mixflow+remat+saved_inner_grads`` avoids the recomputation.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, Union

import jax
from jax.ad_checkpoint import checkpoint_name

from metaflow import microbatch, segments
from metaflow._checks import PyTree, check_int
from metaflow.estimators.base import (
  Loss,
  Option,
  Step,
  Strategy,
  ValueAndGrad,
  valid_strategy_names,
)

if TYPE_CHECKING:
  from metaflow.meta_params import MetaParams

#: Name under which the inner gradient g_t is saved by ``save_inner_grads``.
INNER_GRAD_NAME = "metaflow_inner_grad"


@dataclasses.dataclass(frozen=True)
class Exact(Strategy):
  """An exact estimator with its memory options (module docstring).

  Attributes:
    remat: rematerialise each inner step in the backward pass.
    save_inner_grads: with ``remat``, store each g_t instead of recomputing
      it. Requires ``remat``.
    segment_length: None (store every carry), an int K >= 1, decreasing
      ints ``(K1, K2, ...)`` with K1 > K2 > ... >= 1 (nested segments; a
      list is made a tuple, one length an int), or ``"auto"`` (the fewest
      stored carries for T, `segment_length_for`).
    microbatches: M >= 1 chunks of every inner and outer batch's leading
      axis (which M must divide).
  """

  remat: bool = False
  save_inner_grads: bool = False
  segment_length: Union[None, int, str, tuple[int, ...]] = None
  microbatches: int = 1

  exact: ClassVar[bool] = True
  string_options: ClassVar[tuple[Option, ...]] = (
      Option("remat", "remat", "flag"),
      Option("saved_inner_grads", "save_inner_grads", "flag"),
      Option("segments", "segment_length", "lengths_or_auto"),
      Option("microbatches", "microbatches", "count"))
  #: Whether the rule's per-chunk gradient is rematerialised under
  #: micro-batches (a plain gradient's reverse pass would otherwise keep
  #: every chunk's intermediates; MixFlow-MG's rule keeps only its inputs).
  remat_chunks: ClassVar[bool] = False

  def __post_init__(self):
    kind = type(self).__name__
    for name in ("remat", "save_inner_grads"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{kind}.{name} must be a bool, got "
                        f"{getattr(self, name)!r}.")
    if self.save_inner_grads and not self.remat:
      raise ValueError(
          f"Contradictory strategy '{self.mode}+saved_inner_grads': "
          "'saved_inner_grads' needs 'remat' (save_inner_grads=True requires "
          "remat=True: without remat every residual, g_t included, is "
          "already stored). Valid strategy strings: "
          f"{', '.join(valid_strategy_names())}.")
    k = given = self.segment_length
    if isinstance(k, (tuple, list)):
      k = k[0] if len(k) == 1 else tuple(k)
      object.__setattr__(self, "segment_length", k)
    valid = k is None or k == "auto"
    if k is not None and not isinstance(k, str):
      try:
        valid = bool(segments.check_lengths(k))
      except ValueError:
        pass
    if not valid:
      raise ValueError(
          f"{kind}.segment_length must be None, an int >= 1, 'auto' or "
          "decreasing ints (K1, K2, ...) with K1 > K2 > ... >= 1, got "
          f"{given!r}.")
    object.__setattr__(self, "microbatches",
                       check_int(f"{kind}.microbatches", self.microbatches))

  @abc.abstractmethod
  def rule(self, inner_loss: Loss) -> ValueAndGrad:
    """``(theta, eta, x) -> (L, g)`` on one (chunk of a) batch, with the
    estimator's differentiation rule."""

  @classmethod
  def variants(cls) -> tuple[str, ...]:
    return (cls.mode, f"{cls.mode}+remat",
            f"{cls.mode}+remat+saved_inner_grads")

  def inner_value_and_grad(self, inner_loss: Loss) -> ValueAndGrad:
    fn = microbatch.mean_over_chunks(self.rule(inner_loss), self.microbatches,
                                     "inner batch", remat=self.remat_chunks)
    if not self.save_inner_grads:
      return fn

    def named(theta, eta, batch):
      loss, g = fn(theta, eta, batch)
      return loss, checkpoint_name(g, INNER_GRAD_NAME)

    return named

  def scan(self, step: Step, carry: PyTree, xs: PyTree, num_steps: int
           ) -> tuple[PyTree, jax.Array]:
    if self.remat:
      policy = (jax.checkpoint_policies.save_only_these_names(INNER_GRAD_NAME)
                if self.save_inner_grads else None)
      # prevent_cse=False is safe (and cheaper) inside a scan.
      step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    k = self.segment_length_for(num_steps)
    if k is None:
      return jax.lax.scan(step, carry, xs, length=num_steps)
    return segments.segmented_scan(step, carry, xs, num_steps, k)

  def outer_value(self, outer_loss: Loss) -> Loss:
    # With microbatches, V's gradient is accumulated chunk by chunk too.
    return microbatch.mean_over_chunks(outer_loss, self.microbatches,
                                       "outer batch", remat=True)

  def segment_length_for(self, num_steps: int
                         ) -> Union[None, int, tuple[int, ...]]:
    """The segment lengths of a loop of T = ``num_steps`` steps: None (no
    segments), K (one level) or ``(K1, K2, ...)``: ``segment_length``
    (``"auto"``: `metaflow.segments.schedule`, the fewest stored carries,
    None where no segments store fewer than T), each capped at the piece it
    cuts (`metaflow.segments.capped`)."""
    k = self.segment_length
    if isinstance(k, str):  # "auto"
      k = segments.schedule(num_steps)
    if k is None or k == ():
      return None
    lengths = segments.capped(num_steps, k)
    return lengths[0] if len(lengths) == 1 else lengths

  def stored_carries(self, num_steps: int) -> int:
    """T unrolled; with segments the boundaries of one piece of each level
    at the peak: ceil(T/K1) + ceil(K1/K2) + ... + Kn
    (`metaflow.segments.stored_carries`)."""
    return segments.stored_carries(num_steps,
                                   self.segment_length_for(num_steps) or ())

  def recompute_factor(self, num_steps: int) -> int:
    """1 + the levels of segments (`metaflow.segments.recompute_factor`)."""
    return segments.recompute_factor(self.segment_length_for(num_steps) or ())

  def check_meta_params(self, spec: "MetaParams",
                        outer_reads: Optional[Callable[[str], bool]] = None
                        ) -> None:
    del outer_reads
    if self.microbatches > 1 and not spec.mean_over_examples:
      raise ValueError(
          "Softmax-normalised loss weights (LossWeights(normalise="
          "'softmax')) cannot be micro-batched: each weight depends on the "
          "whole batch, so L is not a mean of per-chunk losses. Drop "
          "+microbatches.")
