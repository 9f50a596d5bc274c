"""A decoder-only transformer in Flax NNX, in the style of Chinchilla.

Token embedding (byte-level by default: vocabulary 256), then ``depth`` pre-norm
blocks (RMSNorm -> multi-head causal self-attention with rotary position
embeddings on queries and keys -> residual; RMSNorm -> GELU MLP -> residual),
a final RMSNorm and an untied output head. No biases anywhere.

The blocks' parameters are stacked along a leading axis of size ``depth`` and
the blocks are applied by a ``jax.lax.scan`` over layers, so compilation time
does not grow with depth, and with ``remat=True`` the scanned body is wrapped in
``jax.checkpoint``: the backward pass then keeps one residual-stream activation
``[B, L, width]`` per block and recomputes the rest. (On XLA:CPU a checkpoint
around Python-unrolled layers saves nothing; around a scanned body it does.)

The parameters, ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``, are a plain
nested dict (the model holds no other state)::

  {"embed": {"embedding": [vocab, width]},
   "blocks": {                                  # every leaf [depth, ...]
       "attn_norm": {"scale": [depth, width]},
       "attn": {"query" | "key" | "value" | "out": {"kernel":
                                                    [depth, width, width]}},
       "mlp_norm": {"scale": [depth, width]},
       "mlp": {"up": {"kernel": [depth, width, hidden]},
               "down": {"kernel": [depth, hidden, width]}}},
   "final_norm": {"scale": [width]},
   "head": {"kernel": [width, vocab]}}

Presets (`PRESETS`, `preset`): ``"nano"``, ``"tiny"`` and ``"small"`` (0.8M
parameters) for tests and quick runs, ``"rater"`` (the data rater's trunk),
and the Chinchilla scaling ladder
(Hoffmann et al., 2022, Table A9: d_model, ffw_size = 4 d_model, kv_size,
n_heads, n_layers), named ``"chinchilla_<N>m"`` after Chinchilla's own
parameter counts N (millions), which include the embeddings of its ~32k-token
vocabulary. With the byte-level vocabulary of 256 here the embeddings are
tiny, so the actual count is close to the non-embedding count
``12 depth width^2``; `num_params` gives the actual count of a configuration.
Every preset but ``nano`` allows sequences up to 131072 bytes (rotary
embeddings are computed per position, so no table limits the length).

Attention is dense (``[B, heads, L, L]`` scores) or blockwise
(`metaflow.blockwise_attention`, tiles of ``attention_block``: the memory of
the meta-gradient linear in L, not quadratic), chosen per config
(``attention``); ``"auto"`` takes blockwise above `BLOCKWISE_ABOVE` tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from metaflow import attention
from metaflow._checks import check_int

STACKED_KEY = "blocks"
"""Top-level parameter key whose leaves stack the blocks on a leading axis."""

_DTYPES = ("bfloat16", "float16", "float32", "float64")
#: `TransformerConfig.attention`'s values.
ATTENTION = ("auto", "blockwise", "dense")
#: ``attention="auto"`` is blockwise for sequences longer than this, one
#: tile of the default ``attention_block``. Measured on 2 idle CPU cores,
#: tiny preset, MixFlow-MG meta-gradient, T=4, B=2 (median of 3; dense
#: against blockwise): L=256 384 and 375 ms; L=512 814 and 1042 ms (one
#: tile: blockwise computes the scores three times, in the forward, dq and
#: dk/dv passes); L=1024 4.48 and 3.88 s with 587 and 173 MiB; L=2048 19.5
#: and 14.6 s with 2142 and 269 MiB. Above one tile blockwise is faster and
#: leaner, and dense's memory grows 4x per doubling.
BLOCKWISE_ABOVE = 512


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
  """Hyper-parameters of a `Transformer`.

  Attributes:
    vocab_size: number of token ids (256: bytes).
    width: the residual stream's width (d_model).
    depth: number of transformer blocks.
    num_heads: attention heads; ``width / num_heads`` is the (even) head size.
    mlp_ratio: the MLP's hidden width is ``round(width * mlp_ratio)``.
    max_length: the longest sequence the model accepts.
    param_dtype: dtype name of the parameters; None: JAX's default float
      dtype when the model is built (float64 under ``jax.enable_x64``).
    compute_dtype: dtype name of activations and matmul inputs; None: the
      parameters' dtype. Attention scores, softmax and logits are computed in
      at least float32.
    remat: rematerialise each block in the backward pass (``jax.checkpoint``
      around the scanned block).
    rope_base: base of the rotary embeddings' frequencies.
    attention: ``"dense"`` (the ``[heads, L, L]`` scores at once),
      ``"blockwise"`` (`metaflow.blockwise_attention`: tiles of
      ``attention_block``, memory linear in L for the meta-gradient too) or
      ``"auto"``: blockwise for sequences longer than `BLOCKWISE_ABOVE`.
    attention_block: queries and keys per tile of blockwise attention.
  """
  vocab_size: int = 256
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  max_length: int
  param_dtype: Optional[str] = None
  compute_dtype: Optional[str] = None
  remat: bool = False
  rope_base: float = 10000.0
  attention: str = "auto"
  attention_block: int = 512

  def __post_init__(self):
    for name in ("vocab_size", "width", "depth", "num_heads", "max_length"):
      check_int(f"TransformerConfig.{name}", getattr(self, name))
    if self.width % self.num_heads:
      raise ValueError(f"TransformerConfig.width {self.width} must be "
                       f"divisible by num_heads {self.num_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"TransformerConfig: the head size width/num_heads = "
                       f"{self.head_dim} must be even for rotary embeddings.")
    if not self.mlp_ratio > 0 or round(self.width * self.mlp_ratio) < 1:
      raise ValueError(f"TransformerConfig.mlp_ratio must be > 0 (and give "
                       f"an MLP width >= 1), got {self.mlp_ratio!r}.")
    if not self.rope_base > 0:
      raise ValueError(f"TransformerConfig.rope_base must be > 0, got "
                       f"{self.rope_base!r}.")
    for name in ("param_dtype", "compute_dtype"):
      value = getattr(self, name)
      if value is not None and value not in _DTYPES:
        raise ValueError(f"TransformerConfig.{name} must be None or one of "
                         f"{_DTYPES}, got {value!r}.")
    if not isinstance(self.remat, bool):
      raise ValueError(f"TransformerConfig.remat must be a bool, got "
                       f"{self.remat!r}.")
    if self.attention not in ATTENTION:
      raise ValueError(f"TransformerConfig.attention must be one of "
                       f"{ATTENTION}, got {self.attention!r}.")
    check_int("TransformerConfig.attention_block", self.attention_block)

  def blockwise(self, length: int) -> bool:
    """Whether sequences of ``length`` use blockwise attention."""
    if self.attention == "auto":
      return length > BLOCKWISE_ABOVE
    return self.attention == "blockwise"

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_width(self) -> int:
    return round(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class _Dtypes:
  """Resolved dtypes: parameters, activations, and accumulation (attention
  scores, softmax, logits: the compute dtype promoted to at least float32)."""
  param: Any
  compute: Any
  acc: Any

  @classmethod
  def of(cls, config: TransformerConfig) -> _Dtypes:
    param = jnp.dtype(config.param_dtype or jnp.result_type(float))
    if param == jnp.float64 and not jax.config.jax_enable_x64:
      raise ValueError("TransformerConfig.param_dtype 'float64' needs "
                       "jax.enable_x64(True).")
    compute = jnp.dtype(config.compute_dtype or param)
    return cls(param, compute, jnp.promote_types(compute, jnp.float32))


def rope_tables(positions: jax.Array, head_dim: int, base: float = 10000.0,
                dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """Rotary embedding tables.

  Args:
    positions: int ``[..., L]`` token positions.
    head_dim: D, the (even) size of the rotated vectors.
    base: frequencies are ``base ** (-2i / D)``, ``i < D/2``.
    dtype: float dtype of the tables.

  Returns:
    ``(cos, sin)``, each ``[..., L, D/2]``.
  """
  exponents = jnp.arange(head_dim // 2, dtype=dtype) * (2.0 / head_dim)
  frequencies = jnp.asarray(base, dtype) ** -exponents  # [D/2]
  angles = jnp.asarray(positions, dtype)[..., None] * frequencies
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` ``[..., L, H, D]`` by the tables ``[..., L, D/2]`` of
  `rope_tables` (pairs ``(x[i], x[i + D/2])`` rotate by angle ``i``); the
  result has the shape and dtype of ``x``."""
  half = x.shape[-1] // 2
  cos, sin = cos[..., None, :], sin[..., None, :]  # [..., L, 1, D/2]
  x1, x2 = x[..., :half], x[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                            axis=-1)
  return rotated.astype(x.dtype)


class RMSNorm(nnx.Module):
  """``[..., W] -> [..., W]``: ``x / rms(x) * scale``, with the statistics in
  at least float32; the output has the compute dtype."""

  def __init__(self, width: int, dtypes: _Dtypes):
    self.scale = nnx.Param(jnp.ones((width,), dtypes.param))
    self.dtypes = dtypes
    self.epsilon = 1e-6

  def __call__(self, x: jax.Array) -> jax.Array:
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(acc)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True)
                          + self.epsilon)
    return (x * self.scale[...].astype(acc)).astype(self.dtypes.compute)


def _linear(fan_in: int, fan_out: int, dtypes: _Dtypes, rngs: nnx.Rngs,
            **kwargs) -> nnx.Linear:
  return nnx.Linear(fan_in, fan_out, use_bias=False, dtype=dtypes.compute,
                    param_dtype=dtypes.param, rngs=rngs, **kwargs)


class Attention(nnx.Module):
  """``[B, L, W] -> [B, L, W]``: multi-head causal self-attention, rotary
  embeddings on queries and keys, scores and softmax in ``dtypes.acc``."""

  def __init__(self, config: TransformerConfig, dtypes: _Dtypes,
               rngs: nnx.Rngs):
    width = config.width
    self.query = _linear(width, width, dtypes, rngs)
    self.key = _linear(width, width, dtypes, rngs)
    self.value = _linear(width, width, dtypes, rngs)
    self.out = _linear(width, width, dtypes, rngs)
    self.num_heads = config.num_heads
    self.dtypes = dtypes
    self.config = config

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array
               ) -> jax.Array:
    batch, length, width = x.shape
    heads = (batch, length, self.num_heads, width // self.num_heads)
    q = apply_rope(self.query(x).reshape(heads), cos, sin)  # [B, L, H, D]
    k = apply_rope(self.key(x).reshape(heads), cos, sin)
    v = self.value(x).reshape(heads)
    if self.config.blockwise(length):
      mixed = attention.blockwise_attention(
          q, k, v, causal=True, block_size=self.config.attention_block)
      return self.out(mixed.reshape(batch, length, width))
    acc = self.dtypes.acc
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc)
    scores = scores * (1.0 / math.sqrt(heads[-1]))  # [B, H, L, L]
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtypes.compute)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return self.out(mixed.reshape(batch, length, width))


class MLP(nnx.Module):
  """``[B, L, W] -> [B, L, W]``: Linear up to the MLP width, GELU, down."""

  def __init__(self, config: TransformerConfig, dtypes: _Dtypes,
               rngs: nnx.Rngs):
    self.up = _linear(config.width, config.mlp_width, dtypes, rngs)
    self.down = _linear(config.mlp_width, config.width, dtypes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """``[B, L, W] -> [B, L, W]``: one pre-norm transformer block."""

  def __init__(self, config: TransformerConfig, dtypes: _Dtypes,
               rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.width, dtypes)
    self.attn = Attention(config, dtypes, rngs)
    self.mlp_norm = RMSNorm(config.width, dtypes)
    self.mlp = MLP(config, dtypes, rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array
               ) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), cos, sin)
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """Decoder-only transformer: int tokens ``[B, L]`` -> logits ``[B, L, V]``.

  See the module docstring for the architecture and the parameter tree. The
  logits have dtype float32 (float64 when the compute dtype is float64).
  """

  def __init__(self, config: TransformerConfig, rngs: nnx.Rngs,
               head: bool = True):
    dtypes = _Dtypes.of(config)
    self.config = config
    self.dtypes = dtypes
    self.embed = nnx.Embed(config.vocab_size, config.width,
                           param_dtype=dtypes.param, rngs=rngs)

    @nnx.split_rngs(splits=config.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(config, dtypes, rngs)

    self.blocks = make_blocks(rngs)  # STACKED_KEY
    self.final_norm = RMSNorm(config.width, dtypes)
    if head:  # (without: a trunk for `hidden`, e.g. a sequence rater's)
      self.head = _linear(config.width, config.vocab_size, dtypes, rngs,
                          preferred_element_type=dtypes.acc)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits ``[B, L, vocab]`` of int tokens ``[B, L]`` (any int dtype)."""
    return self.head(self.hidden(tokens))

  def hidden(self, tokens: jax.Array) -> jax.Array:
    """The final (normalised) residual stream ``[B, L, width]`` of int
    tokens ``[B, L]``."""
    _, length = tokens.shape
    if length > self.config.max_length:
      raise ValueError(f"Sequence length {length} is above the model's "
                       f"max_length {self.config.max_length}.")
    x = self.embed(tokens.astype(jnp.int32)).astype(self.dtypes.compute)
    cos, sin = rope_tables(jnp.arange(length), self.config.head_dim,
                           self.config.rope_base, self.dtypes.acc)
    graphdef, stacked = nnx.split(self.blocks)

    def layer(x, block_state):
      return nnx.merge(graphdef, block_state)(x, cos, sin), None

    if self.config.remat:
      layer = jax.checkpoint(layer, prevent_cse=False)
    x, _ = jax.lax.scan(layer, x, stacked)
    return self.final_norm(x)


def next_token_losses(model: Transformer, tokens: jax.Array) -> jax.Array:
  """Cross-entropy ``[B, L]`` of predicting ``tokens[:, 1:]`` from
  ``tokens[:, :-1]``, for int tokens ``[B, L+1]``; dtype of the logits."""
  logits = model(tokens[:, :-1])
  labels = tokens[:, 1:].astype(jnp.int32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


#: How the parameters are split over the mesh's ``fsdp`` axis (one rule per
#: tensor kind; `metaflow.sharding.param_specs`): the model-width axis of
#: every tensor, which every preset's width (a multiple of 64) lets fsdp
#: sizes up to 64 divide. Stacked block tensors keep their leading depth axis.
PARTITION_RULES = (
    (r"^embed/embedding$", P(None, "fsdp")),                  # [vocab, W]
    (r"^blocks/(attn|mlp)_norm/scale$", P(None, "fsdp")),     # [depth, W]
    (r"^blocks/attn/(query|key|value)/kernel$",
     P(None, "fsdp", None)),                                  # [depth, W, W]
    (r"^blocks/attn/out/kernel$", P(None, None, "fsdp")),     # [depth, W, W]
    (r"^blocks/mlp/up/kernel$", P(None, "fsdp", None)),       # [depth, W, 4W]
    (r"^blocks/mlp/down/kernel$", P(None, None, "fsdp")),     # [depth, 4W, W]
    (r"^final_norm/scale$", P("fsdp")),                       # [W]
    (r"^head/kernel$", P("fsdp", None)),                      # [W, vocab]
)

# Chinchilla (Hoffmann et al., 2022), Table A9: name (millions of parameters
# with its ~32k vocabulary) -> (d_model, kv_size, n_heads, n_layers); the
# feed-forward width is always 4 d_model.
_CHINCHILLA_LADDER = {
    44: (512, 64, 8, 8),
    57: (576, 64, 9, 9),
    74: (640, 64, 10, 10),
    90: (640, 64, 10, 13),
    106: (640, 64, 10, 16),
    117: (768, 64, 12, 12),
    140: (768, 64, 12, 15),
    163: (768, 64, 12, 18),
    175: (896, 64, 14, 14),
    196: (896, 64, 14, 16),
    217: (896, 64, 14, 18),
    251: (1024, 64, 16, 16),
    278: (1024, 64, 16, 18),
    306: (1024, 64, 16, 20),
    425: (1280, 128, 10, 18),
    489: (1280, 128, 10, 21),
    509: (1408, 128, 11, 18),
    552: (1280, 128, 10, 24),
    587: (1408, 128, 11, 21),
    632: (1536, 128, 12, 19),
    664: (1408, 128, 11, 24),
    724: (1536, 128, 12, 22),
    816: (1536, 128, 12, 25),
    893: (1792, 128, 14, 20),
    1018: (1792, 128, 14, 23),
    1143: (1792, 128, 14, 26),
    1266: (2048, 128, 16, 22),
}
_LADDER_MAX_LENGTH = 131072


def _ladder_preset(d_model: int, kv_size: int, heads: int, layers: int
                   ) -> TransformerConfig:
  assert d_model == kv_size * heads, (d_model, kv_size, heads)
  return TransformerConfig(width=d_model, depth=layers, num_heads=heads,
                           max_length=_LADDER_MAX_LENGTH)


PRESETS: dict[str, TransformerConfig] = {
    # lm_data_rater's rater trunk: 7.2k parameters, 18x fewer than tiny.
    "rater": TransformerConfig(width=16, depth=1, num_heads=2,
                               max_length=_LADDER_MAX_LENGTH),
    "nano": TransformerConfig(width=32, depth=2, num_heads=2, max_length=128),
    "tiny": TransformerConfig(width=64, depth=2, num_heads=4,
                              max_length=_LADDER_MAX_LENGTH),
    "small": TransformerConfig(width=128, depth=4, num_heads=4,
                               max_length=_LADDER_MAX_LENGTH),
    **{f"chinchilla_{size}m": _ladder_preset(*shape)
       for size, shape in _CHINCHILLA_LADDER.items()},
}


def preset(name: str, **overrides: Any) -> TransformerConfig:
  """The `PRESETS` configuration ``name`` with fields replaced by
  ``overrides`` (e.g. ``compute_dtype="bfloat16"``, ``remat=True``)."""
  if name not in PRESETS:
    raise ValueError(f"Unknown transformer preset {name!r}; known presets: "
                     f"{', '.join(PRESETS)}.")
  return dataclasses.replace(PRESETS[name], **overrides)


def num_params(config: TransformerConfig) -> int:
  """The number of parameter entries of ``Transformer(config)`` (found from
  shapes only: nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
  return sum(int(np.prod(p.shape))
             for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
