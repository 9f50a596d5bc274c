"""`fewshot_classification`: N-way K-shot image classification (MAML).

An episode draws N classes from the split's class pool, gives them the labels
0..N-1 in a random order, and K support plus Q query images per class (no
image is in both). The inner loop adapts a small convolutional network with
plain SGD on the support set (the whole support set at each of the T inner
steps); the outer loss is the cross-entropy of the adapted network on the query
set, and evaluation also reports its query accuracy.

Meta-train and meta-test classes are disjoint: split ``"train"`` draws from
``train_classes``; ``"validation"`` and ``"test"`` draw from ``test_classes``
(independent episode streams), so meta-test classes are never seen during
meta-training.

Data: by default the 1,797 8x8 handwritten digits bundled with scikit-learn
(``sklearn.datasets.load_digits``; no download; install
``mixflow-mg[examples]``) with digits 0-4 for meta-training and 5-9 for
meta-testing. Any other set (e.g. Omniglot) can be plugged in with
``data_path``: an ``.npz`` file with ``images`` ``[N, H, W]`` or
``[N, H, W, C]`` (channels last; uint8 or float) and integer ``labels``
``[N]``. Images are converted to float32 in [0, 1]: uint8 is divided by 255,
other arrays already in [0, 1] are kept, anything else is scaled linearly
(digits, 0..16, are divided by 16).

Class augmentation (``augment_train``, on by default): the meta-training pool
also holds the rotated and mirrored versions of each meta-training class as
further classes (8 per class for square images, 4 otherwise), as is usual for
Omniglot; they are images of meta-training classes only. With only five
meta-training digits this matters: 0.68 against 0.54 meta-test accuracy
without it (seed 0, recommended settings below). Meta-test episodes are never
transformed.

What is meta-learned: the initialisation (MAML) and, with ``learn_lr=True``,
the inner learning rates (one per parameter element, Meta-SGD, or per tensor
with ``lr_granularity="tensor"``).

Recommended trainer settings (5-way 1-shot digits, see `RECOMMENDED`): T=5
inner SGD steps (the default inner_lr 0.2), meta-batch 4 episodes, Adam(1e-3)
outer optimiser, 1000 meta-steps: about a minute on two CPU cores, and a
meta-test accuracy of 0.59-0.68 over seeds 0-2 (200 test episodes), against
0.28-0.33 for the same adaptation from the random initialisation (chance:
0.2). For 28x28 Omniglot-like data, more capacity (``channels=64``,
``num_blocks=4``) is the usual choice.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from metaflow import data
from metaflow._checks import check_int, check_number
from metaflow.meta_params import LearnedLearningRates, Meta, MetaParams
from metaflow.task import Task, register

#: Trainer settings that meta-train the default task (5-way 1-shot digits)
#: in about a minute on two CPU cores: `BilevelTrainer`'s ``num_inner_steps``
#: and ``meta_batch_size``, the outer Adam learning rate, and the number of
#: meta-steps for `BilevelTrainer.fit`.
RECOMMENDED = {
    "num_inner_steps": 5,
    "meta_batch_size": 4,
    "outer_lr": 1e-3,
    "num_meta_steps": 1000,
}

_GRANULARITIES = ("scalar", "tensor", "element")


# --------------------------------------------------------------------- data
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits: images ``[1797, 8, 8]`` (0..16), labels.

  Raises:
    ImportError: scikit-learn is not installed.
  """
  try:
    from sklearn import datasets  # optional dependency
  except ImportError:
    raise ImportError(
        "fewshot_classification's default data set (the 8x8 digits bundled "
        "with scikit-learn) needs scikit-learn: pip install "
        "'mixflow-mg[examples]', or set data_path to an .npz file with "
        "'images' and 'labels'.") from None
  digits = datasets.load_digits()
  return np.asarray(digits.images), np.asarray(digits.target)


def load_npz_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
  """The ``images`` and ``labels`` arrays of an ``.npz`` file, unchecked.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: not a readable ``.npz`` file, or a key is missing.
  """
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"fewshot data_path {path!r} does not exist (or is "
                            "not a file).")
  try:
    archive = np.load(path, allow_pickle=False)
  except Exception as e:  # numpy raises several types for unreadable files.
    raise ValueError(f"fewshot data_path {path!r} is not a readable .npz file "
                     f"({type(e).__name__}: {e}).") from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(f"fewshot data_path {path!r} is not an .npz archive (it "
                     "holds a single array); save it with "
                     "np.savez(path, images=..., labels=...).")
  with archive:
    missing = [k for k in ("images", "labels") if k not in archive.files]
    if missing:
      raise ValueError(
          f"fewshot data_path {path!r} lacks the array(s) {', '.join(missing)} "
          f"(it has: {', '.join(archive.files) or 'none'}); expected 'images' "
          "[N, H, W] or [N, H, W, C] and 'labels' [N].")
    try:
      return archive["images"], archive["labels"]
    except Exception as e:  # e.g. object arrays (pickled data).
      raise ValueError(f"fewshot data_path {path!r}: cannot read its arrays "
                       f"({type(e).__name__}: {e}).") from None


def prepare_arrays(images: np.ndarray, labels: np.ndarray, source: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Checks shapes and dtypes; returns images ``[N, H, W, C]`` float32 in
  [0, 1] and labels ``[N]`` int64.

  Raises:
    ValueError: wrong shapes, dtypes or non-finite values (one line, naming
      ``source``).
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim not in (3, 4):
    raise ValueError(f"{source}: images must be [N, H, W] or [N, H, W, C], got "
                     f"shape {images.shape}.")
  if labels.ndim != 1:
    raise ValueError(f"{source}: labels must be 1-D [N], got shape "
                     f"{labels.shape}.")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{source}: {images.shape[0]} images but "
                     f"{labels.shape[0]} labels.")
  if images.shape[0] == 0 or 0 in images.shape[1:]:
    raise ValueError(f"{source}: images are empty (shape {images.shape}).")
  if not (np.issubdtype(labels.dtype, np.integer)
          and not np.issubdtype(labels.dtype, np.bool_)):
    raise ValueError(f"{source}: labels must be integers, got dtype "
                     f"{labels.dtype}.")
  if np.issubdtype(images.dtype, np.bool_) or not (
      np.issubdtype(images.dtype, np.integer)
      or np.issubdtype(images.dtype, np.floating)):
    raise ValueError(f"{source}: images must be uint8 or float, got dtype "
                     f"{images.dtype}.")
  if images.ndim == 3:
    images = images[..., None]
  if images.dtype == np.uint8:
    scaled = images.astype(np.float32) / 255.0
  else:
    values = images.astype(np.float64)
    if not np.all(np.isfinite(values)):
      raise ValueError(f"{source}: images contain NaN or infinite values.")
    low, high = min(values.min(), 0.0), max(values.max(), 1.0)
    scaled = ((values - low) / (high - low)).astype(np.float32)
  return scaled, labels.astype(np.int64)


def class_sizes(labels: np.ndarray) -> dict[int, int]:
  """``{label: number of examples}``."""
  values, counts = np.unique(labels, return_counts=True)
  return {int(v): int(c) for v, c in zip(values, counts)}


# ------------------------------------------------------------------ sampler
def dihedral_codes(height: int, width: int) -> tuple[int, ...]:
  """Codes of the shape-preserving symmetries of an ``height x width`` image
  (see `apply_dihedral`): all 8 for a square image, else 4."""
  return tuple(range(8)) if height == width else (0, 2, 4, 6)


def apply_dihedral(images: np.ndarray, code: int) -> np.ndarray:
  """``images [M, H, W, C]`` rotated by ``code % 4`` quarter turns, then
  mirrored left-right if ``code >= 4``; code 0 is the identity."""
  out = np.rot90(images, code % 4, axes=(1, 2))
  if code >= 4:
    out = out[:, :, ::-1]
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class EpisodeSampler:
  """``rng -> episode`` of N-way K-shot classification (picklable).

  The episode is ``{"support": {"x": [N*K, H, W, C] float32, "y": [N*K]
  int32}, "query": {"x": [N*Q, H, W, C], "y": [N*Q]}}``: N distinct classes
  drawn from the pool, labelled 0..N-1 by a random permutation, with K support
  and Q query images per class drawn without replacement (disjoint), shuffled.

  The pool is every pair ``(c, t)`` of a class ``c`` of ``classes`` and a code
  ``t`` of ``transforms`` (`apply_dihedral`, applied to all images of the
  pair): with more codes than the identity, rotated or mirrored versions of a
  class are further, distinct classes (class augmentation, as usual for
  Omniglot), and one episode may hold two versions of the same original
  class under different labels (which, in our digits runs, meta-trains better
  than allowing one version per original class).

  Attributes:
    images: ``[M, H, W, C]`` float32, only the images of ``classes``.
    labels: ``[M]`` their original labels.
    classes: the original label values in the pool.
    num_ways: N.
    num_shots: K.
    num_query: Q.
    transforms: the `apply_dihedral` codes; ``(0,)``: no augmentation.
  """
  images: np.ndarray
  labels: np.ndarray
  classes: tuple[int, ...]
  num_ways: int
  num_shots: int
  num_query: int
  transforms: tuple[int, ...] = (0,)

  @classmethod
  def of(cls, images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...],
         num_ways: int, num_shots: int, num_query: int,
         transforms: tuple[int, ...] = (0,)) -> "EpisodeSampler":
    """A sampler over the examples of ``classes`` only (the others dropped)."""
    keep = np.isin(labels, np.asarray(classes))
    return cls(images[keep], labels[keep], tuple(int(c) for c in classes),
               num_ways, num_shots, num_query, tuple(transforms))

  @property
  def pool_size(self) -> int:
    """Number of distinct (transformed) classes episodes are drawn from."""
    return len(self.classes) * len(self.transforms)

  def __call__(self, rng: np.random.Generator) -> dict:
    n, k, q = self.num_ways, self.num_shots, self.num_query
    chosen = rng.choice(self.pool_size, size=n, replace=False)
    new_labels = rng.permutation(n)
    support, query = [], []
    for pair, new_label in zip(chosen, new_labels):
      original = self.classes[pair // len(self.transforms)]
      transform = self.transforms[pair % len(self.transforms)]
      members = np.flatnonzero(self.labels == original)
      picked = rng.choice(members, size=k + q, replace=False)
      images = apply_dihedral(self.images[picked], transform)
      support.append((images[:k], np.full(k, new_label)))
      query.append((images[k:], np.full(q, new_label)))

    def assemble(parts):
      images = np.concatenate([p[0] for p in parts])
      labels = np.concatenate([p[1] for p in parts])
      order = rng.permutation(images.shape[0])
      return {"x": np.ascontiguousarray(images[order], dtype=np.float32),
              "y": labels[order].astype(np.int32)}

    return {"support": assemble(support), "query": assemble(query)}


# -------------------------------------------------------------------- model
class Conv3x3(nnx.Module):
  """A 3x3 SAME convolution computed as one matrix product over the nine
  shifted copies of the zero-padded input (im2col).

  Same result as ``nnx.Conv(..., (3, 3), padding="SAME")``, but when episodes
  are vmapped (each with its own adapted kernel) it becomes a batched matrix
  product instead of a grouped convolution, which is much faster on CPU.
  """

  def __init__(self, in_features: int, out_features: int, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(
        init(rngs.params(), (9 * in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    height, width = x.shape[-3], x.shape[-2]
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)])
    patches = jnp.concatenate(
        [padded[..., i:i + height, j:j + width, :]
         for i in range(3) for j in range(3)], axis=-1)
    return patches @ self.kernel[...] + self.bias[...]


class ConvNet(nnx.Module):
  """``[B, H, W, C] -> [B, num_classes]`` logits.

  ``num_blocks`` blocks of 3x3 SAME convolution, GroupNorm (one group: a
  layer norm over each example's feature map; no batch statistics) and ReLU,
  each followed by a 2x2 max-pool while the feature map stays at least 2x2;
  then a linear head on the flattened features.
  """

  def __init__(self, image_shape: tuple[int, int, int], num_classes: int,
               channels: int, num_blocks: int, rngs: nnx.Rngs):
    height, width, in_channels = image_shape
    dtype = jnp.result_type(float)  # float64 under jax.enable_x64
    convs, norms, pools = [], [], []
    for _ in range(num_blocks):
      convs.append(Conv3x3(in_channels, channels, rngs))
      norms.append(nnx.GroupNorm(channels, num_groups=1, param_dtype=dtype,
                                 rngs=rngs))
      pool = height >= 4 and width >= 4
      if pool:
        height, width = height // 2, width // 2
      pools.append(pool)
      in_channels = channels
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.pools = tuple(pools)
    self.head = nnx.Linear(height * width * channels, num_classes,
                           param_dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv, norm, pool in zip(self.convs, self.norms, self.pools):
      x = jax.nn.relu(norm(conv(x)))
      if pool:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return self.head(x.reshape(x.shape[0], -1))


# --------------------------------------------------------------------- task
def _class_tuple(name: str, value: Any) -> tuple[int, ...]:
  try:
    classes = tuple(value)
  except TypeError:
    raise ValueError(f"fewshot {name} must be a tuple of label values, got "
                     f"{value!r}.") from None
  if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
             for c in classes):
    raise ValueError(f"fewshot {name} must hold integer label values, got "
                     f"{value!r}.")
  classes = tuple(int(c) for c in classes)
  if len(set(classes)) != len(classes):
    raise ValueError(f"fewshot {name} lists a class twice: {classes}.")
  return classes


@register("fewshot_classification")
@dataclasses.dataclass(frozen=True)
class FewShotClassification(Task):
  """N-way K-shot image classification; see the module docstring.

  The data are loaded and checked when the task is constructed.

  Attributes:
    data_path: an ``.npz`` file with ``images`` and ``labels``; empty for
      scikit-learn's 8x8 digits.
    train_classes: label values of the meta-training classes (split
      ``"train"``).
    test_classes: label values of the meta-test classes (splits
      ``"validation"`` and ``"test"``); disjoint from ``train_classes``.
    num_ways: N, classes per episode.
    num_shots: K, support images per class.
    num_query: Q, query images per class.
    channels: convolution channels of each block.
    num_blocks: convolutional blocks.
    inner_lr: the inner SGD learning rate (the initial one if learned).
    learn_lr: also learn the inner learning rates (Meta-SGD).
    lr_granularity: ``"element"`` (Meta-SGD), ``"tensor"`` or ``"scalar"``.
    augment_train: add the rotations and mirror images of the meta-training
      classes to the meta-training pool as further classes.
    proximal: lam >= 0: iMAML's ``lam/2 ||theta - theta0||^2`` added to the
      inner loss (needed by strategy ``implicit``; 0: plain MAML).

  Raises:
    FileNotFoundError: ``data_path`` does not exist.
    ImportError: no ``data_path`` and scikit-learn is not installed.
    ValueError: a bad setting or data file (one line saying what is wrong).
  """
  data_path: str = ""
  train_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
  test_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
  num_ways: int = 5
  num_shots: int = 1
  num_query: int = 15
  channels: int = 16
  num_blocks: int = 3
  inner_lr: float = 0.2
  learn_lr: bool = False
  lr_granularity: str = "element"
  augment_train: bool = True
  proximal: float = 0.0

  def __post_init__(self):
    for name, low in (("num_ways", 2), ("num_shots", 1), ("num_query", 1),
                      ("channels", 1), ("num_blocks", 1)):
      object.__setattr__(self, name, check_int(f"fewshot {name}",
                                              getattr(self, name), low))
    object.__setattr__(self, "inner_lr", check_number(
        "fewshot inner_lr", self.inner_lr, strict=True))
    if self.lr_granularity not in _GRANULARITIES:
      raise ValueError(f"fewshot lr_granularity must be one of "
                       f"{_GRANULARITIES}, got {self.lr_granularity!r}.")
    if not isinstance(self.data_path, str):
      raise ValueError(f"fewshot data_path must be a string, got "
                       f"{self.data_path!r}.")
    train = _class_tuple("train_classes", self.train_classes)
    test = _class_tuple("test_classes", self.test_classes)
    object.__setattr__(self, "train_classes", train)
    object.__setattr__(self, "test_classes", test)
    shared = sorted(set(train) & set(test))
    if shared:
      raise ValueError(
          "fewshot train_classes and test_classes must be disjoint (meta-test "
          "classes are never seen in meta-training); both contain "
          f"{', '.join(map(str, shared))}.")

    if self.data_path:
      source = f"fewshot data_path {self.data_path!r}"
      images, labels = prepare_arrays(*load_npz_arrays(self.data_path), source)
    else:
      images, labels = prepare_arrays(*load_digits_arrays(), "digits")
      source = "the digits data set"
    sizes = class_sizes(labels)
    need = self.num_shots + self.num_query
    for name, pool in (("train_classes", train), ("test_classes", test)):
      absent = [c for c in pool if c not in sizes]
      if absent:
        raise ValueError(
            f"fewshot {name} lists label(s) {', '.join(map(str, absent))} that "
            f"{source} does not have (it has {len(sizes)} classes, labels "
            f"{min(sizes)}..{max(sizes)}).")
      if len(pool) < self.num_ways:
        raise ValueError(
            f"fewshot {name} has {len(pool)} classes; {self.num_ways}-way "
            f"episodes need at least {self.num_ways}.")
      small = [c for c in pool if sizes[c] < need]
      if small:
        others = (f" ({len(small)} classes of {name} are too small)"
                  if len(small) > 1 else "")
        raise ValueError(
            f"fewshot: class {small[0]} of {source} has {sizes[small[0]]} "
            f"examples; {self.num_shots}-shot episodes with {self.num_query} "
            f"query images per class need {need} per class{others}.")
    transforms = (dihedral_codes(*images.shape[1:3]) if self.augment_train
                  else (0,))
    samplers = {
        "train": EpisodeSampler.of(images, labels, train, self.num_ways,
                                   self.num_shots, self.num_query, transforms),
        "test": EpisodeSampler.of(images, labels, test, self.num_ways,
                                  self.num_shots, self.num_query),
    }
    object.__setattr__(self, "_samplers", samplers)
    object.__setattr__(self, "_image_shape", tuple(images.shape[1:]))

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of the images."""
    return self._image_shape

  def sampler(self, split: str) -> EpisodeSampler:
    """The episode sampler of ``split`` ("train": meta-training classes;
    "validation" and "test": meta-test classes)."""
    data.check_split(split)
    return self._samplers["train" if split == "train" else "test"]

  def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return ConvNet(self.image_shape, self.num_ways, self.channels,
                   self.num_blocks, rngs)

  def inner_loss(self, model: nnx.Module, meta: Meta, batch: dict) -> jax.Array:
    x = batch["x"]
    losses = optax.softmax_cross_entropy_with_integer_labels(model(x),
                                                             batch["y"])
    return meta.weighted_mean(losses, x.reshape(x.shape[0], -1))

  def eval_metrics(self, model: nnx.Module, meta: Meta, batch: dict
                   ) -> dict[str, jax.Array]:
    del meta
    predictions = jnp.argmax(model(batch["x"]), axis=-1)
    correct = (predictions == batch["y"]).astype(jnp.float32)
    return {"accuracy": jnp.mean(correct)}

  def meta_params(self) -> MetaParams:
    lr = (LearnedLearningRates(self.inner_lr, granularity=self.lr_granularity)
          if self.learn_lr else self.inner_lr)
    return MetaParams(learn_init=True, learning_rate=lr,
                      proximal=self.proximal)

  def dataset(self, split: str, seed: int) -> grain.MapDataset:
    return data.episodes(self.sampler(split), seed, split)
