r"""Blockwise attention whose meta-gradient needs memory linear in the length.

`blockwise_attention(q, k, v)` is softmax attention computed over tiles of
``block_size`` queries by ``block_size`` keys, never forming the ``[L, L]``
score matrix, with a custom VJP whose backward pass is tiled the same way and
written in ordinary, differentiable JAX. That last point is what a
meta-gradient needs and what fused flash-attention kernels (cuDNN, Pallas) do
not give: they define a reverse pass only, so neither the forward-over-reverse
Hessian-vector product of MixFlow-MG nor the reverse-over-reverse of the
standard estimator can go through them.

**Forward** (per batch entry and head; i indexes queries, j keys, scale c =
``scale``, by default 1/sqrt(D)):

    s_ij = c q_i . k_j           (masked to -inf for j > i when causal)
    lse_i = log sum_j exp(s_ij)
    p_ij = exp(s_ij - lse_i),    o_i = sum_j p_ij v_j.

For each block of queries, a scan over the key blocks keeps the running
maximum m_i, the running sum l_i = sum_j exp(s_ij - m_i) and the running
numerator a_i = sum_j exp(s_ij - m_i) v_j; a new key block with scores s
updates them as

    m' = max(m, max_j s_ij),   l' = l e^{m - m'} + sum_j e^{s_ij - m'},
    a' = a e^{m - m'} + sum_j e^{s_ij - m'} v_j

(the online softmax), and at the end o_i = a_i / l_i, lse_i = m_i + log l_i.
Statistics are kept in at least float32. Only ``o`` and ``lse`` (and the
inputs) are saved for the backward pass: O(L) memory, not O(L^2).

**Backward.** With output cotangent do_i, the rule (derived from the
definitions above, nothing stored but q, k, v, o, lse):

    delta_i = sum_j p_ij (do_i . v_j) = do_i . o_i
    dv_j = sum_i p_ij do_i
    ds_ij = p_ij (do_i . v_j - delta_i)
    dq_i = c sum_j ds_ij k_j,   dk_j = c sum_i ds_ij q_i,

where every p_ij is recomputed tile by tile from q, k and lse. dq is one pass
(query blocks outer, key blocks inner: dq_i accumulated in the scan's carry);
dk and dv another (key blocks outer, query blocks inner). Two passes recompute
the scores once more than a fused kernel would, and need no atomic
accumulation.

**Why this differentiates again.** A second-order estimator differentiates
the whole first-order computation, the custom rule included: forward-over-
reverse (MixFlow-MG: ``jax.jvp`` of the gradient) pushes tangents of q, k, v
and do through ``fwd`` and ``bwd`` above; reverse-over-reverse (standard)
back-propagates through them. Both are plain JAX here (scans, einsums,
exp, where), so both work and are exact: the tangent of ``lse`` and ``o``
comes from differentiating the online-softmax scan, which computes exactly
lse and o. JAX cannot apply forward mode to the custom VJP itself; it never
needs to, because the outer transformation sees the rule's operations, not
the rule.

**What a second derivative stores.** Forward mode stores nothing across
tiles: the jvp of a scan carries tangents beside the values, so MixFlow-MG's
HVP of attention keeps O(L) (inputs, o, lse, their tangents) plus one tile's
working set (measured: compiled temp memory x1.3 to x2.0 per doubling of L
from 2k to 16k, dense attention x4.0). Reverse mode would store each tile's
intermediates, O(L^2) in all; every outer scan body here (one query block's
forward, one block of a backward pass) is wrapped in ``jax.checkpoint``, so
reverse-over-reverse of attention alone keeps the outer scans' inputs and
one block row's residuals, O(L x block_size) (measured: x1.8 to x1.9 per
doubling). Inside an enclosing ``lax.scan`` or ``jax.checkpoint`` (the
transformer's scanned, rematerialised blocks), JAX's partial evaluation for
the second reverse pass no longer honours these inner checkpoints and keeps
every tile's intermediates (``[n_q, n_k, block, block]``: x3 to x3.5 per
doubling, far below dense attention's constant but quadratic): with long
sequences use MixFlow-MG, whose memory stays linear.

**Lengths.** Any lengths: queries and keys are padded inside to a multiple
of the block (a length shorter than the block is one block of that length),
padded keys are masked out, padded queries dropped. Masked scores take a
large finite negative value and their probabilities are set to exactly zero,
so no NaN appears in any derivative even for a row whose block is entirely
masked. Causal masking is by position (key j visible to query i when j <= i),
computed per tile, so no ``[L, L]`` mask exists either; masked tiles are
computed and discarded (causal attention does about twice the necessary
arithmetic, in exchange for a fixed-shape scan).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["blockwise_attention"]

#: Score of a masked (query, key) pair before the softmax: finite, so that
#: differences of masked scores are 0, not NaN.
_MASKED = -1e30


def blockwise_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                        *, causal: bool = True, block_size: int = 512,
                        scale: Optional[float] = None) -> jax.Array:
  """Softmax attention over tiles of ``block_size``, with a blockwise,
  twice-differentiable custom VJP (module docstring: derivation, storage).

  Args:
    query: ``[batch, q_length, heads, head_dim]`` (the layout of
      ``jax.nn.dot_product_attention``).
    key: ``[batch, k_length, heads, head_dim]``.
    value: ``[batch, k_length, heads, head_dim]``.
    causal: key j is visible to query i only when j <= i (positions from 0 in
      both; q_length must equal k_length).
    block_size: queries and keys per tile, >= 1; lengths need not be
      multiples of it.
    scale: multiplies the scores; None: ``1 / sqrt(head_dim)``.

  Returns:
    ``[batch, q_length, heads, head_dim]`` in the dtype of the inputs
    (bfloat16, float32 or float64; statistics in at least float32).

  Raises:
    ValueError: shapes that do not match, a bad block size, or causal with
      different query and key lengths.
  """
  _check(query, key, value, causal, block_size)
  head_dim = query.shape[-1]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  return _attention(query, key, value, causal, int(block_size), scale)


def _check(query, key, value, causal, block_size) -> None:
  shapes: list[tuple[int, ...]] = [tuple(getattr(x, "shape", ()))
                                   for x in (query, key, value)]
  if any(len(s) != 4 for s in shapes):
    raise ValueError("blockwise_attention: query, key and value must be 4-D "
                     "[batch, length, heads, head_dim], got shapes "
                     f"{', '.join(str(s) for s in shapes)}.")
  q, k, v = shapes
  if k != v or q[0] != k[0] or q[2:] != k[2:]:
    raise ValueError("blockwise_attention: key and value must share one "
                     "shape and match query's batch, heads and head_dim; got "
                     f"query {q}, key {k}, value {v}.")
  if causal and q[1] != k[1]:
    raise ValueError(f"blockwise_attention: causal attention needs equal "
                     f"query and key lengths, got {q[1]} and {k[1]}.")
  if (isinstance(block_size, bool) or not isinstance(block_size, int)
      or block_size < 1):
    raise ValueError(f"blockwise_attention: block_size must be an int >= 1, "
                     f"got {block_size!r}.")
  if len({jnp.dtype(x.dtype) for x in (query, key, value)}) != 1:
    raise ValueError("blockwise_attention: query, key and value must share "
                     f"one dtype, got {query.dtype}, {key.dtype}, "
                     f"{value.dtype}.")


# ------------------------------------------------------------------- tiles
class _Tiles:
  """A length cut into ``count`` blocks of ``size`` (the last padded)."""

  def __init__(self, length: int, block_size: int):
    self.length = length
    self.size = min(block_size, length)
    self.count = -(-length // self.size)

  def split(self, x: jax.Array) -> jax.Array:
    """``[B, length, ...] -> [count, B, size, ...]`` (zero padding)."""
    pad = self.count * self.size - self.length
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((x.shape[0], self.count, self.size) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def merge(self, x: jax.Array) -> jax.Array:
    """The inverse of `split` (padding dropped): ``[count, B, size, ...] ->
    [B, length, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    x = x.reshape((x.shape[0], self.count * self.size) + x.shape[3:])
    return x[:, :self.length]

  def positions(self) -> jax.Array:
    """int ``[count, size]``: each slot's position (padding: >= length)."""
    return jnp.arange(self.count * self.size).reshape(self.count, self.size)


def _stats_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _mask(q_pos, k_pos, k_length: int, causal: bool) -> jax.Array:
  """bool ``[bq, bk]``: key visible to query (real key; causal order)."""
  visible = (k_pos < k_length)[None, :]
  if causal:
    visible = visible & (k_pos[None, :] <= q_pos[:, None])
  return visible


def _scores(q, k, q_pos, k_pos, k_length, causal, scale):
  """Masked scores ``[B, H, bq, bk]`` (statistics dtype) and the mask."""
  acc = _stats_dtype(q.dtype)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
  visible = _mask(q_pos, k_pos, k_length, causal)
  return jnp.where(visible, s, _MASKED), visible


def _probs(q, k, lse, q_pos, k_pos, k_length, causal, scale):
  """p_ij = exp(s_ij - lse_i) of one tile, exactly 0 where masked."""
  s, visible = _scores(q, k, q_pos, k_pos, k_length, causal, scale)
  return jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)


# ----------------------------------------------------------------- forward
def _forward(q, k, v, causal, block_size, scale):
  """``(o [B, Lq, H, D], lse [B, H, Lq])`` by the online softmax."""
  qt, kt = _Tiles(q.shape[1], block_size), _Tiles(k.shape[1], block_size)
  acc = _stats_dtype(q.dtype)
  k_blocks, v_blocks = kt.split(k), kt.split(v)

  def query_block(args):
    q_i, q_pos = args                                   # [B, bq, H, D]
    batch, bq, heads, dim = q_i.shape

    def key_block(carry, kv):
      m, total, a = carry        # [B, H, bq], [B, H, bq], [B, bq, H, D]
      k_j, v_j, k_pos = kv
      s, visible = _scores(q_i, k_j, q_pos, k_pos, kt.length, causal, scale)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
      correction = jnp.exp(m - m_new)
      total = total * correction + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v_j.dtype), v_j,
                      preferred_element_type=acc)
      a = a * jnp.swapaxes(correction, 1, 2)[..., None] + pv
      return (m_new, total, a), None

    init = (jnp.full((batch, heads, bq), _MASKED, acc),
            jnp.zeros((batch, heads, bq), acc),
            jnp.zeros((batch, bq, heads, dim), acc))
    (m, total, a), _ = jax.lax.scan(key_block, init,
                                    (k_blocks, v_blocks, kt.positions()))
    o = a / jnp.swapaxes(total, 1, 2)[..., None]
    return o.astype(q.dtype), m + jnp.log(total)

  # One query block at a time; under reverse mode only its inputs are kept.
  o, lse = jax.lax.map(jax.checkpoint(query_block, prevent_cse=False),
                       (qt.split(q), qt.positions()))
  lse = jnp.moveaxis(lse, 0, 2)                       # [B, H, count, bq]
  lse = lse.reshape(lse.shape[:2] + (-1,))[:, :, :qt.length]
  return qt.merge(o), lse


# ---------------------------------------------------------------- backward
def _backward(q, k, v, o, lse, do, causal, block_size, scale):
  """``(dq, dk, dv)`` of the module docstring, tiled, in plain JAX."""
  qt, kt = _Tiles(q.shape[1], block_size), _Tiles(k.shape[1], block_size)
  acc = _stats_dtype(q.dtype)
  delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(acc), o.astype(acc))
  # Query-side tiles: q, do, lse, delta ([B, H, L] -> [count, B, H, size]).
  q_blocks, do_blocks, q_pos = qt.split(q), qt.split(do), qt.positions()
  lse_blocks, delta_blocks = (
      jnp.moveaxis(qt.split(jnp.swapaxes(x, 1, 2)), 2, 3)
      for x in (lse, delta))
  k_blocks, v_blocks, k_pos = kt.split(k), kt.split(v), kt.positions()

  def tile(q_i, do_i, lse_i, delta_i, qp, k_j, v_j, kp):
    """p and ds of one tile, ``[B, H, bq, bk]``."""
    p = _probs(q_i, k_j, lse_i, qp, kp, kt.length, causal, scale)
    dp = jnp.einsum("bqhd,bkhd->bhqk", do_i, v_j, preferred_element_type=acc)
    return p, p * (dp - delta_i[..., None])

  def dq_block(args):                  # one query block, all key blocks
    q_i, do_i, lse_i, delta_i, qp = args

    def step(dq, kv):
      k_j, v_j, kp = kv
      _, ds = tile(q_i, do_i, lse_i, delta_i, qp, k_j, v_j, kp)
      dq = dq + scale * jnp.einsum("bhqk,bkhd->bqhd", ds.astype(k_j.dtype),
                                   k_j, preferred_element_type=acc)
      return dq, None

    dq, _ = jax.lax.scan(step, jnp.zeros(q_i.shape, acc),
                         (k_blocks, v_blocks, k_pos))
    return dq.astype(q.dtype)

  def dkv_block(args):                 # one key block, all query blocks
    k_j, v_j, kp = args

    def step(carry, qs):
      dk, dv = carry
      q_i, do_i, lse_i, delta_i, qp = qs
      p, ds = tile(q_i, do_i, lse_i, delta_i, qp, k_j, v_j, kp)
      dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p.astype(do_i.dtype), do_i,
                           preferred_element_type=acc)
      dk = dk + scale * jnp.einsum("bhqk,bqhd->bkhd", ds.astype(q_i.dtype),
                                   q_i, preferred_element_type=acc)
      return (dk, dv), None

    zeros = jnp.zeros(k_j.shape, acc)
    (dk, dv), _ = jax.lax.scan(
        step, (zeros, zeros),
        (q_blocks, do_blocks, lse_blocks, delta_blocks, q_pos))
    return dk.astype(k.dtype), dv.astype(v.dtype)

  query_side = (q_blocks, do_blocks, lse_blocks, delta_blocks, q_pos)
  dq = jax.lax.map(jax.checkpoint(dq_block, prevent_cse=False), query_side)
  dk, dv = jax.lax.map(jax.checkpoint(dkv_block, prevent_cse=False),
                       (k_blocks, v_blocks, k_pos))
  return qt.merge(dq), kt.merge(dk), kt.merge(dv)


# ------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, causal, block_size, scale):
  return _forward(q, k, v, causal, block_size, scale)[0]


def _attention_fwd(q, k, v, causal, block_size, scale):
  o, lse = _forward(q, k, v, causal, block_size, scale)
  return o, (q, k, v, o, lse)


def _attention_bwd(causal, block_size, scale, residuals, do):
  q, k, v, o, lse = residuals
  return _backward(q, k, v, o, lse, do, causal, block_size, scale)


_attention.defvjp(_attention_fwd, _attention_bwd)
