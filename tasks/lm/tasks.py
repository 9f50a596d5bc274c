"""The paper's three language-model meta-learning tasks (Kemaev et al., 2025).

All three share one bilevel problem: a decoder-only transformer (`model`)
trained on next-byte prediction by T steps of inner Adam; the inner batches
x_t are T fresh batches of B sequences from the ``"train"`` part of a text
corpus (`text`), and the outer (validation) loss V is the next-byte
cross-entropy of the adapted model theta_T on B sequences from a disjoint
part: ``"outer"`` during meta-training, the held-out ``"validation"`` or
``"test"`` part in evaluation. They differ in what eta is:

========================  =====================================================
``lm_learned_lr``         per-parameter-tensor inner learning rates of Adam,
                          log-parameterised (one per layer's tensor), optionally
                          one set per inner step; eta enters Phi.
``lm_maml``               the initialisation theta0 of the transformer (MAML);
                          eta enters theta0.
``lm_loss_weighting``     a small NNX rater that maps each target byte's
                          context to a weight in [0, 2] on its inner loss; eta
                          enters L, so the meta-gradient needs the mixed second
                          derivative d2L/dtheta deta (MixFlow-MG's H_et v).
``lm_data_rater``         DataRater (Calian et al., 2025): a small transformer
                          and a bag of hashed byte n-grams score each training
                          sequence, the scores compete in
                          a softmax over the inner batch that weights the
                          per-sequence losses, and V is measured on a target
                          text (by default the pool's own outer part); eta
                          enters L, as for lm_loss_weighting.
``lm_learned_optimizer``  the update rule itself (`metaflow.LearnedOptimizer`,
                          replacing inner Adam); eta is Phi.
========================  =====================================================

Defaults: the ``tiny`` preset, sequences of 128 bytes, B=4, inner Adam with
learning rate 3e-3; the corpus is the embedded text of Python's documentation
topics unless ``data_path`` names text files (comma-separated).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, ClassVar, Optional

import grain
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from metaflow import optim
from metaflow._checks import check_int, check_number
from metaflow.lopt import LearnedOptimizer
from metaflow.meta_params import (
  LearnedLearningRates,
  LossWeights,
  Meta,
  MetaParams,
)
from metaflow.task import Task, register
from tasks.lm import model as lm_model
from tasks.lm import text


def _check_sizes(task: Task, names: tuple[str, ...]) -> None:
  for name in names:
    check_int(name, getattr(task, name))


def _paths(setting: str) -> tuple[str, ...]:
  """A comma-separated list of files, as the tasks' path settings take."""
  return tuple(p.strip() for p in setting.split(",") if p.strip())


@dataclasses.dataclass(frozen=True)
class LanguageModelTask(Task):
  """Next-byte prediction with a transformer and inner Adam (abstract: the
  subclasses say what is meta-learned).

  Attributes:
    data_path: text file(s), comma-separated; "" for the embedded corpus
      (Python's documentation topics, no download); "synthetic" for
      random bytes of any length (memory and speed only,
      `tasks.lm.text.SYNTHETIC`).
    preset: model size, a name of `tasks.lm.model.PRESETS`.
    seq_len: bytes per sequence L (the model sees L inputs, predicts L).
    batch_size: B, sequences per inner step and in the outer batch.
    inner_lr: the inner Adam learning rate (the initial one if learned).
    compute_dtype: "" (the parameters' dtype) or "bfloat16".
    remat_blocks: rematerialise each transformer block (`jax.checkpoint`
      around the scanned block).
    attention: "dense", "blockwise" (`metaflow.blockwise_attention`, memory
      linear in L) or "auto" (blockwise above
      `tasks.lm.model.BLOCKWISE_ABOVE` tokens), for every transformer of
      the task.
    attention_block: tokens per tile of blockwise attention.
    strict_utf8: refuse a file that is not valid UTF-8 (by default its bytes
      are used as they are, with a warning).
    resample_init: a fresh model initialisation theta0 at every meta-step
      (for tasks that do not learn theta0), so that learned
      hyper-parameters do not overfit one initialisation.

  On several devices the B sequences of every batch are split over them
  (``example_axes``) and the transformer's parameters over the mesh's
  ``fsdp`` axis (`tasks.lm.model.PARTITION_RULES`).
  """
  example_axes: ClassVar[Any] = {"inner": 1, "outer": 0}
  data_path: str = ""
  preset: str = "tiny"
  seq_len: int = 128
  batch_size: int = 4
  inner_lr: float = 3e-3
  compute_dtype: str = ""
  remat_blocks: bool = False
  attention: str = "auto"
  attention_block: int = 512
  strict_utf8: bool = False
  resample_init: bool = False

  def __post_init__(self):
    _check_sizes(self, ("seq_len", "batch_size"))
    if not self.inner_lr > 0:
      raise ValueError(f"inner_lr must be > 0, got {self.inner_lr!r}.")
    config = self.model_config
    if self.seq_len > config.max_length:
      raise ValueError(
          f"seq_len {self.seq_len} is above the maximum length "
          f"{config.max_length} of model preset {self.preset!r}; use a "
          "smaller seq_len or a preset with a longer max_length.")
    self.corpus  # Reads and checks the files now, before any compilation.

  @functools.cached_property
  def model_config(self) -> lm_model.TransformerConfig:
    return lm_model.preset(self.preset,
                           compute_dtype=self.compute_dtype or None,
                           remat=self.remat_blocks, attention=self.attention,
                           attention_block=self.attention_block)

  @functools.cached_property
  def corpus(self) -> text.TextCorpus:
    return text.TextCorpus(_paths(self.data_path), seq_len=self.seq_len,
                           strict_utf8=self.strict_utf8)

  def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return lm_model.Transformer(self.model_config, rngs)

  def loss_features(self, tokens: jax.Array) -> Optional[jax.Array]:
    """The loss-weight rater's input per predicted token (None: no rater)."""
    del tokens
    return None

  def inner_loss(self, model: nnx.Module, meta: Meta, batch: jax.Array
                 ) -> jax.Array:
    """Mean (weighted) next-byte cross-entropy of ``batch`` ``[B, L+1]``."""
    losses = lm_model.next_token_losses(model, batch)  # [B, L]
    return meta.weighted_mean(losses, self.loss_features(batch))

  def inner_optimizer(self, learning_rate: Any) -> optax.GradientTransformation:
    return optim.adam(learning_rate)

  def episodes(self, split: str, seed: int, num_inner_steps: int
               ) -> grain.MapDataset:
    """``{"inner": uint8 [T, B, L+1], "outer": uint8 [B, L+1]}`` episodes."""
    return text.lm_episodes(self.corpus, split, seed, num_inner_steps,
                            self.batch_size)

  def local_episodes(self, split: str, seed: int, num_inner_steps: int,
                     examples: tuple[tuple[int, int], ...]
                     ) -> grain.MapDataset:
    """Episodes of only the sequences ``examples`` (rows of every batch):
    a process reads only its share."""
    return text.lm_episodes(self.corpus, split, seed, num_inner_steps,
                            self.batch_size, rows=examples)

  def partition_rules(self) -> tuple[tuple[str, Any], ...]:
    """The transformer's table: the width axis of every tensor over fsdp."""
    return lm_model.PARTITION_RULES

  def split_episode(self, episode: dict, num_steps: int
                    ) -> tuple[jax.Array, jax.Array]:
    del num_steps  # The episode already holds T inner batches.
    return episode["inner"], episode["outer"]


@register("lm_learned_lr")
@dataclasses.dataclass(frozen=True)
class LearnedLearningRateLM(LanguageModelTask):
  """Learned per-tensor inner Adam learning rates (one per layer's tensor:
  the stacked transformer blocks get one rate per block); ``per_step`` gives
  each of the T inner steps its own rates."""
  per_step: bool = False
  resample_init: bool = True

  def meta_params(self) -> MetaParams:
    return MetaParams(learning_rate=LearnedLearningRates(
        self.inner_lr, granularity="tensor", per_step=self.per_step,
        stacked=(lm_model.STACKED_KEY,)))


@register("lm_maml")
@dataclasses.dataclass(frozen=True)
class MAMLLM(LanguageModelTask):
  """MAML: the learned initialisation theta0 of the transformer; with
  ``proximal`` > 0, iMAML's ``proximal/2 ||theta - theta0||^2`` in the
  inner loss (needed by strategy ``implicit``)."""
  proximal: float = 0.0

  def meta_params(self) -> MetaParams:
    return MetaParams(learn_init=True, learning_rate=self.inner_lr,
                      proximal=self.proximal)


@register("lm_learned_optimizer")
@dataclasses.dataclass(frozen=True)
class LearnedOptimizerLM(LanguageModelTask):
  """The inner update rule meta-learned (`metaflow.LearnedOptimizer`,
  replacing inner Adam; ``inner_lr`` scales its update). The stacked
  blocks' tensors (leading axis: the layers) are each one tensor to the
  rule's per-tensor normalisation.

  Attributes:
    rule_hidden: the learned optimizer's hidden widths.
    rule_output: ``"normalized"`` or ``"magnitude"``.
  """
  rule_hidden: tuple[int, ...] = (16, 16)
  rule_output: str = "normalized"
  resample_init: bool = True

  def __post_init__(self):
    super().__post_init__()
    self.meta_params()  # checks rule_hidden and rule_output

  def meta_params(self) -> MetaParams:
    return MetaParams(learning_rate=self.inner_lr, optimizer=LearnedOptimizer(
        hidden=tuple(self.rule_hidden),
        output=self.rule_output))  # type: ignore[arg-type]


class TokenRater(nnx.Module):
  """Scores each predicted byte from its context.

  ``features`` int ``[..., K]`` (the target byte and the K-1 bytes before
  it) -> scores ``[...]``: byte embeddings ``[..., K, E]``, flattened, one
  GELU layer, a linear score. The score layer starts at zero, so the initial
  weights are all ``max_weight * sigmoid(0) = 1``: the unweighted loss.
  """

  def __init__(self, context: int, embed_dim: int, hidden: int,
               rngs: nnx.Rngs):
    dtype = jnp.result_type(float)  # float64 under jax.enable_x64
    self.embed = nnx.Embed(text.VOCAB_SIZE, embed_dim, param_dtype=dtype,
                           rngs=rngs)
    self.hidden = nnx.Linear(context * embed_dim, hidden, param_dtype=dtype,
                             rngs=rngs)
    self.score = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros,
                            param_dtype=dtype, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    e = self.embed(features.astype(jnp.int32))
    h = jax.nn.gelu(self.hidden(e.reshape(*e.shape[:-2], -1)))
    return self.score(h)[..., 0]


def context_windows(tokens: jax.Array, context: int) -> jax.Array:
  """``[B, L+1]`` -> int32 ``[B, L, K]``: for the byte predicted at position
  i (``tokens[:, i+1]``), itself and the K-1 bytes before it, most recent
  first, zero-padded on the left."""
  length = tokens.shape[1] - 1
  padded = jnp.pad(tokens.astype(jnp.int32), ((0, 0), (context - 1, 0)))
  # tokens[:, i+1-o] sits at padded[:, i+context-o].
  return jnp.stack([padded[:, context - o:context - o + length]
                    for o in range(context)], axis=-1)


@register("lm_loss_weighting")
@dataclasses.dataclass(frozen=True)
class LossWeightingLM(LanguageModelTask):
  """Per-token loss weights in [0, max_weight] from a `TokenRater`
  (meta-learned) on each target byte's context.

  Attributes:
    context: K, bytes the rater sees per predicted byte.
    rater_embed: the rater's byte-embedding width.
    rater_hidden: the rater's hidden width.
    max_weight: the largest weight (weights are ``max_weight * sigmoid``).

  theta0 is the model's fixed initialisation by default (``resample_init``
  False): the rater learns weights for that start. With a fresh theta0 per
  meta-step the meta-gradient was too noisy for the small gain there is
  (see the README) to show in a few hundred meta-steps.
  """
  context: int = 8
  rater_embed: int = 16
  rater_hidden: int = 32
  max_weight: float = 2.0

  def __post_init__(self):
    _check_sizes(self, ("context", "rater_embed", "rater_hidden"))
    super().__post_init__()

  def loss_features(self, tokens: jax.Array) -> jax.Array:
    return context_windows(tokens, self.context)

  def meta_params(self) -> MetaParams:
    rater = functools.partial(TokenRater, self.context, self.rater_embed,
                              self.rater_hidden)
    return MetaParams(learning_rate=self.inner_lr,
                      loss_weights=LossWeights(rater, self.max_weight))


#: Multipliers of the n-gram hash (odd 32-bit constants, one per byte of
#: the n-gram): h = sum_j c_j b_{t-j} mod 2^32, then mod the buckets.
_NGRAM_HASH = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)


def hashed_ngrams(tokens: jax.Array, order: int, buckets: int) -> jax.Array:
  """int32 ``[B, S]`` -> int32 ``[B, S]``: the bucket in ``range(buckets)``
  of the n-gram of ``order`` bytes ending at each position (positions
  before the ``order``-th see zero bytes before the sequence's start)."""
  x = jnp.pad(tokens.astype(jnp.uint32), ((0, 0), (order - 1, 0)))
  length = tokens.shape[1]
  h = jnp.zeros_like(tokens, jnp.uint32)
  for j in range(order):  # byte t - j times its multiplier, wrapping
    h = h + x[:, order - 1 - j:order - 1 - j + length] * jnp.uint32(
        _NGRAM_HASH[j])
  return (h % jnp.uint32(buckets)).astype(jnp.int32)


def lag_matches(tokens: jax.Array, lags: int) -> jax.Array:
  """int ``[B, S]`` -> float32 ``[B, lags]``: for k = 1..lags, the fraction
  r_k = mean_{t >= k} [x_t == x_{t-k}] of positions whose byte repeats the
  one k before. Text repeating a period of p <= lags bytes has r_p = 1."""
  return jnp.stack([jnp.mean(tokens[:, k:] == tokens[:, :-k], axis=1)
                    for k in range(1, lags + 1)], axis=1).astype(jnp.float32)


class NgramBag(nnx.Module):
  """A sequence's byte statistics: int tokens ``[B, S]`` -> ``[B, D]``.

  The mean over positions of the embeddings of each position's bigram and
  trigram (`hashed_ngrams`, one table of ``buckets`` rows per order), next
  to the sequence's repetition at lags 1..`LAGS` (`lag_matches`), through a
  GELU layer. It sees directly what a one-layer transformer of width 16
  sees only faintly: which byte pairs and triples a text uses (code, prose
  and tables differ there; so do lines reversed) and whether it repeats
  itself (truncated text repeated, runs of one character), which the bag's
  mean hides when the repeated piece is itself ordinary text.
  """

  ORDERS: ClassVar[tuple[int, ...]] = (2, 3)
  LAGS: ClassVar[int] = 16

  def __init__(self, buckets: int, dim: int, rngs: nnx.Rngs,
               param_dtype: Any = jnp.float32):
    self.buckets = buckets
    self.tables = nnx.List([
        nnx.Embed(buckets, dim, param_dtype=param_dtype, rngs=rngs)
        for _ in self.ORDERS])
    self.hidden = nnx.Linear(dim + self.LAGS, dim, param_dtype=param_dtype,
                             rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    bag = sum(jnp.mean(table(hashed_ngrams(tokens, order, self.buckets)),
                       axis=1)
              for order, table in zip(self.ORDERS, self.tables))
    repeats = lag_matches(tokens, self.LAGS).astype(bag.dtype)
    return jax.nn.gelu(self.hidden(jnp.concatenate([bag, repeats], -1)))


class SequenceRater(nnx.Module):
  """DataRater's rater: int tokens ``[B, S]`` (whole sequences) -> one score
  per sequence ``[B]``.

  A small transformer trunk (`tasks.lm.model.Transformer` without its
  head), its final hidden states ``[B, S, W]`` averaged over the positions,
  next to a bag of hashed byte n-grams (`NgramBag`, ``[B, D]``; none with
  ``ngram_buckets=0``), and a linear score of both whose weights start at
  zero: an untrained rater gives every sequence the same score, so
  meta-training starts from plain training and any separation it shows
  was learned.
  """

  def __init__(self, config: lm_model.TransformerConfig, rngs: nnx.Rngs,
               ngram_buckets: int = 0, ngram_dim: int = 32):
    self.trunk = lm_model.Transformer(config, rngs, head=False)
    dtype = self.trunk.dtypes.param
    self.ngrams = (NgramBag(ngram_buckets, ngram_dim, rngs, dtype)
                   if ngram_buckets else None)
    width = config.width + (ngram_dim if ngram_buckets else 0)
    self.score = nnx.Linear(width, 1, kernel_init=nnx.initializers.zeros,
                            param_dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    dtype = self.trunk.dtypes.param
    features = [jnp.mean(self.trunk.hidden(tokens), axis=1).astype(dtype)]
    if self.ngrams is not None:
      features.append(self.ngrams(tokens).astype(dtype))
    return self.score(jnp.concatenate(features, axis=-1))[:, 0]


@register("lm_data_rater")
@dataclasses.dataclass(frozen=True)
class DataRaterLM(LanguageModelTask):
  """Learned data curation (DataRater): a `SequenceRater` (eta) scores every
  training sequence; the inner loss is the weighted mean of per-sequence
  losses with weights ``B * softmax(scores / temperature)`` over the inner
  batch of B (`LossWeights` with ``normalise="softmax"``), and V is the
  plain mean loss of the adapted model on the target text.

  Meta-train it online (``lm_data_rater``'s config: persistent learners at
  every stage of training, `metaflow.online`), then score or filter a
  corpus with the trained rater (`score_sequences`, ``launch.curate``).

  Attributes:
    data_path: the training pool (may be noisy), comma-separated files;
      "" for the embedded corpus.
    target_path: the target text(s) whose loss V measures,
      comma-separated; "" for the pool's own outer part. No inner batch
      reads it, so meta-training's V batches come from its first 80%
      (`tasks.lm.text.TARGET_PARTS`), evaluation's from its held-out
      ``validation`` / ``test`` parts.
    rater_preset: the rater trunk's `tasks.lm.model.PRESETS` name (default
      ``"rater"``, far smaller than the inner model).
    rater_ngrams: buckets of each table of the rater's hashed byte bigrams
      and trigrams (`NgramBag`, next to the trunk, with the sequence's
      repetition at lags 1-16); 0 for no bag.
    temperature: the softmax temperature of the weights.
  """
  target_path: str = ""
  rater_preset: str = "rater"
  rater_ngrams: int = 4096
  temperature: float = 1.0
  resample_init: bool = True

  def __post_init__(self):
    object.__setattr__(self, "temperature", check_number(
        "temperature", self.temperature, strict=True))
    check_int("rater_ngrams", self.rater_ngrams, 0)
    if self.seq_len + 1 > self.rater_config.max_length:
      raise ValueError(
          f"seq_len + 1 = {self.seq_len + 1} is above the maximum length "
          f"{self.rater_config.max_length} of rater preset "
          f"{self.rater_preset!r}.")
    super().__post_init__()
    shared = ({os.path.realpath(p) for p in _paths(self.target_path)}
              & {os.path.realpath(p) for p in _paths(self.data_path)})
    if shared:
      raise ValueError(
          f"target_path and data_path share {sorted(shared)}: V would be "
          "measured on the inner models' training text; give a separate "
          "target text, or target_path='' for the pool's own outer part.")
    self.target_corpus  # Reads and checks the target files now.

  @functools.cached_property
  def rater_config(self) -> lm_model.TransformerConfig:
    return lm_model.preset(self.rater_preset,
                           compute_dtype=self.compute_dtype or None,
                           attention=self.attention,
                           attention_block=self.attention_block)

  @functools.cached_property
  def target_corpus(self) -> Optional[text.TextCorpus]:
    """The target text, or None (the pool's own outer part)."""
    paths = _paths(self.target_path)
    if not paths:
      return None
    return text.TextCorpus(paths, seq_len=self.seq_len,
                           strict_utf8=self.strict_utf8)

  def loss_features(self, tokens: jax.Array) -> jax.Array:
    return tokens  # the rater reads each whole sequence

  def inner_loss(self, model: nnx.Module, meta: Meta, batch: jax.Array
                 ) -> jax.Array:
    """``sum_b w_b l_b / B``: l_b the mean next-byte cross-entropy of
    sequence b of ``batch`` ``[B, L+1]``, w the rater's softmax weights
    (1 each in V, which is unweighted)."""
    losses = jnp.mean(lm_model.next_token_losses(model, batch), axis=1)
    return meta.weighted_mean(losses, self.loss_features(batch))

  def meta_params(self) -> MetaParams:
    rater = functools.partial(SequenceRater, self.rater_config,
                              ngram_buckets=self.rater_ngrams)
    return MetaParams(learning_rate=self.inner_lr, loss_weights=LossWeights(
        rater, normalise="softmax", temperature=self.temperature))

  def episodes(self, split: str, seed: int, num_inner_steps: int
               ) -> grain.MapDataset:
    """As `LanguageModelTask.episodes`, the outer batches from the target
    text."""
    return text.lm_episodes(self.corpus, split, seed, num_inner_steps,
                            self.batch_size, outer_corpus=self.target_corpus)

  def local_episodes(self, split: str, seed: int, num_inner_steps: int,
                     examples: tuple[tuple[int, int], ...]
                     ) -> grain.MapDataset:
    return text.lm_episodes(self.corpus, split, seed, num_inner_steps,
                            self.batch_size, rows=examples,
                            outer_corpus=self.target_corpus)

  def score_sequences(self, rater_params, tokens: jax.Array) -> jax.Array:
    """The rater's scores ``[N]`` of sequences ``tokens`` ``[N, L+1]``
    (``rater_params``: a trained ``eta.loss_weights``); higher is more
    useful for the target. Scores of different batches are comparable:
    the softmax only normalises within a batch."""
    rater = nnx.merge(self.meta_params().loss_weights.graphdef, rater_params)
    return rater(tokens)
